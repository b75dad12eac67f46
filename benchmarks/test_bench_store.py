"""The run store's cost per committed step (pytest-benchmark), apart from the
tracking: ``RunWriter.commit`` of one real step's rows, state and fingerprint,
on a small model of many tensors (20 Linear layers of 43 -> 43: 40 tensors,
37,840 parameters), where zarr's per-array cost dominates.

    .venv/bin/python -m pytest benchmarks/test_bench_store.py -q

Cases: a state with every commit (state_every=1, the default), none (the rows
only: what the other commits of state_every > 1 cost), and the state layout
of runs written before 2026-12 (one zarr array per field and tensor), for
comparison.  Measured 2026-12-02 on this 2-core CPU, shared with other work
(medians of 12 commits): state_every=1 71 ms a commit (per-tensor state
arrays: 1090 ms), rows only 44 ms.  The store before this benchmark (a state
group of one array per field and tensor, each row array reopened at every
commit), timed through the tracker on the same model: 1658 ms a commit with
state_every=1, 114 ms with state_every=5.
"""
import os

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext import store as run_store
from lca_ext import store_link


@pytest.fixture(scope="module")
def step(tmp_path_factory):
    """One tracked step's record, state and fingerprint (the tracker's own)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[m for _ in range(20) for m in (nn.Linear(43, 43), nn.Tanh())])
    x, y = torch.randn(64, 43), torch.randn(64, 43)
    loss_fn = lambda o, t: ((o - t) ** 2).mean()  # noqa: E731
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), method="adaptive", atol=1e9)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    with tracker.step():
        opt.step()
    return tracker, dict(tracker.last), tracker.state_arrays(), store_link.fingerprint(tracker)


def _writer(tmp_path, tracker, flat=True):
    w = run_store.RunWriter(str(tmp_path / "run"), tracker.run_meta())
    if not flat:
        w.meta.pop("state_layout")      # the per-tensor layout of older runs
    return w


@pytest.mark.parametrize("case", ["state_every=1", "rows only", "state_every=1, per-tensor state"])
def test_store_commit(benchmark, record, tmp_path, step, case):
    tracker, rec, state, fp = step
    writer = _writer(tmp_path, tracker, flat="per-tensor" not in case)
    with_state = case != "rows only"
    label = iter(range(10 ** 6))

    def commit():
        i = next(label)
        writer.commit(dict(rec, step=np.int64(i), fingerprint=fp),
                      state if with_state else {}, None,
                      point=dict(next_step=i + 1, fingerprint=fp))

    benchmark.pedantic(commit, rounds=12, warmup_rounds=2)
    nbytes = sum(np.asarray(v).nbytes for v in rec.values()) + (
        sum(a.nbytes for arrays in state.values() for a in arrays) if with_state else 0)
    record(benchmark, f"store commit ({case})", nbytes)
    n = writer.steps_committed
    run = lca_ext.load_run(writer.path)
    assert len(run) == n and run.steps.tolist() == list(range(n))
    if with_state:
        assert np.array_equal(run.state["cum_lca"][3], state["cum_lca"][3])
        assert len([d for d in os.listdir(writer.path) if d.startswith("state.")]) == 2
