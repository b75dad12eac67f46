"""LCATracker: exact, adaptive LCA inside an ordinary PyTorch training loop.

    tracker = lca_ext.LCATracker(model, loss_fn, lca_data=(X, Y))
    for x, y in loader:
        opt.zero_grad(); loss_fn(model(x), y).backward()
        with tracker.step():        # snapshots θ_t on entry, allocates on exit
            opt.step()
    run = tracker.result()

One tracked step (Simpson, the default):
  begin   θ_t is copied into a snapshot buffer; g(θ_t) is reused from the previous
          step's end point (computed afresh only after an untracked step).
  end     g(θ_{t+1}) and g(θ_mid) are evaluated on the whole LCA set
          (lca_ext.evaluate: no side effects on the training).  Composite Simpson
          keeps two running buffers, Q = g_0 + g_N + 2·(even interior points) and
          O = Σ odd points, so that ḡ = (Q + 4·O) / (3n) for n intervals; the
          grounding check uses ΣΔθ·Q and ΣΔθ·O from the fused op (LCA is linear in
          ḡ).  If |ΣLCA − ΔL| > atol + rtol·|ΔL|, the step is refined: Q += 2·O,
          O is rebuilt from the n new midpoints, n doubles (every gradient already
          computed is reused), up to max_splits intervals.  Finally ḡ is formed in
          O and one fused pass (lca_ext.allocate) gives the per-tensor sums, sign
          counts, per-neuron sums, histogram and per-parameter state.

Memory beyond the model, optimiser and .grad (fp32 values per tracked parameter):
θ_t snapshot 1, Q 1, g_end 1, O 1 (= 4), plus one transient buffer for the
current midpoint while it is evaluated, and the per-parameter statistics
cum_lca (1) and helped_steps (1 int32).  ``reuse_gradients=False`` drops g_end
(3 + transient) and recomputes g(θ_t) at every step instead (one more pass).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Union

import numpy as np
import torch
from torch import nn

from . import ops
from .evaluate import Evaluator, as_batches
from .params import ParameterSet


@dataclass
class Run:
    """A tracked run as plain data (numpy arrays, names and numbers).

    Per tracked step t (arrays indexed by position in ``steps``):
      loss_before / loss_after  whole-set loss at θ_t and θ_{t+1}
      lca_sum                   Σ over parameters of LCA (≈ loss_after - loss_before)
      error                     |lca_sum − (loss_after − loss_before)|
      splits                    Simpson intervals used (2 = plain Simpson; 1 = first order)
      grad_passes               whole-set gradient passes spent on this step
      tensor_sums [T, K]        LCA per parameter tensor
      counts [T, K, 4]          helped / hurt / zero / nonfinite per tensor
      row_sums [T, R]           LCA per neuron (rows of dim 0), tensors concatenated
      histogram [T, K, B + 2]   LCA value counts over ``bin_edges`` (+ under/overflow)
    Per parameter tensor k: ``cum_lca[k]`` (Σ_t LCA) and ``helped_steps[k]``.
    """

    names: List[str]
    layer_names: List[str]
    layer_of: List[int]
    shapes: List[tuple]
    bin_edges: np.ndarray
    steps: np.ndarray
    loss_before: np.ndarray
    loss_after: np.ndarray
    lca_sum: np.ndarray
    error: np.ndarray
    splits: np.ndarray
    grad_passes: np.ndarray
    tensor_sums: np.ndarray
    counts: np.ndarray
    row_sums: np.ndarray
    histogram: np.ndarray
    cum_lca: List[np.ndarray] = field(repr=False)
    helped_steps: List[np.ndarray] = field(repr=False)

    @property
    def layer_sums(self) -> np.ndarray:
        """[T, num_layers]: LCA per layer (a module's parameters together)."""
        out = np.zeros((len(self.steps), len(self.layer_names)))
        for k, layer in enumerate(self.layer_of):
            out[:, layer] += self.tensor_sums[:, k]
        return out


class LCATracker:
    """Tracks LCA of the steps taken inside ``with tracker.step():``.

    model:      the nn.Module being trained (its trainable parameters are tracked)
    loss_fn:    loss_fn(model(x), y) -> the *mean* loss of a batch
    lca_data:   the fixed LCA set: an (inputs, targets) tensor pair, cut into
                ``batch_size`` chunks in order, or an iterable of (x, y) batches
    method:     "simpson" (adaptive composite Simpson, default) or "first_order"
                (ḡ = g(θ_t), the left point)
    rtol, atol: refine a step while |ΣLCA − ΔL| > atol + rtol·|ΔL|
    max_splits: at most this many Simpson intervals per step (a power of two)
    schedule:   None (every step), an int k (every k-th step, starting at 0) or
                a collection of step indices; untracked steps cost nothing
    batchnorm:  "batch" (statistics of each fixed LCA batch) or "eval"; see
                lca_ext.evaluate
    bin_edges:  histogram edges (default signed_log_edges(1e-12, 1, 24))
    row_sums:   record per-neuron LCA every tracked step
    reuse_gradients: keep g(θ_{t+1}) for the next step (default) or recompute.
                It is recomputed anyway when a buffer the loss depends on has
                changed since (eval-mode BatchNorm statistics updated by the
                training's forward pass): the loss function itself moved.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, lca_data, *,
                 method: str = "simpson", rtol: float = 1e-3, atol: float = 1e-4,
                 max_splits: int = 32, schedule: Union[None, int, Iterable[int]] = None,
                 batch_size: int = 1024, batchnorm: str = "batch",
                 bin_edges: Optional[torch.Tensor] = None, row_sums: bool = True,
                 reuse_gradients: bool = True):
        if method not in ("simpson", "first_order"):
            raise ValueError(f"lca_ext.LCATracker: method={method!r}; expected "
                             "'simpson' or 'first_order'")
        if not (isinstance(max_splits, int) and max_splits >= 2
                and max_splits & (max_splits - 1) == 0):
            raise ValueError(f"lca_ext.LCATracker: max_splits={max_splits!r}; "
                             "expected a power of two >= 2")
        if rtol < 0 or atol < 0:
            raise ValueError(f"lca_ext.LCATracker: rtol={rtol}, atol={atol}; expected >= 0")
        self.model = model
        self.params = ParameterSet.from_model(model)
        self.evaluator = Evaluator(model, loss_fn, as_batches(lca_data, batch_size),
                                   self.params, batchnorm=batchnorm)
        self.method, self.rtol, self.atol, self.max_splits = method, rtol, atol, max_splits
        self.schedule = schedule if schedule is None or isinstance(schedule, int) \
            else frozenset(schedule)
        self.row_sums = row_sums
        self.reuse_gradients = reuse_gradients
        dev = self.params.params[0].device
        self.bin_edges = (ops.signed_log_edges(1e-12, 1.0, 24) if bin_edges is None
                          else bin_edges.detach().double()).to(dev)

        self._theta_t = [torch.empty_like(p) for p in self.params.params]
        self._g_start: Optional[List[torch.Tensor]] = None  # g(θ_t), when valid
        self._loss_start = float("nan")
        self._start_buffers: List[torch.Tensor] = []
        self._spare: Optional[List[torch.Tensor]] = None    # recycled gradient buffer
        self.cum_lca = self._new_buffer()
        self.helped_steps = [torch.zeros_like(p, dtype=torch.int32)
                             for p in self.params.params]
        self._records: List[dict] = []
        self._step = 0
        self._open = False
        self._tracked = False

    # -- the loop-facing API -------------------------------------------------

    def tracks(self, step: int) -> bool:
        s = self.schedule
        return s is None or (step % s == 0 if isinstance(s, int) else step in s)

    @contextlib.contextmanager
    def step(self):
        """``with tracker.step(): opt.step()`` — one optimiser step."""
        self.begin()
        try:
            yield self
        except BaseException:
            self._open = False  # the step did not complete: record nothing
            raise
        self.end()

    def begin(self) -> None:
        if self._open:
            raise RuntimeError("lca_ext.LCATracker.begin: the previous step was not "
                               "ended; call end() after the optimiser step")
        self._open = True
        self._tracked = self.tracks(self._step)
        if not self._tracked:
            self._drop_start()  # θ is about to change without us watching
            return
        with torch.no_grad():
            for snap, p in zip(self._theta_t, self.params.params):
                snap.copy_(p)
        buffers = self.evaluator.buffers_that_matter()
        if self._g_start is not None and not (
                len(buffers) == len(self._start_buffers)
                and all(torch.equal(a, b) for a, b in zip(buffers, self._start_buffers))):
            self._drop_start()  # the loss function moved (e.g. eval-mode BN stats)
        self._start_buffers = buffers
        if self._g_start is None:
            self._g_start = self._buffer()
            self._loss_start = self.evaluator.loss_and_grad(self._theta_t, self._g_start)
            self._start_passes = 1
        else:
            self._start_passes = 0

    def end(self) -> None:
        if not self._open:
            raise RuntimeError("lca_ext.LCATracker.end: no step was begun")
        self._open = False
        step, self._step = self._step, self._step + 1
        if not self._tracked:
            return
        with torch.no_grad():
            self._records.append(self._allocate_step(step))

    def result(self) -> Run:
        """Everything tracked so far, as plain data."""
        recs = self._records
        k = len(self.params)
        col = lambda key, dt=np.float64: np.array([r[key] for r in recs], dtype=dt)  # noqa: E731
        stack = lambda key, shape, dt: (np.stack([r[key] for r in recs])  # noqa: E731
                                        if recs else np.zeros((0, *shape), dt))
        rows = sum(p.shape[0] if p.dim() else 1 for p in self.params.params) \
            if self.row_sums else 0
        return Run(
            names=list(self.params.names), layer_names=list(self.params.layer_names),
            layer_of=list(self.params.layer_of),
            shapes=[tuple(p.shape) for p in self.params.params],
            bin_edges=self.bin_edges.cpu().numpy(),
            steps=col("step", np.int64), loss_before=col("loss_before"),
            loss_after=col("loss_after"), lca_sum=col("lca_sum"), error=col("error"),
            splits=col("splits", np.int64), grad_passes=col("grad_passes", np.int64),
            tensor_sums=stack("tensor_sums", (k,), np.float64),
            counts=stack("counts", (k, 4), np.int64),
            row_sums=stack("row_sums", (rows,), np.float64),
            histogram=stack("histogram", (k, self.bin_edges.numel() + 1), np.int64),
            cum_lca=[t.cpu().numpy().copy() for t in self.cum_lca],
            helped_steps=[t.cpu().numpy().copy() for t in self.helped_steps])

    # -- internals -------------------------------------------------------------

    def _new_buffer(self) -> List[torch.Tensor]:
        # gradient-sized float32 buffers (float64 for float64 parameters)
        return [torch.zeros_like(p, dtype=torch.float64 if p.dtype == torch.float64
                                 else torch.float32) for p in self.params.params]

    def _buffer(self) -> List[torch.Tensor]:
        buf, self._spare = self._spare, None
        if buf is None:
            return self._new_buffer()
        torch._foreach_zero_(buf)
        return buf

    def _drop_start(self) -> None:
        if self._g_start is not None:
            self._spare, self._g_start = self._g_start, None

    def _lca_total(self, after, grad) -> float:
        return ops.allocate(self._theta_t, after, grad).sums.sum().item()

    def _point(self, after, f: float) -> List[torch.Tensor]:
        """θ_t + f·(θ_{t+1} − θ_t), in a fresh (transient) buffer."""
        return [torch.lerp(a0, a1, f) for a0, a1 in zip(self._theta_t, after)]

    def _allocate_step(self, step: int) -> dict:
        ev = self.evaluator
        passes0 = ev.passes
        after = [p.detach() for p in self.params.params]
        g_end = self._buffer()
        loss_after = ev.loss_and_grad(after, g_end)
        d_loss = loss_after - self._loss_start
        tol = self.atol + self.rtol * abs(d_loss)

        if self.method == "first_order":
            avg, splits = self._g_start, 1
        else:
            q = self._g_start                 # becomes Q = g_0 + g_N + 2·(even points)
            ops.accumulate_(q, g_end, 1.0)
            o = [torch.zeros_like(t) for t in q]
            ev.loss_and_grad(self._point(after, 0.5), o)
            n = 2
            s_q, s_o = self._lca_total(after, q), self._lca_total(after, o)
            while abs((s_q + 4 * s_o) / (3 * n) - d_loss) > tol and n < self.max_splits:
                ops.accumulate_(q, o, 2.0)    # old midpoints become even points
                s_q += 2 * s_o
                torch._foreach_zero_(o)
                for j in range(n):            # the n new midpoints
                    ev.loss_and_grad(self._point(after, (2 * j + 1) / (2 * n)), o)
                n *= 2
                s_o = self._lca_total(after, o)
            torch._foreach_mul_(o, 4.0 / (3 * n))
            ops.accumulate_(o, q, 1.0 / (3 * n))
            avg, splits = o, n

        res = ops.allocate(self._theta_t, after, avg, row_sums=self.row_sums,
                           bin_edges=self.bin_edges, cum_lca=self.cum_lca,
                           helped_steps=self.helped_steps)
        lca_sum = res.sums.sum().item()
        record = dict(step=step, loss_before=self._loss_start, loss_after=loss_after,
                      lca_sum=lca_sum, error=abs(lca_sum - d_loss), splits=splits,
                      grad_passes=ev.passes - passes0 + self._start_passes,
                      tensor_sums=res.sums.cpu().numpy(), counts=res.counts.cpu().numpy(),
                      row_sums=res.row_sums.cpu().numpy(),
                      histogram=res.histogram.cpu().numpy())
        # θ_{t+1} is the next step's θ_t: keep its gradient (or drop it)
        old_start = self._g_start
        if self.reuse_gradients:
            self._g_start, self._loss_start = g_end, loss_after
            self._spare = old_start
        else:
            self._g_start, self._spare = None, g_end
        return record
