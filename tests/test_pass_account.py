"""The run's pass account (lca_ext.pass_account, RuleOptions.mean_passes /
pass_reserve; off by default): any n consecutive tracked steps spend at most
mean_passes·n + pass_reserve passes, the balance is recorded and survives a
resume, and the account changes nothing where it has nothing to cut."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.budget_rule import budget
from lca_ext.pass_account import MIN_PASSES, PassAccount

from helpers import relu_classifier
from synthetic_path import SyntheticPath

C = 4


ACCOUNT = dict(mean_passes=3, pass_reserve=4)


def _relu_run(steps=16, lr=1.0, rule=ACCOUNT, store=None, resume=None, model_state=None,
              **kw):
    """A ReLU MLP at a high learning rate: late steps the default rule refines."""
    x, y, model = relu_classifier(C)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if model_state is not None:
        model.load_state_dict(model_state[0])
        opt.load_state_dict(model_state[1])
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), rule=rule,
                                 store=store, resume=resume, **kw)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        with tracker.step():
            opt.step()
    return tracker, model, opt


def _windows_hold(spent, mean, reserve):
    for i in range(len(spent)):
        for j in range(i + 1, len(spent) + 1):
            assert spent[i:j].sum() <= mean * (j - i) + reserve + 1e-9, (i, j, spent[i:j])


@pytest.mark.filterwarnings("ignore:.*stopped at the pass budget")
def test_the_account_bounds_every_window_of_steps_and_records_its_balance():
    """Every step tracked: only step 0 pays a start pass (g(θ_0)), which the
    account does not charge.  With 3 a step and a reserve of 4
    every window of steps keeps the bound, the recorded balance is the one the
    passes give, and the steps it cut are flagged budget_limited; without the
    account the same training (bit-identical: tracking changes nothing) costs
    more passes on the same steps."""
    tracker, _, _ = _relu_run()
    with pytest.warns(RuntimeWarning, match="mean_passes=3 a step over the run"):
        run = tracker.result()
    free = _relu_run(rule=None)[0].result()             # the default: no account
    opts = lca_ext.RuleOptions(**ACCOUNT)
    spent = run.grad_passes.astype(float)
    spent[0] -= 1                                      # the start pass
    _windows_hold(spent, opts.mean_passes, opts.pass_reserve)
    balance, want = float(opts.pass_reserve), []
    for s in spent:
        balance = min(opts.pass_reserve, balance + opts.mean_passes - s)
        want.append(balance)
    np.testing.assert_array_equal(run.get("pass_credit"), want)
    assert free.grad_passes.sum() > run.grad_passes.sum() + 4
    cut = run.grad_passes < free.grad_passes
    assert cut.any() and run.get("budget_limited")[cut].all()
    assert (run.grad_passes <= free.grad_passes).all()
    assert np.isnan(free.get("pass_credit")).all()          # no account: NaN
    np.testing.assert_array_equal(run.get("loss_after"), free.get("loss_after"))


@pytest.mark.filterwarnings("ignore:.*stopped at the pass budget")
def test_no_reserve_holds_every_step_to_the_mean():
    run = _relu_run(rule=dict(ACCOUNT, pass_reserve=0))[0].result()
    spent = run.grad_passes - np.eye(len(run.grad_passes), dtype=int)[0]
    assert spent.max() == MIN_PASSES and (run.get("pass_credit") == 0).all()


@pytest.mark.filterwarnings("ignore:.*stopped at the pass budget")
def test_what_the_account_does_not_charge_cannot_drive_it_negative():
    """Class gradients recomputed at the rule's points (num_classes outside
    per-class mode) are not the rule's passes: the balance stays >= 0 and the
    steps keep their refinement.  The low-memory mode keeps no account."""
    run = _relu_run(rule=dict(ACCOUNT, pass_reserve=0), num_classes=C,
                    class_memory_budget=1)[0].result()
    assert (run.grad_passes > 3).all()                   # the class passes are there
    assert (run.get("pass_credit") == 0).all()
    low = _relu_run(steps=4, reuse_gradients=False)[0].result()
    assert np.isnan(low.get("pass_credit")).all()


def test_a_resumed_run_goes_on_from_its_last_balance(tmp_path):
    path = str(tmp_path / "run")
    tracker, model, opt = _relu_run(steps=13, store=path)
    balance = tracker.objectives[0].account.balance
    assert balance < ACCOUNT["pass_reserve"]                  # it has spent some
    state = (model.state_dict(), opt.state_dict())
    resumed, _, _ = _relu_run(steps=0, store=path, resume=True, model_state=state)
    assert resumed.objectives[0].account.balance == balance
    assert resumed.tracked_count == 13
    # resumed without the account, and again with it: the run stays readable
    # (NaN balances where there was none), and the account then starts full
    again, model, opt = _relu_run(steps=2, rule=None, store=path, resume=True,
                                  model_state=state)
    run = lca_ext.load_run(path)
    assert len(run.steps) == 15 and np.isnan(run.get("pass_credit")[13:]).all()
    state = (model.state_dict(), opt.state_dict())
    third, _, _ = _relu_run(steps=0, store=path, resume=True, model_state=state)
    assert third.objectives[0].account.balance == ACCOUNT["pass_reserve"]


def test_budget_rule_under_the_account_on_synthetic_jumpy_steps():
    """The rule and the account together, as the tracker drives them, on 120
    synthetic curved, jumpy steps: the window bound holds for several means,
    reserves and memory budgets (points past path_memory_budget cost two passes,
    priced one by one as the memory runs out), it does cut steps (the same steps
    without it cost more), and no step passes max_passes."""
    for mean, reserve, memory in ((3, 0, 2 << 30), (3, 4, 2 << 30), (3.5, 2, 4), (4, 8, 4),
                                  (4, 6, 5)):
        spent, accounts = {}, {}
        for on in (True, False):
            rng = np.random.default_rng(5)
            rule = lca_ext.RuleOptions(mean_passes=mean if on else None, pass_reserve=reserve,
                                       max_passes=12, path_memory_budget=memory)
            accounts[on], spent[on] = PassAccount(rule), []
            for i in range(120):
                path = SyntheticPath(rng, jump=0.05)
                budget(path, accounts[on].step_options(dataclasses.replace(rule, seed=i)))
                accounts[on].charge(path.passes)
                spent[on].append(path.passes)
                assert path.passes <= 12
        got, free = np.array(spent[True], dtype=float), np.array(spent[False])
        _windows_hold(got, mean, reserve)
        assert accounts[True].balance >= 0 and (got <= free).all()
        if reserve <= 4:                                 # tight enough to cut steps
            assert got.sum() < free.sum()
        assert got.min() >= 2 and (got >= MIN_PASSES).mean() > 0.5


def test_bad_account_options_name_the_field():
    with pytest.raises(ValueError, match="mean_passes=2.5"):
        lca_ext.RuleOptions(mean_passes=2.5)
    with pytest.raises(ValueError, match="pass_reserve=-1"):
        lca_ext.RuleOptions(pass_reserve=-1)
    with pytest.raises(ValueError, match="mean_passes=inf; expected None or a finite"):
        lca_ext.RuleOptions(mean_passes=float("inf"))
    with pytest.raises(ValueError, match="method='certified': the pass account bounds the "
                       "default rule only"):
        lca_ext.RuleOptions(mean_passes=3, method="certified")
    # the renamed option says what it became, from RuleOptions and from the tracker
    with pytest.raises(TypeError, match="refine_sd=2 is no longer an option.*refine_level"):
        lca_ext.RuleOptions(refine_sd=2)
    x, y = torch.randn(16, 3), torch.randint(0, 2, (16,))
    with pytest.raises(TypeError, match="refine_sd=2 is no longer an option"):
        lca_ext.LCATracker(nn.Linear(3, 2), nn.functional.cross_entropy, (x, y),
                           rule=dict(refine_sd=2))
    assert PassAccount(lca_ext.RuleOptions()).active is False      # off by default
