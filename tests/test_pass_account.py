"""The run's pass account (lca_ext.pass_account, RuleOptions.mean_passes /
pass_reserve): any n consecutive tracked steps spend at most mean_passes·n +
pass_reserve passes, the balance is recorded and survives a resume, and the
account changes nothing where it has nothing to cut."""
import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.budget_rule import budget
from lca_ext.pass_account import MIN_PASSES, PassAccount

from test_bars import SyntheticPath

C = 4


def _relu_run(steps=16, lr=1.0, rule=None, store=None, resume=None, model_state=None):
    """A ReLU MLP at a high learning rate: late steps the default rule refines."""
    torch.manual_seed(0)
    x = torch.randn(400, 12)
    y = (x[:, :C] + 0.3 * torch.randn(400, C)).argmax(1)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                          nn.Linear(16, C))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if model_state is not None:
        model.load_state_dict(model_state[0])
        opt.load_state_dict(model_state[1])
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), rule=rule,
                                 store=store, resume=resume)
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
    account does not charge.  With the defaults (3 a step, a reserve of 4)
    every window of steps keeps the bound, the recorded balance is the one the
    passes give, and the steps it cut are flagged budget_limited; without the
    account the same training (bit-identical: tracking changes nothing) costs
    more passes on the same steps."""
    tracker, _, _ = _relu_run()
    with pytest.warns(RuntimeWarning, match="mean_passes=3 a step over the run"):
        run = tracker.result()
    free = _relu_run(rule=dict(mean_passes=None))[0].result()
    opts = lca_ext.RuleOptions()
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
    assert "train/pass_credit" not in free.arrays
    np.testing.assert_array_equal(run.get("loss_after"), free.get("loss_after"))


@pytest.mark.filterwarnings("ignore:.*stopped at the pass budget")
def test_no_reserve_holds_every_step_to_the_mean():
    run = _relu_run(rule=dict(pass_reserve=0))[0].result()
    spent = run.grad_passes - np.eye(len(run.grad_passes), dtype=int)[0]
    assert spent.max() == MIN_PASSES and (run.get("pass_credit") <= 0).all()


def test_a_resumed_run_goes_on_from_its_last_balance(tmp_path):
    path = str(tmp_path / "run")
    tracker, model, opt = _relu_run(steps=13, store=path)
    balance = tracker.objectives[0].account.balance
    assert balance < lca_ext.RuleOptions().pass_reserve       # it has spent some
    state = (model.state_dict(), opt.state_dict())
    resumed, _, _ = _relu_run(steps=0, store=path, resume=True, model_state=state)
    assert resumed.objectives[0].account.balance == balance
    assert resumed.tracked_count == 13


def test_budget_rule_under_the_account_on_synthetic_jumpy_steps():
    """The rule and the account together, as the tracker drives them, on 120
    synthetic curved, jumpy steps: the window bound holds for several means and
    reserves, and no step is held below the three passes it needs."""
    for mean, reserve in ((3, 0), (3, 4), (3.5, 2), (4, 8)):
        rng = np.random.default_rng(5)
        account = PassAccount(lca_ext.RuleOptions(mean_passes=mean, pass_reserve=reserve))
        spent = []
        for i in range(120):
            path = SyntheticPath(rng, jump=0.05)
            budget(path, account.step_options(lca_ext.RuleOptions(seed=i)))
            account.charge(path.passes)
            spent.append(path.passes)
        spent = np.array(spent, dtype=float)
        _windows_hold(spent, mean, reserve)
        assert spent.min() >= 2 and spent.max() <= max(8, MIN_PASSES)


def test_bad_account_options_name_the_field():
    with pytest.raises(ValueError, match="mean_passes=2.5"):
        lca_ext.RuleOptions(mean_passes=2.5)
    with pytest.raises(ValueError, match="pass_reserve=-1"):
        lca_ext.RuleOptions(pass_reserve=-1)
    assert PassAccount(lca_ext.RuleOptions(method="certified")).active is False
