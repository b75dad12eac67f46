"""The price a user pays, measured as the issue defines it: gradient passes per
tracked step over a run's first 30 steps, with LCATracker's defaults, on every
family of benchmarks/fidelity.py and several seeds (the rule lab replays 8
recorded steps, which over-weight the curved first ones; this runs the real
tracker on every step).

Per family and seed: mean passes a step (all 30 steps, and from step 5 on), the
most on one step, steps stopped at the budget, grounded steps, and the median
bar (``tensor_error`` / |value| over the (step, tensor) pairs carrying >= 1% of
a step).  No reference is computed here: accuracy and coverage are the rule
lab's (benchmarks/test_bench_rule_lab.py), tests/test_bars.py's and
tests/test_bars_rules.py's.  Rows are appended to ``benchmarks/results/price-<date>.json`` (or
``$LCA_BENCH_PRICE_OUT``).  ``LCA_PRICE_RULE``: RuleOptions fields as JSON
instead of the defaults (the guide's pass-account rows: '{"mean_passes": 3}').

    .venv/bin/python -m pytest benchmarks/test_bench_price.py -q -s
"""
import datetime
import json
import os
import platform
import warnings

import numpy as np
import pytest

import lca_ext

import fidelity

FAMILIES = os.environ.get("LCA_PRICE_FAMILIES", "mlp,cnn_bn,vit,gpt2,lstm").split(",")
SEEDS = range(int(os.environ.get("LCA_PRICE_SEEDS", "5")))
STEPS = 30
RULE = json.loads(os.environ.get("LCA_PRICE_RULE", "null"))
_ROWS = []


def tracked_run(family: fidelity.Family, steps: int = STEPS, rule=None):
    """Train ``family`` for ``steps`` steps with every step tracked; the Run."""
    model = family.make_model()
    opt, sched = family.make_optimizer(model, steps)
    loss = family.tracker_loss()
    tracker = lca_ext.LCATracker(model, loss.pop("loss_fn", None), family.lca_data,
                                 rule=rule, **loss)
    batches = family.train_batches(steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # the budget summary line
        for _ in range(steps):
            opt.zero_grad()
            family.batch_loss(model, next(batches))[0].backward()
            with tracker.step():
                opt.step()
            if sched is not None:
                sched.step()
        return tracker.result()


@pytest.mark.parametrize("seed", list(SEEDS))
@pytest.mark.parametrize("name", FAMILIES)
def test_price_first_30_steps(benchmark, name, seed):
    try:
        family = fidelity.FAMILIES[name](seed=seed)
    except fidelity.FamilyUnavailable as e:
        pytest.skip(str(e))
    run = benchmark.pedantic(tracked_run, args=(family,), kwargs=dict(rule=RULE), rounds=1,
                             iterations=1)
    p = run.grad_passes
    sums, bars = run.tensor_sums, run.tensor_error
    big = np.abs(sums) >= 0.01 * np.abs(sums).sum(1, keepdims=True)
    row = dict(family=name, seed=seed, passes=float(p.mean()), passes_from_step_5=float(p[5:].mean()),
               max_passes=int(p.max()), budget_limited=int(run.get("budget_limited").sum()),
               grounded=int(run.grounded().sum()), steps=len(p),
               median_bar=float(np.median((bars / np.abs(sums))[big])))
    benchmark.extra_info.update(row)
    _ROWS.append(row)
    assert p.max() <= lca_ext.RuleOptions(**(RULE or {})).max_passes


def teardown_module(module):
    if not _ROWS:
        return
    out = os.environ.get("LCA_BENCH_PRICE_OUT") or os.path.join(
        os.path.dirname(__file__), "results", f"price-{datetime.date.today().isoformat()}.json")
    entry = dict(date=datetime.datetime.now().isoformat(timespec="seconds"),
                 machine=f"{platform.machine()} {os.cpu_count()} cores",
                 rule=str(lca_ext.RuleOptions(**(RULE or {}))), rows=_ROWS)
    runs = json.load(open(out)) if os.path.exists(out) else []
    runs.append(entry)
    with open(out, "w") as f:
        json.dump(runs, f, indent=1)
    print("\n| family | passes a step, first 30 (from step 5), per seed | mean | from step 5 "
          "| most | at budget | grounded | median bar |")
    for name in dict.fromkeys(r["family"] for r in _ROWS):
        rows = [r for r in _ROWS if r["family"] == name]
        per_seed = ", ".join(f"{r['passes']:.2f} ({r['passes_from_step_5']:.2f})" for r in rows)
        print(f"| {name} | {per_seed} | {np.mean([r['passes'] for r in rows]):.2f} | "
              f"{np.mean([r['passes_from_step_5'] for r in rows]):.2f} | "
              f"{max(r['max_passes'] for r in rows)} | "
              f"{sum(r['budget_limited'] for r in rows)}/{sum(r['steps'] for r in rows)} | "
              f"{sum(r['grounded'] for r in rows)}/{sum(r['steps'] for r in rows)} | "
              f"{100 * np.median([r['median_bar'] for r in rows]):.2f}% |")
