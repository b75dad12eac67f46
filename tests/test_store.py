"""The run store: round trip, crash safety (kill -9), resume, and clear errors."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.store import RunStoreError
from test_tracker import train, xent


def setup_run(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(seed)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    return model, x, y


def test_store_round_trip_equals_in_memory(tmp_path):
    runs = []
    for store in (None, str(tmp_path / "run")):
        model, x, y = setup_run()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        tracker = lca_ext.LCATracker(model, xent, (x, y), eval_sets={"val": (x[:10], y[:10])},
                                     num_classes=3, frames=["2.weight"], store=store)
        train(model, opt, x, y, xent, 4, tracker)
        runs.append(tracker.result())
    mem, disk = runs
    assert sorted(mem.arrays) == sorted(disk.arrays)
    for key in mem.arrays:
        assert np.array_equal(mem.arrays[key], disk.arrays[key], equal_nan=True), key
    for key in mem.state:
        for a, b in zip(mem.state[key], disk.state[key]):
            assert np.array_equal(a, b), key
    for key in mem.frames:
        assert np.array_equal(mem.frames[key], disk.frames[key]), key
    loaded = lca_ext.load_run(str(tmp_path / "run"))
    assert loaded.names == mem.names and loaded.objectives == ["train", "val"]
    assert np.array_equal(loaded.lca_sum, mem.lca_sum)
    meta = json.load(open(tmp_path / "run" / "lca_run.json"))
    assert meta["format"] == "lca_ext.run" and meta["version"] == 1
    assert meta["steps_committed"] == 4


def test_state_every_keeps_the_last_written_state(tmp_path):
    """state_every=2 over 3 steps: the store holds the state as of step 2 (the
    commit of step 3 writes none and must not drop it).  A resume from θ after
    step 3 would miss step 3's statistics: refused, naming the state's step
    count; cut back to it, a resume from θ after step 2 restores that state.
    result() stores the state as of the last step, and then a resume needs
    nothing."""
    import shutil

    model, x, y = setup_run()
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    tracker = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"),
                                 state_every=2)
    train(model, opt, x, y, xent, 3, tracker)
    model2, _, _ = setup_run()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.2, momentum=0.9)
    two_steps = lca_ext.LCATracker(model2, xent, (x, y))
    train(model2, opt2, x, y, xent, 2, two_steps)
    want = two_steps.result().state
    run = lca_ext.load_run(str(tmp_path / "run"))
    assert len(run) == 3 and sorted(run.state) == sorted(want)
    for key in want:
        for a, b in zip(run.state[key], want[key]):
            assert np.array_equal(a, b), key
    assert run.meta["state_steps"] == 2 and run.meta["steps_committed"] == 3
    stale = str(tmp_path / "stale")
    shutil.copytree(str(tmp_path / "run"), stale)
    with pytest.raises(RunStoreError, match=r"after its last commit, 3 committed steps.*"
                       r"state is not \(state_every > 1: states are saved at 2 committed"):
        lca_ext.LCATracker(model, xent, (x, y), store=stale, resume=True, state_every=2)
    lca_ext.truncate_run(stale, 2)
    resumed = lca_ext.LCATracker(model2, xent, (x, y), store=stale, resume=True, state_every=2)
    for key in want:
        for a, b in zip(resumed.state[key], want[key]):
            assert np.array_equal(a.numpy(), b), key
    assert resumed.next_step == 2 and len(lca_ext.load_run(stale)) == 2
    # result() stores the state as of the last step
    final = tracker.result()
    assert final.meta["state_steps"] == 3
    for key in final.state:
        for a, t in zip(final.state[key], tracker.state[key]):
            assert np.array_equal(a, t.numpy()), key
    again = lca_ext.LCATracker(model, xent, (x, y), store=str(tmp_path / "run"), resume=True)
    assert again.next_step == 3


def test_store_refuses_to_overwrite_and_checks_resume(tmp_path):
    model, x, y = setup_run()
    path = str(tmp_path / "run")
    lca_ext.LCATracker(model, xent, (x, y), store=path)
    with pytest.raises(FileExistsError, match="already holds a run"):
        lca_ext.LCATracker(model, xent, (x, y), store=path)
    other = nn.Linear(5, 3)
    with pytest.raises(RunStoreError, match="cannot resume"):
        lca_ext.LCATracker(other, xent, (x, y), store=path, resume=True)


def test_load_run_errors(tmp_path):
    with pytest.raises(RunStoreError, match="is not a directory"):
        lca_ext.load_run(str(tmp_path / "missing"))
    (tmp_path / "foreign").mkdir()
    with pytest.raises(RunStoreError, match="not an lca_ext run directory"):
        lca_ext.load_run(str(tmp_path / "foreign"))
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "lca_run.json").write_text("{not json")
    with pytest.raises(RunStoreError, match="unreadable or corrupt"):
        lca_ext.load_run(str(tmp_path / "corrupt"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "lca_run.json").write_text('{"format": "lca_ext.run", "version": 99}')
    with pytest.raises(RunStoreError, match="schema version 99"):
        lca_ext.load_run(str(tmp_path / "other"))


CHILD = textwrap.dedent("""
    import os, sys, torch
    from torch import nn
    import lca_ext
    path, steps, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 256), nn.ReLU(), nn.Linear(256, 10))
    x, y = torch.randn(256, 20), torch.randint(0, 10, (256,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    ckpt = path + ".ckpt"
    done = 0
    if resume:                     # the training checkpoint: model, optimiser, step count
        saved = torch.load(ckpt)
        model.load_state_dict(saved["model"]); opt.load_state_dict(saved["opt"])
        done = saved["steps"]
    tracker = lca_ext.LCATracker(model, lambda o, t: nn.functional.cross_entropy(o, t),
                                 (x, y), store=path, resume=resume, num_classes=10)
    for i in range(done, done + steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:32]), y[:32]).backward()
        with tracker.step():
            opt.step()
        print("committed", i, flush=True)
        torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "steps": i + 1},
                   ckpt + ".tmp")
        os.replace(ckpt + ".tmp", ckpt)
