"""The interactive page (lca_ext.interactive): the bounded data against
independent references, the page's embedded data read back from the HTML, its
size, and (with Chromium) the page driven in a headless browser."""
import base64
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext import interactive
from lca_ext.interactive import Bounds
from lca_ext.run import Run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_PLOTLY = importlib.util.find_spec("plotly") is not None
needs_plotly = pytest.mark.skipif(not HAVE_PLOTLY, reason="needs plotly (the demo extra: "
                                  'pip install "lca_ext[demo]")')


# ---------------------------------------------------------------------------
# the bounded data (numpy only)

def test_pool_frame_equals_reshape_sum():
    raw = np.random.default_rng(0).normal(size=(12, 3, 4))     # as a matrix: 12 x 12
    want = raw.reshape(12, 12).reshape(4, 3, 4, 3).sum(axis=(1, 3))
    got = interactive.pool_frame(raw, 3)
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)


def test_pool_frame_ragged_blocks_by_loops():
    raw = np.random.default_rng(1).normal(size=(10, 7))
    got = interactive.pool_frame(raw, 3)
    assert got.shape == (4, 3)
    for i in range(4):
        for j in range(3):
            block = raw[3 * i:3 * i + 3, 3 * j:3 * j + 3]
            assert got[i, j] == pytest.approx(block.sum(), abs=1e-12)
    assert got.sum() == pytest.approx(raw.sum())            # LCA is additive
    np.testing.assert_allclose(interactive.pool_frame(np.arange(5.0), 2), [[1.0, 5.0, 4.0]])


@pytest.mark.parametrize("rows,cols,cap", [(100, 784, 8192), (50257, 768, 4096), (1, 10**6, 1000),
                                           (3, 3, 9), (7, 1, 2)])
