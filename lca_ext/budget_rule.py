"""The default rule, ``method="budget"``: a two-pass Monte Carlo-corrected
trapezoid where its bars hold, else Simpson refined locally within a pass budget,
with 95% error bars from randomised group samples (lca_ext.bars).

One step:

0. where each group's gradient at θ_t is held (path.group_start_known: the
   tracker keeps them while 2 x groups buffers fit path_memory_budget; at least
   ``groups`` groups), the *two-pass stage*: the end point
   and one mixed pass, each group's trapezoid corrected by its random sample
   (:func:`two_pass`, lca_ext.bars.monte_carlo: unbiased for any integrand,
   bar t·√V̂, V̂ the groups' spread about their exact total trapezoid errors,
   :func:`trapezoid_errors`).  It ends the step when every tensor's bar is within its target
   and the total matches ΔL (without the rounding floor); else the step goes
   on, the end point and the mixed samples reused;
1. the end point θ_{t+1} and the midpoint (2 passes; g(θ_t) is reused from the
   previous step): Simpson, each group's samples kept;
2. one *mixed* pass, each group (LCA batch) at its own random point of the
   step (1 pass; the two-pass stage's, if it ran): the bars, Ê and √V̂ per
   tensor (lca_ext.bars);
3. while a tensor's bar exceeds its tolerance, bar_rtol·max(|LCA_k|,
   bar_share·G) (2% of the tensors carrying >= 5% of the step's gross
   movement G = Σ_k |LCA_k|, 0.1% of G for the others), or the total misses
   |ΣLCA − ΔL| ≤ rtol·max(|ΔL|, total_share·G) (rtol: bar_rtol, 2%, unless
   given; the rounding floor below), and the budget allows: the intervals
   whose estimate is largest get their two quarter points (2 passes each), and
   the bars are formed again from the same random samples against the finer
   interpolant (no new mixed pass);
4. it stops at the budget (``max_passes`` a step, the end point's pass
   included: 8 by default) and flags the step ``budget_limited``: the bars
   then say what is left.  The step is *grounded* when ΣLCA matches ΔL within
   tolerance: a bar above its target is not a miss of the total, and the bar
   itself says how far a value may be.  Per-class totals do not drive
   refinement here: each one's error is known exactly (run.class_error()).

A step whose total error is within the loss's rounding floor (float32 or
16-bit passes: NOISE_FACTOR·u·(|L(θ_t)| + |L(θ_{t+1})|)) is not refined for the
total: its ΔL is rounding, refinement cannot shrink that, and the step is
flagged ``noise_limited`` at once (the tensors' bars still decide on
refinement).  Above the floor the total is refined (also where its miss of
the tolerance is smaller than the floor: that does not make the miss
rounding) unless, within ROUNDING_MARGIN x the floor, the bars' estimate of
the total's quadrature error does not explain the miss
(:func:`quadrature_explains`) or refinement stalls there
(quadrature.rounding_limited): then the step is flagged ``noise_limited``.  Flagging either at once blamed rounding for quadrature error:
2.6% of ΔL at 7.7x the floor on a new user's ResNet step (float64 passes gave
the same error), 3.5% of ΔL at 3.3x the floor on a GPT-2 step under the
Trainer (grounded at 9e-8 after two more float32 passes).

The groups are the LCA set's batches (the tracker cuts a tensor pair into at
least ``groups``), or in per-class mode the units: each class's part of a batch
(lca_ext.classes; the classes themselves, unequal and few, gave too short an
interval; with BatchNorm on batch statistics, the batches: bars, but no
two-pass stage); under DDP every rank's (lca_ext.group_probe.GroupProbe); under
FSDP2 the rounds, every rank's r-th batch run together (lca_ext.distributed;
no two-pass stage there).  Where no groups can be had (fewer than two), the
step keeps the certified rule's own estimate as its
``tensor_error`` (not an interval: lca_ext.quadrature) and the run says so
(``run.get("bars")`` False).
"""
from __future__ import annotations

import dataclasses

import numpy as np

from . import bars
from .quadrature import (ROUNDING_MARGIN, LocalSimpson, PathResult, RuleOptions,
                         rounding_limited)


# the two-pass stage needs this many groups at least (V̂'s degrees of freedom: the
# rule lab measured it with 8), whatever RuleOptions.groups says
MIN_GROUPS = 8


