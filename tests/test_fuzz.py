"""The bad-input suite: a bounded, seeded set of hostile inputs to LCATracker.

Every case runs under a time limit (SIGALRM: a hang fails the test instead of
the CI job) and must end in one of two ways: a clear error that names the
cause (the tensor and element, or the argument) and what to do, or a result
whose doubtful steps are flagged (never a NaN, never grounded by accident).
Each case writes a store; two good steps are committed before the bad input,
and afterwards the store is reloaded and compared with what was committed
(the bad step never corrupts or drops earlier steps).
"""
import contextlib
import copy
import os
import signal
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext

from helpers import simpson_lca

xent = nn.functional.cross_entropy
LIMIT_S = 60
SEEDS = range(3)


@contextlib.contextmanager
def time_limit(seconds=LIMIT_S):
    def stop(*_):
        raise TimeoutError(f"the tracker was still busy after {seconds} s")
    old = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))


def embedder():
    """Tokens 0..8 only are ever used: row 9 of the embedding is never read."""
    return nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))


def dataset(model, n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    if isinstance(model, TwoHeads) or isinstance(model[0], nn.Embedding):
        x = torch.randint(0, 9, (n, 3), generator=g)
    else:
        x = torch.randn(n, 6, generator=g)
    return x, torch.randint(0, 3, (n,), generator=g)


def steps(model, tracker, opt, x, y, n):
    for _ in range(n):
        opt.zero_grad()
        xent(model(x), y).backward()
        with tracker.step():
            opt.step()


class Case:
    """A model with two committed steps in a store, ready for a bad input."""

    def __init__(self, tmp_path, make=mlp, seed=0, lr=0.1, **kw):
        torch.manual_seed(seed)
        self.model = make()
        self.x, self.y = dataset(self.model, seed=seed)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr)
        self.path = str(tmp_path / "run")
        self.tracker = lca_ext.LCATracker(self.model, xent, (self.x, self.y), store=self.path,
                                          **kw)
        with time_limit():
            steps(self.model, self.tracker, self.opt, self.x, self.y, 2)
        self.committed = lca_ext.load_run(self.path)

    def step(self, n=1):
        with time_limit():
            steps(self.model, self.tracker, self.opt, self.x, self.y, n)

    def store_intact(self, extra=0):
        """The committed steps are still there, unchanged (plus ``extra`` new ones)."""
        now = lca_ext.load_run(self.path)
        assert len(now) == len(self.committed) + extra
        k = len(self.committed)
        np.testing.assert_array_equal(now.steps[:k], self.committed.steps)
        np.testing.assert_array_equal(now.tensor_sums[:k], self.committed.tensor_sums)
        np.testing.assert_array_equal(now.tensor_error[:k], self.committed.tensor_error)
        return now


def _poke(tensor, rng, value):
    idx = tuple(int(rng.integers(0, s)) for s in tensor.shape)
    with torch.no_grad():
        tensor[idx] = value
    return idx


def _bad_value(rng):
    return float(rng.choice([np.nan, np.inf, -np.inf]))


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_parameter_the_set_reads_is_named(tmp_path, seed):
    rng = np.random.default_rng(seed)
    case = Case(tmp_path, seed=seed)
    names = [n for n, _ in case.model.named_parameters()]
    k = int(rng.integers(0, len(names)))
    idx = _poke(dict(case.model.named_parameters())[names[k]], rng, _bad_value(rng))
    with pytest.raises(FloatingPointError) as e:
        case.step()
    msg = str(e.value)
    assert f"'{names[k]}'" in msg and f"index {idx}" in msg and "step 2" in msg
    assert "fix the parameter" in msg
    case.store_intact()


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("method", ["budget", "certified", "adaptive"])
def test_non_finite_parameter_the_set_never_reads_is_named(tmp_path, seed, method):
    rng = np.random.default_rng(seed)
    case = Case(tmp_path, make=embedder, seed=seed, method=method)
    col = int(rng.integers(0, 4))
    value = _bad_value(rng)
    with torch.no_grad():
        case.model[0].weight[9, col] = value
    with pytest.raises(FloatingPointError, match=rf"'0.weight'.*index \(9, {col}\)"):
        case.step()
    case.store_intact()


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_update_is_named_after_the_step(tmp_path, seed):
    """NaN enters θ_{t+1} through the optimiser (a NaN gradient element)."""
    rng = np.random.default_rng(seed)
    case = Case(tmp_path, seed=seed)
    case.opt.zero_grad()
    xent(case.model(case.x), case.y).backward()
    idx = _poke(case.model[2].bias.grad, rng, _bad_value(rng))
    where = rf"(θ_\(t\+1\).*index \({idx[0]},\)|index \({idx[0]},\) in θ_\(t\+1\))"
    with time_limit(), pytest.raises(FloatingPointError, match=rf"'2.bias'.*{where}"):
        with case.tracker.step():
            case.opt.step()
    case.store_intact()


