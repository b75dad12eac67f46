"""LCATracker against direct reference computations, and its promise never to
change the training it watches."""
import copy

import numpy as np

import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.evaluate import Evaluator, as_batches, classic_batch_loss
from lca_ext.params import ParameterSet


def mse(out, y):
    return ((out - y) ** 2).mean()


def xent(out, y):
    return nn.functional.cross_entropy(out, y)


def whole_set(model, params, x, y, loss_fn):
    """Reference: mean loss and gradient over the whole set, by autograd on a copy."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        for p, v in zip([q for q in m.parameters() if q.requires_grad], params):
            p.copy_(v)
    m.zero_grad()
    loss = loss_fn(m(x), y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in m.parameters() if p.requires_grad]


def train(model, opt, x, y, loss_fn, steps, tracker=None, batch=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx]), y[idx]).backward()
        if tracker is None:
            opt.step()
        else:
            with tracker.step():
                opt.step()


def test_quadratic_loss_is_exact_with_plain_simpson():
    torch.manual_seed(0)
    x, y = torch.randn(64, 5, dtype=torch.float64), torch.randn(64, 3, dtype=torch.float64)
    model = nn.Linear(5, 3).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    tracker = lca_ext.LCATracker(model, mse, (x, y), batch_size=20, atol=0, rtol=1e-9,
                                 method="simpson")
    train(model, opt, x, y, mse, 5, tracker)
    run = tracker.result()
    d_loss = run.loss_after - run.loss_before
    assert (abs(run.lca_sum - d_loss) <= 1e-6 * abs(d_loss)).all()
    assert (run.splits == 2).all()


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_per_tensor_lca_matches_direct_simpson(kind):
    torch.manual_seed(1)
    if kind == "mlp":
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        x = torch.randn(50, 6, dtype=torch.float64)
    else:
        model = SmallCNN().double()
        x = torch.randn(50, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (50,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # huge tolerance: plain Simpson, no refinement, to compare with the reference
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=16, atol=1e9,
                                 method="simpson")
    for _ in range(3):
        before = [p.detach().clone() for p in model.parameters()]
        opt.zero_grad()
        xent(model(x[:16]), y[:16]).backward()
        with tracker.step():
            opt.step()
        after = [p.detach().clone() for p in model.parameters()]
        mid = [(a + b) / 2 for a, b in zip(before, after)]
        g = [whole_set(model, pt, x, y, xent)[1] for pt in (before, mid, after)]
        want = torch.stack([((a - b) * (g0 + 4 * gm + g1) / 6).sum()
                            for a, b, g0, gm, g1 in zip(after, before, *g)])
        got = torch.from_numpy(tracker.result().tensor_sums[-1])
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-12)


def test_large_steps_are_refined_until_grounded():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    tracker = lca_ext.LCATracker(model, xent, (x, y), rtol=1e-4, atol=1e-6, max_splits=64,
                                 method="simpson")
    train(model, opt, x, y, xent, 4, tracker)
    run = tracker.result()
    d_loss = run.loss_after - run.loss_before
    tol = 1e-6 + 1e-4 * abs(d_loss)
    assert (run.splits > 2).any()
    assert ((run.error <= tol) | (run.splits == 64)).all()
    # passes: the end point plus every Simpson point; the start is computed on
    # the first step and after a refined step (which spends g_end's buffer)
    recomputed = np.r_[True, run.splits[:-1] > 2]
    assert (run.grad_passes == run.splits + recomputed).all()


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.3)
        self.fc2 = nn.Linear(12, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


@pytest.mark.parametrize("optim", ["sgd_momentum", "adam"])
def test_tracking_never_changes_training(optim):
    x, y = torch.randn(80, 6), torch.randint(0, 3, (80,))

    def run(track):
        torch.manual_seed(5)
        model = Net()
        opt = (torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9) if optim == "sgd_momentum"
               else torch.optim.Adam(model.parameters(), lr=1e-2))
        tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=32) if track else None
        train(model, opt, x, y, xent, 6, tracker)
        return model, opt, torch.get_rng_state(), torch.rand(3)

    m0, o0, rng0, draw0 = run(False)
    m1, o1, rng1, draw1 = run(True)
    for (n, a), (_, b) in zip(m0.state_dict().items(), m1.state_dict().items()):
        assert torch.equal(a, b), n                 # params and BN running stats
    for s0, s1 in zip(o0.state_dict()["state"].values(), o1.state_dict()["state"].values()):
        for k in s0:
            assert torch.equal(torch.as_tensor(s0[k]), torch.as_tensor(s1[k])), k
    assert torch.equal(rng0, rng1) and torch.equal(draw0, draw1)
    assert m1.training and m1.drop.training and m1.bn.training


def test_tied_and_frozen_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight          # shared
            self.frozen = nn.Linear(4, 2)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            return self.frozen(torch.tanh(self.b(torch.tanh(self.a(x)))))

    torch.manual_seed(3)
    model = Tied()
    ps = ParameterSet.from_model(model)
    assert ps.names == ["a.weight", "a.bias", "b.bias"]
    assert ps.aliases == {"b.weight": "a.weight"}
    x, y = torch.randn(30, 4), torch.randint(0, 2, (30,))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=7)
    train(model, opt, x, y, xent, 3, tracker)
    run = tracker.result()
    d_loss = run.loss_after - run.loss_before
    assert (abs(run.lca_sum - d_loss) <= 1e-4 + 1e-3 * abs(d_loss)).all()
    assert run.tensor_sums.shape == (3, 3)


def test_partial_last_batch_weighs_right():
    torch.manual_seed(4)
    model = nn.Linear(3, 2)
    x, y = torch.randn(10, 3), torch.randint(0, 2, (10,))
    ps = ParameterSet.from_model(model)
    ev = Evaluator(model, classic_batch_loss(xent), as_batches((x, y), batch_size=4), ps)
    grads = [torch.zeros_like(p) for p in ps.params]
    loss = ev.loss_and_grad([p.detach() for p in ps.params], grads)
    want_loss, want_grads = whole_set(model, ps.params, x, y, xent)
    assert loss == pytest.approx(want_loss, rel=1e-6)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


def test_schedule_and_first_order():
    torch.manual_seed(6)
    model = nn.Linear(3, 2)
    x, y = torch.randn(20, 3), torch.randint(0, 2, (20,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), schedule=2, method="first_order")
    train(model, opt, x, y, xent, 5, tracker)
    run = tracker.result()
    assert run.steps.tolist() == [0, 2, 4]
    assert (run.splits == 1).all()
    # after an untracked step the start gradient is recomputed: 2 passes each
    assert run.grad_passes.tolist() == [2, 2, 2]
    # first order: LCA = Δθ · g(θ_t), so the error is second order, not zero
    assert (run.error > 0).all()


@pytest.mark.parametrize("outside", ["optimizer_step", "projection"])
def test_theta_changed_outside_the_tracker_is_noticed(outside):
    """A step taken without tracker.step() (or any in-place write to θ) between
    two tracked steps: the next tracked step starts from the loss and gradient
    at the θ it sees, not from the stale end point of the previous one."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = torch.randn(40, 4), torch.randint(0, 3, (40,))
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = lca_ext.LCATracker(model, xent, (x, y), method="first_order")
    train(model, opt, x, y, xent, 1, tracker)
    if outside == "optimizer_step":
        train(model, opt, x, y, xent, 1, seed=1)
    else:
        with torch.no_grad():
            model[0].weight.clamp_(-0.1, 0.1)
    theta_t = [p.detach().clone() for p in model.parameters()]
    train(model, opt, x, y, xent, 1, tracker, seed=2)
    loss_t, grad_t = whole_set(model, theta_t, x, y, xent)
    run = tracker.result()
    assert run.loss_before[1] == pytest.approx(loss_t, rel=1e-6)
    # first order: LCA = Δθ · g(θ_t) exactly, per tensor
    direct = [float(((p.detach() - t) * g).sum())
              for p, t, g in zip(model.parameters(), theta_t, grad_t)]
    np.testing.assert_allclose(run.tensor_sums[1], direct, rtol=1e-5, atol=1e-9)
    assert run.grad_passes.tolist() == [2, 2]


