"""Offline LCA from saved checkpoints: the same results as tracking during
training, split + merge equal to one run (oscillation counters exactly, seams
with zero signs included), resume, clear refusals, and the CLI."""
import copy
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext import cli, offline
from lca_ext.offline import TrajectoryError
from lca_ext.store import RunStoreError

EXACT_STATE = ("helped_steps", "direction_changes", "grad_sign_changes", "last_delta_sign",
               "last_grad_sign", "first_delta_sign", "first_grad_sign")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: extra threads only add overhead (and stall on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def xent(out, y):
    return nn.functional.cross_entropy(out, y)


class Net(nn.Module):
    """BatchNorm (buffers that matter with batchnorm="eval") and dropout."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def data(n=200, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def train(model, x, y, steps, save, tracker=None, lr=0.3, seed=0):
    """SGD with momentum; ``save(t, state_dict)`` gets θ_0 and the state after
    every optimiser step."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    save(0, model.state_dict())
    for t in range(steps):
        idx = torch.randint(0, x.shape[0], (32,), generator=gen)
        opt.zero_grad()
        xent(model(x[idx]), y[idx]).backward()
        if tracker is None:
            opt.step()
        else:
            with tracker.step():
                opt.step()
        save(t + 1, model.state_dict())


def to_files(directory):
    os.makedirs(directory, exist_ok=True)
    return lambda t, sd: torch.save(sd, os.path.join(directory, f"step_{t:06d}.pt"))


def in_memory(states):
    return lambda t, sd: states.append(copy.deepcopy(sd))


def assert_runs_equal(a, b, *, passes=True, cum_rtol=0.0):
    """Every per-step array, frame and (shared) state field of two runs."""
    keys = sorted(a.arrays) if passes else sorted(k for k in a.arrays if "grad_passes" not in k)
    assert sorted(k for k in b.arrays if passes or "grad_passes" not in k) == keys
    for key in keys:
        assert np.array_equal(a.arrays[key], b.arrays[key], equal_nan=True), key
    for key in a.frames:
        assert np.array_equal(a.frames[key], b.frames[key]), key
    for key in a.state:
        for x, y in zip(a.state[key], b.state[key]):
            if key == "cum_lca" and cum_rtol:
                np.testing.assert_allclose(y, x, rtol=cum_rtol, atol=cum_rtol * np.abs(x).max())
            else:
                assert x.dtype == y.dtype and np.array_equal(x, y), key


# -- the same as tracking during training ------------------------------------------

@pytest.mark.parametrize("batchnorm", ["batch", "eval"])
def test_offline_equals_tracking_during_training(tmp_path, batchnorm):
    x, y = data()
    kw = dict(batch_size=64, batchnorm=batchnorm, eval_sets={"val": (x[:40], y[:40])},
              frames=["fc2.weight"])
    torch.manual_seed(0)
    model = Net()
    tracker = lca_ext.LCATracker(model, xent, (x, y), **kw)
    traj = str(tmp_path / "traj")
    train(model, x, y, 6, to_files(traj), tracker)
    online = tracker.result()

    torch.manual_seed(1)   # another initialisation: the states overwrite it
    # (offline keeps no pass account, whatever the rule says: parts merge exactly)
    run = offline.compute(Net(), xent, (x, y), traj, rule=dict(mean_passes=3), **kw)
    assert run.steps.tolist() == list(range(6))
    # the same gradients at the same points: equal to the last bit, grad_passes
    # (gradient reuse, refinement, eval-mode BN recomputation) included
    assert_runs_equal(online, run)
    assert set(run.state) == set(online.state) | {"first_delta_sign", "first_grad_sign"}
    if batchnorm == "eval":
        # running statistics moved every step: each step recomputed its start;
        # the certified rule then spends one pass per point past θ_t
        assert (run.grad_passes == 1 + run.splits + (run.bar_dof > 0)).all()


# -- split + merge equals one run ---------------------------------------------------

@pytest.fixture(scope="module")
def trajectory(tmp_path_factory):
    """9 steps of an MLP, saved every step; lr high enough to oscillate."""
    x, y = data()
    torch.manual_seed(2)
    directory = str(tmp_path_factory.mktemp("traj") / "traj")
    train(mlp(), x, y, 9, to_files(directory), lr=0.8)
    return directory, x, y


def test_split_into_three_and_merge_equals_unsplit(trajectory, tmp_path):
    traj, x, y = trajectory
    kw = dict(batch_size=64, frames=["2.weight"], frame_every=2)
    whole = offline.compute(mlp(), xent, (x, y), traj, **kw)
    parts = str(tmp_path / "parts")
    for rank in range(3):
        part = offline.compute(mlp(), xent, (x, y), traj, parts, rank=rank, world_size=3, **kw)
        assert part.steps.tolist() == list(range(3 * rank, 3 * rank + 3))
    assert sorted(os.listdir(parts)) == ["part-00000", "part-00001", "part-00002"]
    merged = offline.merge_runs(parts, str(tmp_path / "merged"))
    assert merged.meta["offline"]["range"] == [0, 9]
    assert lca_ext.load_run(str(tmp_path / "merged")).steps.tolist() == list(range(9))
    assert_runs_equal(whole, merged, passes=False, cum_rtol=1e-5)
    # the counters are not trivially zero, and the seams mattered
    assert sum(c.sum() for c in whole.state["direction_changes"]) > 0
    assert sum(c.sum() for c in whole.state["grad_sign_changes"]) > 0
    # grad_passes shows the real cost: one more pass (the start gradient) at
    # the start of each part after the first, none elsewhere
    # (the certified rule keeps every step's end gradient for the next)
    extra = merged.grad_passes - whole.grad_passes
    assert extra[[3, 6]].tolist() == [1, 1]
    assert not extra[[0, 1, 2, 4, 5, 7, 8]].any()
    # frames: every 2nd step counted from the trajectory's start, as unsplit
    assert merged.frames["step"].tolist() == [0, 2, 4, 6, 8]

    # merging is associative: (p0 + p1) + p2 is the same run
    first_two = offline.merge_runs([os.path.join(parts, "part-00001"),
                                    os.path.join(parts, "part-00000")], str(tmp_path / "m01"))
    assert first_two.meta["offline"]["range"] == [0, 6]
    again = offline.merge_runs([str(tmp_path / "m01"), os.path.join(parts, "part-00002")],
                               str(tmp_path / "again"))
    assert_runs_equal(merged, again, cum_rtol=1e-6)


def test_seams_with_zero_signs_are_exact(tmp_path):
    """Where a sign is 0 at the step before a seam (a weight that did not move, a
    gradient exactly 0: a dead ReLU unit), the unsplit run compares the next
    sign with an older one; priming a range with step a−1's signs would miss
    that, the first-sign bookkeeping does not."""
    x, y = data(120)
    torch.manual_seed(3)
    states = []
    train(mlp(), x, y, 9, in_memory(states), lr=0.8)
    # seam at 3: unit 2 dead at θ_2 (zero gradient), and weights 0.weight[0]
    # not moving from θ_2 to θ_3 (zero direction)
    states[2]["0.bias"][2] = -1e3
    states[3]["0.weight"][0] = states[2]["0.weight"][0]
    # seam at 6: the same with unit 5 at θ_5 and 2.weight[1] from θ_5 to θ_6
    states[5]["0.bias"][5] = -1e3
    states[6]["2.weight"][1] = states[5]["2.weight"][1]
    model = mlp()
    model.load_state_dict(states[2])
    xent(model(x), y).backward()
    assert (model[0].bias.grad[2] == 0).item() and (model[0].weight.grad[2] == 0).all()

    kw = dict(batch_size=50, max_splits=4)
    whole = offline.compute(mlp(), xent, (x, y), states, **kw)
    dirs = []
    for start, stop in offline.split_ranges(9, 3):
        dirs.append(str(tmp_path / f"p{start}"))
        offline.compute(mlp(), xent, (x, y), states, dirs[-1], steps=(start, stop), **kw)
    merged = offline.merge_runs(dirs, str(tmp_path / "merged"))
    assert_runs_equal(whole, merged, passes=False, cum_rtol=1e-5)
    # the case arises: at each seam some of those elements change sign relative
    # to a sign older than step a−1 (counted by the unsplit run; priming with
    # step a−1's zero sign would not count it)
    parts = [lca_ext.load_run(d) for d in dirs]

    def seam_changes(a, b, kind, k):
        return b.state[f"first_{kind}_sign"][k].astype(int) * a.state[f"last_{kind}_sign"][k] < 0

    assert seam_changes(parts[0], parts[1], "delta", 0)[0].any()   # 0.weight[0], still
    assert seam_changes(parts[0], parts[1], "grad", 0)[2].any()    # unit 2, dead at θ_2
    assert seam_changes(parts[1], parts[2], "delta", 2)[1].any()   # 2.weight[1], still
    assert seam_changes(parts[1], parts[2], "grad", 0)[5].any()    # unit 5, dead at θ_5


def test_resume_after_a_bad_file_and_empty_parts(tmp_path):
    x, y = data(120)
    torch.manual_seed(4)
    traj = str(tmp_path / "traj")
    train(mlp(), x, y, 6, to_files(traj), lr=0.8)
    whole = offline.compute(mlp(), xent, (x, y), traj, batch_size=64)
    # an unreadable state half way: the steps before it are committed
    good = open(os.path.join(traj, "step_000004.pt"), "rb").read()
    open(os.path.join(traj, "step_000004.pt"), "wb").write(b"truncated")
    out = str(tmp_path / "run")
    with pytest.raises(TrajectoryError, match="step_000004.pt.*not a readable torch.save"):
        offline.compute(mlp(), xent, (x, y), traj, out, batch_size=64)
    assert len(lca_ext.load_run(out)) == 3
    with pytest.raises(FileExistsError):
        offline.compute(mlp(), xent, (x, y), traj, out, batch_size=64)
    open(os.path.join(traj, "step_000004.pt"), "wb").write(good)
    resumed = offline.compute(mlp(), xent, (x, y), traj, out, batch_size=64, resume=True)
    # identical, to the bit (cum_lca was accumulated in the same order), except
    # the resumed step's start gradient, computed afresh
    assert_runs_equal(whole, resumed, passes=False)
    assert (resumed.grad_passes - whole.grad_passes).tolist() == [0, 0, 0, 1, 0, 0]
    with pytest.raises(RunStoreError, match="cannot resume"):
        offline.compute(mlp(), xent, (x, y), traj, out, batch_size=64, steps=(0, 3),
                        resume=True)

    # more workers than steps: empty parts are written and merged away
    parts = str(tmp_path / "parts")
    for rank in range(8):
        offline.compute(mlp(), xent, (x, y), traj, parts, rank=rank, world_size=8,
                        batch_size=64)
    assert len(lca_ext.load_run(os.path.join(parts, "part-00007"))) == 0
    merged = offline.merge_runs(parts, str(tmp_path / "merged"))
    assert_runs_equal(whole, merged, passes=False, cum_rtol=1e-5)


def test_resume_with_the_state_behind_the_rows_is_refused_then_cut(tmp_path):
    """state_every=2, stopped after 3 committed steps (state as of 2): a resume
    would continue at step 3 from the state of 2 and lose step 2's statistics
    (it did, silently); it is refused naming the cut, and after
    truncate_run(out, 2) the resumed run equals the uninterrupted one."""
    x, y = data(120)
    torch.manual_seed(4)
    traj = str(tmp_path / "traj")
    train(mlp(), x, y, 6, to_files(traj), lr=0.8)
    kw = dict(batch_size=64, state_every=2, oscillation=False)
    whole = offline.compute(mlp(), xent, (x, y), traj, **kw)
    good = open(os.path.join(traj, "step_000004.pt"), "rb").read()
    open(os.path.join(traj, "step_000004.pt"), "wb").write(b"truncated")
    out = str(tmp_path / "run")
    with pytest.raises(TrajectoryError):
        offline.compute(mlp(), xent, (x, y), traj, out, **kw)
    open(os.path.join(traj, "step_000004.pt"), "wb").write(good)
    with pytest.raises(RunStoreError, match=r"as of 2 of its 3 committed steps.*"
                       r"truncate_run\(.*, 2\)"):
        offline.compute(mlp(), xent, (x, y), traj, out, resume=True, **kw)
    lca_ext.truncate_run(out, 2)
    resumed = offline.compute(mlp(), xent, (x, y), traj, out, resume=True, **kw)
    assert_runs_equal(whole, resumed, passes=False)


def test_ranks_default_to_torch_distributed(trajectory, tmp_path, monkeypatch):
    """Under an initialised process group each rank takes its own range (and
    tracks on its own: the LCA set is not sharded)."""
    traj, x, y = trajectory
    import torch.distributed as dist
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 3)
    run = offline.compute(mlp(), xent, (x, y), traj, str(tmp_path / "parts"), batch_size=64)
    assert run.steps.tolist() == [3, 4, 5]
    assert os.listdir(tmp_path / "parts") == ["part-00001"]
    assert run.meta["offline"]["range"] == [3, 6]
    with pytest.raises(ValueError, match="give both or neither"):
        offline.compute(mlp(), xent, (x, y), traj, rank=1)
    with pytest.raises(ValueError, match="steps= or rank="):
        offline.compute(mlp(), xent, (x, y), traj, steps=(0, 1), rank=0, world_size=2)
    with pytest.raises(ValueError, match="resume=True needs out_dir="):
        offline.compute(mlp(), xent, (x, y), traj, steps=(0, 1), resume=True)


