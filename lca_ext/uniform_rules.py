"""The uniform composite-Simpson rules (lca_ext.quadrature says what they are
for and how they are judged):

* ``adaptive`` (total-only): the trapezoid on the end points, then Simpson, then
  composite Simpson with doubled points, the first whose total is grounded;
* ``simpson`` (total-only): Simpson first, then composite Simpson;
* ``low_memory`` (``reuse_gradients=False``): ḡ in one buffer with fixed Simpson
  weights, judged by the rule's own criteria, recomputed with twice the
  intervals when it misses.

The total-only rules keep to four gradient-sized buffers: θ_t, Q = g_0 + g_N +
2·(even points), O = Σ (odd points), ḡ = (Q + 4·O)/(3n), and one that holds a
path point and then g(θ_{t+1}); a step that needs refinement lends that buffer
to its points, so the next step recomputes its start gradient.  Σ LCA and the
per-tensor estimate |S_n − T_n| come from the per-tensor samples of Q and O.
"""
from __future__ import annotations

import numpy as np
import torch

from .quadrature import (PathResult, _class_loss, dots, embedded_error, judge,
                         noise_floor, pair_error, rounding_limited, simpson_sum)


def _uniform_result(avg, n, loss_after, g_end, lca, err, d_loss, tol, class_loss):
    """A uniform rule's result; ``lca`` its Σ LCA from the samples (no extra pass)."""
    return PathResult(avg, _uniform_points(n), loss_after, g_end, n, err,
                      abs(lca - d_loss) <= tol, False, class_loss)


def _tol_total(tr, obj, loss_after, d_loss, gross) -> float:
    return tr.rule.total_tolerance(d_loss, gross,
                                   noise_floor(tr, obj, (obj.loss_start, loss_after)))


def _uniform_points(n: int):
    if n == 1:
        return [(0.0, 0.5), (1.0, 0.5)]
    return [(j / n, (1 if j in (0, n) else (4 if j % 2 else 2)) / (3 * n)) for j in range(n + 1)]


def adaptive(tr, obj, after) -> PathResult:
    a, k = obj.g_start, tr.kernels                   # a: g_0
    b = tr._buffer(obj)
    loss_after = tr._loss_and_grad(obj, after, b, 1.0)          # g_1
    cl = _class_loss(obj, obj.evaluator)             # (before the midpoint's pass)
    d_loss = loss_after - obj.loss_start
    phi_a, phi_b = dots(tr, after, a).sum(0), dots(tr, after, b).sum(0)
    tol = _tol_total(tr, obj, loss_after, d_loss, float(np.abs((phi_a + phi_b) / 2).sum()))
    c = tr._buffer(obj)
    trapezoid = float((phi_a + phi_b).sum()) / 2
    if abs(trapezoid - d_loss) <= tol:
        k.accumulate_(c, a, 0.5)
        k.accumulate_(c, b, 0.5)
        return PathResult(c, _uniform_points(1), loss_after, b, 1,
                          np.abs(phi_b - phi_a) / 2, True, False, cl)
    # Simpson: c holds the midpoint, whose gradient goes into a with weight 4
    tr._loss_and_grad(obj, tr._point(after, 0.5, c), a, 0.5, weight=4.0)
    phi_m = (dots(tr, after, a).sum(0) - phi_a) / 4          # a = g_0 + 4·g_½
    lca = float((phi_a + 4 * phi_m + phi_b).sum()) / 6
    if abs(lca - d_loss) <= tol or tr.rule.max_splits < 4:
        torch._foreach_zero_(c)
        k.accumulate_(c, a, 1.0 / 6)
        k.accumulate_(c, b, 1.0 / 6)
        err = np.abs(phi_a - 2 * phi_m + phi_b) / 12          # |S − T₂|
        return _uniform_result(c, 2, loss_after, b, lca, err, d_loss, tol, cl)
    # composite Simpson: g_0 once more (into c) to take g_½ back out of a
    torch._foreach_zero_(c)
    tr._loss_and_grad(obj, tr._theta_t, c, 0.0)
    k.accumulate_(a, c, -1.0)
    torch._foreach_mul_(a, 0.25)                              # a = O = g_½
    k.accumulate_(c, b, 1.0)                                  # c = Q = g_0 + g_1
    n, lca, err = _refine(tr, obj, after, c, a, b, d_loss, tol, phi_a + phi_b, phi_m)
    avg = _form_uniform(tr, c, a, n)
    tr._release(c)
    tr._release(b)                                            # lent to the points
    return _uniform_result(avg, n, loss_after, None, lca, err, d_loss, tol, cl)


def simpson(tr, obj, after) -> PathResult:
    # Four gradient-sized buffers at most: θ_t, Q (the start gradient's buffer),
    # O, and one that first holds the midpoint and then g_1.
    o = tr._buffer(obj)
    g_end = tr._buffer(obj)
    tr._loss_and_grad(obj, tr._point(after, 0.5, g_end), o, 0.5)
    torch._foreach_zero_(g_end)
    loss_after = tr._loss_and_grad(obj, after, g_end, 1.0)
    cl = _class_loss(obj, obj.evaluator)
    d_loss = loss_after - obj.loss_start
    q = obj.g_start                       # becomes Q = g_0 + g_N + 2·(even points)
    tr.kernels.accumulate_(q, g_end, 1.0)
    phi_q, phi_o = dots(tr, after, q).sum(0), dots(tr, after, o).sum(0)
    tol = _tol_total(tr, obj, loss_after, d_loss, float(np.abs((phi_q + 4 * phi_o) / 6).sum()))
    n, lca, err = _refine(tr, obj, after, q, o, g_end, d_loss, tol, phi_q, phi_o)
    avg = _form_uniform(tr, q, o, n)
    if n != 2:
        tr._release(g_end)                # lent to the points: not g(θ_{t+1}) now
    return _uniform_result(avg, n, loss_after, g_end if n == 2 else None, lca, err,
                           d_loss, tol, cl)


