"""The path of one tracked step, θ_t → θ_{t+1}, as the rules see it.

A rule (lca_ext.quadrature, lca_ext.uniform_rules) is a function of a path and
its options.  It never touches the tracker, the evaluator or a tensor: it asks
the path for the loss and the gradient at a fraction ``f`` of the step, for the
per-tensor samples φ_k(f) = Σ_{i∈k} Δθ_i·g_i(θ_t + fΔθ) of a gradient buffer,
and for linear combinations of buffers.  The path owns the point buffer, the
pool of gradient buffers (their memory) and the pass count, and checks every
loss for NaN/Inf.

Two implementations share this interface:

* :class:`StepPath` (here): the live path of a tracked step, over the
  LCA set's evaluator (lca_ext.evaluate) and the fused ops (lca_ext.kernels);
* ``RecordedPath`` in benchmarks/rule_lab.py: a step recorded once as dense
  float64 samples, so any rule can be replayed offline in milliseconds.

A gradient buffer is an opaque handle for the rules: they pass it back to
:meth:`StepPath.grad`, :meth:`StepPath.dots`, :meth:`StepPath.accumulate`,
:meth:`StepPath.scale` and :meth:`StepPath.release`.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .buffer_pool import BufferPool
from .group_probe import GroupProbe
from .lca_set import nonfinite_in

# unit roundoff of a pass's arithmetic (bf16/fp16 only under autocast or 16-bit passes)
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24,
                 torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


_PARAMETER_ADVICE = (
    "A NaN/Inf parameter element gives NaN LCA even where the LCA set never reads it "
    "(NaN·0); fix the parameter (or exclude the tensor from tracking with "
    "requires_grad=False) before tracking this step")


class StepPath:
    """One objective's path for one step (built by the tracker at ``end()``).

    start:      g(θ_t) (a buffer), the loss and per-class losses at θ_t
    classes:    per-class mode: buffers and passes carry the class dimension
    """

    def __init__(self, *, name: str, step: int, evaluator, kernels, ctx, pool: BufferPool,
                 theta_t: List[torch.Tensor], after: List[torch.Tensor],
                 g_start, loss_start: float, class_loss_start, num_classes: int,
                 classes: bool, names: Optional[Sequence[str]] = None,
                 group_start: Optional[List[List[torch.Tensor]]] = None,
                 keep_groups: int = 0, group_start_losses: Optional[np.ndarray] = None):
        self.name, self.step = name, step
        # each group's gradient at θ_t (kept from the previous step's end point,
        # or from the start pass), and how many groups' gradients a pass at θ_{t+1}
        # (or the start pass) may keep in group_end (0: none; more groups: none)
        self.group_start, self.keep_groups = group_start, keep_groups
        self.group_end: Optional[List[List[torch.Tensor]]] = None
        # each group's share of the loss where its gradient is kept ([G], or None)
        self.group_start_losses = group_start_losses if group_start is not None else None
        self.group_end_losses: Optional[np.ndarray] = None
        self._names = list(names) if names is not None else None
        self._ev = evaluator
        # (public: the group probe works through them, lca_ext.group_probe)
        self.kernels, self.ctx, self.pool = kernels, ctx, pool
        self.theta_t, self.after = theta_t, after
        self.g_start, self.loss_start = g_start, loss_start
        self.class_loss_start = class_loss_start
        self.num_classes = num_classes
        self._classes = num_classes if classes else 0
        self._point: Optional[List[torch.Tensor]] = None
        self.passes = 0            # gradient passes this step (the start's not counted)
        # independent groups whose samples the rules may ask for (lca_ext.bars):
        # the LCA set's batches, or in per-class mode each class's part of a
        # batch (lca_ext.classes; with BatchNorm on batch statistics, each batch);
        # under DDP every rank's; 0 where they cannot be had (FSDP2)
        self._group_phi: Dict[float, np.ndarray] = {}
        self._strata: Optional[np.ndarray] = None

    @property
    def groups(self) -> int:
        if self._classes:
            return self._ev.class_groups if self._ev.class_groups_supported() else 0
        return self._ev.groups

    @property
    def group_strata(self) -> Optional[np.ndarray]:
        """[G] each group's stratum for the bars' spread (lca_ext.bars.spread):
        in per-class mode with units of one class each, the unit's class (its
        units are alike; different classes curve differently); else None (the
        groups are the set's batches, alike already).  Under DDP every rank's
        units, gathered once a step (a collective: every rank's rule asks)."""
        if not self._classes or not self._ev.class_units_pure():
            return None
        if self._strata is None:
            slots = self._ev.class_unit_slots or ()
            labels = np.zeros(self.groups)
            labels[self.group_offset:self.group_offset + len(slots)] = \
                np.asarray(slots, dtype=np.float64) + 1.0
            if self.ctx.world > 1:
                labels = self.ctx.sum_(torch.from_numpy(labels).to(self.theta_t[0].device)
                                        ).cpu().numpy()
            self._strata = labels.astype(np.int64) - 1
        return self._strata

    @property
    def group_offset(self) -> int:
        """This rank's first group (DDP; 0 in one process)."""
        return self._ev.class_group_offset if self._classes else self._ev.group_offset

    @property
    def _local_groups(self) -> int:
        return len(self._ev.class_unit_slots or ()) if self._classes else \
            self._ev.local_groups

    def _most_local_groups(self) -> int:
        """The most groups one rank holds (what it must keep), 0 before they
        are counted; the same on every rank."""
        if self.ctx.world == 1:
            return self.groups
        self.groups                                # (counts every rank's, once known)
        return (self._ev.unit_counts if self._classes else self._ev.batch_counts).most()

    # -- buffers ---------------------------------------------------------------------

    @property
    def one_buffer(self) -> int:
        """Bytes of one gradient buffer of this path (per-class: all classes)."""
        return self.pool.one_buffer * max(1, self._classes)

    def buffer(self) -> List[torch.Tensor]:
        """A zeroed gradient buffer (class-stacked in per-class mode)."""
        return self.pool.take(self._classes)

    def release(self, buf) -> None:
        self.pool.give(buf)

    def accumulate(self, dst, src, weight: float) -> None:
        """dst += weight·src."""
        self.kernels.accumulate_(dst, src, weight)

    def scale(self, buf, factor: float) -> None:
        torch._foreach_mul_(buf, factor)

    def zero(self, buf) -> None:
        torch._foreach_zero_(buf)

    # -- passes ----------------------------------------------------------------------

    def point(self, f: float, out: Optional[List[torch.Tensor]] = None) -> List[torch.Tensor]:
        """θ_t + f·(θ_{t+1} − θ_t) (θ_t and θ_{t+1} themselves at 0 and 1),
        written into ``out`` or the path's own point buffer."""
        if f == 0.0:
            return self.theta_t
        if f == 1.0:
            return self.after
        if out is None:
            if self._point is None:
                self._point = self.pool.take()
            out = self._point
        point = []
        for dst, a0, a1 in zip(out, self.theta_t, self.after):
            if dst.dtype == a0.dtype and dst.shape == a0.shape:
                point.append(torch.lerp(a0, a1, f, out=dst))
            else:  # bf16 parameters with float32 buffers: transient
                point.append(torch.lerp(a0, a1, f))
        return point

    def grad(self, f: float, out, weight: float = 1.0, at=None) -> float:
        """The whole-set loss at fraction ``f`` of the step, and ``weight`` x its
        gradient added into ``out`` (None: the loss only, no gradient pass).
        ``at``: a spare buffer to write the point into (instead of the path's
        own point buffer).  A NaN/Inf loss raises, naming the step and the point."""
        x = self.point(f, at)
        if out is None:
            loss = self._ev.loss_and_grad(x, None)
        else:
            # (groups unknown before the first pass: tried, and given back if more
            # come than keep_groups; known and too many: not tried)
            keep = self.keep_groups > 0 and f in (0.0, 1.0) and self.group_end is None \
                and not self.ctx.sharded and self._most_local_groups() <= self.keep_groups \
                and (not self._classes or (self._ev.class_groups_supported()
                                           and self._ev.class_units_pure()))
            probe = GroupProbe(self, self.groups, keep=self.keep_groups if keep else 0,
                               samples=f > 0.0) \
                if (self.groups >= 2 and f > 0.0) or keep else None
            if self._classes:      # the class gradients, adding up to the gradient
                loss = self._ev.class_grads(x, range(self.num_classes), out, weight, probe)
            else:
                loss = self._ev.loss_and_grad(x, out, weight, probe=probe)
            if probe is not None:
                # (per-class mode: the units are counted by the pass itself)
                probe.groups = self.groups
            if probe is not None and f > 0.0 and self.groups >= 2:
                # (per-class passes scale each unit's part by ``weight``, as its
                # class slot's: the samples are kept unweighted)
                phi = probe.array()
                self._group_phi[f] = phi / weight if self._classes and weight != 1.0 else phi
            if keep:
                kept = probe.kept
                ok = kept is not None and len(kept) == self._local_groups and self.groups >= 2
                if self.ctx.world > 1:             # every rank keeps, or none
                    ok = self.ctx.max_int(0 if ok else 1) == 0
                if ok:
                    self.group_end = kept
                    self.group_end_losses = probe.loss_array()
                else:
                    for buf in kept or ():
                        self.pool.give(buf)
        if out is not None:
            self.passes += 1
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"lca_ext: the {self.name!r} loss is {loss} at step {self.step} "
                f"(path point {f:g} of θ_t → θ_(t+1)): {self._nonfinite_cause(f)}. "
                "Steps before it are kept")
        return loss

    def _nonfinite_cause(self, f: float) -> str:
        """Why a loss is NaN/Inf: the first non-finite tracked parameter element,
        or (none) the data, the loss function or an overflow along the step."""
        for what, ends in (("θ_t (before the step)", self.theta_t),
                           ("θ_(t+1) (after the step)", self.after)):
            for k, t in enumerate(ends):
                bad = torch.nonzero(~torch.isfinite(t))
                if bad.numel():
                    idx = tuple(int(i) for i in bad[0].tolist())
                    name = self._names[k] if self._names else f"tensor {k}"
                    return (f"parameter {name!r} holds {t[idx].item()} at index {idx} in "
                            f"{what}; fix the parameter (or the step that wrote it) before "
                            "tracking this step")
        frozen = self._ev.nonfinite_untracked()
        if frozen is not None:
            return f"the model's {frozen}; fix it before tracking this step"
        data = nonfinite_in(self._ev.batches())
        if data is not None:
            return (f"every tracked parameter is finite; the LCA set's data is not "
                    f"({data}): clean or drop that example")
        if 0.0 < f < 1.0:
            return ("every tracked parameter is finite at both ends of the step, so the "
                    "loss overflows between them (a huge step: check the learning rate, or "
                    "run the passes in float64 with pass_dtype=torch.float64)")
        return ("every tracked parameter and the LCA set's data are finite, so the loss "
                "function produces it (log(0), an overflow in 16-bit): check the loss")

    @property
    def last_class_losses(self) -> Optional[np.ndarray]:
        """[C] each class's share of the loss at the last class pass (or None)."""
        return self._ev.last_class_losses

    def class_loss(self):
        """(class losses at θ_t, at θ_{t+1} (the last pass's)), or None."""
        if self.class_loss_start is None or self._ev.last_class_losses is None:
            return None
        return self.class_loss_start, self._ev.last_class_losses

    # -- samples ---------------------------------------------------------------------

    def dots(self, buf) -> np.ndarray:
        """φ of one gradient buffer: [C, K] for class stacks, [1, K] otherwise
        (whole-model values: summed over FSDP2 shards)."""
        if buf[0].dim() > self.theta_t[0].dim():
            sums = self.kernels.allocate_classes(self.theta_t, self.after, buf).sums
        else:
            sums = self.kernels.allocate(self.theta_t, self.after, buf).sums[None]
        if self.ctx.sharded:
            sums = self.ctx.sum_(sums.clone())
        out = sums.double().cpu().numpy()
        if not np.isfinite(out).all():
            self._refuse_nonfinite(buf, out)
        return out

    def _refuse_nonfinite(self, buf, out: np.ndarray) -> None:
        """A NaN/Inf sample: name the tensor, the element and where it is (θ_t,
        θ_{t+1} or the gradient), instead of refining NaN·0 for ever."""
        k = int(np.nonzero(~np.isfinite(out).all(0))[0][0])
        name = self._names[k] if self._names else f"tensor {k}"
        where = "the product Δθ·g overflowed"
        advice = ("Run the passes in float64 (pass_dtype=torch.float64) or take a "
                  "smaller step")
        for what, t, why in (
                ("θ_t (before the step)", self.theta_t[k], _PARAMETER_ADVICE),
                ("θ_(t+1) (after the step)", self.after[k], _PARAMETER_ADVICE),
                ("the LCA set's gradient", buf[k],
                 "The loss is finite but its gradient is not at this point of the step "
                 "(a non-differentiable point such as sqrt or norm at 0, or an overflow "
                 "in the backward pass); make the loss differentiable there")):
            bad = torch.nonzero(~torch.isfinite(t))
            if bad.numel():
                idx = tuple(int(i) for i in bad[0].tolist())
                where = f"{what} holds {t[idx].item()} at index {idx}"
                advice = why
                data = nonfinite_in(self._ev.batches()) if t is buf[k] else None
                if data is not None:
                    advice = (f"The LCA set's data holds a NaN/Inf ({data}); clean or "
                              "drop that example")
                break
        raise FloatingPointError(
            f"lca_ext: step {self.step} ({self.name!r}): the LCA of parameter {name!r} is "
            f"not finite: {where}. {advice}. Steps before it are kept")

    def group_dots(self, f: float) -> np.ndarray:
        """[G, K] the groups' samples at a point already evaluated (f > 0, or
        0 where ``group_start_known``)."""
        if f == 0.0 and f not in self._group_phi and self.group_start is not None:
            phi = np.zeros((self.groups, len(self.theta_t)))
            for g, buf in enumerate(self.group_start):
                phi[self.group_offset + g] = self.dots(buf)[0]
            if self.ctx.world > 1:
                phi = self.ctx.sum_(torch.from_numpy(phi).to(self.theta_t[0].device)
                                     ).cpu().numpy()
            self._group_phi[0.0] = phi
        return self._group_phi[f]

    def group_bytes(self) -> int:
        """Bytes of the groups' gradients held (θ_t's and θ_{t+1}'s: plain buffers,
        also in per-class mode), as the rank holding the most counts them (DDP:
        every rank's rule must decide alike)."""
        if self.group_start is None:
            return 0
        return 2 * self._most_local_groups() * self.pool.one_buffer

    def group_losses(self, f: float) -> Optional[np.ndarray]:
        """[G] each group's share of the set's loss at θ_t (f = 0) or θ_{t+1}
        (f = 1) where the groups' gradients there are held; None elsewhere."""
        if f == 0.0:
            return self.group_start_losses if self.group_start_known else None
        return self.group_end_losses if f == 1.0 else None

    @property
    def group_start_known(self) -> bool:
        """Are the groups' gradients at θ_t held (group_dots(0.0), group_correction)?"""
        return self.group_start is not None and \
            len(self.group_start) == self._local_groups and self.groups >= 2

    def group_correction(self, out, points: np.ndarray, weights: np.ndarray) -> None:
        """out += Σ_g (½ − w_g(1 − u_g))·g_g(θ_t) + (½ − w_g·u_g)·g_g(θ_{t+1}):
        with a mixed pass's weighted gradient Σ_g w_g·g_g(u_g) in ``out`` this
        forms the two-pass rule's ḡ, the trapezoid plus each group's weighted
        correction (lca_ext.budget_rule); needs group_start and group_end.
        Per-class mode: each unit's term goes to its class's slot of ``out``."""
        slots = self._ev.class_unit_slots if self._classes else None
        # (DDP: each rank adds its own groups' terms, summed over ranks)
        self.ctx.replicated_grads_(out, before=True)
        for g, buf in enumerate(self.group_start):
            u = float(points[self.group_offset + g])
            w = float(weights[self.group_offset + g])
            dst = out if slots is None else [t[slots[g]] for t in out]
            self.accumulate(dst, buf, 0.5 - w * (1.0 - u))
            self.accumulate(dst, self.group_end[g], 0.5 - w * u)
        self.ctx.replicated_grads_(out, before=False)

    def mixed(self, points: np.ndarray, out=None,
              weights: Optional[np.ndarray] = None) -> np.ndarray:
        """One pass with group i at fraction ``points[i]`` of the step: [G, K]
        the groups' samples there (lca_ext.bars); ``out``: a buffer the pass's
        gradient is added to, group i's x ``weights[i]`` (None: 1)."""
        probe = GroupProbe(self, self.groups, points, total=out, weights=weights)
        if out is not None:        # (DDP: this rank's groups' part, summed over ranks)
            self.ctx.replicated_grads_(out, before=True)
        if self._classes:
            self._ev.class_probe_pass(probe)
        else:
            self._ev.probe_pass(probe)
        if out is not None:
            self.ctx.replicated_grads_(out, before=False)
        self.passes += 1
        return probe.array()

    def unit_roundoff(self) -> float:
        """The unit roundoff of the passes' arithmetic: their dtype's, or TF32's
        (2^-11) where CUDA matmuls or cuDNN convolutions are allowed to use it."""
        u = UNIT_ROUNDOFF.get(self._ev.compute_dtype, 2.0 ** -24)
        if self._ev.device.type == "cuda" and u == 2.0 ** -24 and (
                torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32):
            u = 2.0 ** -11
        return u

    # -- per-class LCA outside per-class mode (lca_ext.quadrature.recomputed_classes) ---

    def class_stack(self, n: int) -> List[torch.Tensor]:
        return self.pool.new(n)

    def class_grads(self, f: float, classes, out, weight: float) -> np.ndarray:
        """weight x each class's gradient at f into ``out`` [len(classes), ...];
        returns the classes' losses there."""
        self._ev.class_grads(self.point(f), classes, out, weight)
        self.passes += 1
        return self._ev.last_class_losses

    def class_losses(self, f: float, classes) -> np.ndarray:
        return self._ev.class_losses(self.point(f), classes)

    def class_sums(self, stacked):
        """(per-class per-tensor sums [C, K], counts [C, K, 4]) of a class stack."""
        res = self.kernels.allocate_classes(self.theta_t, self.after, stacked)
        return res.sums.cpu().numpy(), res.counts.cpu().numpy()

    def check_class_split(self, split_loss: float) -> None:
        self._ev.check_split_once(self.loss_start, split_loss)

    def close(self) -> None:
        """Give the point buffer back to the pool."""
        if self._point is not None:
            self.pool.give(self._point)
            self._point = None
