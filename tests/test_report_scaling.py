"""The report on many layers: a synthetic 60-layer run is reported with
build_report and every figure is checked for legibility with matplotlib's own
text extents (no overlapping tick labels, nothing off the canvas, legends off
the data, no repeated series colours, titles that state this run's numbers);
and TensorBoard frame images from a real tracked model."""
import glob
import os

import numpy as np
import pytest

pytest.importorskip("matplotlib", reason="the report draws with matplotlib")
pytest.importorskip("PIL", reason="the report's animation needs pillow")

from lca_ext import analysis  # noqa: E402
from lca_ext.run import Run  # noqa: E402

GPT_LIKE = (["transformer.wte", "transformer.wpe"]
            + [f"transformer.h.{i}.{part}" for i in range(28) for part in ("attn", "mlp")]
            + ["transformer.ln_f", "lm_head"])
SEQUENTIAL = [str(i) for i in range(60)]


def synthetic_run(layer_names, steps=12, classes=4, rows=8, cols=6, frames=4, seed=0):
    """A Run of len(layer_names) layers (weight [rows, cols] + bias [rows] each),
    train and val objectives, per-class sums, state and 784-wide frames."""
    rng = np.random.default_rng(seed)
    names, shapes, layer_of = [], [], []
    for i, layer in enumerate(layer_names):
        names += [layer + ".weight", layer + ".bias"]
        shapes += [[rows, cols], [rows]]
        layer_of += [i, i]
    k = len(names)
    edges = np.r_[-np.logspace(0, -12, 25), np.logspace(-12, 0, 25)]
    arrays = {"step": np.arange(steps)}
    for obj in ("train", "val"):
        per_elem = [rng.normal(-1e-3, 2e-3, (steps, *s)) for s in shapes]
        sums = np.stack([p.reshape(steps, -1).sum(1) for p in per_elem], 1)     # [T, K]
        counts = np.zeros((steps, k, 4), dtype=np.int64)
        for j, p in enumerate(per_elem):
            flat = p.reshape(steps, -1)
            counts[:, j, 0], counts[:, j, 1] = (flat < 0).sum(1), (flat > 0).sum(1)
        lca = sums.sum(1)
        before = 3.0 + np.r_[0, np.cumsum(lca)[:-1]]
        rows_ = np.concatenate([p.reshape(steps, p.shape[1], -1).sum(-1) if p.ndim == 3
                                else p for p in per_elem], 1)
        hist = np.stack([np.stack([np.histogram(p.reshape(steps, -1)[t], edges)[0]
                                   for t in range(steps)]) for p in per_elem], 1)
        hist = np.concatenate([np.zeros((steps, k, 1), int), hist, np.zeros((steps, k, 1), int)], -1)
        arrays.update({f"{obj}/tensor_sums": sums, f"{obj}/counts": counts,
                       f"{obj}/lca_sum": lca, f"{obj}/loss_before": before,
                       f"{obj}/loss_after": before + lca + rng.normal(0, 1e-7, steps),
                       f"{obj}/row_sums": rows_, f"{obj}/histogram": hist,
                       f"{obj}/splits": np.ones(steps), f"{obj}/grad_passes": np.ones(steps)})
        arrays[f"{obj}/error"] = np.abs(arrays[f"{obj}/loss_after"] - before - lca)
    arrays["train/class_sums"] = (arrays["train/tensor_sums"][:, None, :] / classes
                                  + rng.normal(0, 1e-4, (steps, classes, k)))
    state = {"cum_lca": [rng.normal(-1e-2, 2e-2, s) for s in shapes],
             "helped_steps": [rng.integers(0, steps + 1, s) for s in shapes],
             "direction_changes": [rng.integers(0, steps, s) for s in shapes],
             "grad_sign_changes": [rng.integers(0, steps, s) for s in shapes]}
    meta = dict(names=names, shapes=shapes, layer_names=list(layer_names), layer_of=layer_of,
                objectives=["train", "val"], bin_edges=edges.tolist(), num_classes=classes,
                config=dict(atol=1e-4, rtol=1e-3))
    frame_data = {"0": rng.normal(0, 1e-4, (frames, 16, 784)),
                  "step": np.arange(0, steps, steps // frames)[:frames]}
    return Run(meta, arrays, state, frame_data)


# -- an independent legibility check (matplotlib's own text extents) ------------------

def _boxes_overlap(a, b, slack=0.5):
    return (a.x0 < b.x1 - slack and b.x0 < a.x1 - slack
            and a.y0 < b.y1 - slack and b.y0 < a.y1 - slack)


def _drawn_ticklabels(axis):
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(abs(lo), abs(hi))    # relative: log axes of tiny values
    return [t for loc, t in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if t.get_visible() and t.get_text().strip() and lo - eps <= loc <= hi + eps]


def _handle_colour(handle):
    from matplotlib.colors import to_rgba
    from matplotlib.lines import Line2D

    c = handle.get_color() if isinstance(handle, Line2D) else handle.get_facecolor()
    return tuple(np.round(to_rgba(c), 3))


def check_legible(fig, name):
    """Assert the figure is legible; returns what was checked, for the caller."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    canvas = fig.bbox
    texts = []
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            labels = _drawn_ticklabels(axis)
            boxes = [t.get_window_extent(renderer) for t in labels]
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    assert not _boxes_overlap(boxes[i], boxes[j]), (
                        f"{name}: tick labels {labels[i].get_text()!r} and "
                        f"{labels[j].get_text()!r} overlap")
            texts += labels
        texts += [t for t in (ax.title, ax.xaxis.label, ax.yaxis.label) if t.get_text()]
        legend = ax.get_legend()
        if legend is not None:
            box = legend.get_window_extent(renderer)
            for other in fig.axes:
                assert not _boxes_overlap(box, other.get_window_extent(renderer)), (
                    f"{name}: a legend covers the data of an axes")
            assert (box.x0 >= canvas.x0 - 1 and box.x1 <= canvas.x1 + 1
                    and box.y0 >= canvas.y0 - 1 and box.y1 <= canvas.y1 + 1), (
                f"{name}: a legend is cut off")
            # a legend's entries never share a colour: no silent repeats
            colours = [_handle_colour(h) for h in legend.legend_handles]
            assert len(set(colours)) == len(colours), f"{name}: legend colours repeat"
    if fig._suptitle is not None:
        texts.append(fig._suptitle)
    for t in texts:
        b = t.get_window_extent(renderer)
        assert (b.x0 >= canvas.x0 - 1 and b.x1 <= canvas.x1 + 1 and b.y0 >= canvas.y0 - 1
                and b.y1 <= canvas.y1 + 1), f"{name}: text {t.get_text()!r} is off the canvas"
    return len(texts)


@pytest.fixture
def checked_figures(monkeypatch):
    """Every figure the report saves, checked for legibility as it is written
    (after plots._save has laid it out)."""
    from lca_ext import plots

    seen = {}
    real_save = plots._write

    def save(fig, path):
        name = os.path.basename(path)
        seen[name] = dict(texts=check_legible(fig, name),
                          titles=[ax.get_title() for ax in fig.axes] +
                          [fig._suptitle.get_text() if fig._suptitle else ""],
                          lines=[len(ax.get_lines()) for ax in fig.axes])
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_write", save)
    return seen


EXPECTED = {"grounding.png", "helped_fraction.png", "heroes_villains.png", "lca_histogram.png",
            "layers.png", "neurons.png", "concentration_oscillation.png", "gini_layers.png",
            "overfitting.png", "class_layers.png", "synchronization.png"}


@pytest.mark.parametrize("layer_names", [GPT_LIKE, SEQUENTIAL], ids=["gpt-like", "sequential"])
def test_sixty_layer_report_is_legible(layer_names, tmp_path, checked_figures):
    from lca_ext.report import build_report

    run = synthetic_run(layer_names)
    assert len(run.layer_names) == 60
    html_path = build_report(run, str(tmp_path))
    assert set(checked_figures) == EXPECTED
    written = {os.path.basename(p) for p in glob.glob(str(tmp_path / "*.png"))}
    assert EXPECTED <= written
    assert os.path.getsize(tmp_path / "first_layer.gif") < 300_000
    html = open(html_path).read()
    for fig in EXPECTED | {"first_layer.gif"}:
        assert fig in html
    # per-layer figures show at most 12 groups, not 60 layers
    groups = analysis.layer_groups(run.layer_names)
    assert len(groups["names"]) <= 12
    assert checked_figures["synchronization.png"]["lines"].count(0) == 0
    assert len(checked_figures["synchronization.png"]["lines"]) == len(groups["names"])
    # titles state this run's numbers, never the paper's claim
    mean = analysis.helped_fraction(run)["overall"].mean()
    assert f"{100 * mean:.1f}% of parameters helped per step" in \
        checked_figures["helped_fraction.png"]["titles"][0]
    for fig in checked_figures.values():
        assert not any("Barely" in t for t in fig["titles"])
    # the new table rows
    for row in ("helped Gini", "top 1% of helping", "90% of the helped total",
                "gradient turns", "LCA turns"):
        assert row in html


def test_few_layers_show_every_layer(tmp_path, checked_figures):
    from lca_ext.report import build_report

    run = synthetic_run(["fc1", "fc2", "fc3"])
    build_report(run, str(tmp_path))
    assert set(checked_figures) == EXPECTED
    assert analysis.layer_groups(run.layer_names)["names"] == ["fc1", "fc2", "fc3"]
    # the per-layer panel of synchronization: one per layer
    assert len(checked_figures["synchronization.png"]["lines"]) == 3


def test_the_checker_catches_overlaps():
    """The legibility check fails on what it should catch (so the test above can)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.set_xticks(range(30), [f"layer.number.{i}" for i in range(30)])
    with pytest.raises(AssertionError, match="overlap"):
        check_legible(fig, "crowded")
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(4, 3))
    ax.plot([0, 1], [0, 1], label="a")
    ax.legend(loc="center")
    with pytest.raises(AssertionError, match="covers the data"):
        check_legible(fig, "legend inside")
    plt.close(fig)


# -- TensorBoard frame images -------------------------------------------------------------

def test_lca_image_colours_and_scale():
    from lca_ext.tensorboard import lca_image

    img = lca_image(np.array([[-2.0, 0.0, 1.0, 4.0]]), limit=2.0)
    assert img.shape == (1, 4, 3) and img.dtype == np.uint8
    assert img[0].tolist() == [[0, 255, 0], [0, 0, 0], [128, 0, 0], [255, 0, 0]]
    assert lca_image(np.zeros(5)).shape == (1, 5, 3)              # 1-D: one row
    assert lca_image(np.ones((3, 2, 2))).shape == (3, 4, 3)       # [dim 0, the rest]
    assert lca_image(np.ones((10, 3000))).shape == (10, 1000, 3)  # shrunk by summing
    with pytest.raises(ValueError, match="limit"):
        lca_image(np.ones(3), limit=0.0)


def test_tensorboard_logs_frame_images_per_step(tmp_path):
    pytest.importorskip("tensorboard")
    import io

    import torch
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    import lca_ext
    from lca_ext.tensorboard import TensorBoardLogger

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    loss_fn = nn.functional.cross_entropy
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), frames=["0.weight"], frame_every=2)
    logger = TensorBoardLogger(str(tmp_path), tracker)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        with tracker.step():
            opt.step()
        assert (tracker.last_frames is not None) == (int(tracker.last["step"]) % 2 == 0)
        logger.log_step(tracker.last)
    logger.close()
    run = tracker.result()

    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert "frames/0.weight" in acc.Tags()["images"]
    events = acc.Images("frames/0.weight")
    assert [e.step for e in events] == run.frames["step"].tolist() == [0, 2, 4]
    assert "train/loss" in acc.Tags()["scalars"]                  # the scalars still there
    limits = [e.value for e in acc.Scalars("frames/0.weight/limit")]
    for event, lca, limit in zip(events, run.frames["0"], limits):
        img = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        assert img.shape == (7, 5, 3)
        nonzero = np.abs(lca[lca != 0])
        assert limit == pytest.approx(np.percentile(nonzero, 99), rel=1e-6)
        for idx in zip(*np.nonzero(lca)):     # helping: green, hurting: red, to scale
            level = round(255 * min(abs(lca[idx]) / limit, 1.0))
            want = [0, level, 0] if lca[idx] < 0 else [level, 0, 0]
            assert img[idx].tolist() == pytest.approx(want, abs=1)
        assert img[np.unravel_index(np.argmin(lca), lca.shape)][1] > 100
    frames = run.frames["0"]
    assert (frames < 0).any() and (frames > 0).any()           # both colours were checked


