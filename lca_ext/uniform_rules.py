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

With ``RuleOptions(bars=True)`` (off by default for these rules: their price is
near one pass a step on smooth steps) a finished step gets one mixed pass more and stores the
honest 95% bar of its own value (:func:`uniform_bars`, lca_ext.bars): the
bars change what is reported, never what the rule refines.
"""
from __future__ import annotations

import numpy as np

from . import bars
from .quadrature import (PathResult, embedded_error, judge, noise_floor, pair_error,
                         rounding_limited, simpson_sum)


def _uniform_result(avg, n, loss_after, g_end, lca, err, d_loss, tol, class_loss,
                    bar_fields):
    """A uniform rule's result; ``lca`` its Σ LCA from the samples (no extra
    pass); ``bar_fields`` from :func:`uniform_bars` (its bar replaces ``err``)."""
    return PathResult(avg, _uniform_points(n), loss_after, g_end, n,
                      bar_fields.pop("tensor_error", err), abs(lca - d_loss) <= tol, False,
                      class_loss, **bar_fields)


def uniform_bars(path, opts, n: int, phi0, first_order: bool = False) -> dict:
    """The honest 95% bars of a finished uniform rule (``opts.with_bars``; {}
    without, or where the set is one group): n = 1 the trapezoid on the whole
    step, else composite Simpson on n intervals; ``first_order``: the value
    φ(0) of ḡ = g(θ_t), whose error is the trapezoid's plus the exactly known
    (φ(1) − φ(0))/2 (so only the trapezoid's part is estimated: a constant
    control would leave the whole slope to the random points).  ``phi0``: the
    whole set's samples at θ_t; the later points' are their groups' samples
    summed (the groups add up to the set).  One mixed pass; returns
    PathResult's bar fields."""
    if not opts.with_bars or path.groups < 2:
        return {}
    points = [j / n for j in range(n + 1)]
    whole = {0.0: np.asarray(phi0, np.float64)}
    whole.update({f: path.group_dots(f).sum(0) for f in points[1:]})
    intervals = [(0.0, 1.0)] if n == 1 else \
        [(2 * j / n, (2 * j + 2) / n) for j in range(n // 2)]
    bar, e_hat, sd, dof = bars.honest_bars(path, opts.seed, intervals, whole,
                                           order=1 if n == 1 else 2)
    if first_order:
        e_hat = e_hat + (whole[1.0] - whole[0.0]) / 2
        bar = bars.bar(e_hat, sd, dof)
    return dict(tensor_error=bar, tensor_bias=e_hat, tensor_sd=sd, bar_dof=dof)


def _tol_total(path, opts, loss_after, d_loss, gross) -> float:
    return opts.total_tolerance(d_loss, gross, noise_floor(path, (path.loss_start, loss_after)))


def _uniform_points(n: int):
    if n == 1:
        return [(0.0, 0.5), (1.0, 0.5)]
    return [(j / n, (1 if j in (0, n) else (4 if j % 2 else 2)) / (3 * n)) for j in range(n + 1)]


def adaptive(path, opts) -> PathResult:
    a = path.g_start                                 # a: g_0
    b = path.buffer()
    loss_after = path.grad(1.0, b)                   # g_1
    cl = path.class_loss()                           # (before the midpoint's pass)
    d_loss = loss_after - path.loss_start
    phi_a, phi_b = path.dots(a).sum(0), path.dots(b).sum(0)
    tol = _tol_total(path, opts, loss_after, d_loss, float(np.abs((phi_a + phi_b) / 2).sum()))
    c = path.buffer()
    trapezoid = float((phi_a + phi_b).sum()) / 2
    if abs(trapezoid - d_loss) <= tol:
        path.accumulate(c, a, 0.5)
        path.accumulate(c, b, 0.5)
        return _uniform_result(c, 1, loss_after, b, trapezoid, np.abs(phi_b - phi_a) / 2,
                               d_loss, tol, cl, uniform_bars(path, opts, 1, phi_a))
    # Simpson: c holds the midpoint, whose gradient goes into a with weight 4
    path.grad(0.5, a, weight=4.0, at=c)
    phi_m = (path.dots(a).sum(0) - phi_a) / 4                 # a = g_0 + 4·g_½
    lca = float((phi_a + 4 * phi_m + phi_b).sum()) / 6
    if abs(lca - d_loss) <= tol or opts.max_splits < 4:
        path.zero(c)
        path.accumulate(c, a, 1.0 / 6)
        path.accumulate(c, b, 1.0 / 6)
        err = np.abs(phi_a - 2 * phi_m + phi_b) / 12          # |S − T₂|
        return _uniform_result(c, 2, loss_after, b, lca, err, d_loss, tol, cl,
                               uniform_bars(path, opts, 2, phi_a))
    # composite Simpson: g_0 once more (into c) to take g_½ back out of a
    path.zero(c)
    path.grad(0.0, c)
    path.accumulate(a, c, -1.0)
    path.scale(a, 0.25)                                       # a = O = g_½
    path.accumulate(c, b, 1.0)                                # c = Q = g_0 + g_1
    n, lca, err = _refine(path, opts, c, a, b, d_loss, tol, phi_a + phi_b, phi_m)
    avg = _form_uniform(path, c, a, n)
    path.release(c)
    path.release(b)                                           # lent to the points
    return _uniform_result(avg, n, loss_after, None, lca, err, d_loss, tol, cl,
                           uniform_bars(path, opts, n, phi_a))


def simpson(path, opts) -> PathResult:
    # Four gradient-sized buffers at most: θ_t, Q (the start gradient's buffer),
    # O, and one that first holds the midpoint and then g_1.
    o = path.buffer()
    g_end = path.buffer()
    path.grad(0.5, o, at=g_end)
    path.zero(g_end)
    loss_after = path.grad(1.0, g_end)
    cl = path.class_loss()
    d_loss = loss_after - path.loss_start
    q = path.g_start                      # becomes Q = g_0 + g_N + 2·(even points)
    phi_0 = path.dots(q).sum(0) if opts.with_bars else None     # (the bars' θ_t samples)
    path.accumulate(q, g_end, 1.0)
    phi_q, phi_o = path.dots(q).sum(0), path.dots(o).sum(0)
    tol = _tol_total(path, opts, loss_after, d_loss, float(np.abs((phi_q + 4 * phi_o) / 6).sum()))
    n, lca, err = _refine(path, opts, q, o, g_end, d_loss, tol, phi_q, phi_o)
    avg = _form_uniform(path, q, o, n)
    if n != 2:
        path.release(g_end)               # lent to the points: not g(θ_{t+1}) now
    return _uniform_result(avg, n, loss_after, g_end if n == 2 else None, lca, err,
                           d_loss, tol, cl, uniform_bars(path, opts, n, phi_0))


def _refine(path, opts, q, o, points, d_loss, tol, phi_q, phi_o):
    """Composite Simpson from n = 2 (Q in q, O in o; ``phi_q``, ``phi_o`` their
    per-tensor samples) until grounded or max_splits; ``points`` is the buffer new
    path points are written to.  Returns (n, Σ LCA, |S_n − T_n| per tensor)."""
    n = 2
    while abs(float((phi_q + 4 * phi_o).sum()) / (3 * n) - d_loss) > tol and \
            n < opts.max_splits:
        path.accumulate(q, o, 2.0)           # old midpoints become even points
        phi_q = phi_q + 2 * phi_o
        path.zero(o)
        for j in range(n):                   # the n new midpoints
            f = (2 * j + 1) / (2 * n)
            path.grad(f, o, at=points)
        n *= 2
        phi_o = path.dots(o).sum(0)
    # T_n = (Q/2 + O)/n on the same points
    return (n, float((phi_q + 4 * phi_o).sum()) / (3 * n),
            np.abs((phi_o - phi_q / 2) / (3 * n)))


def _form_uniform(path, q, o, n):
    """ḡ = (Q + 4·O) / (3n), formed in o."""
    path.scale(o, 4.0 / (3 * n))
    path.accumulate(o, q, 1.0 / (3 * n))
    return o


# -- low memory ----------------------------------------------------------------------

def low_memory(path, opts) -> PathResult:
    """``reuse_gradients=False``: ḡ in a single buffer, with fixed Simpson weights
    (1, 4, 2, ..., 4, 1)/(3n): θ_t, ḡ and the current point are the only
    gradient-sized buffers (3).  Each point's samples are the change of the
    buffer's per-tensor sums (one more fused read per point).  A step that misses
    the rule's criteria is recomputed from scratch with twice the intervals."""
    avg = path.g_start                     # g(θ_t), computed in begin()
    phi0 = path.dots(avg)
    class_start = path.class_loss_start
    if opts.method == "first_order":
        loss = path.grad(1.0, None)
        return PathResult(avg, [(0.0, 1.0)], loss, None, 1, np.full(phi0.shape[1], np.nan),
                          True, False, None)
    n, history = 2, []
    parents = {}                            # the last round's Simpson sums, per interval
    while True:
        path.scale(avg, 1.0 / (3 * n))      # ḡ starts as g(θ_t) / (3n)
        phi = {0.0: phi0}
        before = phi0 / (3 * n)
        for j in range(1, n + 1):
            w = (1 if j == n else (4 if j % 2 else 2)) / (3 * n)
            loss = path.grad(j / n, avg, weight=w)
            now = path.dots(avg)
            phi[j / n] = (now - before) / w
            before = now
        class_after = path.last_class_losses
        d_loss = loss - path.loss_start
        ivs = [(2 * j / n, (2 * j + 2) / n) for j in range(n // 2)]
        sums = {iv: simpson_sum(phi, *iv) for iv in ivs}
        if n == 2:
            pairs = [(sums[iv], embedded_error(phi, *iv)) for iv in ivs]
        else:      # each pair of intervals against its parent of the last round
            pairs = [(sums[iv], pair_error(parents[(4 * (j // 2) / n, (4 * (j // 2) + 4) / n)],
                                           sums[ivs[j - j % 2]], sums[ivs[j - j % 2 + 1]]))
                     for j, iv in enumerate(ivs)]
        parents = sums
        noise = noise_floor(path, (path.loss_start, loss))
        verdict = judge(opts, pairs, sum(s for s, _ in pairs), d_loss, noise)
        history.append(verdict.excess)
        stalled = (not opts.total_only and rounding_limited(path, history, verdict, noise)) \
            or (verdict.ok and verdict.within_noise_only)
        if verdict.ok or n >= opts.max_splits or stalled:
            break
        n *= 2                              # start again with twice the intervals
        path.zero(avg)
        path.grad(0.0, avg)
    cl = None if class_start is None or class_after is None else (class_start, class_after)
    return PathResult(avg, _uniform_points(n), loss, None, n, verdict.tensor_error,
                      verdict.ok and not stalled, stalled, cl)