def test_non_finite_gradient_of_a_finite_loss_is_named(tmp_path):
    """sqrt(|b|) at b = 0: the loss is finite, its gradient is not."""
    torch.manual_seed(0)
    model = mlp()
    x, y = dataset(model)
    with torch.no_grad():
        model[0].bias[3] = 0.0

    def batch_loss(m, batch):
        return xent(m(batch[0]), batch[1]) + 0.0 * m[0].bias.abs().sqrt().sum()
    tracker = lca_ext.LCATracker(model, batch_loss=batch_loss, lca_data=[(x, y)],
                                 store=str(tmp_path / "run"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    xent(model(x), y).backward()
    with time_limit(), pytest.raises(FloatingPointError,
                                     match=r"'0.bias'.*gradient holds nan at index \(3,\)"
                                           r".*non-differentiable"):
        with tracker.step():
            opt.step()


@pytest.mark.parametrize("seed", SEEDS)
def test_non_finite_input_blames_the_data(tmp_path, seed):
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = mlp()
    x, y = dataset(model, seed=seed)
    idx = _poke(x, rng, _bad_value(rng))
    batch, row = divmod(idx[0], 6)     # (48 examples cut into the bars' 8 groups)
    where = rf"batch {batch}, its floating tensor 0, index \({row}, {idx[1]}\)"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with time_limit(), pytest.raises(FloatingPointError,
                                     match=rf"LCA set's data (is not|holds).*{where}"):
        tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"))
        steps(model, tracker, opt, x[:4].nan_to_num(), y[:4], 1)


def test_empty_set_is_refused_at_build():
    model = mlp()
    with pytest.raises(ValueError, match="lca_data is empty"):
        lca_ext.LCATracker(model, xent, (torch.zeros(0, 6), torch.zeros(0, dtype=torch.long)))


def test_single_example_set_is_grounded_without_bars(tmp_path):
    """One example: no groups, so no bars (tensor_bias NaN), and the steps are
    grounded against a float64 reference of the same path."""
    torch.manual_seed(0)
    model = mlp()
    x, y = dataset(model, n=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"))
    before = [p.detach().double().clone() for p in model.parameters()]
    with time_limit():
        steps(model, tracker, opt, x, y, 1)
    run = lca_ext.load_run(str(tmp_path / "run"))
    assert run.grounded().all() and np.isnan(run.get("tensor_bias")).all()
    ref = _reference_lca(model, before, x, y)
    np.testing.assert_allclose(run.tensor_sums[0], ref, rtol=1e-3, atol=1e-7)


def _reference_lca(model, before, x, y, intervals=256):
    """Per-tensor LCA by composite Simpson in float64 (autograd, no lca_ext)."""
    after = [p.detach() for p in model.parameters()]
    return simpson_lca(model, before, after, lambda m: [xent(m(x.double()), y)], intervals)[0][0]


def test_zero_step_allocates_zero_and_is_grounded(tmp_path):
    case = Case(tmp_path, lr=0.0)
    now = case.store_intact()
    assert (now.tensor_sums == 0).all() and now.grounded().all()
    assert (now.grad_passes[1:] <= 8).all()


@pytest.mark.parametrize("lr", [1e3, 1e8, 1e30])
def test_huge_step_stays_within_the_budget_and_is_flagged(tmp_path, lr):
    """A step so large the loss leaves any smooth regime: the budget holds, the
    step is flagged (never silently grounded), or a clear error names the
    overflow."""
    torch.manual_seed(0)
    model = mlp()
    x, y = dataset(model)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        try:
            with time_limit():
                steps(model, tracker, opt, x, y, 2)
        except FloatingPointError as e:
            assert "overflow" in str(e) or "holds" in str(e), e
            return
    run = lca_ext.load_run(str(tmp_path / "run"))
    assert (run.grad_passes[1:] <= 8).all() and run.grad_passes[0] <= 9
    assert np.isfinite(run.tensor_sums).all()
    doubtful = ~run.grounded() | run.get("budget_limited") | run.get("noise_limited")
    err = np.abs(run.lca_sum - (run.loss_after - run.loss_before))
    # a step whose total misses ΔL by more than 1% of |ΔL| is never called grounded
    assert (doubtful | (err <= 0.01 * np.abs(run.loss_after - run.loss_before) + 1e-6)).all()


class Mixed(nn.Module):
    """float64 and bf16 parameters in one model, casting between them itself."""

    def __init__(self, fixed_cast: bool):
        super().__init__()
        self.a = nn.Linear(6, 8).double()
        self.b = nn.Linear(8, 3).bfloat16()
        self.fixed_cast = fixed_cast

    def forward(self, x):
        h = torch.tanh(self.a(x.to(self.a.weight.dtype)))
        h = h.bfloat16() if self.fixed_cast else h.to(self.b.weight.dtype)
        return self.b(h).float()


def test_mixed_precision_model_runs_or_names_pass_dtype(tmp_path):
    # a forward that casts to bf16 itself cannot run float32 passes: named
    torch.manual_seed(0)
    model = Mixed(fixed_cast=True)
    x, y = dataset(mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with time_limit(), pytest.raises(RuntimeError, match=r"pass_dtype=None"):
        steps(model, lca_ext.LCATracker(model, xent, (x, y)), opt, x, y, 1)
    # ... and runs with pass_dtype=None: the bf16 rounding floor is recognised
    # (the least precise parameter's), so the steps end early and flagged
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        tracker = lca_ext.LCATracker(model, xent, (x, y), pass_dtype=None)
        with time_limit():
            steps(model, tracker, opt, x, y, 3)
    run = tracker.result()
    assert (run.grounded() | run.get("noise_limited")).all()
    assert (run.grad_passes <= 8).all()
    # a forward that follows the weights' dtypes runs float32 passes: grounded
    torch.manual_seed(0)
    model = Mixed(fixed_cast=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y))
    with time_limit():
        steps(model, tracker, opt, x, y, 3)
    assert tracker.result().grounded().all()


def test_module_registered_twice_is_tracked_once_and_training_unchanged(tmp_path):
    """One Linear at two places of a Sequential.  torch's functional_call with
    tie_weights=True swapped its tensors in twice (the second swap undoing the
    first): the passes ran at the live θ, the module kept a pass tensor
    afterwards, and the training then diverged from an untracked run."""
    def make():
        torch.manual_seed(0)
        shared = nn.Linear(6, 6)
        return nn.Sequential(shared, nn.Tanh(), shared, nn.Tanh(), nn.Linear(6, 3))
    x, y = dataset(mlp())
    model, twin = make(), make()
    live = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y))
    before = [p.detach().double().clone() for p in model.parameters()]
    with time_limit():
        steps(model, tracker, opt, x, y, 1)
    run = tracker.result()
    assert run.names == ["0.weight", "0.bias", "4.weight", "4.bias"]
    np.testing.assert_allclose(run.tensor_sums[0], _reference_lca(model, before, x, y),
                               rtol=2e-3, atol=1e-7)
    with time_limit():
        steps(model, tracker, opt, x, y, 2)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=0.1)
    for _ in range(3):
        twin_opt.zero_grad()
        xent(twin(x), y).backward()
        twin_opt.step()
    assert all(a is b for a, b in zip(live, model.parameters()))
    assert all(model[2].weight is p for p in (model[0].weight, live[0]))
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def frozen_bias_mlp():
    model = mlp()
    model[0].bias.requires_grad_(False)
    return model


