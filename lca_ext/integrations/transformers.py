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

* ``lca_data``: the LCA set, in the forms ``Trainer(train_dataset=...)`` takes:
  a list of example dicts (``{"input_ids": 1-d, "labels": ...}``), a
  ``datasets.Dataset`` or a torch ``Dataset`` of examples.  They are read as
  the trainer reads an eval set (:func:`trainer_loader`): the trainer's data
  collator, columns its model's ``forward`` does not take dropped
  (``remove_unused_columns``), ``per_device_eval_batch_size`` examples per batch
  (``batch_size=`` overrides it), in order, the last partial batch kept, and no
  random number drawn.  Ready batches pass as they are: a DataLoader, an
  ``(inputs, targets)`` tensor pair or a list of batch dicts (2-d input_ids).
  ``eval_sets={"val": ...}`` are read the same way; ``data_collator=`` replaces
  the trainer's collator for these sets.
* Every other keyword is an ``LCATracker`` option (``num_classes``, ``store``,
  ``rule``, ``schedule``, ``frames``, ...).  ``num_classes=model.config.num_labels``
  gives per-class LCA of a classification set (each class's share of the loss,
  the shares adding up to it; labels -100 are ignored).
* ``batch_loss``: default :func:`hf_batch_loss`, ``model(**batch).loss`` weighted
  by the number of labels the mean is over (label tokens for language models,
  labelled examples for classification), so the LCA loss is the label-weighted
  mean over the whole set.  On the first (forward-only) pass each batch is
  checked before it runs
  (:func:`check_hf_batch`): a label outside the model's range (the vocabulary,
  or ``model.config.num_labels``), a single unbatched example or a batch with
  no counted label is refused naming the set, the batch and the value.
* Checkpoints (with ``store=``): at every checkpoint save (``on_save``) the
  per-parameter state is saved in the store and kept (``tracker.save_state``,
  tagged ``checkpoint-<global step>``; states whose checkpoint directory the
  trainer has since rotated away are dropped).  On
  ``trainer.train(resume_from_checkpoint=...)`` the store is resumed and, if
  it ran past the checkpoint, cut back to the state saved with it (identified
  by the restored parameters' fingerprint; ``lca_ext.truncate_run``, with a
  warning), so the finished run holds exactly the steps of an uninterrupted
  one.  A checkpoint the store holds no state for (saved without this
  callback, or from another run) is refused with a RunStoreError saying why.
  Without a store the LCA of a resumed train() starts at the checkpoint (step
  labels from its global step, statistics from zero; warned); a callback whose
  in-memory run went past the checkpoint refuses (it cannot be cut back).
