"""LCA under torch.distributed: DDP and FSDP2 on 2 CPU processes (gloo).

The reference is a single-process LCATracker run over the same trajectory on
the whole (unsharded) LCA set.  Distributed runs must give the same per-layer
LCA, counts, histograms, per-neuron sums and per-parameter state, and the same
training as untracked distributed training."""
import os
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import lca_ext
from lca_ext import distributed as dsup

sys.path.insert(0, os.path.dirname(__file__))
import distributed_cases as cases  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

KINDS = ["ddp", "fsdp"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every case once: {(kind, tracked, rank): npz}, and the store dirs."""
    out = str(tmp_path_factory.mktemp("dist"))
    for kind in KINDS:
        for tracked in (True, False):
            mp.spawn(cases.run, args=(2, cases.free_port(), out, kind, tracked), nprocs=2)
    loaded = {}
    for kind in KINDS:
        for tracked in (True, False):
            for rank in (0, 1):
                loaded[kind, tracked, rank] = dict(np.load(
                    os.path.join(out, f"{kind}_{int(tracked)}_rank{rank}.npz")))
    return out, loaded


def _theta(npz, t, names):
    return {n: torch.from_numpy(npz[f"theta/{t}/{n}"]) for n in names}


def _replay(tracker, model, npz, steps):
    """Track the saved trajectory's first ``steps`` steps θ_t → θ_{t+1} in one
    process (θ_t written once: each end point starts the next step); the Run."""
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    for t in range(steps):
        with torch.no_grad():
            for n, v in _theta(npz, t, names).items():
                if t == 0:
                    params[n].copy_(v)
                else:
                    assert torch.equal(params[n], v)
        tracker.begin()
        with torch.no_grad():
            for n, v in _theta(npz, t + 1, names).items():
                params[n].copy_(v)
        tracker.end()
    return tracker.result()


@pytest.fixture(scope="module")
def reference(runs):
    """One process, whole LCA set, the DDP run's trajectory (saved by rank 0)."""
    _, loaded = runs
    traj = loaded["ddp", True, 0]
    model = cases.make_model()
    tracker = lca_ext.LCATracker(model, cases.loss_fn, cases.lca_set(),
                                 eval_sets={"val": cases.val_set()},
                                 batch_size=cases.LCA_BATCH, frames=["0.weight"],
                                 distributed=False,
                                 # (the distributed runs' rule: Simpson, no bars)
                                 rule=dict(bars=False))
    return _replay(tracker, model, traj, cases.STEPS)


FLOAT_FIELDS = ("loss_before", "loss_after", "lca_sum", "tensor_sums", "row_sums")
EXACT_FIELDS = ("counts", "histogram", "splits", "step")


@pytest.mark.parametrize("kind", KINDS)
def test_training_unchanged_by_tracking(runs, kind):
    _, loaded = runs
    tracked, plain = loaded[kind, True, 0], loaded[kind, False, 0]
    keys = [k for k in plain if k.startswith("theta/")]
    assert len(keys) == (cases.STEPS + 1) * 6
    for k in keys:
        assert np.array_equal(tracked[k], plain[k]), k
    for rank in (0, 1):   # the training's random stream was not consumed
        assert np.array_equal(loaded[kind, True, rank]["rng_probe"],
                              loaded[kind, False, rank]["rng_probe"])
    # and the training did move
    assert not np.array_equal(plain["theta/0/0.weight"], plain[f"theta/{cases.STEPS}/0.weight"])


def test_ddp_and_fsdp_follow_the_same_trajectory(runs):
    _, loaded = runs
    a, b = loaded["ddp", True, 0], loaded["fsdp", True, 0]
    for k in a:
        if k.startswith("theta/"):
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12, atol=1e-14, err_msg=k)


