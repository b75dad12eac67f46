"""The path integral of one tracked step: ḡ, the average gradient along the
straight line θ_t → θ_{t+1}, by the cheapest rule that grounds the step.

The grounding check is exact (ΔL = L(θ_{t+1}) − L(θ_t) is known) and LCA is
linear in ḡ, so every rule is judged by Σ_i Δθ_i·ḡ_i against ΔL, from per-buffer
totals of the fused op, before ḡ itself is formed:

* ``adaptive`` (the default): the trapezoid on the end points, ḡ = (g_0 + g_1)/2
  (one new pass: g_0 is the previous step's g_1); if it misses the tolerance, the
  midpoint is added, which is Simpson (g_0 + 4·g_½ + g_1)/6 (two passes); if that
  misses, composite Simpson as below (g_0 is computed once more to take the
  midpoint back out of its buffer).  Splits recorded: 1 trapezoid, 2 Simpson,
  n composite.
* ``simpson``: Simpson first, then composite Simpson with doubled points, every
  gradient computed so far reused (Q = g_0 + g_N + 2·even points, O = Σ odd
  points, ḡ = (Q + 4·O)/(3n)), up to ``max_splits`` intervals.

Both keep to four gradient-sized buffers: θ_t (the tracker's), g_0 (the start
buffer), g_1 (kept to start the next step) and one more that holds a path point
and then a sum.  A rule that needs refinement lends g_1's buffer to its points,
so the next step recomputes its start gradient.

``low_memory`` is the rule of ``reuse_gradients=False`` (three buffers, a
refined step recomputed from scratch); ``recomputed_classes`` gives per-class
LCA outside per-class mode (class gradients recomputed at the total's points).

Each function takes the tracker (its buffers, passes, fused kernels) and one
objective, and returns (ḡ, splits, loss at θ_{t+1}, g_1's buffer, whether g_1
is valid to start the next step).
"""
from __future__ import annotations

import math

import numpy as np
import torch


def adaptive(tr, obj, after):
    a, k = obj.g_start, tr.kernels                   # a: g_0
    b = tr._buffer(obj)
    loss_after = tr._loss_and_grad(obj, after, b, 1.0)          # g_1
    d_loss = loss_after - obj.loss_start
    tol = tr.atol + tr.rtol * abs(d_loss)
    s_a, s_b = totals(tr, after, a, b)
    c = tr._buffer(obj)
    if abs((s_a + s_b) / 2 - d_loss) <= tol:                  # trapezoid
        k.accumulate_(c, a, 0.5)
        k.accumulate_(c, b, 0.5)
        return c, 1, loss_after, b, True
    # Simpson: c holds the midpoint, whose gradient goes into a with weight 4
    tr._loss_and_grad(obj, tr._point(after, 0.5, c), a, 0.5, weight=4.0)
    (s_a,) = totals(tr, after, a)                            # Σ Δθ·(g_0 + 4·g_½)
    if abs((s_a + s_b) / 6 - d_loss) <= tol or tr.max_splits < 4:
        torch._foreach_zero_(c)
        k.accumulate_(c, a, 1.0 / 6)
        k.accumulate_(c, b, 1.0 / 6)
        return c, 2, loss_after, b, True
    # composite Simpson: g_0 once more (into c) to take g_½ back out of a
    torch._foreach_zero_(c)
    tr._loss_and_grad(obj, tr._theta_t, c, 0.0)
    k.accumulate_(a, c, -1.0)
    torch._foreach_mul_(a, 0.25)                              # a = O = g_½
    k.accumulate_(c, b, 1.0)                                  # c = Q = g_0 + g_1
    n = _refine(tr, obj, after, c, a, b, d_loss, tol)
    avg = _form(tr, c, a, n)
    tr._release(c)
    return avg, n, loss_after, b, False


def totals(tr, after, *grads):
    """Σ_i Δθ_i·g_i (all ranks) for each gradient list, from one fused call."""
    k, n = len(tr._theta_t), len(grads)
    flat = [t for g in grads for t in g]
    if flat[0].dim() > tr._theta_t[0].dim():      # per-class buffers: Σ over classes
        sums = tr.kernels.allocate_classes(tr._theta_t * n, list(after) * n, flat).sums.sum(0)
    else:
        sums = tr.kernels.allocate(tr._theta_t * n, list(after) * n, flat).sums
    per = sums.reshape(n, k).sum(1).tolist()
    return [tr.ctx.over_shards(v) for v in per]


