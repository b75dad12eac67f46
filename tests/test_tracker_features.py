"""LCATracker features: per-class LCA, eval sets, oscillation counters, frames,
bad input."""
import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from test_tracker import Net, train, whole_set, xent


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def data(n=48, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("budget", [2 << 30, 1], ids=["stacked", "class-by-class"])
def test_per_class_sums_add_up_to_total(budget):
    torch.manual_seed(0)
    model = mlp()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=20, num_classes=3,
                                 class_memory_budget=budget)
    train(model, opt, x, y, xent, 3, tracker)
    run = tracker.result()
    cs = run.class_sums                            # [T, C, K]
    assert cs.shape == (3, 3, 4)
    np.testing.assert_allclose(cs.sum(1), run.tensor_sums, rtol=1e-5, atol=1e-8)
    assert (run.class_counts.sum(-1) == np.array([p.numel() for p in model.parameters()])).all()
    layers = run.class_layer_sums()                # [T, C, layers]
    assert layers.shape == (3, 3, 2)
    np.testing.assert_allclose(layers.sum(1), run.layer_sums(), rtol=1e-5, atol=1e-8)


def test_per_class_matches_direct_reference():
    torch.manual_seed(1)
    model = mlp().double()
    x, y = data(30, seed=1)
    x = x.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=30, num_classes=3,
                                 atol=1e9, method="simpson")
    before = [p.detach().clone() for p in model.parameters()]
    train(model, opt, x, y, xent, 1, tracker)
    after = [p.detach().clone() for p in model.parameters()]
    mid = [(a + b) / 2 for a, b in zip(before, after)]
    for c in range(3):
        mask = y == c
        # class c's share of the mean loss: (n_c / N) * mean over the class
        share = lambda out, t, m=mask: xent(out[m], t[m]) * m.sum() / len(t)  # noqa: E731
        g = [whole_set(model, pt, x, y, share)[1] for pt in (before, mid, after)]
        want = [((a - b) * (g0 + 4 * gm + g1) / 6).sum().item()
                for a, b, g0, gm, g1 in zip(after, before, *g)]
        np.testing.assert_allclose(tracker.result().class_sums[0, c], want, rtol=1e-5,
                                   atol=1e-10)


def test_eval_sets_use_the_same_step():
    torch.manual_seed(2)
    model = mlp()
    x, y = data(40, seed=2)
    xv, yv = data(25, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    tracker = lca_ext.LCATracker(model, xent, (x, y), eval_sets={"val": (xv, yv)},
                                 batch_size=16)
    train(model, opt, x, y, xent, 3, tracker)
    run = tracker.result()
    assert run.objectives == ["train", "val"]
    val_d = run.get("loss_after", "val") - run.get("loss_before", "val")
    assert (run.get("error", "val") <= 1e-4 + 1e-3 * abs(val_d)).all()
    # the val loss really is the loss on the val set
    assert run.get("loss_after", "val")[-1] == pytest.approx(
        whole_set(model, list(model.parameters()), xv, yv, xent)[0], rel=1e-5)
    assert not np.allclose(run.get("lca_sum", "val"), run.lca_sum)


@pytest.mark.parametrize("rule", ["budget", "certified", "simpson", "adaptive",
                                  "low-memory"])
def test_oscillation_counters_match_a_direct_count(rule):
    """Every rule: the gradient signs are g(θ_t)'s (simpson, adaptive and the
    low-memory rule build ḡ inside g(θ_t)'s buffer: the counters read it first)."""
    torch.manual_seed(3)
    model = mlp()
    x, y = data(40, seed=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    kw = dict(reuse_gradients=False) if rule == "low-memory" else dict(method=rule)
    tracker = lca_ext.LCATracker(model, xent, (x, y), atol=1e9, **kw)
    thetas = [[p.detach().clone() for p in model.parameters()]]
    gen = torch.Generator().manual_seed(0)
    for _ in range(6):
        idx = torch.randint(0, 40, (8,), generator=gen)
        opt.zero_grad()
        xent(model(x[idx]), y[idx]).backward()
        with tracker.step():
            opt.step()
        thetas.append([p.detach().clone() for p in model.parameters()])
    run = tracker.result()
    for k in range(4):
        deltas = [torch.sign(b[k] - a[k]) for a, b in zip(thetas, thetas[1:])]
        grads = [torch.sign(whole_set(model, th, x, y, xent)[1][k]) for th in thetas[:-1]]
        for name, seq in (("direction_changes", deltas), ("grad_sign_changes", grads)):
            want = torch.zeros_like(seq[0], dtype=torch.int32)
            last = torch.zeros_like(seq[0])
            for s in seq:
                want += (s * last < 0).int()
                last = torch.where(s != 0, s, last)
            assert np.array_equal(run.state[name][k], want.numpy()), (name, k)
    assert sum(c.sum() for c in run.state["direction_changes"]) > 0


def test_frames_hold_per_element_lca():
    torch.manual_seed(4)
    model = mlp()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), frames=["0.weight"], frame_every=2)
    train(model, opt, x, y, xent, 5, tracker)
    run = tracker.result()
    assert run.frames["step"].tolist() == [0, 2, 4]
    frames = run.frames["0"]
    assert frames.shape == (3, 7, 5)
    np.testing.assert_allclose(frames.sum((1, 2)), run.tensor_sums[::2, 0], rtol=1e-5,
                               atol=1e-9)


