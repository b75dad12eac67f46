"""The default rule, ``method="budget"``: Simpson refined locally within a pass
budget, with 95% error bars from randomised group samples (lca_ext.bars).

One step:

1. the end point θ_{t+1} and the midpoint (2 passes; g(θ_t) is reused from the
   previous step): Simpson, each group's samples kept;
2. one *mixed* pass, each group (LCA batch) at its own random point of the
   step (1 pass): the bars, Ê and √V̂ per tensor (lca_ext.bars);
3. while a tensor's bar exceeds its tolerance, bar_rtol·max(|LCA_k|,
   bar_share·G) (2% of the tensors carrying >= 5% of the step's gross
   movement G = Σ_k |LCA_k|, 0.1% of G for the others), or the total misses |ΣLCA − ΔL| ≤ rtol·max(|ΔL|,
   total_share·G) + the rounding floor, and the budget allows: the intervals
   whose estimate is largest get their two quarter points (2 passes each), and
   the bars are formed again from the same random samples against the finer
   interpolant (no new mixed pass);
4. it stops at the budget (``max_passes`` a step, the end point's pass
   included: 8 by default) and flags the step ``budget_limited``: the bars
   then say what is left.  The step is *grounded* when ΣLCA matches ΔL within
   tolerance: a bar above its target is not a miss of the total, and the bar
   itself says how far a value may be.  Per-class totals do not drive
   refinement here: each one's error is known exactly (run.class_error()).

A step whose total error is already within ROUNDING_MARGIN x the loss's
rounding floor (float32 or 16-bit passes) is not refined for the total: its
ΔL is rounding, refinement cannot shrink that, and the step is flagged
``noise_limited`` at once (the tensors' bars still decide on refinement).

The groups are the LCA set's batches (the tracker cuts a tensor pair into at
least ``groups``), or in per-class mode the classes.  Where no groups can be
had (fewer than two, torch.distributed, or per-class mode with BatchNorm on
batch statistics), the step keeps the certified rule's own estimate as its
``tensor_error`` (not an interval: lca_ext.quadrature) and the run says so
(``run.get("bars")`` False).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np

from . import bars
from .quadrature import (ROUNDING_MARGIN, PathResult, RuleOptions, _form, _Point, _weights,
                         embedded_error, judge, noise_floor, pair_error, simpson_sum)


def budget(path, opts: RuleOptions) -> PathResult:
    """The default rule on one step's ``path`` (lca_ext.path): Simpson, one
    mixed pass for the 95% bars, local refinement within ``opts.max_passes``
    (the module docstring says how it decides)."""
    max_passes = opts.max_passes if opts.max_passes is not None else 1 << 30
    held_extra = max(0, opts.path_memory_budget // max(1, path.one_buffer))
    pts: Dict[float, _Point] = {
        0.0: _Point(path.g_start, path.dots(path.g_start), path.loss_start,
                    path.class_loss_start)}

    def evaluate(f: float, hold: bool) -> None:
        buf = path.buffer()
        loss = path.grad(f, buf)
        pts[f] = _Point(buf, path.dots(buf), loss, path.last_class_losses)
        if not hold:
            path.release(buf)
            pts[f].grad = None

    evaluate(1.0, True)
    evaluate(0.5, True)
    d_loss = pts[1.0].loss - pts[0.0].loss
    class_d = (None if pts[0.0].class_loss is None or pts[1.0].class_loss is None
               else pts[1.0].class_loss - pts[0.0].class_loss)
    noise = noise_floor(path, (pts[0.0].loss, pts[1.0].loss))
    grouped = opts.bars and path.groups >= 2
    if grouped:
        u = bars.draw_points(bars.rng_for(opts.seed, path.name, path.step), path.groups)
        at_u = path.mixed(u)
    intervals = [(0.0, 1.0)]
    phi = {f: p.phi for f, p in pts.items()}
    sums = {(0.0, 1.0): simpson_sum(phi, 0.0, 1.0)}
    est = {(0.0, 1.0): embedded_error(phi, 0.0, 1.0)}
    finest = 2.0 / opts.max_splits
    noise_limited = budget_limited = False
    # float32 / 16-bit passes: a total within the rounding margin is rounding
    rounding = path.unit_roundoff() > 2.0 ** -53
    while True:
        pairs = [(sums[iv], est[iv]) for iv in intervals]
        verdict = judge(opts, pairs, sum(s for s, _ in pairs), d_loss, noise, class_d)
        total = sum(s for s, _ in pairs).sum(0)                 # [K]
        gross = float(np.abs(total).sum())
        if grouped:
            e_hat, sd, dof = bars.estimate(
                intervals, {f: v.sum(0) for f, v in phi.items()}, bars.group_samples(path, phi),
                u, at_u)
            bar = bars.bar(e_hat, sd, dof)
        else:
            e_hat, sd, dof, bar = None, None, 0, verdict.tensor_error
        tol_k = (opts.bar_rtol if grouped else opts.tensor_rtol) * np.maximum(
            np.abs(total), (opts.bar_share if grouped else opts.min_share) * gross) + 1e-300
        over = bar > tol_k
        tensors_ok = not over.any()
        # refining narrows a bar where Simpson's error is systematic (curvature:
        # |Ê| beyond its own noise); where it is the jumps' noise, a finer rule
        # narrows it only like √h, not worth the passes: stop, the bar says it
        worth = over & (np.abs(e_hat) > opts.refine_sd * sd) if grouped else over
        total_err = verdict.total_error
        tol_total = opts.total_tolerance(d_loss, gross, noise)
        at_floor = rounding and total_err <= ROUNDING_MARGIN * noise and total_err > \
            opts.total_tolerance(d_loss, gross, 0.0)
        total_ok = total_err <= tol_total or at_floor
        if (tensors_ok or not worth.any()) and total_ok:
            noise_limited = at_floor or verdict.within_noise_only
            break
        # which intervals: the largest estimates (the certified rule's badness),
        # within what the budget still allows
        splittable = [(b, iv) for b, iv in zip(verdict.badness, intervals)
                      if iv[1] - iv[0] > finest]
        if not splittable:
            break                                   # max_splits everywhere
        # a point not held (past path_memory_budget) is recomputed once when ḡ
        # is formed: it costs two passes, and the budget counts them
        unheld = sum(1 for f, p in pts.items() if p.grad is None)
        per_split = 2 if held_extra >= 2 else 4
        room = (max_passes - path.passes - unheld) // per_split
        if room < 1:
            budget_limited = True
            break
        worst = max(b for b, _ in splittable)
        chosen = sorted((iv for b, iv in splittable if b >= 0.5 * worst),
                        key=lambda iv: -dict(zip(intervals, verdict.badness))[iv])[:room]
        new: List = []
        for a, b in intervals:
            if (a, b) in chosen:
                m = (a + b) / 2
                for f in ((a + m) / 2, (m + b) / 2):
                    evaluate(f, hold=held_extra > 0)
                    held_extra -= 1
                    phi[f] = pts[f].phi
                left, right = (a, m), (m, b)
                sums[left], sums[right] = simpson_sum(phi, a, m), simpson_sum(phi, m, b)
                est[left] = est[right] = pair_error(sums[(a, b)], sums[left], sums[right])
                new += [left, right]
            else:
                new.append((a, b))
        intervals = new
    weights = _weights(intervals)
    avg = _form(path, pts, weights)
    for f, p in pts.items():
        if f not in (0.0, 1.0) and p.grad is not None and p.grad is not avg:
            path.release(p.grad)
    # grounded: ΣLCA matches ΔL; a bar above its target at the budget is flagged
    # budget_limited, not ungrounded: the bar itself says how far a value may be
    # off (and each class total's error is known exactly: run.class_error())
    grounded = total_ok and not noise_limited
    return PathResult(avg, sorted(weights.items()), pts[1.0].loss, pts[1.0].grad,
                      2 * len(intervals), np.asarray(bar, dtype=np.float64),
                      grounded, noise_limited,
                      None if class_d is None else (pts[0.0].class_loss, pts[1.0].class_loss),
                      budget_limited=budget_limited,
                      tensor_bias=None if e_hat is None else e_hat,
                      tensor_sd=None if sd is None else sd, bar_dof=dof)