def test_tensorboard_frame_of_a_big_tensor_is_scaled_to_its_pooled_cells(tmp_path):
    """An embedding of 2,100 rows is drawn as 700 rows of summed triples: the
    colour scale (and the logged limit) is that of the sums, not of single
    elements, so the image does not saturate."""
    pytest.importorskip("tensorboard")
    import io

    import torch
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch import nn

    import lca_ext
    from lca_ext.tensorboard import TensorBoardLogger

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(2100, 3), nn.Flatten(), nn.Linear(6, 3))
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 2100, (600, 2), generator=gen), torch.randint(0, 3, (600,), generator=gen)
    loss_fn = nn.functional.cross_entropy
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), frames=["0.weight"])
    logger = TensorBoardLogger(str(tmp_path), tracker)
    opt = torch.optim.SGD(model.parameters(), lr=5.0)
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    with tracker.step():
        opt.step()
    logger.log_step(tracker.last)
    logger.close()
    lca = tracker.result().frames["0"][0]                       # [2100, 3]
    triples = lca.astype(np.float64).reshape(700, 3, 3).sum(1)   # independent pooling
    want = np.percentile(np.abs(triples[triples != 0]), 99)
    acc = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    acc.Reload()
    assert acc.Scalars("frames/0.weight/limit")[0].value == pytest.approx(want, rel=1e-6)
    img = np.asarray(Image.open(io.BytesIO(
        acc.Images("frames/0.weight")[0].encoded_image_string)).convert("RGB"))
    assert img.shape == (700, 3, 3)
    saturated = (img.max(-1) == 255).mean()
    assert saturated <= 0.02