def refine_threshold(opts: RuleOptions, over: int, dof: int) -> float:
    """How many standard errors √V̂ a tensor's Ê must exceed for refining it to
    be worth passes, when ``over`` tensors have bars above their target.

    Refining narrows a bar where Simpson's error is systematic (curvature: Ê
    nonzero); where it is the jumps' noise, a finer rule narrows it only like
    √h, not worth the passes: the step stops there and the bar says what is
    left.  The test is family-wise over the ``over`` tensors (Bonferroni, at
    ``opts.refine_level``; Student t with the bars' ``dof``).  The test it
    replaced, |Ê| > 2√V̂ per tensor (about 91% a tensor at 7 degrees of
    freedom), refined some tensor of most CNN steps on noise alone (10 tensors
    above target: a 59% chance), 3.58 passes a step from step 5 against 3.30
    and no per-step accuracy bought (the rule lab: p95 8.9% either way).
    ``refine_level`` 1: refine on the bar alone."""
    if over < 1 or opts.refine_level >= 1.0:
        return 0.0
    return bars.t_two_sided(opts.refine_level / over, dof)


def trapezoid_errors(path, g0: np.ndarray, g1: np.ndarray):
    """[G] each group's exact total trapezoid error, its loss change less
    ½Σ_k(φ_gk(0) + φ_gk(1)) (its samples' sum over tensors is the derivative
    of its loss along the step), or None where the groups' losses at both ends
    are not held.  Fixed before the points are drawn, it is the covariate of
    the two-pass bars' spread (lca_ext.bars.spread): the groups' own errors,
    which differ by the examples each holds, follow it (the rule lab: 0.3-0.99
    of the one-stratum V̂ was that difference; with it the ViT ends 67% of its
    steps at two passes instead of 55%, the LSTM 86% instead of 71%)."""
    losses = getattr(path, "group_losses", None)
    l0, l1 = (losses(0.0), losses(1.0)) if losses is not None else (None, None)
    if l0 is None or l1 is None:
        return None
    x = (l1 - l0) - 0.5 * (g0 + g1).sum(1)
    # float32 / 16-bit passes: a covariate within the losses' rounding is noise
    # (valid, but it costs a degree of freedom and widens V̂): left out
    rounding = COVARIATE_ROUNDING * path.unit_roundoff() * (
        np.abs(l0) + np.abs(l1) + 0.5 * np.abs(g0 + g1).sum(1))
    if np.abs(x - x.mean()).max() <= rounding.max():
        return None
    return x


# a covariate whose spread is within this many unit roundoffs of the losses'
# size is taken as rounding (float32 passes on a small step: about 3)
COVARIATE_ROUNDING = 16


def quadrature_explains(rule, path, u, at_u, strata, value: float) -> bool:
    """Does the rule's own quadrature error explain the total's miss of ΔL?  The
    bars' estimate of the *total's* error (lca_ext.bars.estimate on the samples
    summed over tensors: unbiased, with its 95% half-width) against the exact
    miss ΔL − ΣLCA, within that half-width plus the rounding floor.  Where it
    does not (a miss within ROUNDING_MARGIN x the floor), the miss is rounding:
    the step is flagged at once instead of refined until it stalls (a float32
    step whose loss is exactly quadratic along it, Simpson exact, its miss
    2.5-10x the floor: 7 passes to stall, 3 with this test)."""
    whole = {f: v.sum(0).sum(-1, keepdims=True) for f, v in rule.phi.items()}
    groups = {f: g.sum(-1, keepdims=True) for f, g in bars.group_samples(path, rule.phi).items()}
    e_hat, sd, dof = bars.estimate(rule.intervals, whole, groups, u,
                                   at_u.sum(-1, keepdims=True), strata)
    miss = rule.d_loss - value
    return abs(miss - float(e_hat[0])) <= bars.t975(dof) * float(sd[0]) + rule.noise


def two_pass(path, opts: RuleOptions):
    """The two-pass stage: the end point and one mixed pass, each group's
    trapezoid corrected by its random sample (unbiased, lca_ext.bars.monte_carlo).
    Returns (result or None, the end point (buffer, loss), u, the groups'
    samples at u): None when a bar or the total misses its target (the caller
    goes on to Simpson, reusing the end point and the mixed samples)."""
    end = path.buffer()
    loss_after = path.grad(1.0, end)
    class_loss = path.class_loss()        # (per-class mode; before the mixed pass)
    u = bars.draw_points(bars.rng_for(opts.seed, path.name, path.step), path.groups)
    w = bars.point_weights(u)
    mix = path.buffer()
    at_u = path.mixed(u, out=mix, weights=w)
    g0, g1 = path.group_dots(0.0), path.group_dots(1.0)
    value, sd, dof = bars.monte_carlo(g0, g1, u, at_u, getattr(path, "group_strata", None),
                                      trapezoid_errors(path, g0, g1))
    bar = bars.t975(dof) * sd
    gross = float(np.abs(value).sum())
    tol_k = opts.bar_rtol * np.maximum(np.abs(value), opts.bar_share * gross)
    d_loss = loss_after - path.loss_start
    # (without the rounding floor: a total that needs it goes on to Simpson, which
    # flags the step noise_limited)
    total_ok = abs(float(value.sum()) - d_loss) <= opts.total_tolerance(d_loss, gross, 0.0)
    if not ((bar <= tol_k).all() and total_ok):
        path.release(mix)
        return None, (end, loss_after), u, at_u
    path.group_correction(mix, u, w)              # ḡ per element: Σ φ = value
    return PathResult(mix, [(0.0, 0.5), (1.0, 0.5)], loss_after, end, 1, bar, True, False,
                      class_loss, tensor_bias=np.zeros_like(value), tensor_sd=sd,
                      bar_dof=dof), None, u, at_u


