"""Figures of a run's analyses (matplotlib, Agg backend), in the paper's colours:
green helps (negative LCA), red hurts (positive LCA).  Each function takes a
``Run`` (and analysis results) and writes one PNG, returning its path.

The figures hold for 3 layers and for 100: past ``MAX_SERIES`` layers every
per-layer figure shows layer groups (``analysis.layer_groups``: blocks such as
``transformer.h.3``), at most ``MAX_COLOURS`` series get distinct colours (more
use a sequential map with a colourbar), legends sit outside the data, tick
labels are shortened and rotated or thinned until none overlap, and titles
state what this run measured."""
from __future__ import annotations

import os
from typing import Dict, List, Optional

from ._extras import require

require("lca_ext.plots (the report's figures)", ["matplotlib", "PIL"])
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import LinearSegmentedColormap  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from . import analysis  # noqa: E402

GREEN, RED, GREY, BLUE = "#2ca02c", "#d62728", "#7f7f7f", "#1f77b4"
MAX_SERIES = 12          # more layers than this: figures show layer groups
# tab10 less green, red (they mean helps, hurts), grey (the "rest") and olive
SERIES_COLOURS = [matplotlib.colormaps["tab10"](i) for i in (0, 1, 4, 5, 6, 9)]
MAX_COLOURS = len(SERIES_COLOURS)   # more series than this: a sequential map, not a cycle
LABEL_CHARS = 24         # tick labels longer than this keep their tail
# green (helps, negative) → white (0) → red (hurts): full contrast at both ends
LCA_CMAP = LinearSegmentedColormap.from_list("lca", ["#00441b", GREEN, "#ffffff", RED, "#67000d"])


# -- layout helpers --------------------------------------------------------------------

def _figure(width: float, height: float, **kw):
    return plt.subplots(figsize=(width, height), layout="constrained", **kw)


def _save(fig, path: str) -> str:
    # any axis whose labels still collide once laid out (numbers on a panel
    # squeezed by long names beside it) is thinned, not left overlapping
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            if _overlapping(_shown(axis), renderer):
                _fit_ticklabels(fig, axis, rotate=False)
    return _write(fig, path)


def _write(fig, path: str) -> str:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _short(name: str, chars: int = LABEL_CHARS) -> str:
    """A label of at most ``chars`` characters: the tail of a long dotted name
    (the part that tells layers apart)."""
    return name if len(name) <= chars else "…" + name[-(chars - 1):]


def _legend_outside(ax, **kw):
    """A legend to the right of the axes, never over the data."""
    kw.setdefault("fontsize", 8)
    return ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, **kw)


def _overlapping(labels, renderer) -> bool:
    boxes = [t.get_window_extent(renderer) for t in labels]
    return any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:])


def _shown(axis) -> list:
    """The tick labels an axis draws: visible, non-empty, inside the view."""
    lo, hi = sorted(axis.get_view_interval())
    eps = 1e-9 * max(abs(lo), abs(hi))    # relative: log axes of tiny values
    return [t for loc, t in zip(axis.get_ticklocs(), axis.get_ticklabels())
            if t.get_visible() and t.get_text() and lo - eps <= loc <= hi + eps]


