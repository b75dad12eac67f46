"""A stored run is checked against its metadata on load: each kind of file of a
run directory deleted or truncated is an error naming what is missing, never a
silently shorter (or zero-filled) run."""
import glob
import json
import os
import shutil

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext import cli
from lca_ext.store import META, RunStoreError

STEPS = 5


@pytest.fixture(scope="module")
def stored(tmp_path_factory):
    """A run with every kind of file: data rows (train, val, classes), the
    per-parameter state (oscillation counters too) and frames."""
    torch.manual_seed(0)
    x, xv = torch.randn(80, 4), torch.randn(24, 4)
    y, yv = x[:, :3].argmax(1), xv[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.4)
    path = str(tmp_path_factory.mktemp("integrity") / "run")
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), eval_sets={"val": (xv, yv)},
                                 num_classes=3, frames=["0.weight"], oscillation=True,
                                 store=path)
    for t in range(STEPS):
        opt.zero_grad()
        loss_fn(model(x[t::STEPS]), y[t::STEPS]).backward()
        with tracker.step():
            opt.step()
    return path, tracker.result()


def copy(stored, tmp_path):
    dst = str(tmp_path / "run")
    shutil.copytree(stored[0], dst)
    return dst


def chunk_files(root):
    return sorted(os.path.join(d, f) for d, _, files in os.walk(root) for f in files
                  if f != "zarr.json")


def state_dir(run, which=-1):
    """A kept state group: the latest (the one load_run reads), or an older
    one (the store keeps the last two, and pinned ones, for truncate_run)."""
    meta = json.load(open(os.path.join(run, META)))
    versions = [p["version"] for p in meta["states"]]
    assert len(glob.glob(os.path.join(run, "state.*.zarr"))) == len(versions) == 2
    return os.path.join(run, f"state.{versions[which]}.zarr")


def truncate(path, size=None):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 if size is None else size)


def test_an_intact_copy_loads_whole(stored, tmp_path):
    run = lca_ext.load_run(copy(stored, tmp_path))
    mem = stored[1]
    assert len(run) == STEPS and sorted(run.arrays) == sorted(mem.arrays)
    for k in mem.arrays:
        assert np.array_equal(run.arrays[k], mem.arrays[k], equal_nan=True), k
    assert sorted(run.state) == sorted(mem.state)
    assert sorted(run.frames) == sorted(mem.frames) and len(run.frames["step"]) == STEPS
    meta = json.load(open(os.path.join(stored[0], META)))
    assert meta["chunks_complete"] and sorted(meta["arrays"]) == sorted(mem.arrays)
    assert sorted(meta["frame_arrays"]) == sorted(mem.frames)


# each case: (what to damage, how) -> a regular expression the error must match
def _data_array(run, name):
    return os.path.join(run, "data.zarr", *name.split("/"))


CASES = {
    "meta deleted": (lambda r: os.remove(os.path.join(r, META)), r"no lca_run\.json"),
    "meta truncated": (lambda r: truncate(os.path.join(r, META)), r"lca_run\.json.*corrupt"),
    "data.zarr deleted": (lambda r: shutil.rmtree(os.path.join(r, "data.zarr")),
                          r"data\.zarr is missing.*5 committed steps"),
    "data.zarr group metadata deleted": (
        lambda r: os.remove(os.path.join(r, "data.zarr", "zarr.json")), r"data\.zarr"),
    "data array deleted": (lambda r: shutil.rmtree(_data_array(r, "train/counts")),
                           r"data\.zarr lacks the arrays \['train/counts'\]"),
    "data array metadata deleted": (
        lambda r: os.remove(os.path.join(_data_array(r, "val/lca_sum"), "zarr.json")),
        # zarr warns and skips the entry (or, with warnings as errors, raises)
        r"data\.zarr (lacks the arrays \['val/lca_sum'\]|is unreadable: .*lca_sum)"),
    "data array metadata truncated": (
        lambda r: truncate(os.path.join(_data_array(r, "train/lca_sum"), "zarr.json")),
        r"data\.zarr"),
    "data chunk deleted": (lambda r: os.remove(chunk_files(_data_array(r, "train/lca_sum"))[0]),
                           r"missing chunk files data\.zarr/train/lca_sum/c/0"),
    "class rows chunk deleted": (
        lambda r: os.remove(chunk_files(_data_array(r, "train/class_sums"))[0]),
        r"missing chunk files data\.zarr/train/class_sums/c/0/0/0"),
    "data chunk truncated": (lambda r: truncate(chunk_files(_data_array(r, "step"))[0]),
                             r"data\.zarr/step is unreadable"),
    "data chunk emptied": (lambda r: truncate(chunk_files(_data_array(r, "train/counts"))[0], 0),
                           r"data\.zarr/train/counts is unreadable"),
    "rows short of the commit": (
        lambda r: _edit_meta(r, steps_committed=STEPS + 2),
        r"data\.zarr/\S+ holds 5 rows.*7 committed steps"),
    "state deleted": (lambda r: shutil.rmtree(state_dir(r)), r"state\.\d+\.zarr is missing"),
    "older state deleted": (lambda r: shutil.rmtree(state_dir(r, 0)),
                            r"state\.\d+\.zarr is missing"),
    "state field deleted": (lambda r: shutil.rmtree(os.path.join(state_dir(r), "cum_lca")),
                            r"lacks the arrays \['cum_lca'\]"),
    "state chunk deleted": (
        lambda r: os.remove(chunk_files(os.path.join(state_dir(r), "direction_changes"))[0]),
        r"missing chunk files state\.\d+\.zarr/direction_changes/c/0"),
    "state chunk truncated": (
        lambda r: truncate(chunk_files(os.path.join(state_dir(r), "cum_lca"))[0]),
        r"state\.\d+\.zarr/cum_lca is unreadable"),
    "state fingerprint deleted": (
        lambda r: shutil.rmtree(os.path.join(state_dir(r), "fingerprint")),
        r"lacks the arrays \['fingerprint'\]|fingerprint is missing"),
    "frames deleted": (lambda r: shutil.rmtree(os.path.join(r, "frames.zarr")),
                       r"frames\.zarr is missing.*5 committed frames"),
    "frame chunk deleted": (lambda r: os.remove(chunk_files(os.path.join(r, "frames.zarr",
                                                                         "step"))[2]),
                            r"missing chunk files frames\.zarr/step/c/2"),
    "frame chunk truncated": (
        lambda r: truncate(chunk_files(os.path.join(r, "frames.zarr", "0"))[0]),
        r"frames\.zarr/0 is unreadable"),
}