def test_block_side_is_the_smallest_that_fits(rows, cols, cap):
    cells = lambda b: -(-rows // b) * -(-cols // b)
    b = interactive.block_side(rows, cols, cap)
    assert cells(b) <= cap
    assert b == 1 or cells(b - 1) > cap


def test_group_layers_gpt2_blocks_and_flat_runs():
    names = ["transformer.wte", "transformer.wpe"]
    for i in range(12):
        names += [f"transformer.h.{i}.{m}" for m in ("ln_1", "attn.c_attn", "attn.c_proj",
                                                     "ln_2", "mlp.c_fc", "mlp.c_proj")]
    names += ["transformer.ln_f"]
    groups, of = interactive.group_layers(names, 24)
    assert len(groups) == 15 and set(groups) >= {f"transformer.h.{i}" for i in range(12)}
    assert {groups[g] for g in of[2:8]} == {"transformer.h.0"}
    flat = [f"layer{i}" for i in range(50)]
    groups, of = interactive.group_layers(flat, 8)
    assert len(groups) <= 8 and np.all(np.diff(of) >= 0)       # consecutive runs
    values = np.random.default_rng(2).normal(size=(3, 50))
    grouped = interactive.sum_groups(values, of, len(groups))
    np.testing.assert_allclose(grouped.sum(1), values.sum(1))
    groups, of = interactive.group_layers(["a", "b"], 2)
    assert groups == ["a", "b"] and of.tolist() == [0, 1]


def test_top_classes_keeps_the_biggest_and_sums_the_rest():
    cl = np.zeros((2, 5, 3))
    cl[:, 3] = 5.0
    cl[:, 1] = -4.0
    cl[:, 0] = 0.5
    cl[:, 4] = 0.25
    labels, rows = interactive.top_classes(cl, 3)
    assert labels == ["class 1", "class 3", "other 3 classes"]
    np.testing.assert_allclose(rows[:, 2], cl[:, [0, 2, 4]].sum(1))
    np.testing.assert_allclose(rows.sum(1), cl.sum(1))


def test_frame_index_and_evenly():
    steps = np.array([0, 10, 20])
    assert [interactive.frame_index(steps, s) for s in (0, 9, 10, 25)] == [0, 0, 1, 2]
    idx = interactive.evenly(1000, 7)
    assert idx[0] == 0 and idx[-1] == 999 and len(idx) == 7
    assert interactive.evenly(5, 7).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("field,value", [("max_cells", 0), ("max_steps", 2.5), ("max_layers", -1)])
def test_bad_bounds_name_the_argument(field, value):
    with pytest.raises(ValueError, match=field):
        Bounds(**{field: value})


# ---------------------------------------------------------------------------
# runs: a real tracked one and a big hand-made one

def tracked_run(steps=9, frame_every=2) -> Run:
    """A tiny classifier trained with the tracker (in memory: the store's reading
    is tested elsewhere): frames of a 32x40 tensor every ``frame_every`` tracked
    steps, 3 classes."""
    torch.manual_seed(0)
    x = torch.randn(64, 40)
    y = x[:, :3].argmax(1)
    model = nn.Sequential(nn.Linear(40, 32), nn.ReLU(), nn.Linear(32, 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    loss_fn = nn.functional.cross_entropy
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), num_classes=3, frames=["0.weight"],
                                 frame_every=frame_every)
    for t in range(steps):
        opt.zero_grad()
        loss_fn(model(x[t % 4::4]), y[t % 4::4]).backward()
        with tracker.step():
            opt.step()
    return tracker.result()


def big_run(steps=250, frames=45, shape=(300, 400), layers=60, classes=30) -> Run:
    """More of everything than the default bounds allow."""
    rng = np.random.default_rng(3)
    names = [f"net.blocks.{i // 10}.sub{i % 10}.weight" for i in range(layers)]
    tensor_sums = rng.normal(size=(steps, layers))
    lb = 3.0 - np.arange(steps) * 1e-3
    arrays = {"step": np.arange(steps), "train/tensor_sums": tensor_sums,
              "train/loss_before": lb, "train/loss_after": lb - 1e-3,
              "train/error": np.full(steps, 1e-6), "train/lca_sum": tensor_sums.sum(1),
              "train/class_sums": rng.normal(size=(steps, classes, layers))}
    meta = dict(names=names, shapes=[list(shape)] * layers,
                layer_names=[n.rsplit(".", 1)[0] for n in names], layer_of=list(range(layers)),
                objectives=["train"], bin_edges=[-1.0, 0.0, 1.0], num_classes=classes,
                config=dict(atol=1e-5, rtol=1e-3))
    run_frames = {"0": rng.normal(size=(frames, *shape)).astype(np.float32),
                  "step": np.arange(frames) * 5}
    return Run(meta, arrays, {}, run_frames)


# ---------------------------------------------------------------------------
# the page, read back from its HTML

def decode(value):
    """A plotly JSON array: a list, or a base64 typed array {dtype, bdata, shape}."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return out.reshape([int(s) for s in str(shape).split(",")]) if shape else out
    return np.asarray(value)


def embedded(page: str):
    """(data, layout, frames) of the plot in the page: the arguments of the
    Plotly.newPlot and Plotly.addFrames calls that plotly writes."""
    dec = json.JSONDecoder()
    start = page.index("Plotly.newPlot(")
    at = page.index("[", start)
    data, end = dec.raw_decode(page, at)
    layout, end = dec.raw_decode(page, page.index("{", end))
    at = page.index("Plotly.addFrames(", end)
    frames, _ = dec.raw_decode(page, page.index("[", at))
    return data, layout, frames


def write_page(run, path, bounds=Bounds()):
    interactive.write_interactive(run, str(path), bounds)
    with open(path, encoding="utf-8") as f:
        return f.read()


def assert_self_contained(page: str):
    # no script, stylesheet or image fetched from anywhere: every src/href attribute
    # of a tag is local (plotly.js is inline)
    tags = re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", page, flags=re.I)
    remote = [t for t in tags if re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", t, re.I)]
    assert not remote, remote
    assert page.count("Plotly.newPlot(") == 1
    # plotly.js itself is embedded, once
    from plotly.offline import get_plotlyjs
    assert page.count(get_plotlyjs()[-2000:]) == 1


@needs_plotly
def test_page_embeds_the_runs_pooled_frames_and_sums(tmp_path):
    run = tracked_run()
    bounds = Bounds(max_cells=100, max_steps=9)
    page = write_page(run, tmp_path / "page.html", bounds)
    assert_self_contained(page)
    data, layout, frames = embedded(page)
    steps = layout["sliders"][0]["steps"]
    assert [s["label"] for s in steps] == [str(s) for s in run.steps]     # 9 ≤ max_steps
    assert [f["name"] for f in frames] == [s["label"] for s in steps]
    heat = [(i, t) for i, t in enumerate(data) if t.get("coloraxis") == "coloraxis"]
    assert len(heat) == len(run.frames["step"])                           # one per frame
    raw = run.frames[str(run.names.index("0.weight"))]                    # [F, 32, 40]
    layer_sums, class_layer = run.layer_sums(), run.class_layer_sums()
    for j, frame in enumerate(frames):
        step = int(frame["name"])
        by_trace = dict(zip(frame["traces"], frame["data"]))
        shown = [i for i, _ in heat if by_trace[i]["visible"]]
        assert len(shown) == 1
        # independent reference: the latest frame taken at or before the step, 32x40
        # in 4x4 blocks (block_side(32, 40, 100) = 4: 8x10 cells) summed by reshape
        f = max(k for k, s in enumerate(run.frames["step"]) if s <= step)
        want = raw[f].astype(np.float64).reshape(8, 4, 10, 4).sum(axis=(1, 3))
        got = decode(data[shown[0]]["z"])
        assert got.dtype == np.float32 and got.shape == (8, 10)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        row = int(np.flatnonzero(run.steps == step)[0])
        bar = next(d for d in frame["data"] if d["type"] == "bar")
        np.testing.assert_allclose(decode(bar["y"]), layer_sums[row], rtol=1e-5, atol=1e-8)
        cls = next(d for i, d in by_trace.items() if d["type"] == "heatmap"
                   and data[i].get("coloraxis") == "coloraxis2")
        np.testing.assert_allclose(decode(cls["z"]), class_layer[row], rtol=1e-5, atol=1e-8)
        markers = [d for d in frame["data"] if d["type"] == "scatter"]
        assert [list(decode(m["x"])) for m in markers] == [[step], [step]]
        np.testing.assert_allclose(decode(markers[0]["y"]), [run.loss_after[row]], rtol=1e-6)
        np.testing.assert_allclose(decode(markers[1]["y"]), [run.error[row]], rtol=1e-6)
    assert layout["coloraxis"]["cmin"] == -layout["coloraxis"]["cmax"]     # symmetric
    assert "4x4 blocks" in page and "LCA is additive" in page


@needs_plotly
def test_doubtful_steps_are_marked_with_a_legend_and_each_frame_has_its_scale(tmp_path):
    """Ungrounded and budget-limited steps get their own marker traces on the
    error curve, named with their counts in the legend (the page's only legend
    entries); every slider step sets the frames' colour scale to its own frame's
    symmetric limit (a fixed scale left the early frames nearly blank)."""
    run = tracked_run()
    grounded = np.ones(len(run), bool)
    grounded[[2, 5]] = False
    budget = np.zeros(len(run), bool)
    budget[[5, 7]] = True
    run.arrays["train/grounded"] = grounded
    run.arrays["train/budget_limited"] = budget
    page = write_page(run, tmp_path / "page.html", Bounds(max_cells=100, max_steps=9))
    data, layout, frames = embedded(page)
    legend = {t["name"]: t for t in data if t.get("showlegend")}
    assert set(legend) == {"not grounded (2)", "stopped at the pass budget (2)"}
    assert list(decode(legend["not grounded (2)"]["x"])) == [int(run.steps[2]),
                                                             int(run.steps[5])]
    assert list(decode(legend["stopped at the pass budget (2)"]["x"])) == [
        int(run.steps[5]), int(run.steps[7])]
    assert layout["showlegend"] is True
    assert "not grounded: step 2, 5" in page
    raw = run.frames[str(run.names.index("0.weight"))]
    lims = []
    for frame in frames:
        step = int(frame["name"])
        f = max(k for k, s in enumerate(run.frames["step"]) if s <= step)
        pooled = raw[f].astype(np.float32).reshape(8, 4, 10, 4).sum(axis=(1, 3))
        want = float(np.quantile(np.abs(pooled), 0.995))
        scale = frame["layout"]["coloraxis"]
        assert scale["cmin"] == -scale["cmax"]
        assert scale["cmax"] == pytest.approx(want, rel=1e-5)
        lims.append(scale["cmax"])
    assert layout["coloraxis"]["cmax"] == pytest.approx(lims[0])
    assert max(lims) > 1.5 * min(lims)        # the frames' scales do differ here


@needs_plotly
def test_big_run_is_bounded(tmp_path):
    from plotly.offline import get_plotlyjs

    run = big_run()
    bounds = Bounds()
    page = write_page(run, tmp_path / "big.html", bounds)
    data, layout, frames = embedded(page)
    assert len(layout["sliders"][0]["steps"]) == len(frames) == bounds.max_steps
    heat = [t for t in data if t.get("coloraxis") == "coloraxis"]
    assert len(heat) == bounds.max_frames
    z = decode(heat[0]["z"])
    assert z.size <= bounds.max_cells and z.dtype == np.float32
    # the pooled frame keeps the total (LCA is additive)
    assert float(z.sum()) == pytest.approx(float(run.frames["0"][0].astype(np.float64).sum()),
                                           rel=1e-4, abs=1e-3)
    bar = next(t for t in data if t["type"] == "bar")
    assert len(bar["x"]) == 6                           # by block: net.blocks.0 .. net.blocks.5
    cls = next(t for t in data if t.get("coloraxis") == "coloraxis2")
    assert len(cls["y"]) == bounds.max_classes and cls["y"][-1] == "other 11 classes"
    size = os.path.getsize(tmp_path / "big.html")
    assert size <= len(get_plotlyjs()) + bounds.max_data_bytes() + 100_000, size
    assert size < 9_000_000


@needs_plotly
def test_write_interactive_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="run must be a Run"):
        interactive.write_interactive(42, str(tmp_path / "x.html"))
    with pytest.raises(TypeError, match="bounds"):
        interactive.write_interactive(big_run(steps=3, frames=2, shape=(4, 4), layers=2,
                                              classes=2), str(tmp_path / "x.html"), bounds=5)


def test_report_link_without_plotly_is_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(interactive, "missing", lambda modules: list(modules))
    note = interactive.report_link(big_run(steps=3, frames=2, shape=(4, 4), layers=2, classes=2),
                                   str(tmp_path))
    assert "lca_ext[demo]" in note and "plotly" in note
    assert not os.path.exists(tmp_path / interactive.FILE_NAME)


def test_write_interactive_without_plotly_names_the_extra(tmp_path, monkeypatch):
    import importlib.util as iu
    real = iu.find_spec
    monkeypatch.setattr(iu, "find_spec",
                        lambda name, *a: None if name == "plotly" else real(name, *a))
    with pytest.raises(ImportError, match=r'plotly.*lca_ext\[demo\]'):
        interactive.write_interactive(big_run(steps=3, frames=2, shape=(4, 4), layers=2,
                                              classes=2), str(tmp_path / "x.html"))


# ---------------------------------------------------------------------------
# in a browser

def browser_check_module():
    spec = importlib.util.spec_from_file_location("browser_check",
                                                  os.path.join(ROOT, "scripts", "browser_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_plotly
def test_page_in_headless_chromium(tmp_path):
    check = browser_check_module()
    why = check.missing_browser()
    if why:
        if os.environ.get("LCA_REQUIRE_BROWSER") == "1":     # CI: never skip silently
            pytest.fail(f"LCA_REQUIRE_BROWSER=1 but {why}")
        pytest.skip(f"browser check: {why}")
    run = tracked_run(steps=12, frame_every=3)
    page = tmp_path / "page.html"
    interactive.write_interactive(run, str(page), Bounds(max_cells=100))
    shot = tmp_path / "interactive.png"
    states = check.check(str(page), str(shot))
    with open(shot, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # what the browser drew after the slider moved is the run's frame for that
    # step: the pooled cells sum to the raw frame's total (LCA is additive)
    moved = states["moved"]
    step = int(moved["label"])
    f = max(k for k, s in enumerate(run.frames["step"]) if s <= step)
    assert moved["visible"] == [f"0.weight @ {run.frames['step'][f]}"]
    raw = run.frames[str(run.names.index("0.weight"))][f].astype(np.float64)
    assert moved["frame_sums"][0] == pytest.approx(raw.sum(), rel=1e-4, abs=1e-7)
    row = int(np.flatnonzero(run.steps == step)[0])
    np.testing.assert_allclose(moved["bar_y"], run.layer_sums()[row], rtol=1e-5, atol=1e-8)
    assert states["first"]["visible"] != moved["visible"]


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None
                    or importlib.util.find_spec("PIL") is None,
                    reason="the static report draws with matplotlib and pillow (the demo extra)")
@pytest.mark.parametrize("with_plotly", [True, False])
def test_static_report_links_the_page_or_says_why(tmp_path, monkeypatch, with_plotly):
    from lca_ext.report import build_report

    if with_plotly and not HAVE_PLOTLY:
        pytest.skip("needs plotly (the demo extra)")
    if not with_plotly:        # as where plotly is not installed
        monkeypatch.setattr(interactive, "missing", lambda modules: list(modules))
    index = build_report(tracked_run(steps=4), str(tmp_path / "report"))
    with open(index, encoding="utf-8") as f:
        text = f.read()
    page = tmp_path / "report" / interactive.FILE_NAME
    assert page.exists() == with_plotly
    if with_plotly:
        assert f'<a href="{interactive.FILE_NAME}">' in text
    else:
        assert "needs plotly" in text and 'lca_ext[demo]' in text
        assert f'href="{interactive.FILE_NAME}"' not in text


@needs_plotly
@pytest.mark.parametrize("frames", ["none", "bias"])
def test_page_without_classes_and_with_few_or_no_frames(tmp_path, frames):
    run = big_run(steps=7, frames=3, shape=(5, 6), layers=4, classes=2)
    run.meta["num_classes"] = None
    del run.arrays["train/class_sums"]
    if frames == "none":
        run.frames = {}
    else:                       # a 1-D tensor: one row of cells
        run.frames = {"1": np.arange(3 * 6, dtype=np.float32).reshape(3, 6),
                      "step": np.array([0, 3, 6])}
    page = write_page(run, tmp_path / "p.html")
    data, layout, frames_ = embedded(page)
    assert len(frames_) == len(layout["sliders"][0]["steps"]) == 7
    heat = [t for t in data if t["type"] == "heatmap"]
    assert not any(t.get("coloraxis") == "coloraxis2" for t in heat)
    if frames == "none":
        assert not heat and "stored no per-parameter frames" in page
    else:
        assert len(heat) == 3
        np.testing.assert_array_equal(decode(heat[1]["z"]), run.frames["1"][1].reshape(1, 6))
        assert [int(f["name"]) for f in frames_ if f["data"][2]["visible"]] == [6]