def _refine(tr, obj, after, q, o, points, d_loss, tol, phi_q, phi_o):
    """Composite Simpson from n = 2 (Q in q, O in o; ``phi_q``, ``phi_o`` their
    per-tensor samples) until grounded or max_splits; ``points`` is the buffer new
    path points are written to.  Returns (n, Σ LCA, |S_n − T_n| per tensor)."""
    n = 2
    while abs(float((phi_q + 4 * phi_o).sum()) / (3 * n) - d_loss) > tol and \
            n < tr.rule.max_splits:
        tr.kernels.accumulate_(q, o, 2.0)    # old midpoints become even points
        phi_q = phi_q + 2 * phi_o
        torch._foreach_zero_(o)
        for j in range(n):                   # the n new midpoints
            f = (2 * j + 1) / (2 * n)
            tr._loss_and_grad(obj, tr._point(after, f, points), o, f)
        n *= 2
        phi_o = dots(tr, after, o).sum(0)
    # T_n = (Q/2 + O)/n on the same points
    return (n, float((phi_q + 4 * phi_o).sum()) / (3 * n),
            np.abs((phi_o - phi_q / 2) / (3 * n)))


def _form_uniform(tr, q, o, n):
    """ḡ = (Q + 4·O) / (3n), formed in o."""
    torch._foreach_mul_(o, 4.0 / (3 * n))
    tr.kernels.accumulate_(o, q, 1.0 / (3 * n))
    return o


# -- low memory ----------------------------------------------------------------------

def low_memory(tr, obj, after) -> PathResult:
    """``reuse_gradients=False``: ḡ in a single buffer, with fixed Simpson weights
    (1, 4, 2, ..., 4, 1)/(3n): θ_t, ḡ and the current point are the only
    gradient-sized buffers (3).  Each point's samples are the change of the
    buffer's per-tensor sums (one more fused read per point).  A step that misses
    the rule's criteria is recomputed from scratch with twice the intervals."""
    opts, ev = tr.rule, obj.evaluator
    avg = obj.g_start                      # g(θ_t), computed in begin()
    phi0 = dots(tr, after, avg)
    class_start = obj.class_loss_start
    if opts.method == "first_order":
        loss = tr._loss_and_grad(obj, after, None, 1.0)
        return PathResult(avg, [(0.0, 1.0)], loss, None, 1, np.full(phi0.shape[1], np.nan),
                          True, False, None)
    point = tr._buffer()
    n, history = 2, []
    parents = {}                            # the last round's Simpson sums, per interval
    while True:
        torch._foreach_mul_(avg, 1.0 / (3 * n))   # ḡ starts as g(θ_t) / (3n)
        phi = {0.0: phi0}
        before = phi0 / (3 * n)
        for j in range(1, n + 1):
            w = (1 if j == n else (4 if j % 2 else 2)) / (3 * n)
            pt = after if j == n else tr._point(after, j / n, point)
            loss = tr._loss_and_grad(obj, pt, avg, j / n, weight=w)
            now = dots(tr, after, avg)
            phi[j / n] = (now - before) / w
            before = now
        class_after = ev.last_class_losses
        d_loss = loss - obj.loss_start
        ivs = [(2 * j / n, (2 * j + 2) / n) for j in range(n // 2)]
        sums = {iv: simpson_sum(phi, *iv) for iv in ivs}
        if n == 2:
            pairs = [(sums[iv], embedded_error(phi, *iv)) for iv in ivs]
        else:      # each pair of intervals against its parent of the last round
            pairs = [(sums[iv], pair_error(parents[(4 * (j // 2) / n, (4 * (j // 2) + 4) / n)],
                                           sums[ivs[j - j % 2]], sums[ivs[j - j % 2 + 1]]))
                     for j, iv in enumerate(ivs)]
        parents = sums
        noise = noise_floor(tr, obj, (obj.loss_start, loss))
        verdict = judge(opts, pairs, sum(s for s, _ in pairs), d_loss, noise)
        history.append(verdict.excess)
        stalled = (not opts.total_only and rounding_limited(tr, obj, history, verdict, noise)) \
            or (verdict.ok and verdict.within_noise_only)
        if verdict.ok or n >= opts.max_splits or stalled:
            break
        n *= 2                              # start again with twice the intervals
        torch._foreach_zero_(avg)
        tr._loss_and_grad(obj, tr._theta_t, avg, 0.0)
    tr._release(point)
    cl = None if class_start is None or class_after is None else (class_start, class_after)
    return PathResult(avg, _uniform_points(n), loss, None, n, verdict.tensor_error,
                      verdict.ok and not stalled, stalled, cl)