def test_layer_sums_and_state_add_up():
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(3, 5), nn.ReLU(), nn.Linear(5, 2))
    x, y = torch.randn(30, 3), torch.randint(0, 2, (30,))
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = lca_ext.LCATracker(model, xent, (x, y))
    train(model, opt, x, y, xent, 4, tracker)
    run = tracker.result()
    assert run.layer_names == ["0", "2"]
    torch.testing.assert_close(torch.from_numpy(run.layer_sums().sum(1)),
                               torch.from_numpy(run.lca_sum))
    cum = [c.sum() for c in run.cum_lca]
    torch.testing.assert_close(torch.tensor(cum, dtype=torch.float64),
                               torch.from_numpy(run.tensor_sums.sum(0)), rtol=1e-5, atol=1e-7)
    assert run.counts.sum(-1).tolist() == [[15, 5, 10, 2]] * 4
    assert run.layer_counts().sum(-1).tolist() == [[20, 12]] * 4
    assert (run.layer_counts()[:, 0] == run.counts[:, 0] + run.counts[:, 1]).all()


def test_begin_end_misuse():
    model = nn.Linear(2, 2)
    tracker = lca_ext.LCATracker(model, xent, (torch.randn(4, 2), torch.randint(0, 2, (4,))))
    with pytest.raises(RuntimeError, match="no step was begun"):
        tracker.end()
    tracker.begin()
    with pytest.raises(RuntimeError, match="previous step was not ended"):
        tracker.begin()