def test_split_ranges():
    assert offline.split_ranges(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert offline.split_ranges(9, 1) == [(0, 9)]
    assert offline.split_ranges(2, 4) == [(0, 1), (1, 2), (2, 2), (2, 2)]
    with pytest.raises(ValueError, match="parts=0"):
        offline.split_ranges(5, 0)
    with pytest.raises(ValueError, match="num_steps=-1"):
        offline.split_ranges(-1, 2)


# -- the trajectory: naming, step numbers, refusals ---------------------------------

def test_directory_order_step_numbers_and_gaps(tmp_path):
    x, y = data(60)
    torch.manual_seed(5)
    states = []
    train(mlp(), x, y, 3, in_memory(states))
    d = tmp_path / "traj"
    d.mkdir()
    for index, sd in zip([0, 5, 10, 20], states):   # a state every few steps
        torch.save(sd, d / f"ckpt-{index}.pth")
    (d / "notes.txt").write_text("ignored")
    torch.save(states[0], d / ".partial-99.pt")      # dot-files are skipped
    found = offline.state_files(str(d))
    assert [i for i, _ in found] == [0, 5, 10, 20]   # numeric, not lexicographic
    run = offline.compute(mlp(), xent, (x, y), str(d), batch_size=64)
    assert run.steps.tolist() == [0, 5, 10]
    paths = [p for _, p in found]
    listed = offline.compute(mlp(), xent, (x, y), paths, batch_size=64, step_indices=[0, 5, 10, 20])
    assert_runs_equal(run, listed)
    assert offline.compute(mlp(), xent, (x, y), paths, batch_size=64).steps.tolist() == [0, 1, 2]
    part = offline.compute(mlp(), xent, (x, y), states, batch_size=64, steps=(1, None))
    assert part.steps.tolist() == [1, 2]
    np.testing.assert_array_equal(part.lca_sum, run.lca_sum[1:])

    torch.save(states[0], d / "final.pt")
    with pytest.raises(TrajectoryError, match="final.pt.*no step number"):
        offline.state_files(str(d))
    os.remove(d / "final.pt")
    torch.save(states[0], d / "step_005.pt")
    with pytest.raises(TrajectoryError, match="both have step number 5"):
        offline.state_files(str(d))


class Opaque:
    """Not a tensor: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.lr = 0.1


def trajectory_with(tmp_path, second):
    d = tmp_path / "traj"
    d.mkdir()
    torch.save(mlp().state_dict(), d / "step_000000.pt")
    torch.save(second, d / "step_000001.pt")
    return str(d), str(d / "step_000001.pt")


def run_offline(traj, **kw):
    x, y = data(40)
    return offline.compute(mlp(), xent, (x, y), traj, **kw)


@pytest.mark.parametrize("content", ["object_in_dict", "object"])
def test_refuses_pickled_objects(tmp_path, content):
    sd = mlp().state_dict()
    second = dict(sd, extra=Opaque()) if content == "object_in_dict" else Opaque()
    traj, bad = trajectory_with(tmp_path, second)
    with pytest.raises(TrajectoryError) as err:
        run_offline(traj)
    msg = str(err.value)
    assert bad in msg and "pickled Python object" in msg and "Opaque" in msg
    assert "expected a state dict: a mapping of parameter/buffer name -> tensor" in msg
    assert "\n" not in msg


def test_refuses_nested_non_tensors_and_reads_checkpoint_dicts(tmp_path):
    sd = mlp().state_dict()
    traj, bad = trajectory_with(tmp_path, dict(sd, meta={"lr": 0.1}))
    with pytest.raises(TrajectoryError, match=r"step_000001.pt'?: entry 'meta' is a dict, "
                       r"not a tensor \(a checkpoint dict\? pass key="):
        run_offline(traj)
    torch.save([1, 2], bad)
    with pytest.raises(TrajectoryError, match="step_000001.pt' holds a list; expected a state"):
        run_offline(traj)
    # checkpoint dicts: key= picks the state dict
    for name in ("step_000000.pt", "step_000001.pt"):
        torch.save({"model": mlp().state_dict(), "step": 3}, os.path.join(traj, name))
    assert len(run_offline(traj, key="model")) == 1
    with pytest.raises(TrajectoryError, match="no entry 'net'"):
        run_offline(traj, key="net")


def test_missing_paths_and_short_trajectories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        run_offline(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="step_9.pt"):
        run_offline([str(tmp_path / "step_9.pt"), str(tmp_path / "step_10.pt")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrajectoryError, match="has 0 state.*at least 2"):
        run_offline(str(tmp_path / "empty"))
    torch.save(mlp().state_dict(), tmp_path / "empty" / "step_0.pt")
    with pytest.raises(TrajectoryError, match="has 1 state"):
        run_offline(str(tmp_path / "empty"))
    with pytest.raises(TrajectoryError, match="is a file"):
        run_offline(str(tmp_path / "empty" / "step_0.pt"))
    with pytest.raises(TrajectoryError, match="has 1 state"):
        run_offline([mlp().state_dict()])
    with pytest.raises(ValueError, match="expected 0 <= start <= stop <= 1"):
        run_offline([mlp().state_dict()] * 2, steps=(0, 2))


def test_state_dicts_must_match_the_model(tmp_path):
    good = mlp().state_dict()
    missing = {k: v for k, v in good.items() if k != "2.bias"}
    with pytest.raises(TrajectoryError, match=r"state 1 \(step 1\) has no entry for the "
                       r"tracked parameter\(s\) \['2.bias'\]"):
        run_offline([good, missing])
    _, bad = trajectory_with(tmp_path, missing)
    with pytest.raises(TrajectoryError, match=f"{bad}' has no entry.*'2.bias'"):
        run_offline(str(tmp_path / "traj"))
    with pytest.raises(TrajectoryError, match=r"entries \['extra'\] that are not parameters"):
        run_offline([good, dict(good, extra=torch.zeros(1))])
    with pytest.raises(TrajectoryError, match=r"'0.weight' has shape \(8, 5\)"):
        run_offline([good, dict(good, **{"0.weight": torch.zeros(8, 5)})])
    # buffers are loaded strictly too
    bn = [Net().state_dict() for _ in range(2)]
    del bn[0]["bn.running_mean"]
    x, y = data(40)
    with pytest.raises(TrajectoryError, match="lacks \\['bn.running_mean'\\]"):
        offline.compute(Net(), xent, (x, y), bn)


def test_merge_refuses_what_is_not_one_trajectory(trajectory, tmp_path):
    traj, x, y = trajectory
    parts = [str(tmp_path / f"p{r}") for r in range(3)]
    for r, (start, stop) in enumerate(offline.split_ranges(9, 3)):
        offline.compute(mlp(), xent, (x, y), traj, parts[r], steps=(start, stop), batch_size=64,
                        state_every=100)   # the final state is stored regardless
    with pytest.raises(RunStoreError, match="leave steps \\[3, 6\\) out"):
        offline.merge_runs([parts[0], parts[2]], str(tmp_path / "m"))
    with pytest.raises(FileExistsError, match="already exists"):
        offline.merge_runs(parts, parts[0])
    # an interrupted part
    meta_path = os.path.join(parts[2], "lca_run.json")
    meta = json.load(open(meta_path))
    meta["offline"]["range"] = [6, 10]
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(RunStoreError, match="holds 3 of the 4 steps"):
        offline.merge_runs(parts, str(tmp_path / "m"))
    # a run tracked during training is not a part
    model = mlp()
    tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "online"))
    train(model, x, y, 1, lambda t, sd: None, tracker)
    with pytest.raises(RunStoreError, match="not a part written by lca_ext.offline"):
        offline.merge_runs([parts[0], str(tmp_path / "online")], str(tmp_path / "m"))
    assert not os.path.exists(tmp_path / "m")
    with pytest.raises(TypeError, match="store= is not an option"):
        offline.compute(mlp(), xent, (x, y), traj, store="x")


# -- the command line -------------------------------------------------------------

TOY = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))

    def make_data():
        gen = torch.Generator().manual_seed(0)
        return torch.randn(120, 6, generator=gen), torch.randint(0, 3, (120,), generator=gen)

    def mean_xent(out, y):
        return nn.functional.cross_entropy(out, y)
""")


