"""The default rule's error bars (lca_ext.bars, lca_ext.budget_rule) from the
tracker, on real networks against float64 autograd references: ReLU networks on
curved early steps (float32, bf16), the two-pass stage, per-class mode (with
and without batch statistics), the groups' losses, a NaN the set never reads,
the rounding floor.  (tests/test_bars_rules.py: the same rules on synthetic
integrands whose integral is exact.)"""
import time
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext

from helpers import relu_classifier, simpson_lca
from test_fidelity import C, reference


@pytest.mark.parametrize("classes", [None, 3])
def test_the_groups_losses_are_each_groups_share_in_the_groups_order(classes, monkeypatch):
    """The two-pass covariate's inputs, as the tracker's passes keep them: at
    θ_t and θ_{t+1} each group's loss is its share of the set's mean loss,
    computed here directly (float64): batch g's examples, or in per-class mode
    each class's units (their group_strata) adding up to that class's share; the
    groups' losses add up to the loss; and the covariate is each group's loss
    change less its trapezoid (so a shuffled order would not match)."""
    import lca_ext.budget_rule as rule_module
    seen = []
    real = rule_module.trapezoid_errors

    def spy(path, g0, g1):
        seen.append((path.group_losses(0.0), path.group_losses(1.0), path.group_strata,
                     g0, g1, real(path, g0, g1)))
        return seen[-1][-1]
    monkeypatch.setattr(rule_module, "trapezoid_errors", spy)
    torch.manual_seed(0)
    x = torch.randn(160, 6, dtype=torch.float64)
    y = (x[:, :3] + 0.3 * torch.randn(160, 3, dtype=torch.float64)).argmax(1)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).double()
    batches = [(x[i:i + 20], y[i:i + 20]) for i in range(0, 160, 20)]
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, batches,
                                 num_classes=classes)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    shares = []
    for t in range(3):
        with torch.no_grad():
            losses = nn.functional.cross_entropy(model(x), y, reduction="none") / len(y)
        before = losses
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:40]), y[:40]).backward()
        with tracker.step():
            opt.step()
        with torch.no_grad():
            after = nn.functional.cross_entropy(model(x), y, reduction="none") / len(y)
        shares.append((before, after))
    assert len(seen) == 3
    for (l0, l1, strata, g0, g1, cov), (before, after) in zip(seen, shares):
        for got, want in ((l0, before), (l1, after)):
            assert got is not None
            np.testing.assert_allclose(got.sum(), float(want.sum()), rtol=1e-12)
            if classes is None:
                direct = want.reshape(8, 20).sum(1).numpy()
                np.testing.assert_allclose(got, direct, rtol=1e-10)
            else:
                for c in range(classes):
                    np.testing.assert_allclose(got[np.asarray(strata) == c].sum(),
                                               float(want[y == c].sum()), rtol=1e-10)
        if cov is not None:
            np.testing.assert_allclose(cov, (l1 - l0) - 0.5 * (g0 + g1).sum(1), rtol=1e-12)
    assert any(s[-1] is not None for s in seen)