class TwoHeads(nn.Module):
    """An embedding and an output layer of the same shape, separate at first."""

    def __init__(self):
        super().__init__()
        self.wte, self.head = nn.Embedding(10, 4), nn.Linear(4, 10, bias=False)

    def forward(self, x):
        return self.head(self.wte(x).mean(1))[:, :3]


@pytest.mark.parametrize("change", ["added", "unfrozen", "retied"])
def test_parameter_set_changing_between_steps_is_refused(tmp_path, change):
    """Trainable tensors added or unfrozen, or slots re-tied after the tracker
    was built: refused by name (re-tied weights made the passes run at the
    old head's values, silently)."""
    if change == "retied":
        case = Case(tmp_path, make=TwoHeads)
        case.model.head.weight = case.model.wte.weight
        named = "'head.weight'"
        with pytest.raises(RuntimeError, match=rf"slots that hold other tensors.*{named}.*"
                                               r"new LCATracker"):
            case.step()
        case.store_intact()
        return
    if change == "added":
        case = Case(tmp_path)
        case.model.add_module("3", nn.Linear(3, 3))
        case.opt.add_param_group({"params": case.model[3].parameters()})
        named = "'3.weight', '3.bias'"
    else:
        case = Case(tmp_path, make=frozen_bias_mlp)
        case.model[0].bias.requires_grad_(True)
        named = "'0.bias'"
    with pytest.raises(RuntimeError, match=rf"not built with: {named}.*new LCATracker"):
        case.step()
    case.store_intact()