def budget(path, opts: RuleOptions) -> PathResult:
    """The default rule on one step's ``path`` (lca_ext.path): the two-pass
    stage where the groups' gradients at θ_t are held, else (or where its bars
    miss) Simpson, one mixed pass for the 95% bars, local refinement within
    ``opts.max_passes`` (the module docstring says how it decides)."""
    max_passes = opts.max_passes if opts.max_passes is not None else 1 << 30
    grouped = opts.with_bars and path.groups >= 2
    if not grouped and opts.rtol is None:     # no bars: the total as the certified rule's
        opts = dataclasses.replace(opts, rtol=opts.tensor_rtol)
    end = None
    # (at least `groups` groups: with fewer, V̂ has too few degrees of freedom for
    # a stop decided by the bars' size)
    if grouped and path.groups >= max(opts.groups, MIN_GROUPS) and \
            getattr(path, "group_start_known", False):
        done, end, u, at_u = two_pass(path, opts)
        if done is not None:
            return done
    rule = LocalSimpson(path, opts, end)         # the end point and the midpoint
    strata = getattr(path, "group_strata", None)
    if grouped and end is None:
        u = bars.draw_points(bars.rng_for(opts.seed, path.name, path.step), path.groups)
        at_u = path.mixed(u)
    noise_limited = budget_limited = False
    # float32 / 16-bit passes: a total within the floor is rounding, and one that
    # stalls within the margin (the module docstring)
    rounding = path.unit_roundoff() > 2.0 ** -53
    history = []                                 # the total's error, round by round
    while True:
        verdict = rule.judge(opts)
        total = sum(s for s, _ in rule.pairs()).sum(0)          # [K]
        gross = float(np.abs(total).sum())
        if grouped:
            e_hat, sd, dof = bars.estimate(
                rule.intervals, {f: v.sum(0) for f, v in rule.phi.items()},
                bars.group_samples(path, rule.phi), u, at_u, strata)
            bar = bars.bar(e_hat, sd, dof)
        else:
            e_hat, sd, dof, bar = None, None, 0, verdict.tensor_error
        tol_k = (opts.bar_rtol if grouped else opts.tensor_rtol) * np.maximum(
            np.abs(total), (opts.bar_share if grouped else opts.min_share) * gross) + 1e-300
        over = bar > tol_k
        worth = over & (np.abs(e_hat) > refine_threshold(opts, int(over.sum()), dof) * sd) \
            if grouped else over
        total_err = verdict.total_error
        # grounded: within the tolerance itself; a miss that the floor could explain
        # is refined like any other (the floor does not say the miss is rounding)
        tol_total = opts.total_tolerance(rule.d_loss, gross, 0.0)
        history.append(total_err)
        at_floor = rounding and total_err > tol_total and (
            total_err <= rule.noise or rounding_limited(path, history, verdict, rule.noise)
            or (grouped and total_err <= ROUNDING_MARGIN * rule.noise and not
                quadrature_explains(rule, path, u, at_u, strata, float(total.sum()))))
        total_ok = total_err <= tol_total or at_floor
        noise_limited = at_floor              # (on every exit below)
        if not worth.any() and total_ok:
            break
        # which intervals: the largest estimates (the certified rule's badness),
        # within what the budget still allows
        splittable = rule.splittable(verdict.badness)
        if not splittable:
            break                                   # max_splits everywhere
        # a point not held (past path_memory_budget) is recomputed once when ḡ
        # is formed: it costs two passes, and the budget counts them
        room = rule.splits_within(max_passes - path.passes - rule.unheld)
        if room < 1:
            budget_limited = True
            break
        worst = max(b for b, _ in splittable)
        chosen = sorted((iv for b, iv in splittable if b >= 0.5 * worst),
                        key=lambda iv: -dict(zip(rule.intervals, verdict.badness))[iv])
        rule.split(set(chosen[:room]))
    avg, weights = rule.finish()
    # grounded: ΣLCA matches ΔL; a bar above its target at the budget is flagged
    # budget_limited, not ungrounded: the bar itself says how far a value may be
    # off (and each class total's error is known exactly: run.class_error())
    return rule.result(avg, weights, bar, total_ok and not noise_limited, noise_limited,
                       budget_limited=budget_limited, tensor_bias=e_hat, tensor_sd=sd,
                       bar_dof=dof)