def _fit_ticklabels(fig, axis, rotate: bool = True) -> None:
    """Rotate (x axes) and then thin an axis's tick labels until no two overlap."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    labels = _shown(axis)
    if rotate and _overlapping(labels, renderer):
        for t in axis.get_ticklabels():
            t.set_rotation(90)
        fig.canvas.draw()
    every = 1
    while _overlapping(_shown(axis), renderer) and every < len(labels):
        # the smallest stride whose labels clear each other at today's layout;
        # one redraw checks it (hiding labels can shift a constrained layout)
        boxes = [t.get_window_extent(renderer) for t in labels]
        every += 1
        while every < len(labels) and any(
                a.overlaps(b) for a, b in zip(boxes[::every], boxes[every::every])):
            every += 1
        for i, t in enumerate(labels):
            t.set_visible(i % every == 0)
        fig.canvas.draw()


def _category_ticks(fig, ax, labels: List[str], axis: str = "x") -> None:
    pos = np.arange(len(labels))
    short = [_short(n) for n in labels]
    if axis == "x":
        ax.set_xticks(pos, short, fontsize=8)
        _fit_ticklabels(fig, ax.xaxis)
    else:
        ax.set_yticks(pos, short, fontsize=8)
        _fit_ticklabels(fig, ax.yaxis, rotate=False)


def _series_colours(n: int):
    """Distinct colours for up to MAX_COLOURS series; a sequential map beyond
    (returns the colours and, for the map, a mappable for a colourbar)."""
    if n <= MAX_COLOURS:
        return SERIES_COLOURS[:n], None
    cmap = plt.cm.viridis
    norm = matplotlib.colors.Normalize(0, n - 1)
    return [cmap(norm(i)) for i in range(n)], plt.cm.ScalarMappable(norm=norm, cmap=cmap)


def _order_colourbar(fig, ax, mappable, names: List[str], label: str) -> None:
    """A colourbar standing for series order, its ends named."""
    bar = fig.colorbar(mappable, ax=ax, label=label)
    ends = [0, len(names) - 1]
    bar.set_ticks(ends, labels=[_short(names[i], 16) for i in ends])
    bar.ax.tick_params(labelsize=7)


def _groups(run) -> Dict[str, object]:
    return analysis.layer_groups(run.layer_names, MAX_SERIES)


def _thin(n: int, limit: int = 2000) -> np.ndarray:
    """At most ``limit`` indices of 0..n-1 spread evenly, ends included."""
    return np.unique(np.linspace(0, n - 1, min(n, limit)).round().astype(np.int64))


def _clip_limit(values: np.ndarray, percentile: float = 99.0) -> float:
    """Symmetric colour limit: a high percentile of |value|, so a few outliers do
    not wash the rest out to white."""
    a = np.abs(np.asarray(values, dtype=np.float64))
    a = a[np.isfinite(a) & (a > 0)]
    return float(np.percentile(a, percentile)) if a.size else 1.0


# -- figures -----------------------------------------------------------------------------

def grounding(run, out_dir: str) -> str:
    g = analysis.grounding(run)
    fig, (a, b) = _figure(10, 3.8, ncols=2)
    steps = run.steps
    a.plot(steps, run.loss_after - run.loss_before, color=GREY, label="ΔL measured")
    a.plot(steps, run.lca_sum, "--", color="k", label="ΣLCA")
    a.set(xlabel="iteration", ylabel="loss change per step",
          title="ΣLCA vs ΔL: whole-run relative error " + (
              f"{g['relative_error']:.1e}" if np.isfinite(g["relative_error"])
              else "n/a (ΔL = 0)"))
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=8)
    err = np.maximum(run.error, 1e-16)
    b.semilogy(steps, err, color="k")
    b.set_ylim(err.min() / 3, err.max() * 3)     # a range even when every error is 0
    flagged = analysis.doubtful_steps(run)
    for key, label, marker in FLAG_MARKERS:
        at = np.isin(steps, flagged[key])
        if at.any():
            b.plot(steps[at], err[at], ls="none", label=f"{label} ({int(at.sum())})",
                   **marker)
    b.set(xlabel="iteration", ylabel="|ΣLCA − ΔL| (loss units)",
          title=f"Per-step error: max {np.max(run.error):.1e}" + (
              "" if any(flagged.values()) else "\nevery step grounded"))
    if any(flagged.values()):
        _legend_outside(b, fontsize=8)
    return _save(fig, os.path.join(out_dir, "grounding.png"))


# the doubtful steps' markers (lca_ext.analysis.doubtful_steps), as on the
# interactive page
FLAG_MARKERS = (("ungrounded", "not grounded", dict(marker="x", color=RED, ms=7)),
                ("budget_limited", "stopped at the pass budget",
                 dict(marker="D", mfc="none", mec="#9467bd", ms=8)),
                ("noise_limited", "at the rounding floor",
                 dict(marker="o", mfc="none", mec="#8c564b", ms=10)))


def helped_fraction(run, out_dir: str) -> str:
    hf = analysis.helped_fraction(run)
    groups = _groups(run)
    counts = analysis.group_sum(np.moveaxis(run.layer_counts(), -1, -2), groups)  # [T, 4, G]
    per_group = counts[:, 0] / np.maximum(counts.sum(1), 1)
    fig, ax = _figure(9, 3.8)
    colours, mappable = _series_colours(len(groups["names"]))
    for i, name in enumerate(groups["names"]):
        ax.plot(run.steps, 100 * per_group[:, i], lw=1, color=colours[i],
                label=_short(name) if mappable is None else None)
    ax.plot(run.steps, 100 * hf["overall"], color="k", lw=2, label="all parameters")
    ax.axhline(50, color=GREY, ls=":", label="50%")
    ax.set(xlabel="iteration", ylabel="% of parameters that helped",
           title=f"{100 * hf['overall'].mean():.1f}% of parameters helped per step (mean)")
    if mappable is not None:
        _order_colourbar(fig, ax, mappable, groups["names"], "layer group (model order)")
    _legend_outside(ax)
    return _save(fig, os.path.join(out_dir, "helped_fraction.png"))


def heroes_villains(run, out_dir: str) -> str:
    hv = analysis.helped_iterations_distribution(run)
    fig, ax = _figure(7, 3.6)
    centres = (hv["edges"][:-1] + hv["edges"][1:]) / 2
    ax.bar(100 * centres, hv["hist"], width=100 * np.diff(hv["edges"]),
           color=[GREEN if c >= 0.5 else RED for c in centres])
    most = hv["hist"][centres >= 0.5].sum() / max(hv["hist"].sum(), 1)
    ax.set(xlabel="% of iterations the parameter helped", ylabel="parameters",
           title=f"{100 * most:.1f}% of parameters helped in at least half the steps "
                 f"({hv['idle']} idle left out)")
    return _save(fig, os.path.join(out_dir, "heroes_villains.png"))


def lca_histogram(run, out_dir: str) -> str:
    s = analysis.lca_value_summary(run)
    hist, centres = s["hist"], s["centres"]
    fig, ax = _figure(8, 3.8)
    pos = np.arange(len(hist))
    ax.bar(pos, hist, color=[GREEN if c < 0 else RED if c > 0 else GREY for c in centres])
    ticks = pos[:: max(1, len(pos) // 8)]
    ax.set_xticks(ticks, [f"{centres[i]:.0e}" for i in ticks], fontsize=7)
    ax.set_yscale("log")
    ax.set(xlabel="LCA value (signed log bins)", ylabel="count (all steps, parameters)",
           title=f"LCA values: mean {s['mean']:.1e}, std {s['std']:.1e}")
    _fit_ticklabels(fig, ax.xaxis)
    return _save(fig, os.path.join(out_dir, "lca_histogram.png"))


def layers(run, out_dir: str, top_k: int = 6) -> str:
    """Per-group total LCA (bars, one row each) and the cumulative LCA of the
    ``top_k`` groups by |total|, the rest summed into one grey line."""
    groups = _groups(run)
    lt = analysis.layer_totals(run)
    total = analysis.group_sum(lt["total"], groups)
    cumulative = analysis.group_sum(lt["cumulative"], groups)
    names = groups["names"]
    n = len(names)
    fig, (a, b) = _figure(12, max(3.8, 0.3 * n + 1.5), ncols=2, width_ratios=[1, 1.4])
    error = analysis.group_sum(lt["error"], groups)
    a.barh(np.arange(n), total, color=[GREEN if v < 0 else RED for v in total],
           xerr=np.nan_to_num(error), error_kw=dict(ecolor="k", lw=0.8, capsize=2))
    a.axvline(0, color="k", lw=0.5)
    a.invert_yaxis()                                   # model order, top to bottom
    hurt = int((lt["total"] > 0).sum())
    unit = "layers" if n == len(lt["names"]) else f"layers ({n} groups shown)"
    a.set(xlabel="total LCA (loss units)",
          title=f"{hurt} of {len(lt['names'])} {unit} hurt overall")
    _category_ticks(fig, a, names, axis="y")
    top = np.argsort(-np.abs(total))[:top_k] if n > top_k else np.arange(n)
    colours, _ = _series_colours(len(top))
    # the cumulative values' 95% bars as bands (at up to 200 steps of a long run)
    at = _thin(len(run), 200) if len(run) else np.zeros(0, int)
    band = analysis.group_sum(analysis.cumulative_layer_error(run, at), groups)
    for c, i in zip(colours, sorted(top)):
        b.plot(run.steps, cumulative[:, i], color=c, label=_short(names[i]))
        b.fill_between(run.steps[at], cumulative[at, i] - band[:, i],
                       cumulative[at, i] + band[:, i], color=c, alpha=0.2, lw=0)
    rest = np.setdiff1d(np.arange(n), top)
    if rest.size:
        b.plot(run.steps, cumulative[:, rest].sum(1), color=GREY, ls="--",
               label=f"rest ({rest.size} groups)")
    b.axhline(0, color="k", lw=0.5)
    b.set(xlabel="iteration", ylabel="cumulative LCA (bands: 95% bars)",
          title=f"Cumulative LCA, top {len(top)} of {n} by |total|")
    _legend_outside(b)
    return _save(fig, os.path.join(out_dir, "layers.png"))


def neuron_heatmap(run, out_dir: str, tensor: int = 0, max_rows: int = 400,
                   percentile: float = 99.0) -> str:
    """Per-neuron LCA over time; the colour scale is symmetric and clipped at the
    ``percentile`` of |value|; more than ``max_rows`` neurons are summed in bins."""
    h = analysis.neuron_heatmap(run, tensor)           # [T, rows]
    rows = h.shape[1]
    per = -(-rows // max_rows)
    if per > 1:                                        # sum neighbouring rows
        pad = per * (-(-rows // per)) - rows
        h = np.pad(h, ((0, 0), (0, pad))).reshape(h.shape[0], -1, per).sum(-1)
    lim = _clip_limit(h, percentile)
    fig, ax = _figure(9, 4)
    im = ax.imshow(h.T, aspect="auto", cmap=LCA_CMAP, vmin=-lim, vmax=lim,
                   extent=[run.steps[0], run.steps[-1] + 1, rows, 0], interpolation="nearest")
    fig.colorbar(im, ax=ax, label=f"LCA (clipped at ±{lim:.1e}, {percentile:g}th pct of |LCA|)")
    helped = (analysis.neuron_heatmap(run, tensor).sum(0) < 0).mean()
    rows_label = f"neuron of {_short(run.names[tensor], 32)}"
    if per > 1:
        rows_label += f" ({per} per row)"
    ax.set(xlabel="iteration", ylabel=rows_label,
           title=f"Per-neuron LCA: {100 * helped:.0f}% of {rows} neurons helped overall")
    return _save(fig, os.path.join(out_dir, "neurons.png"))


def class_layers(run, out_dir: str) -> str:
    groups = _groups(run)
    cls = analysis.group_sum(run.class_layer_sums().sum(0), groups)   # [C, G]
    lim = _clip_limit(cls, 100.0)
    fig, ax = _figure(max(6, 0.5 * len(groups["names"]) + 3), 4.5)
    im = ax.imshow(cls, cmap=LCA_CMAP, vmin=-lim, vmax=lim, aspect="auto")
    fig.colorbar(im, ax=ax, label="total LCA")
    ax.set(ylabel="class", title=f"LCA per class and layer: {int((cls > 0).sum())} of "
           f"{cls.size} hurt")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _category_ticks(fig, ax, groups["names"])
    return _save(fig, os.path.join(out_dir, "class_layers.png"))


def synchronization(run, out_dir: str, sync: List[Dict], cls: int = 0, top_k: int = 10) -> str:
    """One panel per layer (group) of class ``cls``'s LCA over time, each with its
    own y scale, and the ``top_k`` deepest minima marked."""
    groups = _groups(run)
    series = analysis.group_sum(run.class_layer_sums()[:, cls, :], groups)   # [T, G]
    per_layer = len(groups["names"]) == len(run.layer_names)
    n = series.shape[1]
    fig, axes = _figure(10, 0.85 * n + 1.4, nrows=n, sharex=True, squeeze=False)
    for i, ax in enumerate(axes[:, 0]):
        peaks = (sync[cls]["peaks"][i] if per_layer
                 else analysis.peak_moments(series[:, i], top_k))
        ax.plot(run.steps, series[:, i], lw=1, color="k")
        ax.plot(run.steps[peaks], series[peaks, i], "v", color=GREEN, ms=5)
        ax.axhline(0, color=GREY, lw=0.5)
        ax.set_ylabel(_short(groups["names"][i], 18), rotation=0, ha="right", va="center",
                      fontsize=8)
        ax.yaxis.set_major_locator(MaxNLocator(2))
        ax.tick_params(axis="y", labelsize=7)
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    axes[-1, 0].set_xlabel("iteration")
    s = sync[cls]
    fig.suptitle(f"Class {cls}: all layers peak together at {s['observed']} iterations "
                 f"(null mean {s['null_mean']:.1f}, p = {s['p_value']:.3f}); "
                 f"y: LCA per step, ▼ deepest minima", fontsize=9)
    return _save(fig, os.path.join(out_dir, "synchronization.png"))


def concentration(run, out_dir: str) -> str:
    """Cumulative shares of learning over parameters sorted by learning, and
    oscillation histograms.

    Two curves on one x axis (% of all parameters, largest learning first): the
    share of the *helped* total (Σ of negative total LCA; rises to 1 and stays),
    and the share of *net* learning (helped − hurt), which overshoots 1 before the
    hurting parameters at the end pull it back to exactly 1."""
    total = analysis.parameter_totals(run)
    hc = analysis.helped_concentration(run)
    learning = np.sort(-total)[::-1]
    helped = np.clip(learning, 0, None)
    idx = _thin(learning.size)
    net = learning.sum()
    if net > 0:
        net_curve = np.cumsum(learning) / net
        peak = int(np.argmax(net_curve))
        idx = np.union1d(idx, [peak])
    x = 100 * (idx + 1) / learning.size
    fig, (a, b) = _figure(12, 4.2, ncols=2)
    a.plot(x, (np.cumsum(helped) / max(helped.sum(), 1e-300))[idx], color=GREEN,
           label="share of helped total (Σ negative LCA)")
    if net > 0:
        a.plot(x, net_curve[idx], color=GREY, ls="--",
               label=f"share of net learning (peaks at {net_curve[peak]:.2f}:\n"
                     "hurting parameters pull it back to 1)")
    else:   # the loss rose over the run: no net learning to take shares of
        a.plot([], [], color=GREY, ls="--",
               label=f"no share of net learning: Σ total LCA = {-net:+.3g} ≥ 0")
    a.axhline(1.0, color="k", lw=0.8)
    a.axhline(0.9, color=GREY, ls=":", lw=0.8)
    a.set(xlabel="% of parameters (largest learning first)", ylabel="cumulative share",
          title=(f"90% of helped total from {100 * hc['of_all']:.2f}% of parameters"
                 if np.isfinite(hc["of_all"]) else "No parameter helped"))
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=8)
    t = max(len(run), 1)
    means = []
    for key, color, label in (("direction_changes", "k", "weight direction"),
                              ("grad_sign_changes", GREY, "gradient sign")):
        if key in run.state:
            c = np.concatenate([s.ravel() for s in run.state[key]])
            c = c[c > 0]
            if c.size:
                b.hist(t / c, bins=40, histtype="step", color=color, label=label)
                means.append(f"{label} {np.mean(t / c):.1f}")
    b.set(xlabel="tracked steps between changes", ylabel="parameters",
          title="Mean steps between changes: " + (", ".join(means) or "not tracked"))
    if means:
        _legend_outside(b)
    return _save(fig, os.path.join(out_dir, "concentration_oscillation.png"))


def gini_per_layer(run, out_dir: str) -> str:
    """Helped and hurt Gini per layer (group), beside the whole model's."""
    groups = _groups(run)
    total = analysis.parameter_totals(run)
    slices = analysis.layer_slices(run)
    names = groups["names"]
    helped, hurt = [], []
    for g in range(len(names)):
        v = np.concatenate([total[slices[l]] for l in np.flatnonzero(groups["of"] == g)])
        gg = analysis.helped_hurt_gini(v)
        helped.append(gg["helped"])
        hurt.append(gg["hurt"])
    overall = analysis.helped_hurt_gini(total)
    n = len(names)
    fig, ax = _figure(8, max(3.6, 0.35 * n + 1.5))
    pos = np.arange(n)
    ax.barh(pos - 0.2, helped, 0.4, color=GREEN, label="helped Gini")
    ax.barh(pos + 0.2, hurt, 0.4, color=RED, label="hurt Gini")
    ax.invert_yaxis()
    ax.set(xlim=(0, 1), xlabel="Gini (0 = equal shares, 1 = one parameter)",
           title=f"Helped Gini {overall['helped']:.2f}, hurt Gini {overall['hurt']:.2f} "
                 f"(whole model)")
    _category_ticks(fig, ax, names, axis="y")
    _legend_outside(ax)
    return _save(fig, os.path.join(out_dir, "gini_layers.png"))