@pytest.mark.parametrize("seed", SEEDS)
def test_loss_that_raises_midway_leaves_the_tracker_usable(tmp_path, seed):
    """The user's loss raises at a random call inside a step's passes (at its
    start or its end): the exception comes through unchanged, the committed
    steps stay, and the next step is tracked as a fresh tracker would track it
    (no half-made gradient reused)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = dataset(mlp(), seed=seed)
    calls, fail_at = [0], [None]

    def loss(out, t):
        calls[0] += 1
        if calls[0] == fail_at[0]:
            raise KeyError("the user's loss failed")
        return xent(out, t)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = str(tmp_path / "run")
    # (the certified rule: its values do not depend on the step's random bar points)
    tracker = lca_ext.LCATracker(model, loss, (x, y), store=path, method="certified")
    with time_limit():
        steps(model, tracker, opt, x, y, 2)
    committed = lca_ext.load_run(path)
    fail_at[0] = calls[0] + int(rng.integers(1, 40))
    with time_limit(), pytest.raises(KeyError, match="the user's loss failed"):
        steps(model, tracker, opt, x, y, 3)
    now = lca_ext.load_run(path)
    np.testing.assert_array_equal(now.tensor_sums[:2], committed.tensor_sums)
    # the next step, tracked by the tracker that saw the failure and by a fresh
    # one from the same θ_t and optimiser state: the same LCA
    model_at, opt_at = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    fresh = lca_ext.LCATracker(model, xent, (x, y), method="certified")
    results = []
    for tr in (tracker, fresh):
        model.load_state_dict(model_at)
        opt.load_state_dict(copy.deepcopy(opt_at))   # (a step mutates loaded state)
        with time_limit():
            steps(model, tr, opt, x, y, 1)
        results.append(tr.result())
    np.testing.assert_allclose(results[0].tensor_sums[-1], results[1].tensor_sums[0],
                               rtol=1e-6, atol=1e-9)
    assert results[0].grounded()[-1]


@pytest.mark.parametrize("where", ["buffer", "frozen"])
def test_non_finite_untracked_tensor_is_named(tmp_path, where):
    """A NaN in what the passes read but LCA does not track (an eval-mode
    BatchNorm's running variance, a frozen weight): named, not blamed on the
    data or the loss function."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))
    x, y = dataset(mlp())
    if where == "frozen":
        model[3].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batchnorm="eval")
    opt.zero_grad()
    xent(model(x), y).backward()
    with torch.no_grad():
        if where == "buffer":
            model[1].running_var[3] = float("nan")
            named = r"buffer '1.running_var' \(not tracked\) holds nan at index \(3,\)"
        else:
            model[3].weight[1, 2] = float("inf")
            named = r"parameter '3.weight' \(not tracked\) holds inf at index \(1, 2\)"
    with time_limit(), pytest.raises(FloatingPointError, match=named):
        with tracker.step():
            opt.step()