def test_comparison_of_sixty_layer_runs_is_legible(tmp_path, checked_figures):
    from lca_ext import plots

    runs = [synthetic_run(GPT_LIKE, seed=s) for s in range(2)]
    plots.comparison(runs, ["lca_demo_runs/fc-seed0-long-name", "seed1"], str(tmp_path))
    assert set(checked_figures) == {"compare.png"}
    with pytest.raises(ValueError, match="one label per run"):
        plots.comparison(runs, ["only one"], str(tmp_path))


def test_concentration_of_a_run_whose_loss_rose(tmp_path, monkeypatch):
    """Net learning Σ(−total LCA) < 0: no share of it is drawn (it used to be
    divided by 1e-300), the helped share still rises to 1."""
    import warnings

    from lca_ext import plots

    run = synthetic_run(["fc1", "fc2", "fc3"], seed=1)
    run.state["cum_lca"] = [c + 0.03 for c in run.state["cum_lca"]]
    learning = -np.concatenate([c.ravel() for c in run.state["cum_lca"]])
    assert learning.sum() < 0 and (learning > 0).any()
    seen = {}
    real_save = plots._write

    def save(fig, path):
        lines = fig.axes[0].get_lines()
        seen.update(y=[np.asarray(ln.get_ydata(), float) for ln in lines],
                    labels=[ln.get_label() for ln in lines])
        check_legible(fig, os.path.basename(path))
        return real_save(fig, path)

    monkeypatch.setattr(plots, "_write", save)
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # no collapsed layout either
        plots.concentration(run, str(tmp_path))
    ys = np.concatenate([y for y in seen["y"] if y.size])
    assert np.nanmax(ys) <= 1 + 1e-12
    helped = np.sort(np.clip(learning, 0, None))[::-1]
    assert seen["y"][0][-1] == pytest.approx(np.cumsum(helped)[-1] / helped.sum())
    assert any("no share of net learning" in label for label in seen["labels"])


