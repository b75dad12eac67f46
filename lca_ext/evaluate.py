"""The whole-set loss and gradient at a point of parameter space, free of side
effects on the training it watches.

At a point θ (a list of tensors, one per tracked parameter) the evaluator runs the
model over every batch of the LCA set with ``torch.func.functional_call`` and
returns the exact mean loss over the set (per-batch mean x batch size, summed,
divided by the total count, so a last partial batch weighs right), adding the
gradient of that mean into caller-owned buffers.  What it guarantees:

* the live parameters and their ``.grad`` are never written (gradients come
  from ``torch.autograd.grad`` on the tensors passed in);
* BatchNorm running statistics are never touched: buffers are passed as copies.
  By default BatchNorm normalises with the statistics of each fixed, unshuffled
  batch of the LCA set (``batchnorm="batch"``, as the LCA paper's code did: the
  loss is then the training-mode loss the optimiser sees); ``batchnorm="eval"``
  uses the running statistics instead (``model.eval()`` semantics);
* no dropout: every dropout module runs in eval mode during evaluation, and each
  module's ``training`` flag is restored afterwards;
* the CPU and CUDA random number streams are forked and restored, so the
  training's dropout masks and data order are unchanged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.func import functional_call

from . import ops
from .distributed import Context
from .params import ParameterSet

Batch = Tuple[torch.Tensor, torch.Tensor]

_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
            nn.FeatureAlphaDropout)
_BATCHNORM = (nn.modules.batchnorm._BatchNorm,)


def as_batches(data, batch_size: int = 1024) -> List[Batch]:
    """The LCA set as a fixed list of (inputs, targets) batches.

    ``data`` is a (inputs, targets) pair of tensors (cut into ``batch_size``
    chunks in order) or an iterable of such pairs (e.g. a DataLoader without
    shuffling), read once and kept.
    """
    if isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"lca_ext: lca_data inputs have {x.shape[0]} rows but "
                             f"targets have {y.shape[0]}; expected the same count")
        return [(x[i:i + batch_size], y[i:i + batch_size])
                for i in range(0, x.shape[0], batch_size)]
    batches = []
    for k, b in enumerate(data):
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"lca_ext: lca_data batch {k} is not an (inputs, targets) pair")
        batches.append((b[0], b[1]))
    if not batches:
        raise ValueError("lca_ext: lca_data is empty; expected at least one batch")
    return batches


class Evaluator:
    """Whole-set loss and gradient of ``loss_fn(model(x), y)`` at any point."""

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Sequence[Batch],
                 params: ParameterSet, batchnorm: str = "batch",
                 ctx: Optional[Context] = None):
        if batchnorm not in ("batch", "eval"):
            raise ValueError(f"lca_ext: batchnorm={batchnorm!r}; expected 'batch' or 'eval'")
        self.model = model
        self.loss_fn = loss_fn
        self.batches = list(batches)
        self.params = params
        self.batchnorm = batchnorm
        self.ctx = ctx or Context()
        self.kernels = ops.kernels_for(params.params[0].device)
        # under torch.distributed: this rank's share; the mean is over all ranks
        self.count = int(self.ctx.sum_float(sum(int(y.shape[0]) for _, y in self.batches)))
        if self.count == 0:
            raise ValueError("lca_ext: the LCA set has no examples")
        if self.ctx.sharded:
            if not self.batches:
                raise ValueError(f"lca_ext: rank {self.ctx.rank} got no LCA batch; FSDP "
                                 "needs every rank in every forward pass (use a set with "
                                 "at least as many batches or examples as ranks)")
            # FSDP's collectives need the same number of forward passes on every rank
            self.rounds = self.ctx.max_int(len(self.batches))
        self.passes = 0  # gradient passes run (each = one sweep of the LCA set)

    def buffers_that_matter(self) -> List[torch.Tensor]:
        """Copies of the module buffers the loss depends on (all of them, except
        BatchNorm running statistics when BatchNorm uses batch statistics).  When
        they change between two steps (eval-mode BatchNorm after a training
        forward pass), the loss function itself has changed, and a gradient from
        the previous step must not be reused."""
        skip = set()
        if self.batchnorm == "batch":
            for m in self.model.modules():
                if isinstance(m, _BATCHNORM):
                    skip.update(id(b) for b in m.buffers(recurse=False))
        return [b.detach().clone() for b in self.model.buffers() if id(b) not in skip]

    @contextlib.contextmanager
    def _quiet_model(self):
        """Dropout off, BatchNorm as chosen, RNG streams forked; all restored."""
        flags = [(m, m.training) for m in self.model.modules()]
        devices = sorted({p.device.index for p in self.params.params
                          if p.device.type == "cuda"})
        try:
            with torch.random.fork_rng(devices=devices):
                for m in self.model.modules():
                    if isinstance(m, _DROPOUT):
                        m.train(False)
                    elif isinstance(m, _BATCHNORM):
                        m.train(self.batchnorm == "batch")
                yield
        finally:
            for m, t in flags:
                m.training = t

    def loss_and_grad(self, point: Sequence[torch.Tensor],
                      grad_out: Optional[Sequence[torch.Tensor]] = None,
                      weight: float = 1.0) -> float:
        """Mean loss over the LCA set at ``point``; if ``grad_out`` is given,
        ``grad_out[k] += weight * d(mean loss)/d(param k)`` (fused op)."""
        if self.ctx.sharded:
            return self._loss_and_grad_sharded(point, grad_out, weight)
        names = self.params.names
        frozen = {n: p for n, p in self.model.named_parameters() if n not in names}
        total = 0.0
        if grad_out is not None:
            self.ctx.replicated_grads_(grad_out, before=True)
        with self._quiet_model():
            for x, y in self.batches:
                leaves = [t.detach().requires_grad_(grad_out is not None) for t in point]
                buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                tensors = {**frozen, **buffers, **dict(zip(names, leaves))}
                with torch.set_grad_enabled(grad_out is not None):
                    out = functional_call(self.model, tensors, (x,), tie_weights=True)
                    # loss_fn gives the batch mean; x batch size = the batch's sum
                    batch_sum = self._checked_loss(out, y) * y.shape[0]
                total += batch_sum.item()
                if grad_out is not None:
                    grads = torch.autograd.grad(batch_sum, leaves, allow_unused=True)
                    grads = [torch.zeros_like(p) if g is None else g
                             for g, p in zip(grads, point)]
                    self.kernels.accumulate_(list(grad_out), grads, weight / self.count)
        if grad_out is not None:
            self.ctx.replicated_grads_(grad_out, before=False)
            self.passes += 1
        return self.ctx.sum_float(total) / self.count

    def _loss_and_grad_sharded(self, point, grad_out, weight) -> float:
        """FSDP2: run the sharded model itself at ``point`` (this rank's shards).

        The point's values are swapped into the live shards, tensor by tensor,
        and swapped back afterwards (exact copies, also on error), so FSDP's own
        all-gathers see the point and its reduce-scatter gives each rank the
        whole-set gradient of its shard.  The training's ``.grad`` tensors are
        set aside (not copied) and put back; module buffers are restored."""
        live = self.params.params
        dtensors = self.ctx.dtensors
        swapped = [k for k, (a, b) in enumerate(zip(point, live))
                   if a.numel() and a.data_ptr() != b.data_ptr()]
        saved_grads = [p.grad for p in dtensors]
        saved_buffers = [b.detach().clone() for b in self.model.buffers()]
        total = 0.0
        _reshard(self.model)   # the shards are what FSDP all-gathers from
        with torch.no_grad():
            for k in swapped:
                _swap(live[k], point[k])
        try:
            for p in dtensors:
                p.grad = None
            with self._quiet_model():
                for r in range(self.rounds):
                    real = r < len(self.batches)
                    x, y = self.batches[r] if real else (self.batches[0][0][:1],
                                                         self.batches[0][1][:1])
                    with torch.set_grad_enabled(grad_out is not None):
                        batch_sum = self._checked_loss(self.model(x), y) * (
                            y.shape[0] if real else 0.0)
                        # FSDP averages gradients over ranks: x world undoes it
                        scaled = batch_sum * (self.ctx.world / self.count)
                    total += batch_sum.item()
                    if grad_out is not None:
                        scaled.backward()
            if grad_out is not None:
                grads = [torch.zeros_like(b) if p.grad is None else p.grad.to_local()
                         for p, b in zip(dtensors, live)]
                self.kernels.accumulate_(list(grad_out), grads, weight)
                self.passes += 1
        finally:
            # (reshard_after_forward=False would keep the point's unsharded values)
            _reshard(self.model)
            with torch.no_grad():
                for k in swapped:
                    _swap(live[k], point[k])
                for b, v in zip(self.model.buffers(), saved_buffers):
                    b.copy_(v)
            for p, g in zip(dtensors, saved_grads):
                p.grad = g
        return self.ctx.sum_float(total) / self.count

    def _batch_coupled(self) -> bool:
        """Do samples of a batch affect each other's outputs here?"""
        return self.batchnorm == "batch" and any(
            isinstance(m, _BATCHNORM) for m in self.model.modules())

    def _class_grads_split(self, point, classes, grad_out, weight) -> None:
        names = self.params.names
        frozen = {n: p for n, p in self.model.named_parameters() if n not in names}
        with self._quiet_model(), torch.enable_grad():
            for x, y in self.batches:
                for j, c in enumerate(classes):
                    mask = y == c
                    if not bool(mask.any()):
                        continue
                    leaves = [t.detach().requires_grad_(True) for t in point]
                    buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                    tensors = {**frozen, **buffers, **dict(zip(names, leaves))}
                    out = functional_call(self.model, tensors, (x[mask],), tie_weights=True)
                    share = self._checked_loss(out, y[mask]) * mask.sum()
                    grads = torch.autograd.grad(share, leaves, allow_unused=True)
                    grads = [torch.zeros_like(p) if g is None else g
                             for g, p in zip(grads, point)]
                    self.kernels.accumulate_([g[j] for g in grad_out], grads, weight / self.count)
        self.passes += 1

    def _checked_loss(self, out, y) -> torch.Tensor:
        loss = self.loss_fn(out, y)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"lca_ext: loss_fn returned {shape}; expected a scalar "
                             "tensor (the mean loss of the batch)")
        return loss

    def class_grads(self, point: Sequence[torch.Tensor], classes: Sequence[int],
                    grad_out: Sequence[torch.Tensor], weight: float) -> None:
        """For each class c = classes[j]: ``grad_out[k][j] += weight * d/dθ_k`` of
        class c's share of the mean loss, (1/N) Σ_{i: y_i = c} loss_i; the shares
        add up to the whole-set loss.  When samples are independent in the forward
        pass (no BatchNorm using batch statistics), each class's samples are run
        on their own: one pass over the set in all.  Otherwise one forward per
        batch (so batch statistics are the whole batch's) and one backward per
        class present."""
        if self.ctx.sharded:
            raise NotImplementedError("lca_ext: per-class LCA is not supported with FSDP2 "
                                      "yet (use DDP, or num_classes=None)")
        self.ctx.replicated_grads_(grad_out, before=True)
        self._class_grads_one_rank(point, classes, grad_out, weight)
        self.ctx.replicated_grads_(grad_out, before=False)

    def _class_grads_one_rank(self, point, classes, grad_out, weight) -> None:
        if not self._batch_coupled():
            return self._class_grads_split(point, classes, grad_out, weight)
        names = self.params.names
        frozen = {n: p for n, p in self.model.named_parameters() if n not in names}
        with self._quiet_model(), torch.enable_grad():
            for x, y in self.batches:
                leaves = [t.detach().requires_grad_(True) for t in point]
                buffers = {n: b.clone() for n, b in self.model.named_buffers()}
                tensors = {**frozen, **buffers, **dict(zip(names, leaves))}
                out = functional_call(self.model, tensors, (x,), tie_weights=True)
                present = [(j, y == c) for j, c in enumerate(classes)]
                present = [(j, m) for j, m in present if bool(m.any())]
                for i, (j, mask) in enumerate(present):
                    share = self._checked_loss(out[mask], y[mask]) * mask.sum()
                    grads = torch.autograd.grad(share, leaves, allow_unused=True,
                                                retain_graph=i + 1 < len(present))
                    grads = [torch.zeros_like(p) if g is None else g
                             for g, p in zip(grads, point)]
                    self.kernels.accumulate_([g[j] for g in grad_out], grads, weight / self.count)
        self.passes += 1


def _swap(a: torch.Tensor, b: torch.Tensor) -> None:
    """Exchange the values of two same-shape tensors (one tensor's worth of
    temporary memory)."""
    tmp = a.clone()
    a.copy_(b)
    b.copy_(tmp)


def _reshard(model: nn.Module) -> None:
    """Free every FSDP2 unsharded parameter, so the next forward all-gathers
    the current shards."""
    from torch.distributed.fsdp import FSDPModule
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()