@pytest.mark.parametrize("batchnorm", ["batch", "eval"])
def test_grounded_with_batchnorm_and_dropout(batchnorm):
    """Dropout is off and BatchNorm deterministic during evaluation, so ΣLCA
    matches the measured loss change (dropout left on would break this)."""
    torch.manual_seed(8)
    model = Net()
    x, y = torch.randn(64, 6), torch.randint(0, 3, (64,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=32, batchnorm=batchnorm,
                                 rtol=1e-3, atol=1e-5, method="simpson")
    train(model, opt, x, y, xent, 4, tracker)
    run = tracker.result()
    d_loss = run.loss_after - run.loss_before
    assert (run.error <= 1e-5 + 1e-3 * abs(d_loss)).all()
    if batchnorm == "batch":
        # the next step starts where this one ended: the losses chain exactly
        assert (run.loss_before[1:] == run.loss_after[:-1]).all()
    else:
        # running statistics moved between steps: each step re-evaluates its start
        assert (run.grad_passes == 1 + run.splits).all()


@pytest.mark.parametrize("method", ["simpson", "first_order"])
def test_low_memory_mode_gives_the_same_lca(method):
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    runs = []
    for reuse in (True, False):
        torch.manual_seed(9)
        model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        opt = torch.optim.SGD(model.parameters(), lr=2.0)
        tracker = lca_ext.LCATracker(model, xent, (x, y), method=method, rtol=1e-4,
                                     atol=1e-6, reuse_gradients=reuse)
        train(model, opt, x, y, xent, 4, tracker)
        runs.append(tracker.result())
    a, b = runs
    assert (a.splits == b.splits).all()
    np.testing.assert_allclose(b.tensor_sums, a.tensor_sums, rtol=1e-4, atol=1e-9)
    np.testing.assert_allclose(b.loss_after, a.loss_after, rtol=1e-6)
    if method == "simpson":
        assert (b.splits > 2).any()
        # low memory: the start every step, then n points per attempt, and the
        # start again for every attempt after the first
        def passes(s):
            levels = range(1, int(np.log2(s)) + 1)
            return 1 + sum(2 ** i for i in levels) + (len(levels) - 1)
        assert b.grad_passes.tolist() == [passes(s) for s in b.splits]