def _relu_run(dtype, steps=4, lr=0.4, with_reference=True, **kw):
    x, y, model = relu_classifier(C, dtype)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x.to(dtype), y), **kw)
    refs = []
    for _ in range(steps):
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.zero_grad()
        nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
        with tracker.step():
            opt.step()
        after = [p.detach().double().clone() for p in model.parameters()]
        if with_reference:
            refs.append(reference(model, x, y, before, after, intervals=256)[0])
    return tracker.result(), np.array(refs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_relu_network_bars_cover_a_float64_reference_on_curved_early_steps(dtype):
    """A ReLU MLP's first four steps at a high learning rate (curved, jumpy):
    the bars hold the actual error of the tensors carrying >= 1% of a step
    against a 256-interval float64 autograd reference (>= 95%), those errors
    are under 5% (median under 1%), no step passes the budget, and sum_error
    holds the error of the summed tensors."""
    with warnings.catch_warnings():     # (the budget's one-line summary)
        warnings.simplefilter("ignore", RuntimeWarning)
        run, ref = _relu_run(dtype)
    err = np.abs(run.tensor_sums - ref)
    big = np.abs(ref) >= 0.01 * np.abs(ref).sum(1, keepdims=True)
    rel = (err / np.abs(ref))[big]
    assert rel.max() <= 0.05 and np.median(rel) <= 0.01, (rel.max(), np.median(rel))
    assert (run.tensor_error[big] >= err[big]).mean() >= 0.95
    assert (run.bar_dof == 7).all()
    assert (run.grad_passes[1:] <= 8).all() and run.grad_passes[0] <= 9
    summed = np.abs(run.tensor_sums.sum(0) - ref.sum(0))
    assert (run.sum_error() >= summed).all()


def test_a_nan_in_a_parameter_the_set_never_reads_is_named_not_hung():
    """Issue reproduction: an embedding row no LCA example uses holds NaN; every
    rule raises at once naming the tensor, the element and the step (it looped
    for ever: NaN·0 left nothing to refine and nothing to stop it)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 2))
    x, y = torch.randint(0, 9, (64, 3)), torch.randint(0, 2, (64,))
    with torch.no_grad():
        model[0].weight[9, 0] = float("nan")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for method in ("budget", "certified", "adaptive", "simpson"):
        tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), method=method)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        start = time.monotonic()
        with pytest.raises(FloatingPointError, match=r"'0.weight'.*index \(9, 0\)"):
            with tracker.step():
                opt.step()
        assert time.monotonic() - start < 30


def test_a_step_at_the_float32_rounding_floor_is_flagged_not_refined():
    """A step so small that ΔL is float32 rounding: the default rule flags it
    noise_limited after Simpson and the bars' pass (3 passes), instead of
    refining for a total it cannot resolve; the same step in float64 passes is
    grounded, and its tensors are within the float32 step's bars."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
    trackers = [lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y)),
                lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                   pass_dtype=torch.float64)]
    opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with trackers[0].step(), trackers[1].step():
            opt.step()
    low, high = (t.result() for t in trackers)
    assert low.get("noise_limited")[0] and not low.grounded()[0]
    assert low.grad_passes[0] == 1 + 3                  # the start pass, Simpson, the bars
    assert any("rounding" in str(w.message) for w in caught)
    assert high.grounded()[0] and not high.get("noise_limited")[0]
    assert (np.abs(low.tensor_sums - high.tensor_sums) <= low.tensor_error + 1e-12).all()


def _two_pass_run(budget_bytes=2 << 30, steps=6, lr=0.05):
    torch.manual_seed(1)
    x = torch.randn(400, 12)
    y = (x[:, :C] + 0.3 * torch.randn(400, C)).argmax(1)
    model = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, C))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                 rule=dict(path_memory_budget=budget_bytes),
                                 frames=["0.weight"],
                                 frame_every=1)
    refs = []
    for t in range(steps):
        before = [p.detach().double().clone() for p in model.parameters()]
        opt.zero_grad()
        idx = torch.arange(t * 50, t * 50 + 50)
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        with tracker.step():
            opt.step()
        after = [p.detach().double().clone() for p in model.parameters()]
        refs.append(reference(model, x, y, before, after, intervals=256)[0])
    return tracker.result(), np.array(refs)


def test_tracker_two_pass_steps_against_a_float64_reference():
    """A ReLU MLP at a moderate learning rate: from the second step on the
    groups' gradients at θ_t are held and most steps cost 2 passes; their
    tensors are within their bars of a 256-interval float64 reference (and
    under 1%), the per-element values add up to the per-tensor ones (frames),
    and sum_error holds the summed error.  With a path_memory_budget too small
    for the groups' buffers the rule is the 3-pass one."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run, ref = _two_pass_run()
    assert run.grad_passes[0] >= 3 and (run.grad_passes[1:] == 2).sum() >= 3
    err = np.abs(run.tensor_sums - ref)
    big = np.abs(ref) >= 0.01 * np.abs(ref).sum(1, keepdims=True)
    assert (err[big] / np.abs(ref[big])).max() <= 0.01
    assert (run.tensor_error[big] >= err[big]).mean() >= 0.95
    frames = run.frames["0"].reshape(len(run), -1).astype(np.float64).sum(1)
    np.testing.assert_allclose(frames, run.tensor_sums[:, 0], rtol=1e-5)
    assert (run.sum_error() >= np.abs(run.tensor_sums.sum(0) - ref.sum(0))).all()
    one_buffer = 4 * (12 * 32 + 32 + 32 * C + C)       # bytes of one gradient buffer
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        small, _ = _two_pass_run(budget_bytes=2 * 8 * one_buffer - 1, steps=3)
    assert (small.grad_passes[1:] >= 3).all()


def _class_reference(model, before, x, y, classes, intervals=128):
    """[C, K] per-class per-tensor LCA by composite Simpson in float64 (autograd,
    no lca_ext): class c's share is (1/N) Σ_{i: y_i = c} loss_i."""
    def shares(m):
        losses = nn.functional.cross_entropy(m(x.double()), y, reduction="none") / len(y)
        return [losses[y == c].sum() for c in range(classes)]
    return simpson_lca(model, before, [p.detach() for p in model.parameters()], shares,
                       intervals)[0]