def test_report_of_a_tracked_twelve_layer_gpt2(tmp_path, checked_figures):
    """A real tracked run of a model the report was not designed on: a GPT-2 of
    12 blocks from a config (tied embeddings, attention dropout), token classes
    through batch_loss, frames of the embedding; every figure legible, no
    warning, the interactive page beside it when plotly is there."""
    import warnings

    transformers = pytest.importorskip("transformers")
    import torch

    import lca_ext
    from lca_ext.report import build_report

    torch.manual_seed(0)
    seq, vocab = 12, 24
    cfg = transformers.GPT2Config(n_layer=12, n_embd=16, n_head=2, vocab_size=vocab,
                                  n_positions=seq, attn_pdrop=0.1)
    model = transformers.GPT2LMHeadModel(cfg)
    gen = torch.Generator().manual_seed(1)

    def batches(n):
        return [{"input_ids": (ids := torch.randint(0, vocab, (4, seq), generator=gen)),
                 "labels": ids} for _ in range(n)]

    def lm_loss(m, b):
        return m(**b).loss, (b["labels"][:, 1:] != -100).sum()

    tracker = lca_ext.LCATracker(model, lca_data=batches(2), batch_loss=lm_loss,
                                 num_classes=vocab, frames=["transformer.wte.weight"],
                                 store=str(tmp_path / "run"))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    tracker.attach(opt)
    for b in batches(5):
        opt.zero_grad()
        model(**b).loss.backward()
        opt.step()
    tracker.result()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)     # e.g. a collapsed layout
        html_path = build_report(str(tmp_path / "run"), str(tmp_path / "report"))
    assert EXPECTED - {"overfitting.png"} <= set(checked_figures)
    html = open(html_path).read()
    assert "transformer.h.11" in html or "60" not in html
    if not analysis_missing_plotly():
        assert os.path.exists(tmp_path / "report" / "interactive.html")


