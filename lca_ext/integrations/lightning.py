"""PyTorch Lightning: LCA of every optimiser step that ``Trainer.fit`` takes.

    from lca_ext.integrations.lightning import LCACallback

    lca = LCACallback(nn.functional.cross_entropy, lca_data=(x_val, y_val))
    pl.Trainer(callbacks=[lca], ...).fit(module, train_loader)
    run = lca.result()            # an lca_ext.Run, as LCATracker.result() gives

Needs Lightning >= 2.0: the ``lightning`` package (``lightning.pytorch``) or the
standalone ``pytorch_lightning``; ``pip install lightning``.
"""
from __future__ import annotations

import inspect
from typing import Callable, Dict, List, Optional

import numpy as np
import torch

try:
    import lightning.pytorch as pl
except ImportError as _err:
    try:
        import pytorch_lightning as pl
    except ImportError:
        raise ImportError(
            "lca_ext.integrations.lightning needs PyTorch Lightning: "
            "pip install lightning  (or pip install lca_ext[lightning])") from _err

if int(pl.__version__.split(".")[0]) < 2:
    # the hook signatures used below (no optimizer_idx) are Lightning 2's
    raise ImportError(f"lca_ext.integrations.lightning needs Lightning >= 2.0; found "
                      f"{pl.__name__} {pl.__version__} (pip install -U lightning)")

from ..tracker import LCATracker, Run
from .metrics import end_of_run, step_metrics
from .resume import resumed, start_new_run_at, tracker_on_resume

__all__ = ["LCACallback"]


class _CheckpointTracker(LCATracker):
    """The callback's tracker: a resume cuts the store back to the checkpoint."""
    resume_cuts_back = True


class _StepSkipped(Exception):
    """Thrown into an open ``tracker.step()`` block: the step did not happen."""


def _to_device(data, device: torch.device):
    # an (inputs, targets) tensor pair follows the model; batch iterables are
    # the caller's to place
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        return tuple(t.to(device) for t in data)
    return data