@pytest.mark.parametrize("classes", [3, 10])
def test_per_class_mode_two_pass_steps_against_a_float64_reference(classes):
    """Per-class mode: the bars' groups are the units (each class's part of a
    batch, at least 4 a class here), so the two-pass stage runs there too: from the
    second step on most steps cost 2 passes.  Against a float64 reference
    (3 seeds, 6 steps, a ReLU MLP at two learning rates): the tensors carrying
    >= 1% of a step are within 3% and inside their bars >= 95% of the time, the
    class x tensor values within 5% of the step's gross movement, the class
    shares add up to the tensors, and each class total's error is what
    class_error() says."""
    cover, passes = [], []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(300, 12)
        y = (x[:, :classes] + 0.3 * torch.randn(300, classes)).argmax(1)
        model = nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, classes))
        opt = torch.optim.SGD(model.parameters(), lr=0.1 * (1 + seed))
        tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                     num_classes=classes)
        assert tracker.objectives[0].classes
        refs = []
        for t in range(6):
            before = [p.detach().double().clone() for p in model.parameters()]
            opt.zero_grad()
            idx = torch.arange(t * 50, t * 50 + 50)
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            with tracker.step():
                opt.step()
            refs.append(_class_reference(model, before, x, y, classes))
        run = tracker.result()
        refs = np.array(refs)                                   # [T, C, K]
        tensor_ref = refs.sum(1)
        err = np.abs(run.tensor_sums - tensor_ref)
        big = np.abs(tensor_ref) >= 0.01 * np.abs(tensor_ref).sum(1, keepdims=True)
        assert (err[big] / np.abs(tensor_ref[big])).max() <= 0.03
        cover += list(run.tensor_error[big] >= err[big])
        passes += list(run.grad_passes[1:])
        gross = np.abs(tensor_ref).sum(1)[:, None, None]
        assert (np.abs(run.class_sums - refs) <= 0.05 * gross).all()
        np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-5,
                                   atol=1e-7 * gross.max())
        d_class = refs.sum(2)                                   # the reference's ΔL_c
        np.testing.assert_allclose(np.abs(run.class_sums.sum(2) - d_class),
                                   np.abs(run.class_error()), atol=1e-5 * gross.max())
    assert np.mean(cover) >= 0.95, np.mean(cover)
    assert np.mean(np.array(passes) == 2) >= 0.6, passes

def _bn_reference(model, before, x, y, batch, intervals=128):
    """[K] per-tensor LCA of the set's mean loss with BatchNorm on each batch's
    statistics (train mode, a copy: the running statistics are not touched),
    composite Simpson in float64."""
    def loss(m):
        return [sum(nn.functional.cross_entropy(m(x[j:j + batch].double()), y[j:j + batch],
                                                reduction="sum")
                    for j in range(0, len(y), batch)) / len(y)]
    return simpson_lca(model, before, [p.detach() for p in model.parameters()], loss,
                       intervals, train=True)[0][0]


