"""LCA under torch.distributed: DDP (replicated parameters) and FSDP2 (sharded).

The tracker stays one object per rank; this module is the only place that
talks to ``torch.distributed``.  What is exchanged, and why it is exact:

* **The LCA set is sharded** (``shard_batches``): example i goes to rank
  i mod world (no padding, so every example is counted exactly once, uneven
  counts included).  A whole-set gradient pass all-reduces *sums* (the loss
  sum and the example count, the gradient of the sum divided by the global
  count), never a mean of per-rank means.
* **DDP** (``Replicated``): every rank holds the whole model, Δθ is the same on
  every rank, so after the gradient all-reduce every buffer the tracker keeps
  is identical on every rank and every rank computes the same LCA; rank 0
  writes the store.  The gradient passes run on the wrapped module itself
  (``functional_call`` on ``ddp.module``), so DDP's reducer hooks never fire.
* **FSDP2** (``Sharded``, ``fully_shard``): each rank allocates on its local
  dim-0 shards (``to_local()`` of parameters, gradients and snapshots); the
  per-tensor sums, sign counts, histograms and grounding totals are
  all-reduced as small vectors, and per-neuron sums are placed at their global
  rows and summed (rows of dim 0 are whole on one rank).  No full parameter or
  gradient is gathered to compute LCA; only the per-parameter *state* that is
  written to the store (and frames) is gathered, one tensor at a time.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from .lca_set import at_least_float32, first_tensor
from .ops import Allocation


def _dist():
    import torch.distributed as dist
    return dist


def unwrap(model: nn.Module) -> nn.Module:
    """The module whose parameters are trained: DDP's ``.module`` (so that
    parameter names carry no "module." prefix and the tracker's own gradient
    passes never go through DDP's reducer), and a ``torch.compile``d module's
    original (its passes then run eagerly: compiling them would recompile for
    every swapped-in parameter set)."""
    from torch.nn.parallel import DistributedDataParallel
    while True:
        if isinstance(model, (DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def is_sharded(model: nn.Module) -> bool:
    """Does the model hold DTensor parameters (FSDP2 ``fully_shard``)?"""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def context(model: nn.Module, distributed) -> "Context":
    """The tracker's view of the process group.

    ``distributed``: None (automatic: the default process group when one is
    initialised with more than one rank, or when the model is sharded), False
    (each rank on its own: only for unsharded models), True (the default
    group) or a ProcessGroup."""
    sharded = is_sharded(model)
    if distributed is False:
        if sharded:
            raise ValueError("lca_ext.LCATracker: distributed=False, but the model's "
                             "parameters are sharded (FSDP2); LCA of a shard alone is "
                             "not the LCA of the model")
        return Context()
    dist = _dist()
    if distributed is None or distributed is True:
        if not (dist.is_available() and dist.is_initialized()):
            if distributed is True or sharded:
                raise RuntimeError("lca_ext.LCATracker: distributed tracking needs an "
                                   "initialised torch.distributed process group "
                                   "(dist.init_process_group)")
            return Context()
        group = None
    else:
        group = distributed
    if dist.get_world_size(group) == 1 and not sharded:
        return Context()
    return Sharded(group) if sharded else Replicated(group)



class RankCounts:
    """Every rank's count of something (the LCA set's batches, or per-class
    units), gathered once, collectively, the first time it is asked for."""

    def __init__(self, ctx):
        self._ctx = ctx
        self._counts: Optional[List[int]] = None

    def gather(self, local: int) -> List[int]:
        """Every rank's count, rank 0's first (the first call: a collective that
        every rank reaches at the same point of a step)."""
        if self._counts is None:
            self._counts = self._ctx.counts(local)
        return self._counts

    def offset(self) -> int:
        """The global index of this rank's first item (0 before gathered)."""
        return sum(self._counts[:self._ctx.rank]) if self._counts else 0

    def most(self) -> int:
        """The most any one rank holds (0 before gathered)."""
        return max(self._counts) if self._counts else 0