* Logging: the ``lca/*`` values reach the trainer's ``log_history`` and any
  callback after this one.  TensorBoard / W&B / MLflow (``report_to``) are
  callbacks the trainer registers *before* user callbacks, so to reach them,
  register with ``LCACallback.install(trainer, ...)``, which puts the callback
  first.
"""
from __future__ import annotations

import collections.abc as abc
import inspect
import random
from typing import Callable, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..tracker import LCATracker
from .metrics import end_of_run, step_metrics
from .resume import resumed as resume_store
from .resume import start_new_run_at, tracker_on_resume

try:
    from transformers import TrainerCallback
except ImportError as err:  # pragma: no cover - exercised without the extra
    raise ImportError("lca_ext.integrations.transformers needs transformers: "
                      "pip install 'lca_ext[transformers]'") from err


def label_count(model, labels: torch.Tensor):
    """The number of labels ``model(**batch).loss`` averages over: label tokens
    that are not -100 (causal LMs shift labels by one, so the first position
    of each row never counts); for one label per example, the examples whose
    label is not -100 (single-label classification: torch's cross entropy
    ignores -100), or every example for float labels (regression)."""
    if labels.dim() < 2:
        return labels.shape[0] if labels.is_floating_point() else (labels != -100).sum()
    # a decoder-only LM shifts its labels; an encoder-decoder (Bart, T5), whose
    # loss function may carry the same name, scores every label position
    causal = ("CausalLM" in getattr(getattr(model, "loss_function", None), "__name__", "")
              and not getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    kept = labels[..., 1:] if causal else labels
    return (kept != -100).sum()


def hf_batch_loss(model, batch):
    """``(model(**batch).loss, weight)``: the weight is the number of labels the
    model's mean runs over (:func:`label_count`), so the LCA loss is the
    label-weighted mean over the whole set: token-weighted for language models,
    and for classification with some labels -100 the mean over the labelled
    examples (what per-class LCA needs: a class's share counts its own labels)."""
    loss = model(**batch).loss
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if labels is None:
        raise ValueError("lca_ext: hf_batch_loss needs 'labels' in every LCA batch (the "
                         "model computes no loss without them); pass batch_loss=f for "
                         "other batches")
    return loss, label_count(model, labels)


def label_range(model):
    """``(n, where)``: the model's loss takes integer labels in 0..n-1 (or -100),
    or None when it cannot tell.  A model with an output embedding (a language
    model head) takes token ids below its row count (the vocabulary); a
    ``*Classification`` model takes ``model.config.num_labels`` classes (when
    more than one: one is regression).  Other models are not checked."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    weight = getattr(head, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        return int(weight.shape[0]), "the vocabulary (rows of the model's output embedding)"
    n = getattr(getattr(model, "config", None), "num_labels", None)
    if "Classification" in type(model).__name__ and isinstance(n, int) and n > 1:
        return n, "model.config.num_labels"
    return None


def check_hf_batch(model, batch) -> Optional[str]:
    """What is wrong with one LCA batch for :func:`hf_batch_loss`, or None: no
    labels, a single unbatched example, an integer label outside the model's
    range (:func:`label_range`), or no label that counts (its mean would be
    0/0).  The evaluator runs it on every batch of the first pass, before the
    batch's forward, and names the set and the batch (lca_ext.evaluate)."""
    labels = batch.get("labels") if hasattr(batch, "get") else None
    if not isinstance(labels, torch.Tensor):
        return ("has no 'labels' tensor (hf_batch_loss takes model(**batch).loss, which "
                "needs labels); add labels to the set, or pass batch_loss=f")
    if labels.dim() == 0:
        return ("is a single example (a 0-d 'labels'), not a batch: pass a list of "
                "examples to LCACallback(lca_data=...), which collates them, or batches "
                "(e.g. a DataLoader with a collate_fn) to LCATracker")
    if not labels.is_floating_point():
        limits = label_range(model)
        if limits is not None:
            n, where = limits
            bad = labels[(labels != -100) & ((labels < 0) | (labels >= n))]
            if bad.numel():
                return (f"has label {int(bad[0])}, outside 0..{n - 1} ({where}: {n}); "
                        f"every label must lie in 0..{n - 1} or be -100 (ignored): fix the "
                        "set's labels, or the model's label count")
    if int(label_count(model, labels)) == 0:
        return ("has no label the loss counts (every label -100, or, for a causal LM, "
                "labels only in the first position, which its shift drops): its mean "
                "loss would be 0/0; drop that batch from the set")
    return None


hf_batch_loss.check_batch = check_hf_batch


def signature_columns(model, args) -> List[str]:
    """The columns the Trainer keeps (``Trainer._set_signature_columns_if_needed``):
    the arguments of the model's ``forward``, "label", "label_ids" and the label
    names (``args.label_names``, else the model class's own)."""
    inspected = model
    if hasattr(model, "get_base_model"):            # a PEFT model
        inspected = model.get_base_model()
    forward = getattr(inspected, "_original_forward", inspected.forward)
    columns = list(inspect.signature(forward).parameters)
    names = getattr(args, "label_names", None)
    if names is None:
        try:
            from transformers.utils import find_labels
            names = find_labels(type(inspected))
        except ImportError:  # pragma: no cover - very old transformers
            names = ["labels"]
    return columns + list(set(["label", "label_ids"] + list(names)))


def _is_hf_dataset(data) -> bool:
    try:
        import datasets
    except ImportError:
        return False
    return isinstance(data, datasets.Dataset)


def _is_example_list(data) -> bool:
    """A list (or tuple) of example dicts, as ``Trainer(train_dataset=...)`` takes:
    every list of mappings except one whose first item's ``input_ids`` is 2-d
    (a list of ready batches, read as batches)."""
    if not isinstance(data, (list, tuple)) or not data or \
            not isinstance(data[0], abc.Mapping):
        return False
    ids = data[0].get("input_ids")
    return not (hasattr(ids, "ndim") and ids.ndim >= 2)


def trainer_loader(data, args, model, collator=None, *, name: str = "lca_data",
                   batch_size: Optional[int] = None):
    """The set ``data`` read as the Trainer reads an eval set
    (``Trainer.get_eval_dataloader``), in order and drawing no random number.

    * ``data`` holding examples, a ``datasets.Dataset``, a torch ``Dataset``
      (or ``IterableDataset``) of examples, or a list of example dicts (dicts
      whose ``input_ids`` is not 2-d): a ``DataLoader`` of ``batch_size`` (default
      ``args.per_device_eval_batch_size``) examples per batch, no shuffling,
      ``collator`` (default ``transformers.default_data_collator``), the last
      partial batch kept (the LCA set is the whole set: ``dataloader_drop_last``
      is not applied), no workers (the set is re-read on every pass).  Columns
      the model's ``forward`` does not take are dropped as the Trainer drops them
      when ``args.remove_unused_columns`` (from a ``datasets.Dataset``
      beforehand, otherwise from each example before the collator);
    * ready batches: a ``DataLoader``, an ``(inputs, targets)`` tensor pair, a
      list of batch dicts (2-d ``input_ids``) or any other re-iterable: as they
      are (lca_ext.lca_set).
    """
    if isinstance(data, DataLoader) or not (
            _is_hf_dataset(data) or isinstance(data, Dataset) or _is_example_list(data)):
        return data
    if collator is None:
        from transformers import default_data_collator as collator
    size = batch_size or args.per_device_eval_batch_size
    remove = getattr(args, "remove_unused_columns", True)
    # (removing a datasets.Dataset's columns may draw a random fingerprint)
    state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=[]):
            if remove:
                columns = signature_columns(model, args)
                if _is_hf_dataset(data):
                    unused = [c for c in data.column_names if c not in columns]
                    if len(unused) == len(data.column_names):
                        raise ValueError(
                            f"lca_ext: {name}: none of its columns {data.column_names} is "
                            f"an argument of {type(model).__name__}.forward ({columns}); "
                            "tokenise it like the training set, or pass "
                            "remove_unused_columns=False in TrainingArguments")
                    data = data.remove_columns(unused) if unused else data
                else:
                    from transformers.trainer_utils import RemoveColumnsCollator
                    collator = RemoveColumnsCollator(collator, columns)
            return DataLoader(data, batch_size=size, shuffle=False, collate_fn=collator,
                              num_workers=0, drop_last=False)
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])


class _CheckpointTracker(LCATracker):
    """The callback's tracker: a resume cuts the store back to the checkpoint."""
    resume_cuts_back = True


class LCACallback(TrainerCallback):
    """Tracks LCA of every optimizer step of a ``transformers.Trainer`` run."""

    def __init__(self, lca_data, batch_loss: Optional[Callable] = None, *,
                 log_layers: bool = False, data_collator: Optional[Callable] = None,
                 **tracker_kwargs):
        self.lca_data = lca_data
        self.data_collator = data_collator
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

    def _data(self, data, args, model, train_dataloader, name):
        collator = self.data_collator
        if collator is None:
            collator = getattr(train_dataloader, "collate_fn", None)
            # the Trainer wraps its collator to drop unused columns: take the collator
            collator = getattr(collator, "data_collator", collator)
        return trainer_loader(data, args, model, collator, name=name,
                              batch_size=self.tracker_kwargs.get("batch_size"))

    def on_train_begin(self, args, state, control, model=None, optimizer=None,
                       train_dataloader=None, **kwargs):
        if self._handle is not None:   # a train() that raised never reached on_train_end
            self._handle.remove()
            self._handle = None
        resumed = state.global_step > 0     # train(resume_from_checkpoint=...)
        store = self.tracker_kwargs.get("store")
        if resumed:
            self.tracker = tracker_on_resume(self.tracker, store, state.global_step,
                                             "lca_ext: LCACallback")
        if self.tracker is None:
            kw = dict(self.tracker_kwargs)
            if resumed and store is not None:
                kw = resume_store(kw)
            if kw.get("eval_sets"):
                kw["eval_sets"] = {k: self._data(v, args, model, train_dataloader,
                                                 f"eval_sets[{k!r}]")
                                   for k, v in kw["eval_sets"].items()}
            self.tracker = _CheckpointTracker(
                model, lca_data=self._data(self.lca_data, args, model, train_dataloader,
                                           "lca_data"),
                batch_loss=self.batch_loss, **kw)
            if resumed:
                start_new_run_at(self.tracker, state.global_step, "lca_ext: LCACallback")
        self._handle = self.tracker.attach(optimizer)

    def on_save(self, args, state, control, **kwargs):
        """A checkpoint was saved: keep the per-parameter state with it."""
        if self.tracker is None or self.tracker.store_link is None:
            return
        import os
        tag = f"checkpoint-{state.global_step}"
        self.tracker.save_state(tag=tag)
        writer = self.tracker.store_link.writer
        if writer is not None:   # drop the states of checkpoints the trainer rotated away
            writer.unpin(lambda p: not str(p.get("tag") or "").startswith("checkpoint-")
                         or p["tag"] == tag
                         or os.path.isdir(os.path.join(args.output_dir, p["tag"])))

    def on_train_end(self, args, state, control, **kwargs):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        if self.tracker is not None:      # the end-of-run line: the doubtful steps
            end_of_run(self.tracker)

    def on_log(self, args, state, control, logs=None, **kwargs):
        last = self.tracker.last if self.tracker is not None else None
        if last is None or logs is None or self.tracker.tracked_count == self._logged:
            return
        self._logged = self.tracker.tracked_count
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