def _edit_meta(run, **changes):
    path = os.path.join(run, META)
    meta = json.load(open(path))
    meta.update(changes)
    json.dump(meta, open(path, "w"))


@pytest.mark.parametrize("case", sorted(CASES))
def test_damaged_run_is_an_error_naming_what_is_missing(stored, tmp_path, case):
    damage, pattern = CASES[case]
    run = copy(stored, tmp_path)
    damage(run)
    with pytest.raises(RunStoreError, match=pattern):
        lca_ext.load_run(run)


@pytest.mark.parametrize("case", ["data.zarr deleted", "state chunk deleted", "frames deleted"])
def test_resume_of_a_damaged_run_is_refused(stored, tmp_path, case):
    from lca_ext.store import RunWriter

    damage, pattern = CASES[case]
    run = copy(stored, tmp_path)
    damage(run)
    meta = json.load(open(os.path.join(run, META)))
    before = sorted(os.listdir(run))
    with pytest.raises(RunStoreError, match=pattern):
        RunWriter(run, meta, resume=True)
    assert sorted(os.listdir(run)) == before   # nothing recreated in the damaged run


def test_cli_names_what_is_missing(stored, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="lca-ext report draws (the demo extra)")
    run = copy(stored, tmp_path)
    shutil.rmtree(os.path.join(run, "data.zarr"))
    assert cli.main(["report", run, "--out", str(tmp_path / "rep")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.zarr is missing" in err[0] and "5 committed steps" in err[0]
    assert not os.path.exists(tmp_path / "rep" / "index.html")


def test_runs_written_before_the_content_record(stored, tmp_path):
    """Metadata without "arrays"/"chunks_complete" (an older writer): a missing
    data directory or a missing base array is still an error."""
    run = copy(stored, tmp_path)
    meta = json.load(open(os.path.join(run, META)))
    for k in ("arrays", "state_fields", "frame_arrays", "chunks_complete"):
        meta.pop(k)
    json.dump(meta, open(os.path.join(run, META), "w"))
    assert len(lca_ext.load_run(run)) == STEPS
    shutil.rmtree(_data_array(run, "val/loss_after"))
    with pytest.raises(RunStoreError, match=r"lacks the arrays \['val/loss_after'\]"):
        lca_ext.load_run(run)
    shutil.rmtree(os.path.join(run, "data.zarr"))
    with pytest.raises(RunStoreError, match=r"data\.zarr is missing"):
        lca_ext.load_run(run)


def test_all_zero_chunks_are_written(tmp_path):
    """zarr skips a chunk equal to the fill value unless told otherwise; the
    store writes it, so that a missing chunk file always means lost data."""
    from lca_ext.store import RunWriter

    w = RunWriter(str(tmp_path / "z"), {"names": ["a"], "shapes": [[3]], "objectives": ["train"]})
    zeros = {"field": [np.zeros(3, np.int32)]}
    w.commit({"step": np.int64(0), "train/lca_sum": np.float64(0.0)}, zeros)
    run = lca_ext.load_run(str(tmp_path / "z"))
    assert run.arrays["train/lca_sum"].tolist() == [0.0]
    assert run.state["field"][0].tolist() == [0, 0, 0]
    assert len(chunk_files(str(tmp_path / "z" / "data.zarr"))) == 2
    [d] = glob.glob(os.path.join(str(tmp_path / "z"), "state.*.zarr"))
    assert len(chunk_files(d)) == 1