class Context:
    """One process: every reduction is the identity."""

    rank, world, sharded = 0, 1, False

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def local(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return list(params)

    def shard_data(self, data):
        return data

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def sum_float(self, x: float) -> float:
        return x

    def max_int(self, x: int) -> int:
        return x

    def counts(self, n: int) -> List[int]:
        """Every rank's ``n``, in rank order."""
        return [n]

    def over_shards(self, x: float) -> float:
        """A total over the parameters, from this rank's part of it."""
        return x

    def replicated_grads_(self, grad_out: Sequence[torch.Tensor], before: bool) -> None:
        pass

    def allocation(self, res: Allocation, rows: bool) -> Allocation:
        return res

    def full(self, k: int, local: torch.Tensor) -> torch.Tensor:
        return local

    def local_part(self, k: int, full: np.ndarray) -> np.ndarray:
        return full

    def barrier(self) -> None:
        pass


class Replicated(Context):
    """DDP: the parameters and every tracker buffer are replicated."""

    def __init__(self, group):
        dist = _dist()
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def shard_data(self, data):
        """This rank's share of an LCA set given whole on every rank: example i
        of an (inputs, targets) pair, or batch i of a batch list, goes to rank
        i mod world (every example once, uneven counts included, no padding)."""
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(
                isinstance(t, torch.Tensor) for t in data):
            return data[0][self.rank::self.world], data[1][self.rank::self.world]
        return list(data)[self.rank::self.world]

    def _device(self) -> torch.device:
        # NCCL reduces CUDA tensors only; gloo takes CPU tensors
        backend = _dist().get_backend(self.group)
        return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" \
            else torch.device("cpu")

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        _dist().all_reduce(t, group=self.group)
        return t

    def sum_float(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64, device=self._device())
        return float(self.sum_(t).item())

    def max_int(self, x: int) -> int:
        dist = _dist()
        t = torch.tensor([x], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t.item())

    def counts(self, n: int) -> List[int]:
        dist = _dist()
        out = [torch.zeros(1, dtype=torch.int64, device=self._device())
               for _ in range(self.world)]
        dist.all_gather(out, torch.tensor([n], dtype=torch.int64, device=self._device()),
                        group=self.group)
        return [int(t.item()) for t in out]

    def replicated_grads_(self, grad_out: Sequence[torch.Tensor], before: bool) -> None:
        """Add every rank's gradient contribution into replicated buffers.

        ``before`` (ahead of a pass): the buffers hold the same values on every
        rank; keep them on rank 0 only, so that the sum after the pass counts
        them once.  After the pass: all-reduce (every rank gets the same sum)."""
        if before:
            if self.rank != 0:
                torch._foreach_zero_(list(grad_out))
            return
        dist = _dist()
        works = [dist.all_reduce(t, group=self.group, async_op=True) for t in grad_out]
        for w in works:
            w.wait()

    def barrier(self) -> None:
        _dist().barrier(group=self.group)


class Sharded(Replicated):
    """FSDP2: parameters are DTensors sharded on dim 0; the tracker works on the
    local shards and reduces its small per-tensor results."""

    sharded = True

    def __init__(self, group):
        super().__init__(group)
        self.dtensors: List = []
        self.row_offsets: List[int] = []   # first global row of each local shard
        self.local_rows: List[int] = []
        self.global_rows: List[int] = []   # rows (dim 0) of each full tensor

    def local(self, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        from torch.distributed.tensor import DTensor, Shard
        self.dtensors = list(params)
        out, self.row_offsets, self.local_rows, self.global_rows = [], [], [], []
        for p in params:
            if not isinstance(p, DTensor):
                raise ValueError("lca_ext.LCATracker: with FSDP2 every tracked parameter "
                                 f"must be sharded; one is a plain {type(p).__name__}")
            if p.dim() == 0 or len(p.placements) != 1 or p.placements[0] != Shard(0):
                raise ValueError("lca_ext.LCATracker: FSDP2 parameters must be sharded on "
                                 f"dim 0 of a 1-D mesh; got placements {p.placements} for a "
                                 f"{tuple(p.shape)} parameter")
            local = p.to_local()
            rows = p.shape[0]
            chunk = -(-rows // self.world)         # torch.chunk: ceil(rows / world)
            start = min(rows, self.rank * chunk)
            if local.shape[0] != min(rows, start + chunk) - start:
                raise ValueError("lca_ext.LCATracker: an FSDP2 shard of a "
                                 f"{tuple(p.shape)} parameter has {local.shape[0]} rows on "
                                 f"rank {self.rank}; expected torch.chunk's even split")
            out.append(local)
            self.row_offsets.append(start)
            self.local_rows.append(local.shape[0])
            self.global_rows.append(rows)
        return out

    def over_shards(self, x: float) -> float:
        return self.sum_float(x)

    def replicated_grads_(self, grad_out, before) -> None:
        pass   # FSDP's reduce-scatter already gave each rank its shard's gradient

    def allocation(self, res: Allocation, rows: bool) -> Allocation:
        """Whole-model results from this rank's shard results.  Every rank runs
        the same reductions (``rows`` is a tracker option, equal on all ranks)."""
        sums = self.sum_(res.sums.clone())
        counts = self.sum_(res.counts.clone())
        hist = self.sum_(res.histogram.clone())
        row_sums = res.row_sums
        if rows:
            # a neuron's row lives whole on one rank: put it at its global row, sum
            row_sums = torch.zeros(sum(self.global_rows), dtype=res.row_sums.dtype,
                                   device=res.row_sums.device)
            base, at = 0, 0
            for k, n_global in enumerate(self.global_rows):
                n_local, start = self.local_rows[k], base + self.row_offsets[k]
                row_sums[start:start + n_local] = res.row_sums[at:at + n_local]
                base += n_global
                at += n_local
            row_sums = self.sum_(row_sums)
        return res._replace(sums=sums, counts=counts, histogram=hist, row_sums=row_sums)

    def full(self, k: int, local: torch.Tensor) -> torch.Tensor:
        """The whole tensor k from every rank's shard of it (an all-gather; used
        only for what is stored: per-parameter state and frames)."""
        from torch.distributed.tensor import DTensor
        p = self.dtensors[k]
        d = DTensor.from_local(local.contiguous(), device_mesh=p.device_mesh,
                               placements=p.placements, shape=p.shape, stride=p.stride())
        return d.full_tensor()

    def local_part(self, k: int, full: np.ndarray) -> np.ndarray:
        start = self.row_offsets[k]
        return full[start:start + self.local_rows[k]]


# -- the FSDP2 gradient pass (lca_ext.evaluate.Evaluator) ---------------------------

def sharded_pass(ev, point, grad_out, weight, probe=None) -> tuple:
    """FSDP2: run the sharded model itself at ``point`` (this rank's shards);
    ``ev`` the LCA set's lca_ext.evaluate.Evaluator.

    The point's values are swapped into the live shards, tensor by tensor,
    and swapped back afterwards (exact copies, also on error), so FSDP's own
    all-gathers see the point and its reduce-scatter gives each rank the
    whole-set gradient of its shard.  The training's ``.grad`` tensors are
    set aside (not copied) and put back; module buffers are restored.

    ``probe`` (lca_ext.group_probe.GroupProbe): the bars' groups are the *rounds*
    (round r: every rank's r-th batch, one forward together); each round's
    gradient shard goes to ``probe.add(r, ...)`` (the probe sums the shards'
    samples over the ranks); with ``point`` None, round r runs at
    ``probe.point(r)`` (a mixed pass: one point per round, the same on
    every rank)."""
    live = ev.params.params
    dtensors = ev.ctx.dtensors
    need_grad = grad_out is not None or probe is not None
    saved_grads = [p.grad for p in dtensors]
    saved_buffers = [b.detach().clone() for b in ev.model.buffers()]
    total = torch.zeros((), dtype=torch.float64, device=ev.device)
    wsum = torch.zeros((), dtype=torch.float64, device=ev.device)
    swapped: List[tuple] = []       # (k, the tensor now holding live[k]'s values)

    def move_to(x) -> None:
        # (each pair is listed only once swapped, and unlisted once swapped back:
        # an error halfway leaves the list true, so the finally restores exactly)
        _reshard(ev.model)   # the shards are what FSDP all-gathers from
        with torch.no_grad():
            while swapped:                         # back to the live values first
                k, t = swapped[-1]
                _swap(live[k], t)
                swapped.pop()
            if x is None:
                return
            x = x() if callable(x) else x          # (a probe point: after the swap back)
            for k, (a, b) in enumerate(zip(x, live)):
                if a.numel() and a.data_ptr() != b.data_ptr():
                    _swap(b, a)
                    swapped.append((k, a))

    def shard_grads() -> List[torch.Tensor]:
        return [torch.zeros_like(b) if p.grad is None else p.grad.to_local()
                for p, b in zip(dtensors, live)]

    try:
        if point is not None:
            move_to(point)
        for p in dtensors:
            p.grad = None
        with ev.quiet_model():
            batches = ev.batches()
            first = None
            for r in range(ev.rounds):
                if point is None:
                    move_to(lambda: probe.point(r))
                batch = next(batches, None)
                real = batch is not None
                if first is None:
                    first = batch
                if not real:      # fewer batches here: a zero-weight forward
                    batch = first
                with torch.set_grad_enabled(need_grad):
                    out = ev.batch_loss(ev.model, batch)
                    loss, w = out if isinstance(out, tuple) and len(out) == 2 else \
                        (out, first_tensor(batch).shape[0])
                    w = w if real else 0.0
                    batch_sum = at_least_float32(loss) * w
                    if need_grad:
                        # FSDP averages gradients over ranks: x world undoes it
                        scaled = batch_sum * (ev.ctx.world / ev.count)
                total += loss.detach().double() * w
                wsum += w
                if need_grad:
                    scaled.backward()
                if probe is not None:      # this round's gradient shard
                    grads = shard_grads()
                    # (the live shards hold the point now: θ_{t+1} is where they
                    # were swapped to)
                    held = dict(swapped)
                    probe.add(r, grads, 1.0, after=[held.get(k, t) for k, t in enumerate(live)])
                    if grad_out is not None:
                        ev.kernels.accumulate_(list(grad_out), grads, weight)
                    for p in dtensors:
                        p.grad = None
        if grad_out is not None:
            if probe is None:
                ev.kernels.accumulate_(list(grad_out), shard_grads(), weight)
            ev.passes += 1
    finally:
        # (reshard_after_forward=False would keep the point's unsharded values)
        move_to(None)
        with torch.no_grad():
            for b, v in zip(ev.model.buffers(), saved_buffers):
                b.copy_(v)
        for p, g in zip(dtensors, saved_grads):
            p.grad = g
    return tuple(ev.ctx.sum_float(v) for v in torch.stack([total, wsum]).tolist())


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
