"""LCA in a Hugging Face ``transformers.Trainer`` run (transformers >= 4.46).

    from lca_ext.integrations.transformers import LCACallback
    lca = LCACallback(lca_data=tokenised_subset)          # + any LCATracker argument
    trainer = Trainer(model, args, train_dataset=..., callbacks=[lca])
    trainer.train()
    run = lca.result()                                     # the Run (plain data)

What it does: at ``on_train_begin`` it builds an ``LCATracker`` on the trainer's
model and attaches it to the trainer's optimizer (``tracker.attach``: torch's
step hooks on the optimizer inside accelerate's wrapper), so every optimizer
step is tracked (θ_t right before the update, the allocation right after); a
step that mixed precision skips (inf gradients) records nothing; gradient
accumulation and clipping need nothing.  At every log it adds ``lca/*`` values
of the last tracked step to the trainer's logs.

* ``lca_data``: a Dataset of tokenised examples (model inputs and ``labels``
  only: collated with the trainer's data collator, ``per_device_eval_batch_size``
  per batch, in order) or a DataLoader / re-iterable of ready batches.
* ``batch_loss``: default :func:`hf_batch_loss`, ``model(**batch).loss`` weighted
  by the number of label tokens the mean is over, so the LCA loss is the
  token-weighted mean over the whole set.
* Logging: the ``lca/*`` values reach the trainer's ``log_history`` and any
  callback after this one.  TensorBoard / W&B / MLflow (``report_to``) are
  callbacks the trainer registers *before* user callbacks, so to reach them,
  register with ``LCACallback.install(trainer, ...)``, which puts the callback
  first.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..tracker import LCATracker
from .metrics import step_metrics

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError("lca_ext.integrations.transformers needs transformers: "
                      "pip install 'lca_ext[transformers]'") from err


def hf_batch_loss(model, batch):
    """``(model(**batch).loss, weight)``: the weight is the number of label tokens
    the model's mean runs over (causal LMs shift labels by one; -100 is ignored),
    or the number of examples for one label per example."""
    loss = model(**batch).loss
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is None:
        raise ValueError("lca_ext: hf_batch_loss needs 'labels' in every LCA batch (the "
                         "model computes no loss without them); pass batch_loss=f for "
                         "other batches")
    if labels.dim() < 2:
        return loss, labels.shape[0]
    causal = "CausalLM" in getattr(getattr(model, "loss_function", None), "__name__", "")
    kept = labels[..., 1:] if causal else labels
    return loss, (kept != -100).sum()


class LCACallback(TrainerCallback):
    """Tracks LCA of every optimizer step of a ``transformers.Trainer`` run."""

    def __init__(self, lca_data, batch_loss: Optional[Callable] = None, *,
                 log_layers: bool = False, **tracker_kwargs):
        self.lca_data = lca_data
        self.log_layers = log_layers
        self.batch_loss = batch_loss or hf_batch_loss
        self.tracker_kwargs = tracker_kwargs
        self.tracker: Optional[LCATracker] = None
        self._handle = None
        self._logged = 0

    @classmethod
    def install(cls, trainer, lca_data, **kwargs) -> "LCACallback":
        """Adds the callback before the trainer's loggers (so ``report_to``
        receives the ``lca/*`` values) and returns it."""
        cb = cls(lca_data, **kwargs)
        trainer.callback_handler.callbacks.insert(0, cb)
        return cb

    def _data(self, args, train_dataloader):
        data = self.lca_data
        if isinstance(data, torch.utils.data.Dataset) or hasattr(data, "column_names"):
            collate = getattr(train_dataloader, "collate_fn", None)
            return torch.utils.data.DataLoader(
                data, batch_size=args.per_device_eval_batch_size, shuffle=False,
                collate_fn=collate)
        return data

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        if self.tracker is None:
            self.tracker = LCATracker(model, lca_data=self._data(args, train_dataloader),
                                      batch_loss=self.batch_loss, **self.tracker_kwargs)
        self._handle = self.tracker.attach(optimizer)

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        last = self.tracker.last if self.tracker is not None else None
        if last is None or logs is None or self.tracker._tracked_count == self._logged:
            return
        self._logged = self.tracker._tracked_count
        t = self.tracker
        layers = (t.params.layer_of, t.params.layer_names) if self.log_layers else (None, None)
        values = step_metrics(last, [o.name for o in t.objectives], *layers)
        values["lca/step"] = int(last["step"])           # the tracked optimizer step
        logs.update(values)
        if state.log_history:
            state.log_history[-1].update(values)

    def result(self):
        """The tracked run so far (``lca_ext.Run``)."""
        if self.tracker is None:
            raise RuntimeError("lca_ext: LCACallback has not started (trainer.train() "
                               "builds the tracker)")
        return self.tracker.result()