def analysis_missing_plotly():
    from lca_ext._extras import missing
    return bool(missing(["plotly"]))


@pytest.mark.parametrize("case", ["all LCA zero (lr 0)", "loss rose", "two steps"])
def test_report_of_edge_runs_says_n_a_not_nan(case, tmp_path, checked_figures):
    """No "nan" or "inf" in the report's table: a value that does not exist says why."""
    import re

    import torch
    from torch import nn

    import lca_ext
    from lca_ext.report import build_report

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))
    x, y = torch.randn(40, 5), torch.randint(0, 3, (40,))
    lr, sign, steps = {"all LCA zero (lr 0)": (0.0, 1.0, 3), "loss rose": (0.5, -1.0, 3),
                       "two steps": (0.1, 1.0, 2)}[case]
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), num_classes=3)
    for _ in range(steps):
        opt.zero_grad()
        (sign * nn.functional.cross_entropy(model(x), y)).backward()
        with tracker.step():
            opt.step()
    html = open(build_report(tracker.result(), str(tmp_path))).read()
    table = html[html.index("<table>"):html.index("</table>")]
    cells = re.findall(r"<td>(.*?)</td>", table)
    assert cells and not any(re.search(r"\b(nan|inf)\b", c, re.I) for c in cells), cells
    for fig in checked_figures.values():
        assert not any(re.search(r"\bnan\b", t, re.I) for t in fig["titles"]), fig["titles"]


def test_grounding_figure_marks_every_doubtful_step_in_its_legend(tmp_path, monkeypatch):
    """The static report's per-step error panel: ungrounded, budget-limited and
    rounding-floor steps each get a marker series at exactly their steps, named
    with its count in a legend that is legible (outside the data)."""
    from lca_ext import plots

    run = synthetic_run(["fc1", "fc2"], steps=30)
    grounded = np.ones(30, bool)
    grounded[[3, 17, 25]] = False
    budget, noise = np.zeros(30, bool), np.zeros(30, bool)
    budget[[17, 20]] = True
    noise[[25]] = True
    run.arrays.update({"train/grounded": grounded, "train/budget_limited": budget,
                       "train/noise_limited": noise})
    seen = {}

    def save(fig, path):
        seen["fig"] = fig
        check_legible(fig, os.path.basename(path))

    monkeypatch.setattr(plots, "_write", save)
    plots.grounding(run, str(tmp_path))
    err_ax = seen["fig"].axes[1]
    series = {line.get_label(): line.get_xdata().tolist() for line in err_ax.get_lines()}
    assert series["not grounded (3)"] == [3, 17, 25]
    assert series["stopped at the pass budget (2)"] == [17, 20]
    assert series["at the rounding floor (1)"] == [25]
    legend = [t.get_text() for t in err_ax.get_legend().get_texts()]
    assert legend == ["not grounded (3)", "stopped at the pass budget (2)",
                      "at the rounding floor (1)"]
    # a run with no doubtful step says so in the title, with no legend
    run.arrays.update({"train/grounded": np.ones(30, bool), "train/budget_limited": 0 * budget,
                       "train/noise_limited": 0 * noise})
    plots.grounding(run, str(tmp_path))
    assert seen["fig"].axes[1].get_legend() is None
    assert "every step grounded" in seen["fig"].axes[1].get_title()


def test_an_eval_sets_doubtful_steps_are_named_in_the_report_not_hidden(tmp_path):
    """The demo's report said 'every one of the 150 tracked steps is grounded'
    while its val set had 2 steps stopped at the pass budget: the report's row,
    the CLI's line (both from headline) and the interactive page's note name
    every objective's doubtful steps."""
    from lca_ext import analysis, report

    run = synthetic_run(["fc1", "fc2"], steps=12)
    ok = np.ones(12, bool)
    val_grounded, val_budget = ok.copy(), ~ok
    val_grounded[[4, 9]] = False
    val_budget[[4, 9]] = True
    run.arrays.update({"train/grounded": ok, "train/budget_limited": ~ok,
                       "train/noise_limited": ~ok, "val/grounded": val_grounded,
                       "val/budget_limited": val_budget, "val/noise_limited": ~ok})
    line = analysis.describe_doubtful_objectives(run)
    assert line == ("train: every one of the 12 tracked steps is grounded; val: of 12 "
                    "tracked steps, not grounded: step 4, 9; stopped at the pass budget "
                    "(bars above target): 4, 9")
    assert report.headline(run)["doubtful"] == line
    html = open(report.build_report(run, str(tmp_path))).read()
    assert "val: of 12 tracked steps, not grounded: step 4, 9" in html