@pytest.mark.parametrize("kind", KINDS)
def test_distributed_lca_equals_single_process(runs, reference, kind):
    out, loaded = runs
    for rank in (0, 1):
        got = loaded[kind, True, rank]
        assert int(got["lca_set_size"]) == cases.LCA_EXAMPLES
        for obj in ("train", "val"):
            for field in FLOAT_FIELDS:
                want = reference.get(field, obj)
                np.testing.assert_allclose(got[f"a/{obj}/{field}"], want, rtol=1e-6,
                                           atol=1e-12, err_msg=f"{kind} rank {rank} {obj}/{field}")
            for field in EXACT_FIELDS:
                key = f"a/{field}" if field == "step" else f"a/{obj}/{field}"
                want = reference.arrays["step"] if field == "step" else reference.get(field, obj)
                np.testing.assert_array_equal(got[key], want, err_msg=f"{kind} {obj}/{field}")
    # per-layer LCA from the stored run (rank 0 wrote it)
    run = lca_ext.load_run(os.path.join(out, f"run_{kind}"))
    np.testing.assert_allclose(run.layer_sums(), reference.layer_sums(), rtol=1e-6, atol=1e-12)
    assert run.meta["shapes"] == reference.meta["shapes"]
    assert run.meta["config"]["world_size"] == 2
    # grounded: the LCA adds up to the loss change
    np.testing.assert_allclose(run.lca_sum, run.loss_after - run.loss_before, rtol=1e-3,
                               atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_distributed_state_and_frames_equal_single_process(runs, reference, kind):
    out, loaded = runs
    run = lca_ext.load_run(os.path.join(out, f"run_{kind}"))
    for name in ("cum_lca",):
        for k, want in enumerate(reference.state[name]):
            np.testing.assert_allclose(run.state[name][k], want, rtol=1e-6, atol=1e-12)
            # what rank 0's result() returned is the store's
            np.testing.assert_array_equal(loaded[kind, True, 0][f"s/{name}/{k}"],
                                          run.state[name][k])
    for name in ("helped_steps", "direction_changes", "grad_sign_changes"):
        for k, want in enumerate(reference.state[name]):
            assert run.state[name][k].shape == want.shape
            np.testing.assert_array_equal(run.state[name][k], want, err_msg=f"{name}[{k}]")
    np.testing.assert_allclose(run.frames["0"], reference.frames["0"], rtol=1e-6, atol=1e-14)
    for rank in (0, 1):   # resume=True restores each rank's shard of the state
        assert int(loaded[kind, True, rank]["resume_ok"]) == 1
    np.testing.assert_array_equal(run.frames["step"], reference.frames["step"])


def test_shard_data_covers_every_example_once():
    x = torch.arange(11.0)[:, None]
    y = torch.arange(11)
    seen = []
    for world in (2, 3, 4):
        seen.clear()
        for rank in range(world):
            ctx = dsup.Replicated.__new__(dsup.Replicated)
            ctx.rank, ctx.world, ctx.group = rank, world, None
            xs, ys = ctx.shard_data((x, y))
            assert torch.equal(xs[:, 0].long(), ys)
            seen.extend(ys.tolist())
            batches = ctx.shard_data([(x[i:i + 2], y[i:i + 2]) for i in range(0, 11, 2)])
            assert all(int(b[1][0]) // 2 % world == rank for b in batches)
        assert sorted(seen) == list(range(11))


def test_distributed_true_without_a_process_group_is_a_clear_error():
    model = cases.make_model()
    with pytest.raises(RuntimeError, match="initialised torch.distributed process group"):
        lca_ext.LCATracker(model, cases.loss_fn, cases.lca_set(), distributed=True)


def test_unwrap_leaves_plain_models_alone():
    model = cases.make_model()
    assert dsup.unwrap(model) is model
    assert dsup.unwrap(torch.nn.DataParallel(model)) is model
    assert not dsup.is_sharded(model)


@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_torchrun_example(tmp_path, fsdp):
    """The DDP guide's torchrun command (docs/guides/distributed.md), on 2 CPU processes."""
    import subprocess
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2", os.path.join(root, "examples", "distributed.py"),
           "--steps", "3", "--out", str(tmp_path / "run")] + (["--fsdp"] if fsdp else [])
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "per-layer LCA over the run" in proc.stdout
    run = lca_ext.load_run(str(tmp_path / "run"))
    assert len(run) == 3 and run.meta["config"]["world_size"] == 2
    assert run.meta["config"]["lca_set_size"] == 2048
    np.testing.assert_allclose(run.lca_sum, run.loss_after - run.loss_before,
                               rtol=1e-3, atol=1e-4)


def test_ddp_per_class_lca_equals_single_process(tmp_path):
    mp.spawn(cases.run_classes, args=(2, cases.free_port(), str(tmp_path)), nprocs=2)
    got = [dict(np.load(tmp_path / f"classes_0_rank{r}.npz")) for r in (0, 1)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    x, _ = cases.lca_set()
    tracker = lca_ext.LCATracker(model, torch.nn.functional.cross_entropy,
                                 (x, x[:, :3].argmax(1)), batch_size=cases.LCA_BATCH,
                                 num_classes=3, distributed=False,
                                 # (ranks have no groups, so no bars and no two-pass stage)
                                 rule=dict(bars=False))
    ref = _replay(tracker, model, got[0], 3)
    for g in got:
        np.testing.assert_allclose(g["a/train/class_sums"], ref.get("class_sums"),
                                   rtol=1e-6, atol=1e-13)
        np.testing.assert_array_equal(g["a/train/class_counts"], ref.get("class_counts"))
        np.testing.assert_allclose(g["a/train/tensor_sums"], ref.get("tensor_sums"),
                                   rtol=1e-6, atol=1e-13)
    # the class shares add up to the total
    np.testing.assert_allclose(got[0]["a/train/class_sums"].sum(1),
                               got[0]["a/train/tensor_sums"], rtol=1e-9, atol=1e-13)


def test_fsdp_error_bars_equal_one_process_on_the_rounds(tmp_path):
    """Under FSDP2 a pass runs every rank's r-th batch together (one point for
    all ranks), so the bars' groups are the rounds: a mixed pass moves the
    shards to round r's point before its forward, and each round's gradient
    shard gives its samples (summed over ranks).  One process whose batches are
    the rounds (rank 0's r-th batch and rank 1's, joined) gives the same
    values, bars and passes; the training is bit-identical to untracked FSDP2
    training (every mixed pass swaps the shards back exactly)."""
    for tracked in (True, False):
        mp.spawn(cases.run_fsdp_bars, args=(2, cases.free_port(), str(tmp_path), tracked),
                 nprocs=2)
    got = [dict(np.load(tmp_path / f"fsdp_bars_1_rank{r}.npz")) for r in (0, 1)]
    plain = dict(np.load(tmp_path / "fsdp_bars_0_rank0.npz"))
    thetas = [k for k in plain if k.startswith("theta/")]
    assert thetas and all(np.array_equal(got[0][k], plain[k]) for k in thetas)
    x, y = cases.lca_set()
    b = cases.FSDP_BARS_BATCH
    shares = [(x[r::2], y[r::2]) for r in (0, 1)]       # example i -> rank i mod 2
    rounds = -(-shares[0][0].shape[0] // b)
    batches = [tuple(torch.cat([s[j][i * b:(i + 1) * b] for s in shares]) for j in (0, 1))
               for i in range(rounds)]
    model = cases.bars_model()
    tracker = lca_ext.LCATracker(model, cases.loss_fn, batches, distributed=False,
                                 rule=cases.FSDP_BARS_RULE)
    ref = _replay(tracker, model, got[0], cases.STEPS)
    assert (ref.bar_dof == rounds - 1).all() and rounds >= 7
    for g in got:
        for key in ("tensor_sums", "tensor_error", "tensor_bias", "bar_dof", "grad_passes",
                    "lca_sum"):
            np.testing.assert_allclose(g[f"a/train/{key}"], ref.get(key), rtol=1e-7,
                                       atol=1e-13, err_msg=key)


@pytest.mark.parametrize("form", ["pair", "batches", "uneven"])
def test_ddp_error_bars_and_two_pass_steps_equal_one_process_on_the_same_groups(tmp_path,
                                                                               form):
    """Under DDP the groups are every rank's batches (rank 0's first): each rank
    runs its own at their random points, the samples are summed, and each rank
    keeps its own groups' gradients for the two-pass stage.  One process whose
    LCA set is the same batches in that order gives the same values, bars and
    passes (float64), and every rank the same records."""
    mp.spawn(cases.run_bars, args=(2, cases.free_port(), str(tmp_path), form), nprocs=2)
    got = [dict(np.load(tmp_path / f"bars_{form}_rank{r}.npz")) for r in (0, 1)]
    model = cases.bars_model()
    if form == "pair":
        x, y = cases.lca_set()
        batches = []
        for r in (0, 1):                # example i -> rank i mod 2, then cut in 32s
            xr, yr = x[r::2], y[r::2]
            batches += [(xr[i:i + cases.LCA_BATCH], yr[i:i + cases.LCA_BATCH])
                        for i in range(0, xr.shape[0], cases.LCA_BATCH)]
    else:                               # batch i -> rank i mod 2 (counted by a pass)
        whole = cases.bar_batches(9 if form == "uneven" else 8)
        batches = whole[0::2] + whole[1::2]
    assert len(batches) == (9 if form == "uneven" else 8)
    # (one process holds all 9 groups' gradients where a rank holds at most 5: 8
    # buffers more leave it the same room for refined points)
    rule = dict(cases.UNEVEN_RULE, path_memory_budget=cases.UNEVEN_RULE[
        "path_memory_budget"] + 8 * 8 * 97) if form == "uneven" else None
    tracker = lca_ext.LCATracker(model, cases.loss_fn, batches, distributed=False, rule=rule)
    ref = _replay(tracker, model, got[0], cases.STEPS)
    if form == "uneven":                # refined within a small budget: 9 groups
        assert (ref.bar_dof == 8).all() and (ref.grad_passes[1:] > 3).all()
    else:   # 8 groups: 7 degrees of freedom (6 about the two-pass stage's covariate)
        assert np.isin(ref.bar_dof, (6, 7)).all() and (ref.grad_passes[1:] == 2).any()
        assert (ref.bar_dof == 6).any()         # (the covariate: every rank's losses)
    for g in got:
        for key in ("tensor_sums", "tensor_error", "tensor_sd", "bar_dof", "grad_passes",
                    "row_sums", "counts"):
            np.testing.assert_allclose(g[f"a/train/{key}"], ref.get(key), rtol=1e-7,
                                       atol=1e-13, err_msg=key)
    np.testing.assert_array_equal(got[0]["a/train/tensor_sums"], got[1]["a/train/tensor_sums"])


def test_ddp_per_class_error_bars_equal_one_process_on_the_same_units(tmp_path):
    """Per-class mode under DDP: the units (each class's part of a batch) of
    every rank are the groups, rank 0's first; one process on the same batches
    in the ranks' order gives the same class and tensor values, bars and passes."""
    mp.spawn(cases.run_classes, args=(2, cases.free_port(), str(tmp_path), True), nprocs=2)
    got = [dict(np.load(tmp_path / f"classes_1_rank{r}.npz")) for r in (0, 1)]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 7), torch.nn.Tanh(),
                                torch.nn.Linear(7, 3)).double()
    x, _ = cases.lca_set()
    y = x[:, :3].argmax(1)
    whole = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 200, 25)]
    tracker = lca_ext.LCATracker(model, torch.nn.functional.cross_entropy,
                                 whole[0::2] + whole[1::2], num_classes=3,
                                 distributed=False)
    ref = _replay(tracker, model, got[0], 3)
    assert (ref.bar_dof > 8).all() and (ref.grad_passes[1:] == 2).any()
    for g in got:
        for key in ("class_sums", "tensor_sums", "tensor_error", "bar_dof", "grad_passes"):
            np.testing.assert_allclose(g[f"a/train/{key}"], ref.get(key), rtol=1e-7,
                                       atol=1e-13, err_msg=key)


def test_a_batch_refused_on_one_rank_raises_on_every_rank(tmp_path):
    """(Before: rank 1 raised alone and rank 0 waited in the pass's all-reduce
    until gloo's timeout.)"""
    mp.spawn(cases.run_bad_target, args=(2, cases.free_port(), str(tmp_path)), nprocs=2)
    said = [open(tmp_path / f"bad_target_rank{r}.txt").read() for r in (0, 1)]
    assert "rank 1" in said[1] and "class target 7" in said[1], said[1]
    assert "rank 1 refused one of its batches" in said[0], said[0]


@pytest.mark.parametrize("kind", KINDS)
def test_one_rank_runs_like_many(tmp_path, kind):
    """One process that is still under torch.distributed (a fully_shard model
    in a one-rank group): tracked and grounded (the default rule's two-pass
    stage, which keeps per-group gradients, is off for sharded models; it made
    every step fail there)."""
    out = str(tmp_path)
    mp.spawn(cases.run, args=(1, cases.free_port(), out, kind, True, True), nprocs=1)
    arrays = dict(np.load(os.path.join(out, f"{kind}_1_rank0.npz")))
    assert len(arrays["a/step"]) == cases.STEPS
    assert arrays["a/train/grounded"].all()
