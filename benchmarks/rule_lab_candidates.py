"""Candidate rules measured on the rule lab's recordings (the measurement that
chose the default rule's two-pass stage, lca_ext/budget_rule.py, and why it
needs the groups' gradients at θ_t).

Each candidate here is an experiment written apart from the product code: it
reads the recorded dense per-group samples (benchmarks/rule_lab.py: record
first) and reports what the rule would cost and how often its bars would hold.
The accuracy guide quotes its numbers; rerun to reproduce them:

    python benchmarks/rule_lab_candidates.py [family ...]

``two_pass``: the trapezoid plus a Monte Carlo correction from the mixed pass,
when each group's value at θ_t is known (it needs each group's gradient at θ_t
held from the previous step: G more gradient buffers).  For group g with its
random point U_g (density p: lca_ext.bars.draw_points) and its line ℓ_g through
its values at 0 and 1,

    c_g = (φ_g(U_g) − ℓ_g(U_g))/p(U_g),    E[c_g] = ∫φ_g − ∫ℓ_g,

so trapezoid + Σ c_g is unbiased for the step's integral, and
V̂ = G/(G−1) Σ (c_g − c̄)² estimates its variance: bar = t_{G−1}·√V̂.  A step
is accepted at 2 passes (the end point and the mixed pass) when every bar is
within the default rule's target; otherwise the default rule runs (its
midpoint and refinements; the mixed pass already made serves as its bars'
pass, so the fallback costs what the default rule costs today).

``without_start``: the same with the groups' θ_t values not known (split
equally from the whole set's): the groups' differences at θ_t then swamp the
bars.
"""
from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import fidelity  # noqa: E402
import rule_lab  # noqa: E402


def two_pass(rec, seed: int, known_start: bool = True, bar_rtol: float = 0.02,
             bar_share: float = 0.05):
    """(estimate [K], bar [K], accepted) of the 2-pass candidate on one step."""
    from lca_ext import bars
    phi, grid = rec.phi, rec.grid
    groups = phi.shape[1]
    g0 = phi[0] if known_start else np.broadcast_to(phi[0].sum(0) / groups, phi[0].shape)
    g1 = phi[grid]
    u = bars.draw_points(bars.rng_for(seed, rec.family, rec.step), groups)
    at_u = rule_lab.RecordedPath(rec).mixed(u)
    c = bars.point_weights(u)[:, None] * (at_u - ((1 - u)[:, None] * g0 + u[:, None] * g1))
    est = 0.5 * (g0 + g1).sum(0) + c.sum(0)
    bar = bars.t975(groups - 1) * np.sqrt(groups / (groups - 1) * ((c - c.mean(0)) ** 2).sum(0))
    tol = bar_rtol * np.maximum(np.abs(est), bar_share * np.abs(est).sum())
    return est, bar, bool((bar <= tol).all())


def measure(recs, seeds: int = 20, known_start: bool = True) -> dict:
    import lca_ext
    from lca_ext.rules import RULES
    passes, passes5, cover, rel, accepted = [], [], [], [], 0
    for rec in recs:
        truth = rec.truth()
        sig = fidelity.significant(truth)
        for seed in range(seeds):
            est, bar, ok = two_pass(rec, seed, known_start)
            if ok:
                accepted += 1
                err = np.abs(est - truth)
                cover += list((bar >= err)[sig])
                rel += list((err / np.abs(truth))[sig])
                n = 2
            else:
                path = rule_lab.RecordedPath(rec)
                RULES["budget"](path, dataclasses.replace(lca_ext.RuleOptions(), seed=seed))
                n = path.passes
            passes.append(n)
            if rec.step >= 5:
                passes5.append(n)
    return dict(family=recs[0].family, accepted=accepted / len(passes),
                coverage_accepted=float(np.mean(cover)) if cover else float("nan"),
                p95_accepted=float(np.percentile(rel, 95)) if rel else float("nan"),
                passes=float(np.mean(passes)), passes_from_5=float(np.mean(passes5)))


def _main(families):
    import warnings
    warnings.simplefilter("ignore", RuntimeWarning)
    names = families or sorted(f[:-4] for f in os.listdir(rule_lab.LAB_DIR))
    for name in names:
        recs = rule_lab.load(os.path.join(rule_lab.LAB_DIR, f"{name}.npz"))
        for known in (True, False):
            r = measure(recs, known_start=known)
            print(("two_pass" if known else "without_start").ljust(14),
                  "  ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                            for k, v in r.items()))


if __name__ == "__main__":
    _main(sys.argv[1:])