def simpson(tr, obj, after):
    # Four gradient-sized buffers at most: θ_t, Q (the start gradient's buffer),
    # O, and one that first holds the midpoint and then g_1.
    o = tr._buffer(obj)
    g_end = tr._buffer(obj)
    tr._loss_and_grad(obj, tr._point(after, 0.5, g_end), o, 0.5)
    torch._foreach_zero_(g_end)
    loss_after = tr._loss_and_grad(obj, after, g_end, 1.0)
    d_loss = loss_after - obj.loss_start
    tol = tr.atol + tr.rtol * abs(d_loss)
    q = obj.g_start                       # becomes Q = g_0 + g_N + 2·(even points)
    tr.kernels.accumulate_(q, g_end, 1.0)
    n = _refine(tr, obj, after, q, o, g_end, d_loss, tol)
    return _form(tr, q, o, n), n, loss_after, g_end, n == 2


def _refine(tr, obj, after, q, o, points, d_loss, tol) -> int:
    """Composite Simpson from n = 2 (Q in q, O in o) until grounded or
    max_splits; ``points`` is the buffer new path points are written to."""
    n = 2
    s_q, s_o = totals(tr, after, q, o)
    while abs((s_q + 4 * s_o) / (3 * n) - d_loss) > tol and n < tr.max_splits:
        tr.kernels.accumulate_(q, o, 2.0)    # old midpoints become even points
        s_q += 2 * s_o
        torch._foreach_zero_(o)
        for j in range(n):                   # the n new midpoints
            f = (2 * j + 1) / (2 * n)
            tr._loss_and_grad(obj, tr._point(after, f, points), o, f)
        n *= 2
        (s_o,) = totals(tr, after, o)
    return n


def _form(tr, q, o, n):
    """ḡ = (Q + 4·O) / (3n), formed in o."""
    torch._foreach_mul_(o, 4.0 / (3 * n))
    tr.kernels.accumulate_(o, q, 1.0 / (3 * n))
    return o


def low_memory(tr, obj, after):
    """``reuse_gradients=False``: ḡ in a single buffer, with fixed Simpson weights
    (1, 4, 2, ..., 4, 1)/(3n): θ_t, ḡ and the current point are the only
    gradient-sized buffers (3).  A step that needs refinement is recomputed from
    scratch with twice the intervals (no gradient is kept for reuse).  Returns
    (ḡ, splits, loss at θ_{t+1})."""
    avg = obj.g_start                      # g(θ_t), computed in begin()
    if tr.method == "first_order":
        return avg, 1, tr._loss_and_grad(obj, after, None, 1.0)
    point = tr._buffer()
    n = 2
    torch._foreach_mul_(avg, 1.0 / (3 * n))   # ḡ starts as g(θ_t) / (3n)
    while True:
        for j in range(1, n + 1):
            w = (1 if j == n else (4 if j % 2 else 2)) / (3 * n)
            pt = after if j == n else tr._point(after, j / n, point)
            loss = obj.evaluator.loss_and_grad(pt, avg, w)
            if not math.isfinite(loss):
                tr._loss_and_grad(obj, pt, None, j / n)   # raises, naming the step
        d_loss = loss - obj.loss_start
        (s,) = totals(tr, after, avg)
        if abs(s - d_loss) <= tr.atol + tr.rtol * abs(d_loss) or n >= tr.max_splits:
            break
        n *= 2                              # start again with twice the intervals
        torch._foreach_zero_(avg)
        obj.evaluator.loss_and_grad(tr._theta_t, avg, 1.0 / (3 * n))
    tr._release(point)
    return avg, n, loss


def recomputed_classes(tr, obj, after, n: int):
    """Per-class LCA outside per-class mode: the class gradients recomputed at
    the points of the total's rule (``n`` splits), in groups of classes that fit
    ``class_memory_budget``.  Returns (class sums [C, K], class counts [C, K, 4])."""
    group = max(1, min(tr.num_classes, tr.class_memory_budget // max(1, tr._one_class)))
    sums, counts = [], []
    at_start = 0.0                  # the classes' loss at θ_t, over the groups
    for c0 in range(0, tr.num_classes, group):
        classes = list(range(c0, min(tr.num_classes, c0 + group)))
        stacked = tr._new_buffer(len(classes))
        for f, w in class_weights(tr.method, n):
            point = after if f == 1.0 else tr._theta_t if f == 0.0 else tr._point(after, f)
            part = obj.evaluator.class_grads(point, classes, stacked, w)
            at_start += part if f == 0.0 else 0.0
        res = tr.kernels.allocate_classes(tr._theta_t, after, stacked)
        sums.append(res.sums.cpu().numpy())
        counts.append(res.counts.cpu().numpy())
    obj.evaluator.check_split_once(obj.loss_start, at_start)
    return np.concatenate(sums), np.concatenate(counts)


def class_weights(method: str, n: int):
    """(path fraction, weight) of the points the per-class gradients use: the
    same rule as the step's total."""
    if method == "first_order":
        return [(0.0, 1.0)]
    if n == 1:                                       # trapezoid (adaptive)
        return [(0.0, 0.5), (1.0, 0.5)]
    return [(j / n, (1 if j in (0, n) else (4 if j % 2 else 2)) / (3 * n)) for j in range(n + 1)]