def test_per_class_mode_with_batch_statistics_has_bars_against_a_float64_reference():
    """Per-class mode with BatchNorm on batch statistics: a batch's classes share
    its forward, so each batch is a unit (no two-pass stage: its correction goes
    to a unit's class).  The steps get 95% bars (bar_dof = batches - 1) that hold
    the error against a float64 reference (3 seeds, 5 steps, lr 0.5), and the
    class shares add up to the tensors."""
    cover = []
    for seed in range(3):
        torch.manual_seed(seed)
        x = torch.randn(240, 6)
        y = (x[:, :3] + 0.3 * torch.randn(240, 3)).argmax(1)
        model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), batch_size=30,
                                     num_classes=3)
        assert tracker.objectives[0].evaluator.batch_coupled()
        refs = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for t in range(5):
                before = [p.detach().double().clone() for p in model.parameters()]
                opt.zero_grad()
                idx = torch.arange(t * 40, t * 40 + 40)
                nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
                with tracker.step():
                    opt.step()
                refs.append(_bn_reference(model, before, x, y, 30))
            run = tracker.result()
        refs = np.array(refs)
        assert (run.bar_dof == 7).all() and (run.grad_passes[1:] >= 3).all()
        err = np.abs(run.tensor_sums - refs)
        big = np.abs(refs) >= 0.01 * np.abs(refs).sum(1, keepdims=True)
        assert (err[big] / np.abs(refs[big])).max() <= 0.03
        cover += list(run.tensor_error[big] >= err[big])
        np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-5,
                                   atol=1e-6 * np.abs(refs).max())
    assert np.mean(cover) >= 0.95, np.mean(cover)


def test_a_float32_miss_the_quadrature_does_not_explain_is_flagged_without_refining():
    """A float32 step whose loss is exactly quadratic along it (a linear model's
    MSE at its least-squares optimum, targets near 4000, a move of 1e-3): Simpson
    is exact, so its miss of ΔL, 2.5-10x the loss's rounding floor, is rounding.
    The bars' estimate of the total's quadrature error (about 0) does not explain
    it, so the step is flagged noise_limited after Simpson and the bars' pass
    (3 passes), not refined until it stalls (7, a reviewer's case); float64
    passes ground the same step.  (A miss beyond 10x the floor is refined: the
    floor, 16·u·Σ|L|, does not see rounding inside the loss, here of targets
    near 4000 against a loss near 1.)"""
    from lca_ext import quadrature
    above = 0
    for seed in range(4):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(256, 4, generator=g)
        y = 4000.0 + x @ torch.randn(4, 1, generator=g) + torch.randn(256, 1, generator=g)
        X = torch.cat([x, torch.ones(256, 1)], 1).double()
        w = torch.linalg.lstsq(X, y.double()).solution
        move = 1e-3 * torch.randn(1, 4, generator=g)
        runs = []
        for dtype in ("auto", torch.float64):
            model = nn.Linear(4, 1)
            with torch.no_grad():
                model.weight.copy_(w[:4].T)
                model.bias.copy_(w[4])
            tracker = lca_ext.LCATracker(model, nn.functional.mse_loss, (x, y), pass_dtype=dtype)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                with tracker.step():
                    with torch.no_grad():
                        model.weight.add_(move)
            runs.append(tracker.result())
        low, high = runs
        floor = quadrature.NOISE_FACTOR * 2.0 ** -24 * (abs(low.loss_before[0])
                                                          + abs(low.loss_after[0]))
        above += float(low.error[0]) > floor
        assert low.grad_passes[0] == 1 + 3                  # the start pass, Simpson, the bars
        assert low.grounded()[0] or low.get("noise_limited")[0]
        assert high.grounded()[0] and high.grad_passes[0] <= 1 + 3
    assert above >= 2                       # the case in question: a miss above the floor


@pytest.mark.parametrize("method,classes", [("adaptive", None), ("adaptive", C),
                                            ("simpson", None), ("first_order", None)])
