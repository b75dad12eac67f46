"""The whole-set loss and gradient at a point of parameter space, free of side
effects on the training it watches.

At a point θ (a list of tensors, one per tracked parameter) the evaluator runs
the model over every batch of the LCA set (lca_ext.lca_set) with
``torch.func.functional_call`` and returns the exact weighted mean loss over the
set, adding its gradient into caller-owned buffers.  A batch's loss comes from
``batch_loss(model, batch)``: the batch's mean loss, or ``(mean_loss, weight)``
when batches weigh differently (e.g. the number of label tokens); the weight
defaults to the batch's number of examples (dim 0 of its first tensor, or of the
targets of an ``(inputs, targets)`` pair).  The set's loss is
Σ weight·mean / Σ weight, so a last partial batch or a batch with more tokens
weighs right.  The classic ``loss_fn(model(x), y)`` is the special case
``classic_batch_loss(loss_fn)``.  What it guarantees:

* the live parameters and their ``.grad`` are never written (gradients come
  from ``torch.autograd.grad`` on the tensors passed in);
* module buffers are passed as copies (BatchNorm running statistics untouched);
* a pass is a deterministic function of θ: every module runs in eval mode
  (dropout, attention dropout, stochastic depth and any ``if self.training:``
  branch off) except BatchNorm under ``batchnorm="batch"`` (the statistics of
  each fixed LCA batch, as the LCA paper's code did); ``batchnorm="eval"`` uses
  the running statistics.  Each module's ``training`` flag is restored;
* passes run outside any surrounding autocast, also one a framework put
  inside ``model.forward`` (Accelerate's wrapper under ``Trainer(bf16=True)`` is
  taken off for the pass; any other autocast switched on inside the model is
  refused with an error), unless ``autocast=`` (a dtype) asks for one;
* precision (``pass_dtype``): "auto" runs the passes of 16-bit (bf16/fp16)
  parameters in float32 (the point, the parameters, buffers and 16-bit inputs
  cast up; the loss of a bf16 pass is quantised to 2^-8 relative, so its ΔL
  would be rounding), other parameters in their own precision; None keeps the
  parameters' precision; a dtype casts parameters, buffers and floating inputs
  of fewer bits up to it (e.g. torch.float64 for float32 models).  Losses and weights add up in
  float64 from at least float32 values;
* the CPU and CUDA random streams (and Python's and NumPy's) are forked and
  restored, so the training's dropout masks and data order are unchanged, also
  when the LCA set is a DataLoader (which draws a seed on every ``iter()``);
* one host synchronisation per pass (losses and weights add up on the device).

The first pass runs the set twice, once without gradients: that gives the total
weight (before any gradient is scaled by it) and checks that the loss is a
deterministic function of θ (a clear error otherwise).
"""
from __future__ import annotations

import contextlib
import random
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from . import batch_checks
from . import classes as per_class
from . import kernels
from .distributed import Context, RankCounts, sharded_pass
from .example_check import check_examples
from .lca_set import HALF, LCASet, at_least_float32, cast_up, first_tensor, to_device
from .params import ParameterSet, call_at, tied_slots

_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)
# same loss at the same θ up to this relative difference, else the loss is random
DETERMINISM_RTOL = 1e-5


def as_batches(data, batch_size: int = 1024) -> LCASet:
    """The LCA set as fixed batches (see lca_ext.lca_set)."""
    return data if isinstance(data, LCASet) else LCASet(data, batch_size=batch_size)


def classic_batch_loss(loss_fn: Callable) -> Callable:
    """``batch_loss`` for ``loss_fn(model(x), y)`` on ``(x, y)`` batches, weighted
    by the number of examples ``y.shape[0]``."""
    def batch_loss(model, batch):
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            # (a tuple of 1 or 3 tensors as lca_data is read as a list of batches)
            hint = (" (lca_data given as a tuple or list of tensors is a set only as "
                    "exactly (inputs, targets); any other length is read as a list of "
                    "batches, each one tensor)") if isinstance(batch, torch.Tensor) else ""
            raise ValueError("lca_ext: with loss_fn, every LCA batch must be an (inputs, "
                             f"targets) pair; got a {type(batch).__name__}{hint}. For "
                             "other batches pass batch_loss=f, f(model, batch) -> mean "
                             "loss or (mean loss, weight)")
        x, y = batch
        return loss_fn(model(x), y), y.shape[0]
    batch_loss.classic = True
    batch_loss.loss_fn = loss_fn
    return batch_loss