@pytest.fixture()
def toy(tmp_path, monkeypatch):
    (tmp_path / "offline_toy.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    import offline_toy
    torch.manual_seed(6)
    traj = str(tmp_path / "traj")
    x, y = offline_toy.make_data()
    train(offline_toy.make_model(), x, y, 5, to_files(traj), lr=0.8)
    return tmp_path, traj, offline_toy


def test_cli_parts_and_merge(toy, capsys):
    tmp_path, traj, mod = toy
    out = str(tmp_path / "parts")
    common = ["offline", traj, "--model", "offline_toy:make_model", "--data",
              "offline_toy:make_data", "--batch-size", "50", "--device", "cpu"]
    assert cli.main(common + ["--out", out, "--part", "0/2",
                              "--loss", "offline_toy:mean_xent"]) == 0
    assert cli.main(common + ["--out", out, "--part", "1/2"]) == 0
    printed = capsys.readouterr().out
    assert "steps 0..2: 3 of 5" in printed and "steps 3..4: 2 of 5" in printed
    assert cli.main(["merge", out, "--out", str(tmp_path / "merged")]) == 0
    assert "merged: 5 steps (0..4)" in capsys.readouterr().out
    whole = offline.compute(mod.make_model(), xent, mod.make_data(), traj, batch_size=50)
    assert_runs_equal(whole, lca_ext.load_run(str(tmp_path / "merged")), passes=False,
                      cum_rtol=1e-5)
    # --range writes exactly --out
    assert cli.main(common + ["--out", str(tmp_path / "r"), "--range", "1:3"]) == 0
    assert lca_ext.load_run(str(tmp_path / "r")).steps.tolist() == [1, 2]


@pytest.mark.parametrize("args, message", [
    (["--model", "offline_toy"], "--model 'offline_toy': expected MODULE:NAME"),
    (["--model", "no_such_module_xyz:f"], "--model: cannot import 'no_such_module_xyz'"),
    (["--data", "offline_toy:nothing"], "--data: 'offline_toy' has no 'nothing'"),
    (["--data", "offline_toy:make_model"], "--data 'offline_toy:make_model' returned a "
     "Sequential; expected an (inputs, targets) pair"),
    (["--range", "2:9"], "--range '2:9': expected START:STOP with 0 <= START <= STOP <= 5"),
    (["--part", "2/2"], "--part '2/2': expected I/N with 0 <= I < N"),
    (["--traj", "missing"], "trajectory directory 'missing' does not exist"),
])
def test_cli_errors_are_one_line(toy, capsys, args, message):
    tmp_path, traj, _ = toy
    opts = {"--model": "offline_toy:make_model", "--data": "offline_toy:make_data",
            "--out": str(tmp_path / "o")}
    if args[0] == "--traj":
        traj = args[1]
    else:
        opts[args[0]] = args[1]
    argv = ["offline", traj] + [a for kv in opts.items() for a in kv]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("lca-ext: error: ") and err.count("\n") == 1, err
    assert message in err, err


def test_cli_merge_errors_and_subprocess(toy, capsys):
    tmp_path, traj, _ = toy
    assert cli.main(["merge", str(tmp_path / "nothing"), "--out", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lca-ext: error: ") and err.count("\n") == 1
    # end to end, as a user runs it: python -m lca_ext with the module on PYTHONPATH
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "lca_ext", "offline", traj, "--model", "offline_toy:make_model",
         "--data", "offline_toy:make_data", "--out", str(tmp_path / "sub"), "--range", "0:2",
         "--device", "cpu"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "steps 0..1: 2 of 5" in proc.stdout
    assert lca_ext.load_run(str(tmp_path / "sub")).steps.tolist() == [0, 1]
    # the same --out again: refused unless --resume (which finds it complete)
    argv = ["offline", traj, "--model", "offline_toy:make_model", "--data",
            "offline_toy:make_data", "--out", str(tmp_path / "sub"), "--range", "0:2"]
    assert cli.main(argv) == 2
    assert "already holds a run; pass --resume" in capsys.readouterr().err
    assert cli.main(argv + ["--resume"]) == 0
    assert "steps 0..1: 2 of 5" in capsys.readouterr().out