def overfitting(run, out_dir: str, eval_set: str = "val") -> str:
    """Per-layer (group) total LCA on the LCA set against the eval set."""
    of = analysis.overfitting(run, eval_set)
    groups = _groups(run)
    train = analysis.group_sum(of["train_layer_totals"], groups)
    val = analysis.group_sum(of["val_layer_totals"], groups)
    pos = np.arange(len(groups["names"]))
    fig, ax = _figure(max(7, 0.5 * len(pos) + 3), 4)
    ax.bar(pos - 0.2, train, 0.4, color=GREEN, label="train (LCA set)")
    ax.bar(pos + 0.2, val, 0.4, color=BLUE, label=eval_set)
    ax.axhline(0, color="k", lw=0.5)
    ax.set(ylabel="total LCA", title=f"Train vs {eval_set}: {100 * of['neuron_fraction']:.1f}% "
           f"of neurons help train but hurt {eval_set}")
    _category_ticks(fig, ax, groups["names"])
    _legend_outside(ax)
    return _save(fig, os.path.join(out_dir, "overfitting.png"))


def comparison(runs, labels: List[str], out_dir: str) -> str:
    """Runs side by side: loss curves and per-layer (group) totals, grouped by
    the first run's layer names."""
    if len(runs) != len(labels) or not runs:
        raise ValueError(f"lca_ext: comparison needs one label per run, got {len(runs)} "
                         f"runs and {len(labels)} labels")
    groups = _groups(runs[0])
    names = groups["names"]
    colours, mappable = _series_colours(len(runs))
    fig, (a, b) = _figure(12, 4.2, ncols=2)
    width = 0.8 / len(runs)
    for i, (r, label, c) in enumerate(zip(runs, labels, colours)):
        a.plot(r.steps, r.loss_after, color=c, label=_short(label))
        total = analysis.group_sum(analysis.layer_totals(r)["total"], groups)
        b.bar(np.arange(len(names)) + (i - (len(runs) - 1) / 2) * width, total, width, color=c,
              label=_short(label))
    a.set(xlabel="iteration", ylabel="loss (LCA set)", title="Loss")
    b.axhline(0, color="k", lw=0.5)
    b.set(ylabel="total LCA", title="LCA per layer" + (" group" if len(names) <
                                                      len(runs[0].layer_names) else ""))
    _category_ticks(fig, b, names)
    if mappable is None:
        _legend_outside(b)
    else:
        _order_colourbar(fig, b, mappable, labels, "run")
    return _save(fig, os.path.join(out_dir, "compare.png"))