class _Bound(nn.Module):
    """model + batch_loss as one module, so functional_call can run the user's
    batch_loss (which calls the model however it likes) at any point θ."""

    def __init__(self, model: nn.Module, batch_loss: Callable):
        super().__init__()
        self.model = model
        self.batch_loss = batch_loss

    def forward(self, batch):
        return self.batch_loss(self.model, batch)


class Evaluator:
    """Whole-set loss and gradient of the weighted mean of ``batch_loss`` at any point."""

    def __init__(self, model: nn.Module, batch_loss: Callable, data: LCASet,
                 params: ParameterSet, batchnorm: str = "batch",
                 ctx: Optional[Context] = None, autocast: Optional[torch.dtype] = None,
                 targets: Optional[Callable] = None, num_classes: Optional[int] = None,
                 pass_dtype="auto"):
        if batchnorm not in ("batch", "eval"):
            raise ValueError(f"lca_ext: batchnorm={batchnorm!r}; expected 'batch' or 'eval'")
        if autocast is not None and not (isinstance(autocast, torch.dtype)
                                         and autocast.is_floating_point):
            raise ValueError(f"lca_ext: autocast={autocast!r}; expected None (passes in the "
                             "parameters' precision) or a floating dtype, e.g. torch.bfloat16")
        if not (pass_dtype in (None, "auto") or (isinstance(pass_dtype, torch.dtype)
                                                  and pass_dtype.is_floating_point)):
            raise ValueError(f"lca_ext: pass_dtype={pass_dtype!r}; expected 'auto', None "
                             "(the parameters' precision) or a floating dtype such as "
                             "torch.float32")
        half = any(p.dtype in HALF for p in params.params)
        sharded = ctx is not None and ctx.sharded
        if pass_dtype == "auto":
            # (FSDP2 passes run the live sharded model: its precision is FSDP's)
            pass_dtype = torch.float32 if half and autocast is None and not sharded else None
        elif pass_dtype is not None and sharded:
            raise NotImplementedError(
                f"lca_ext: pass_dtype={pass_dtype!r} with FSDP2: the passes run the sharded "
                "model itself, in FSDP's precision (its MixedPrecisionPolicy); use "
                "pass_dtype='auto' or None")
        self.pass_dtype = pass_dtype
        # the arithmetic a pass runs in (its rounding sets the noise floor): with
        # mixed parameter dtypes, the least precise one's
        self.compute_dtype = autocast or pass_dtype or max(
            (p.dtype for p in params.params), key=lambda d: torch.finfo(d).eps)
        self.last_class_losses = None   # [C] each class's share at the last class pass
        self.model = model
        self.batch_loss = batch_loss
        self.data = data if isinstance(data, LCASet) else LCASet(data)
        self.params = params
        self.batchnorm = batchnorm
        self.ctx = ctx or Context()
        self.autocast = autocast
        self.targets = targets            # per-class LCA: batch -> class indices
        self.num_classes = num_classes
        self.kernels = kernels.kernels_for(params.params[0].device)
        self.device = params.params[0].device
        self._bound = _Bound(model, batch_loss)
        self._bound_ties = tied_slots(self._bound)   # (names prefixed "model.")
        self.model_ties = tied_slots(model)
        self.count: Optional[float] = None    # Σ weight over the set (all ranks)
        self._check_loss: Optional[float] = None   # the first pass's loss, without gradients
        if getattr(batch_loss, "classic", False) and self.data.pair is not None:
            # (x, y) pairs: the weight is the example count, known without a pass
            self.count = self.ctx.sum_float(float(sum(int(y.shape[0])
                                                      for _, y in self.data.pair)))
            if self.count == 0:
                raise ValueError("lca_ext: the LCA set has no examples")
        if self.ctx.sharded:
            # FSDP's collectives need the same number of forward passes on every rank
            n = len(self.data)
            if n == 0:
                raise ValueError(f"lca_ext: rank {self.ctx.rank} got no LCA batch; FSDP "
                                 "needs every rank in every forward pass (use a set with "
                                 "at least as many batches or examples as ranks)")
            self.rounds = self.ctx.max_int(n)
        self.passes = 0  # gradient passes run (each = one sweep of the LCA set)
        self._groups: Optional[int] = None   # batches, counted once (groups)
        self._batches_seen = 0
        self._counted = False                 # a whole pass has run (batches counted)
        self.batch_counts = RankCounts(self.ctx)      # every rank's batches (DDP)
        self.class_batches = None   # the set regrouped by class (lca_ext.classes)
        # the class slot of each unit (a class's part of a batch) of a pass over
        # every class, in pass order: per-class mode's error-bar groups
        self.class_unit_slots: Optional[List[Optional[int]]] = None   # (None: not yet)
        self.unit_counts = RankCounts(self.ctx)       # every rank's units (DDP)
        self._split_checked = False  # class shares checked against the plain loss

    def buffers_that_matter(self) -> List[torch.Tensor]:
        """Copies of every module buffer, whether or not the loss reads it, except
        BatchNorm running statistics when BatchNorm uses batch statistics.  When
        any of them changes between two steps (eval-mode BatchNorm after a
        training forward pass, a step counter), the tracker treats the loss
        function as changed and recomputes the start gradient instead of
        reusing the previous step's (a cost, never a wrong value)."""
        skip = set()
        if self.batchnorm == "batch":
            for m in self.model.modules():
                if isinstance(m, _BATCHNORM):
                    skip.update(id(b) for b in m.buffers(recurse=False))
        return [b.detach().clone() for b in self.model.buffers() if id(b) not in skip]

    @contextlib.contextmanager
    def quiet_model(self):
        """Eval mode (BatchNorm as chosen), no surrounding autocast, RNG streams
        forked; all restored."""
        flags = [(m, m.training) for m in self.model.modules()]
        devices = sorted({p.device.index for p in self.params.params
                          if p.device.type == "cuda"})
        py_state, np_state = random.getstate(), np.random.get_state()
        # Accelerate (Trainer(bf16=True), Accelerator(mixed_precision=...)) puts an
        # autocast wrapper into model.forward and keeps the original beside it
        wrapped = vars(self.model).get("forward") if hasattr(self.model, "_original_forward") \
            else None
        hooks = []
        try:
            if wrapped is not None:
                self.model.forward = self.model._original_forward
            if self.autocast is None:
                hooks = [m.register_forward_pre_hook(self._refuse_autocast)
                         for m in self.model.children()]
            with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
                for m in self.model.modules():
                    m.training = isinstance(m, _BATCHNORM) and self.batchnorm == "batch"
                for kind in {"cpu", self.device.type}:
                    if kind in ("cpu", "cuda"):
                        stack.enter_context(torch.autocast(kind, enabled=False))
                if self.autocast is not None:
                    stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast))
                yield
        finally:
            for h in hooks:
                h.remove()
            if wrapped is not None:
                self.model.forward = wrapped
            for m, t in flags:
                m.training = t
            random.setstate(py_state)
            np.random.set_state(np_state)

    def _refuse_autocast(self, module, args) -> None:
        if torch.is_autocast_enabled(self.device.type):
            raise RuntimeError(
                "lca_ext: an LCA pass ran under autocast although the tracker's autocast "
                f"is None: something inside {type(self.model).__name__}.forward switched it "
                "on (a mixed-precision wrapper around model.forward, or torch.autocast in "
                "the model's code), so the passes would silently run in 16-bit. Pass "
                "autocast=torch.bfloat16 (or float16) to the tracker to run them under "
                "autocast on purpose, or take the wrapper off model.forward")

    def batches(self):
        """The LCA set's batches on the pass device, floating inputs of fewer bits
        cast up to ``pass_dtype``."""
        for batch in self.data.batches(self.device):
            yield batch if self.pass_dtype is None else cast_up(batch, self.pass_dtype)

    def batch_loss_at(self, tensors, batch):
        """(mean loss, weight) of one batch at the point in ``tensors``."""
        try:
            out = call_at(self._bound, self._bound_ties, tensors, (batch,))
        except RuntimeError as e:
            if self.pass_dtype is None or "dtype" not in str(e).lower():
                raise
            raise RuntimeError(
                f"lca_ext: the model failed in an LCA pass with its parameters cast to "
                f"pass_dtype={self.pass_dtype} ('auto' casts 16-bit parameters to float32, "
                f"for exact losses): {e}. A model that casts to a fixed dtype itself "
                "(x.bfloat16()) cannot take that: pass pass_dtype=None to run the passes in "
                "the parameters' own precision (or cast to the weight's dtype in forward)"
            ) from e
        loss, weight = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            who = "loss_fn" if getattr(self.batch_loss, "classic", False) else "batch_loss"
            raise ValueError(f"lca_ext: {who} returned {shape}; expected a scalar tensor "
                             "(the mean loss of the batch)")
        if weight is None:
            t = first_tensor(batch)
            if t is None or t.dim() == 0:
                raise ValueError("lca_ext: cannot tell this batch's size (no tensor with a "
                                 "batch dimension in it); return (mean loss, weight) from "
                                 "batch_loss")
            weight = t.shape[0]
        return loss, weight

    def tensors_at(self, point, requires_grad: bool):
        """The model's tensors with the tracked parameters at ``point`` (in the
        pass precision; buffers copied, so a pass never updates the model's):
        (name -> tensor for batch_loss_at, the point's leaves)."""
        names = self.params.names
        up = self._up
        leaves = [up(t.detach()).requires_grad_(requires_grad) for t in point]
        tracked = set(names)
        tensors = {"model." + n: up(p) for n, p in self.model.named_parameters()
                   if n not in tracked}
        tensors.update({"model." + n: up(b).clone() for n, b in self.model.named_buffers()})
        tensors.update({"model." + n: t for n, t in zip(names, leaves)})
        return tensors, leaves

    def _up(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` in the pass precision (floating tensors of fewer bits cast up)."""
        pd = self.pass_dtype
        if pd is None or not t.is_floating_point() or t.dtype == pd or \
                torch.finfo(t.dtype).bits >= torch.finfo(pd).bits:
            return t
        return t.to(pd)

    def _reseed(self) -> None:
        """Other random streams than a pass sees (inside quiet_model, which
        restores them): randomness that ignores module.training then shows as a
        difference between two passes at the same point."""
        torch.default_generator.manual_seed(0x1CA)
        for p in self.params.params:      # (only the CUDA streams fork_rng forked)
            if p.device.type == "cuda":
                torch.cuda.default_generators[p.device.index].manual_seed(0x1CA)
        random.seed(0x1CA)
        np.random.seed(0x1CA)

    def nonfinite_untracked(self) -> Optional[str]:
        """The first NaN/Inf in a frozen parameter or a floating buffer of the
        model ("buffer 'bn.running_var' holds nan at index (3,)"), or None."""
        tracked = {id(p) for p in self.params.params}
        named = [("parameter", n, p) for n, p in self.model.named_parameters()
                 if id(p) not in tracked] + \
            [("buffer", n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        for kind, name, t in named:
            bad = torch.nonzero(~torch.isfinite(t.detach()))
            if bad.numel():
                idx = tuple(int(i) for i in bad[0].tolist())
                return f"{kind} {name!r} (not tracked) holds {t[idx].item()} at index {idx}"
        return None

    def check_examples(self) -> None:
        """Once, when the tracker is built: the first batch of a list of batches
        (an unbatched example is refused here, not at the first step), interacting
        examples, a loss_fn that is not a mean (lca_ext.example_check)."""
        source = self.data.source
        if isinstance(source, (list, tuple)) and source and self.ctx.world == 1:
            batch_checks.check_batch(self, 0, source[0])
        check_examples(self)

    def _first_pass(self, point) -> None:
        """The total weight, and the check that the loss is deterministic."""
        with self.quiet_model():
            self._reseed()
            batch_checks.check_all(self)
            total, wsum = (sharded_pass(self, point, None, 1.0) if self.ctx.sharded
                           else self._pass_local(point, None, 1.0))     # forward only
        if wsum <= 0:
            raise ValueError(f"lca_ext: the {self.data.name} set has total weight {wsum}; "
                             "expected a positive number of examples (or tokens)")
        self.count = wsum
        self._check_loss = total / wsum

    def loss_and_grad(self, point: Sequence[torch.Tensor],
                      grad_out: Optional[Sequence[torch.Tensor]] = None,
                      weight: float = 1.0, probe=None) -> float:
        """Weighted mean loss over the LCA set at ``point``; if ``grad_out`` is
        given, ``grad_out[k] += weight * d(mean loss)/d(param k)`` (fused op);
        ``probe``: each batch's gradient also to ``probe.add`` (_pass_local)."""
        check = None
        if self._check_loss is None:
            self._first_pass(point)
            check = self._check_loss
        if self.ctx.sharded:
            total, wsum = sharded_pass(self, point, grad_out, weight, probe)
        else:
            total, wsum = self._pass_local(point, grad_out, weight, probe)
        self._check_weight(wsum)
        loss = total / self.count
        self.last_class_losses = None
        if check is not None:
            self._check_same(check, loss)
        return loss

    def check_batch(self, i: int, batch) -> None:
        """lca_ext.batch_checks.check_batch: batch ``i`` refused, naming the
        cause, if it cannot give a right loss (every batch is checked before
        the first pass, once per set)."""
        batch_checks.check_batch(self, i, batch)

    def _check_same(self, check: float, loss: float) -> None:
        """The first pass's loss (forward only) against the first gradient pass's."""
        if abs(loss - check) > DETERMINISM_RTOL * max(abs(loss), 1e-3):
            raise RuntimeError(
                f"lca_ext: the {self.data.name} loss is random at a fixed θ: two "
                f"passes over the same set gave {check!r} and {loss!r}. LCA needs a "
                "deterministic loss: passes run every module in eval mode, so look for "
                "randomness that ignores module.training (e.g. F.dropout(x, "
                "training=True), random augmentation in the data pipeline, a sampler "
                "that shuffles)")

    def _pass_local(self, point, grad_out, weight, probe=None) -> tuple:
        """(Σ weight·loss, Σ weight) over the set (all ranks); gradients added.
        ``probe`` (lca_ext.group_probe.GroupProbe): each batch's gradient is also
        handed to ``probe.add(i, grads, 1/W)`` (batch i is group i); with
        ``point`` None, batch i runs at ``probe.point(i)`` (a mixed pass)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        wsum = torch.zeros((), dtype=torch.float64, device=self.device)
        need_grad = grad_out is not None or probe is not None
        if grad_out is not None:
            self.ctx.replicated_grads_(grad_out, before=True)
        with self.quiet_model():
            # one set of leaves (and buffer copies) for the whole pass: each
            # batch's graph is freed by its autograd.grad
            if point is not None:
                tensors, leaves = self.tensors_at(point, need_grad)
            for i, batch in enumerate(self.batches()):
                if point is None:
                    tensors, leaves = self.tensors_at(probe.point(i), True)
                with torch.set_grad_enabled(need_grad):
                    loss, w = self.batch_loss_at(tensors, batch)
                    batch_sum = at_least_float32(loss) * w   # its share x the set's weight
                total += loss.detach().double() * w
                wsum += w
                self._batches_seen = max(self._batches_seen, i + 1)
                if need_grad:
                    grads = torch.autograd.grad(batch_sum, leaves, allow_unused=True)
                    grads = [torch.zeros_like(p) if g is None else g
                             for g, p in zip(grads, leaves)]
                    if grad_out is not None:
                        self.kernels.accumulate_(list(grad_out), grads, weight / self.count)
                    if probe is not None:
                        probe.add(i, grads, 1.0 / self.count, loss=batch_sum)
        self._counted = True
        if grad_out is not None:
            self.ctx.replicated_grads_(grad_out, before=False)
            self.passes += 1
        return tuple(self.ctx.sum_float(v) for v in torch.stack([total, wsum]).tolist())

    def probe_pass(self, probe) -> None:
        """A mixed pass: batch i at ``probe.point(i)``, its gradient to
        ``probe.add`` only (one gradient pass; no loss is returned)."""
        if self._check_loss is None:
            raise RuntimeError("lca_ext: probe_pass before any pass at a point")
        if self.ctx.sharded:
            sharded_pass(self, None, None, 1.0, probe)
        else:
            self._pass_local(None, None, 1.0, probe)
        self.passes += 1

    def class_probe_pass(self, probe) -> None:
        """A mixed class pass: unit i (a class's part of a batch) at
        ``probe.point(i)``, its gradient to ``probe.add`` only (one gradient pass)."""
        per_class.class_pass(self, None, range(self.num_classes), None, 1.0, probe)
        self.passes += 1

    def class_groups_supported(self) -> bool:
        """Class units as the bars' groups (lca_ext.classes): not under FSDP2."""
        return not self.ctx.sharded

    @property
    def class_groups(self) -> int:
        """Units over every rank (DDP: rank 0's first; 0 before a class pass has
        counted them, which every rank's start pass does at the same point)."""
        if self.class_unit_slots is None:
            return 0
        if self.ctx.world == 1:
            return len(self.class_unit_slots)
        return sum(self.unit_counts.gather(len(self.class_unit_slots)))

    @property
    def class_group_offset(self) -> int:
        """The global index of this rank's first unit."""
        return self.unit_counts.offset()

    def class_units_pure(self) -> bool:
        """Is each unit one class's part of a batch (not a whole batch of several
        classes: BatchNorm on batch statistics)?  The two-pass stage needs it."""
        return per_class.units_class_pure(self)

    @property
    def local_groups(self) -> int:
        """This rank's batches (0 before a DataLoader set's first pass)."""
        if self._groups is None and self.data.pair is not None:
            self._groups = len(self.data.pair)
        if self._groups is None:
            # counted by the first pass (len() would read an unsized set once more)
            return self._batches_seen
        return self._groups

    @property
    def groups(self) -> int:
        """Independent groups a probe sees: the LCA set's batches, every rank's
        under DDP (group_offset: this rank's first); under FSDP2, whose passes
        run every rank's r-th batch together, the rounds (lca_ext.distributed)."""
        if self.ctx.sharded:
            return self.rounds
        if self.ctx.world == 1:
            return self.local_groups
        if self.data.pair is None and not self._counted:
            return 0
        return sum(self.batch_counts.gather(self.local_groups))

    @property
    def group_offset(self) -> int:
        """The global index of this rank's first batch (its groups follow)."""
        return self.batch_counts.offset()

    def _check_weight(self, wsum: float) -> None:
        if abs(wsum - self.count) > 1e-9 * self.count:
            raise RuntimeError(f"lca_ext: the {self.data.name} set changed between passes "
                               f"(total weight {wsum} now, {self.count} before); the LCA set "
                               "must be the same at every point of a step")

    # -- per-class passes (lca_ext.classes) ---------------------------------------

    def batch_coupled(self) -> bool:
        """Do samples of a batch affect each other's outputs here (BatchNorm on
        batch statistics, or examples that interact: ``check_examples``)?"""
        return getattr(self, "examples_interact", False) or (
            self.batchnorm == "batch" and any(
                isinstance(m, _BATCHNORM) for m in self.model.modules()))

    def class_grads(self, point: Sequence[torch.Tensor], classes: Sequence[int],
                    grad_out: Sequence[torch.Tensor], weight: float = 1.0,
                    probe=None) -> float:
        """For each class c = classes[j]: ``grad_out[k][j] += weight * d/dθ_k`` of
        class c's share of the mean loss, (1/W) Σ w·loss over class c's targets
        (lca_ext.classes says how the set is split).  Returns the classes' part
        of the mean loss: over every class, the whole-set loss, and the class
        gradients add up to its gradient.  ``probe`` (lca_ext.group_probe.GroupProbe):
        each unit's gradient is handed to it too (lca_ext.classes)."""
        if self.ctx.sharded:
            raise NotImplementedError("lca_ext: per-class LCA is not supported with FSDP2 "
                                      "yet (use DDP, or num_classes=None)")
        if self._check_loss is None:
            self._first_pass(point)
        checks = None
        if not self._split_checked and len(classes) == self.num_classes:
            # once: the same split forward only (randomness), and the plain loss
            # (is the loss a sum of per-target terms?), both at this point
            with self.quiet_model():
                self._reseed()
                again = self._class_loss(point, classes)
            checks = (again, self._pass_local(point, None, 1.0)[0] / self.count)
        self.ctx.replicated_grads_(grad_out, before=True)
        loss, wsum = self._class_loss(point, classes, grad_out, weight, with_weight=True,
                                      probe=probe)
        self.ctx.replicated_grads_(grad_out, before=False)
        self.passes += 1
        if len(classes) == self.num_classes:
            per_class.check_shares(self, wsum)
        if checks is not None:
            self._check_same(checks[0], loss)
            self.check_split_once(checks[1], loss)
        return loss

    def _class_loss(self, point, classes, grad_out=None, weight=1.0, with_weight=False,
                    probe=None):
        """The classes' part of the mean loss; each class's share is kept in
        ``last_class_losses`` ([len(classes)], summed over ranks)."""
        total, wsum = per_class.class_pass(self, point, classes, grad_out, weight, probe)
        both = torch.cat([total.double().reshape(-1), torch.as_tensor(
            wsum, dtype=torch.float64, device=total.device).reshape(1)])
        vals = np.array([self.ctx.sum_float(v) for v in both.tolist()])
        self.last_class_losses = vals[:-1] / self.count
        loss, wsum = float(vals[:-1].sum()) / self.count, float(vals[-1])
        return (loss, wsum) if with_weight else loss

    def class_losses(self, point: Sequence[torch.Tensor], classes: Sequence[int]) -> np.ndarray:
        """Each class's share of the mean loss at ``point`` (forward only) [len]."""
        if self._check_loss is None:
            self._first_pass(point)
        with self.quiet_model():
            self._class_loss(point, classes)
        return self.last_class_losses

    def check_split_once(self, plain: float, split: float) -> None:
        """Once per run: the class shares' loss against the plain pass's at the
        same point.  They run different batches (class-pure ones), so rounding
        differs: 1e-3 relative in float32 and float64, 2e-2 with 16-bit
        parameters or autocast."""
        if self._split_checked:
            return
        self._split_checked = True
        low = self.autocast is not None or any(
            p.dtype in (torch.float16, torch.bfloat16) for p in self.params.params)
        if abs(split - plain) > (2e-2 if low else 1e-3) * max(abs(plain), 1e-3):
            raise ValueError(
                f"lca_ext: per-class LCA: the {self.data.name} loss split by class adds up "
                f"to {split!r}, the loss is {plain!r}. The classes' shares must add up to "
                "the loss: with loss_fn it must be a mean of per-example terms (no class "
                "weights, no batch-level terms); otherwise pass batch_loss=f returning "
                "(mean, weight), or drop num_classes")