""")


def start_child(path, steps, resume):
    return subprocess.Popen([sys.executable, "-c", CHILD, path, str(steps), "1" if resume else "0"],
                            stdout=subprocess.PIPE, text=True)


@pytest.mark.parametrize("delay", [0.0, 0.004, 0.017])
def test_kill_9_loses_no_completed_step_and_resumes(tmp_path, delay):
    path = str(tmp_path / "run")
    child = start_child(path, 10_000, resume=False)
    seen = -1
    for line in child.stdout:
        seen = int(line.split()[1])
        if seen >= 4:
            break
    time.sleep(delay)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    run = lca_ext.load_run(path)
    n = len(run)
    assert n >= seen + 1                           # every step it reported, maybe one more
    assert run.steps.tolist() == list(range(n))
    assert np.isfinite(run.lca_sum).all()
    assert (run.loss_before[1:] == run.loss_after[:-1]).all()
    assert run.class_sums.shape[:2] == (n, 10)
    # the training checkpoint is at the store's last commit, or one behind it
    # (killed between the commit inside opt.step() and the save): cut back to it
    c = torch.load(path + ".ckpt")["steps"]
    assert c in (n, n - 1)
    if c < n:
        lca_ext.truncate_run(path, c)
    # resume: the same script continues the same directory from its checkpoint
    child = start_child(path, 3, resume=True)
    out, _ = child.communicate(timeout=300)
    assert child.returncode == 0, out
    resumed = lca_ext.load_run(path)
    assert resumed.steps.tolist() == list(range(c + 3))
    assert np.array_equal(resumed.lca_sum[:c], run.lca_sum[:c])
    assert (resumed.loss_before[1:] == resumed.loss_after[:-1]).all()   # no step twice
    assert resumed.state["helped_steps"][0].max() <= c + 3