def test_bad_input():
    model = mlp()
    x, y = data()
    with pytest.raises(ValueError, match="lca_data is empty"):
        lca_ext.LCATracker(model, xent, [])
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        lca_ext.LCATracker(frozen, xent, (x, y))
    with pytest.raises(ValueError, match="frames names"):
        lca_ext.LCATracker(model, xent, (x, y), frames=["nope"])
    with pytest.raises(ValueError, match="max_splits"):
        lca_ext.LCATracker(model, xent, (x, y), max_splits=6)
    with pytest.raises(ValueError, match="inputs have 48 rows but targets have 3"):
        lca_ext.LCATracker(model, xent, (x, y[:3]))
    per_sample = lambda out, t: nn.functional.cross_entropy(out, t, reduction="none")  # noqa: E731
    tracker = lca_ext.LCATracker(model, per_sample, (x, y))
    with pytest.raises(ValueError, match=r"loss_fn returned \(20?4?8?,?\)|loss_fn returned"):
        tracker.begin()


def test_nan_loss_names_the_step_and_keeps_finished_steps(tmp_path):
    torch.manual_seed(5)
    model = mlp()
    x, y = data()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"))
    train(model, opt, x, y, xent, 2, tracker)
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    opt.zero_grad()
    with pytest.raises(FloatingPointError, match=r"'train' loss is nan at step 2"):
        with tracker.step():
            opt.step()
    run = lca_ext.load_run(str(tmp_path / "run"))
    assert run.steps.tolist() == [0, 1]


def test_per_class_with_batchnorm_uses_whole_batch_statistics():
    """With batch-statistics BatchNorm the class shares come from one forward of
    the whole batch, so they still add up to the total exactly."""
    torch.manual_seed(10)
    model = Net()
    x, y = torch.randn(60, 6), torch.randint(0, 3, (60,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=30, num_classes=3)
    assert tracker.objectives[0].evaluator.batch_coupled()
    train(model, opt, x, y, xent, 2, tracker)
    run = tracker.result()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-5, atol=1e-8)