class LCACallback(pl.Callback):
    """Loss Change Allocation of the training steps of a LightningModule.

    ``LCACallback(loss_fn, lca_data, *, log=True, log_layers=True, **tracker_kwargs)``

    loss_fn:     ``loss_fn(pl_module(x), y)`` -> the mean loss of a batch; the
                 LightningModule is the model, so its ``forward`` must give the
                 outputs ``loss_fn`` expects
    lca_data:    the fixed LCA set, as for ``LCATracker`` (an (inputs, targets)
                 tensor pair, or an iterable of (x, y) batches)
    log:         after every tracked step, send a few scalars to each of the
                 trainer's loggers (``logger.log_metrics``; nothing without one)
    log_layers:  include the LCA of each layer ("lca/train/layer/<module path>")
    tracker_kwargs: passed to ``LCATracker`` unchanged (eval_sets, schedule,
                 store, num_classes, method, rtol, ...); checked here, so a
                 misspelt option fails when the callback is made

    The tracker is built in ``on_fit_start`` (after the strategy has moved the
    module to its device) and kept as ``.tracker``; ``.result()`` is
    ``tracker.result()``.  Tensor-pair LCA / eval sets are moved to the module's
    device.  A second ``fit`` with the same callback and module continues the run.

    One optimiser step is one tracker step: ``on_before_optimizer_step`` (the
    closure, i.e. training_step and backward, has run and θ is still θ_t)
    begins it; ``on_train_batch_end`` ends and allocates it.  A batch that only
    accumulates gradients calls neither, and costs nothing.  Decisions:

    * no tracked parameter has a gradient (``training_step`` returned None, so
      Lightning skipped backward): no torch optimiser moves such parameters, so
      no step is begun: nothing is recorded and the schedule does not advance;
    * the optimiser's ``step`` never ran although the hook fired (``GradScaler``
      found inf/NaN gradients): known from a step post-hook on the optimiser;
      the step is closed without recording (θ did not move, so the cached
      g(θ_t) stays valid and costs nothing next step);
    * an optimiser without ``register_step_post_hook`` is assumed to have
      stepped (a skipped step is then recorded as a zero change);
    * hook fired again before the optimiser stepped (LBFGS evaluates its
      closure several times in one step): still the same step, θ_t stands;
      after it stepped (manual optimisation with several ``opt.step()`` per
      batch): the previous step is allocated and a new one begun;
    * an exception during fit closes an open step without recording it.

    Record indices (``run.steps``) count the optimiser steps that happened;
    ``.trainer_steps`` holds ``trainer.global_step - 1`` of each tracked step,
    the step the metrics are logged at.  Under a distributed strategy every
    rank builds its tracker and takes the steps in lockstep, as LCATracker's
    ``distributed=`` handling expects (see lca_ext.distributed: DDP, FSDP2;
    rank 0 writes the store); Lightning's loggers write from rank 0.  The
    tracker never writes the parameters, their gradients, buffers or the RNG
    streams, so training is bitwise the same with or without the callback.

    Checkpoints (with ``store=``): at every checkpoint save
    (``on_save_checkpoint``) the per-parameter state is saved in the store and
    kept (``tracker.save_state``, tagged ``lightning-step-<global step>``; about
    18 bytes a parameter each).  ``keep_states=k`` keeps the latest k of them
    (match ModelCheckpoint's ``save_top_k`` of a step-based rotation); None
    keeps every one, as the callback cannot see which files ModelCheckpoint
    deleted.  ``trainer.fit(..., ckpt_path=...)`` resumes the
    store (``resume=True`` is implied) once the checkpoint is restored (at
    ``on_train_start``) and, if the store ran past the checkpoint, cuts it back
    to the state saved with it (found by the restored parameters' fingerprint;
    with a warning), so the run ends with exactly the steps of an uninterrupted
    one.  A checkpoint the store holds no state for is refused with a
    RunStoreError saying why.  Without a store, the LCA state is not in the
    checkpoint: a resumed fit starts a new in-memory run at the checkpoint's
    step (warned); a callback whose in-memory run went past it refuses.
    """

    def __init__(self, loss_fn: Callable, lca_data, *, log: bool = True,
                 log_layers: bool = True, keep_states: Optional[int] = None,
                 **tracker_kwargs):
        super().__init__()
        try:  # a bad option should fail here, not steps into a fit
            inspect.signature(LCATracker).bind(None, loss_fn, lca_data, **tracker_kwargs)
        except TypeError as err:
            raise TypeError(f"lca_ext.LCACallback: {err} (the options are "
                            "LCATracker's)") from None
        if keep_states is not None and not (isinstance(keep_states, int)
                                            and not isinstance(keep_states, bool)
                                            and keep_states >= 1):
            raise ValueError(f"lca_ext.LCACallback: keep_states={keep_states!r}; expected "
                             "an int >= 1 (checkpoint states kept in the store) or None")
        self.keep_states = keep_states
        self.loss_fn = loss_fn
        self.lca_data = lca_data
        self.tracker_kwargs = tracker_kwargs
        self.log_metrics = log
        self.log_layers = log_layers
        self.tracker: Optional[LCATracker] = None
        self.trainer_steps: List[int] = []
        self._step_cm = None        # the open ``tracker.step()`` block, if any
        self._stepped = False       # an optimiser's step ran since the block opened
        self._blind = False         # ... or one that cannot tell us took part
        self._hooks: Dict[int, object] = {}   # id(optimizer) -> post-hook handle

    # -- public --------------------------------------------------------------

    def result(self) -> Run:
        """Everything tracked so far (``LCATracker.result()``)."""
        if self.tracker is None:
            raise RuntimeError("lca_ext.LCACallback.result: nothing tracked; no fit has "
                               "started with this callback")
        return self.tracker.result()

    # -- Lightning hooks -----------------------------------------------------

    def on_fit_start(self, trainer, pl_module) -> None:
        self._close(record=False)
        if getattr(trainer, "ckpt_path", None) is not None:
            return     # resuming: built at on_train_start, once the checkpoint is restored
        self._build(pl_module)

    def on_train_start(self, trainer, pl_module) -> None:
        if getattr(trainer, "ckpt_path", None) is None:
            return
        store = self.tracker_kwargs.get("store")
        self.tracker = tracker_on_resume(self.tracker, store, trainer.global_step,
                                         "lca_ext.LCACallback (Lightning)")
        fresh = self.tracker is None
        self._build(pl_module, resume=store is not None)
        if fresh:
            start_new_run_at(self.tracker, trainer.global_step,
                             "lca_ext.LCACallback (Lightning)")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        """A checkpoint is being saved: keep the per-parameter state with it."""
        if self.tracker is None or self.tracker.store_link is None:
            return
        if self._step_cm is not None:
            import warnings
            warnings.warn("lca_ext.LCACallback: a checkpoint was saved inside an optimizer "
                          "step; the store keeps no state for it, so a resume from it will "
                          "be refused", RuntimeWarning, stacklevel=2)
            return
        self.tracker.save_state(tag=f"lightning-step-{trainer.global_step}",
                                keep=self.keep_states)

    def _build(self, pl_module, resume: bool = False) -> None:
        if self.tracker is None:
            kwargs = dict(self.tracker_kwargs)
            device = pl_module.device
            if kwargs.get("eval_sets"):
                kwargs["eval_sets"] = {k: _to_device(v, device)
                                       for k, v in kwargs["eval_sets"].items()}
            if resume:
                kwargs = resumed(kwargs)
            self.tracker = _CheckpointTracker(pl_module, self.loss_fn,
                                              _to_device(self.lca_data, device), **kwargs)
        elif self.tracker.model is not pl_module:
            raise RuntimeError("lca_ext.LCACallback: this callback already tracks another "
                               "LightningModule; use a new LCACallback per module")
        self._objectives = [o.name for o in self.tracker.objectives]
        self._layer_of = np.asarray(self.tracker.params.layer_of)
        self._layer_names = list(self.tracker.params.layer_names)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.tracker is None:
            return
        hooked = self._watch(optimizer)
        if self._step_cm is not None:
            if not self._stepped:
                self._blind |= not hooked
                return    # the same step still (LBFGS), or a skipped one: θ_t stands
            self._finish(trainer)      # manual optimisation: the last step is done
        if not any(p.grad is not None for p in self.tracker.params.params):
            return        # nothing for the optimiser to apply (backward was skipped)
        self._stepped, self._blind = False, not hooked
        self._step_cm = self.tracker.step()
        self._step_cm.__enter__()      # tracker.begin(): snapshot θ_t

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._step_cm is not None:
            self._finish(trainer)

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close(record=False)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.tracker is not None:      # the end-of-run line: the doubtful steps
            end_of_run(self.tracker)

    def teardown(self, trainer, pl_module, stage) -> None:
        self._close(record=False)
        for handle in self._hooks.values():
            if handle is not None:
                handle.remove()
        self._hooks.clear()

    # -- internals -------------------------------------------------------------

    def _watch(self, optimizer) -> bool:
        """Hook ``optimizer`` once; True if it reports its steps."""
        if id(optimizer) not in self._hooks:
            register = getattr(optimizer, "register_step_post_hook", None)
            self._hooks[id(optimizer)] = register(self._on_step) if register else None
        return self._hooks[id(optimizer)] is not None

    def _on_step(self, optimizer, args, kwargs) -> None:
        self._stepped = True

    def _finish(self, trainer) -> None:
        """Allocate the open step if the optimiser took it, drop it if not; log."""
        last = self.tracker.last
        self._close(record=self._stepped or self._blind)
        if self.tracker.last is not last:   # tracked (not passed over by the schedule)
            step = trainer.global_step - 1
            self.trainer_steps.append(step)
            if self.log_metrics and trainer.loggers:
                self._log(trainer, self.tracker.last, step)

    def _close(self, record: bool) -> None:
        """End the open step: allocate it (record) or drop it."""
        cm, self._step_cm = self._step_cm, None
        if cm is None:
            return
        if record:
            cm.__exit__(None, None, None)              # tracker.end()
        else:
            # tracker.step() records nothing for a block that raised
            cm.__exit__(_StepSkipped, _StepSkipped(), None)

    def _log(self, trainer, record: dict, step: int) -> None:
        """The step's scalars (lca_ext.integrations.metrics) to every logger."""
        layers = (self._layer_of, self._layer_names) if self.log_layers else (None, None)
        metrics = step_metrics(record, self._objectives, *layers)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