def test_bars_on_request_make_any_rules_error_an_interval(method, classes):
    """``bars=True`` on a total-only rule (or first order): the same values,
    one mixed pass more a step, and a tensor_error that holds the actual error
    of the tensors carrying >= 1% of a step against a 256-interval float64
    reference on a ReLU MLP's curved first steps (>= 95% over three seeds of
    the bars' points; the rule's own estimate is not an interval, and first
    order's error is large: its bar must say so), per-class mode included;
    sum_error holds the summed error."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        plain, ref = _relu_run(torch.float32, steps=5, num_classes=classes,
                               rule=lca_ext.RuleOptions(method=method))
        runs = [_relu_run(torch.float32, steps=5, num_classes=classes, with_reference=False,
                          rule=lca_ext.RuleOptions(method=method, bars=True, seed=seed))[0]
                for seed in range(3)]
    assert (plain.bar_dof == 0).all()
    big = np.abs(ref) >= 0.01 * np.abs(ref).sum(1, keepdims=True)
    cover = []
    for run in runs:
        assert (run.bar_dof >= 2).all()
        np.testing.assert_array_equal(run.grad_passes, plain.grad_passes + 1)
        np.testing.assert_allclose(run.tensor_sums, plain.tensor_sums, rtol=1e-5, atol=1e-9)
        err = np.abs(run.tensor_sums - ref)
        cover += list(run.tensor_error[big] >= err[big])
        summed = np.abs(run.tensor_sums.sum(0) - ref.sum(0))
        assert (run.sum_error() >= summed).all()
    assert np.mean(cover) >= 0.95, np.mean(cover)
    if method == "first_order":          # its error is no rounding matter: the bar says so
        assert np.median((err / np.abs(ref))[big]) > 0.01
        assert np.median((run.tensor_error / np.abs(ref))[big]) > 0.01


@pytest.mark.parametrize("method,classes,memory", [
    ("adaptive", C, 2 << 30), ("adaptive", None, 2 << 30), ("first_order", C, 2 << 30),
    ("certified", C, 0)])
def test_the_bars_whole_set_samples_are_the_rules_own(method, classes, memory, monkeypatch):
    """The bars of a uniform rule read the whole set's samples as its groups'
    summed (lca_ext.uniform_rules.uniform_bars): the rule's quadrature over
    them must be the stored value of every step, and at every point the
    groups' samples must add up to the whole set's, also in per-class mode,
    whose passes scale each unit's part by the pass's weight (Simpson's
    midpoint enters adaptive's buffer x4; the certified rule recomputes a point
    past path_memory_budget with its Simpson weight before its bars' pass:
    both kept unweighted by the path)."""
    from lca_ext import bars as bars_module
    seen = []
    real = bars_module.honest_bars

    def spy(path, seed, intervals, whole, order=2):
        sums = {f: path.group_dots(f).sum(0) for f in whole if f > 0.0}
        seen.append((list(intervals), dict(whole), order, sums))
        return real(path, seed, intervals, whole, order)
    monkeypatch.setattr(bars_module, "honest_bars", spy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run, _ = _relu_run(torch.float32, steps=4, lr=0.8, num_classes=classes,
                           with_reference=False,
                           rule=lca_ext.RuleOptions(method=method, bars=True,
                                                    path_memory_budget=memory))
    assert len(seen) == len(run)
    for t, (intervals, whole, order, sums) in enumerate(seen):
        for f, v in sums.items():
            np.testing.assert_allclose(v, whole[f], rtol=1e-4, atol=1e-6 * np.abs(v).max())
        if method == "first_order":         # its bars: the trapezoid's, shifted
            value = whole[0.0]
        elif order == 1:
            value = (whole[0.0] + whole[1.0]) / 2
        else:
            value = sum((b - a) / 6 * (whole[a] + 4 * whole[(a + b) / 2] + whole[b])
                        for a, b in intervals)
        np.testing.assert_allclose(value, run.tensor_sums[t], rtol=1e-4,
                                   atol=1e-6 * np.abs(value).max())
    if method == "adaptive":
        assert (run.splits >= 2).any()   # Simpson's midpoint was taken


def test_bars_asked_for_where_the_set_is_one_group_warn_once_and_runs_record_them():
    """bars=True on a set of one batch gives no bars (bar_dof 0): one warning
    saying why and what to pass, not a silent estimate; the rule's default
    (bars=None) does not warn.  The run's config records bars as resolved for
    the method (True for the default rule, False for adaptive's default)."""
    x, y, model = relu_classifier(C, torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for rule, warns in ((dict(method="adaptive", bars=True), True),
                        (dict(method="adaptive"), False)):
        tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                     batch_size=len(x), rule=rule)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                opt.zero_grad()
                nn.functional.cross_entropy(model(x), y).backward()
                with tracker.step():
                    opt.step()
        said = [w for w in caught if "no error bars" in str(w.message)]
        assert len(said) == (1 if warns else 0), [str(w.message) for w in caught]
        if warns:
            assert "batch_size" in str(said[0].message) and "'train'" in str(said[0].message)
        assert (tracker.result().bar_dof == 0).all()
        assert tracker.run_meta()["config"]["bars"] is (True if warns else False)
    default = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    assert default.run_meta()["config"]["bars"] is True