def test_compiled_model_is_tracked_as_its_original():
    """torch.compile(model): the tracker sees the original module (no "_orig_mod."
    prefix) and gives what it gives for the uncompiled model."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
        x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
        run_model = torch.compile(model, backend="eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.3)
        tracker = lca_ext.LCATracker(run_model, nn.functional.cross_entropy, (x, y))
        assert tracker.params.names == ["0.weight", "0.bias", "2.weight", "2.bias"]
        for step in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(run_model(x[step::3]), y[step::3]).backward()
            with tracker.step():
                opt.step()
        results.append(tracker.result())
    np.testing.assert_allclose(results[1].tensor_sums, results[0].tensor_sums, rtol=1e-6)
    np.testing.assert_array_equal(results[1].counts, results[0].counts)


def test_tracker_falls_back_to_the_reference_ops(monkeypatch):
    """Where a device has no usable fused kernel (e.g. CUDA kernels not yet
    verified), the tracker uses lca_ext.reference, warns once, and gives the
    same LCA as with the fused kernels."""
    from lca_ext import kernels, ops, reference
    assert kernels.kernels_for("cpu") is ops
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(ops, "fused_available", lambda op, device: False)
            monkeypatch.setattr(kernels, "_warned_fallback", set())
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
        opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        if fused:
            tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                         num_classes=3, frames=["0.weight"])
        else:
            with pytest.warns(RuntimeWarning, match="reference ops"):
                tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y),
                                             num_classes=3, frames=["0.weight"])
            assert tracker.kernels is reference
        train(model, opt, x, y, nn.functional.cross_entropy, 4, tracker)
        runs.append(tracker.result())
    fused_run, ref_run = runs
    for key in fused_run.arrays:
        np.testing.assert_allclose(ref_run.arrays[key], fused_run.arrays[key], rtol=1e-6,
                                   atol=1e-12, err_msg=key)
    for key in fused_run.state:
        for a, b in zip(ref_run.state[key], fused_run.state[key]):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12, err_msg=key)
    np.testing.assert_allclose(ref_run.frames["0"], fused_run.frames["0"], rtol=1e-6,
                               atol=1e-12)


def test_options_grouped_by_concern_and_the_old_keywords(tmp_path):
    """stats=StatsOptions(...) and store=StoreOptions(...) give the same run as
    the keywords they group (two trackers nested on the same steps), the
    options take effect, and mixing the two forms, resume without a store or a
    bare string for frames are refused with the argument named."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(60, 4), torch.randint(0, 3, (60,))
    edges = lca_ext.signed_log_edges(1e-8, 1.0, 4)
    keywords = lca_ext.LCATracker(model, xent, (x, y), bin_edges=edges, row_sums=False,
                                  oscillation=False, frames=["2.weight"], frame_every=2,
                                  store=str(tmp_path / "a"), state_every=2)
    grouped = lca_ext.LCATracker(
        model, xent, (x, y),
        stats=lca_ext.StatsOptions(bin_edges=edges, row_sums=False, oscillation=False,
                                   frames=["2.weight"], frame_every=2),
        store=lca_ext.StoreOptions(tmp_path / "b", state_every=2))
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    for _ in range(5):
        idx = torch.randint(0, 60, (16,), generator=gen)
        opt.zero_grad()
        xent(model(x[idx]), y[idx]).backward()
        with keywords.step(), grouped.step():
            opt.step()
    a, b = keywords.result(), grouped.result()
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    assert sorted(a.state) == sorted(b.state) == ["cum_lca", "helped_steps"]  # no oscillation
    assert a.arrays["train/row_sums"].shape[1] == 0                         # no row sums
    assert a.arrays["train/histogram"].shape[-1] == len(edges) + 1
    assert sorted(a.frames) == sorted(b.frames) and len(a.frames["step"]) == 3  # steps 0, 2, 4
    np.testing.assert_array_equal(a.frames["2"], b.frames["2"])
    # and the frames are the per-element LCA of that tensor: they add up to its sums
    np.testing.assert_allclose(a.frames["2"].reshape(3, -1).sum(1),
                               a.arrays["train/tensor_sums"][[0, 2, 4], 2], rtol=1e-5)

    data = (model, xent, (x, y))
    with pytest.raises(ValueError, match="give stats= or row_sums="):
        lca_ext.LCATracker(*data, stats=lca_ext.StatsOptions(), row_sums=False)
    with pytest.raises(TypeError, match="stats has unknown fields"):
        lca_ext.LCATracker(*data, stats=dict(rows=False))
    with pytest.raises(TypeError, match="frames='2.weight'"):
        lca_ext.LCATracker(*data, frames="2.weight")
    with pytest.raises(ValueError, match="frame_every=0"):
        lca_ext.LCATracker(*data, frame_every=0)
    with pytest.raises(ValueError, match="resume= inside store="):
        lca_ext.LCATracker(*data, store=lca_ext.StoreOptions(tmp_path / "c"), resume=True)
    with pytest.raises(ValueError, match="resume=True needs store="):
        lca_ext.LCATracker(*data, resume=True)
    with pytest.raises(ValueError, match="state_every=0"):
        lca_ext.LCATracker(*data, store=str(tmp_path / "d"), state_every=0)


def test_the_callbacks_end_of_run_line_names_every_objectives_doubtful_steps():
    """integrations.metrics.end_of_run (the Lightning and HF callbacks' last
    line) named only the training set's steps: an eval set's steps stopped at
    the budget went unmentioned (a reviewer's report)."""
    import warnings

    from lca_ext import analysis
    from lca_ext.integrations.metrics import end_of_run
    torch.manual_seed(0)
    x, y = torch.randn(256, 6), torch.randint(0, 3, (256,))
    xv, yv = 3 * torch.randn(256, 6), torch.randint(0, 3, (256,))
    model = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.ReLU(), torch.nn.Linear(64, 3))
    tracker = lca_ext.LCATracker(model, torch.nn.functional.cross_entropy, (x, y),
                                 eval_sets={"val": (xv, yv)}, rule=dict(max_passes=3))
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(3):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            with tracker.step():
                opt.step()
        run = tracker.result()
    val = analysis.doubtful_steps(run, "val")
    assert val["budget_limited"], val                    # the setting gives some
    with pytest.warns(RuntimeWarning) as caught:
        end_of_run(tracker)
    line = str(caught[0].message)
    assert line.startswith("lca_ext: train: ")
    assert "; val: " + analysis.format_doubtful(val, 3) in line