def first_layer_animation(run, out_dir: str, max_tiles: int = 49, max_frames: int = 12,
                          percentile: float = 99.0) -> str:
    """A small animated GIF of the per-element LCA frames of the first frame
    tensor when its rows are 28x28 images: the first ``max_tiles`` units' incoming
    weights as tiles (green helps, red hurts, one symmetric scale clipped at the
    ``percentile`` of |LCA|), at most ``max_frames`` frames spread over the run
    (first and last kept), in a 16-colour palette.  "" when there is nothing to
    draw (the interactive page shows every frame)."""
    from PIL import Image

    keys = [k for k in run.frames if k != "step"]
    if not keys:
        return ""
    frames = np.asarray(run.frames[keys[0]])
    if frames.ndim != 3 or frames.shape[-1] != 784:
        return ""
    frames = frames[_thin(len(frames), max_frames)]
    units = min(frames.shape[1], max_tiles)
    side = int(np.ceil(np.sqrt(units)))
    lim = _clip_limit(frames[:, :units], percentile)
    images = []
    for f in frames:
        grid = np.zeros((side * 29 - 1, side * 29 - 1))
        for u in range(units):
            r, c = divmod(u, side)
            grid[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = f[u].reshape(28, 28)
        rgb = Image.fromarray(_lca_rgb(grid, lim))
        images.append(rgb.quantize(colors=16, method=Image.Quantize.MEDIANCUT))
    path = os.path.join(out_dir, "first_layer.gif")
    images[0].save(path, save_all=True, append_images=images[1:], duration=400, loop=0,
                   optimize=True)
    return path


def _lca_rgb(values: np.ndarray, limit: Optional[float] = None) -> np.ndarray:
    from .tensorboard import lca_image
    return lca_image(values, limit)
