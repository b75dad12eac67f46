"""The interactive report: one self-contained HTML page with a step slider and a
play button over a run (``write_interactive(run, path)``).

It shows, per slider step: the per-parameter LCA of the tracked frame tensors
(the paper's video), the LCA per layer, the [class x layer] LCA (with
num_classes), and a marker on the loss and |ΣLCA − ΔL| curves.  The page is
drawn by plotly (the "demo" extra); plotly.js is embedded once, so the file
opens offline.  Its data is bounded: big frames are pooled by summing blocks of
parameters (LCA is additive, so a pooled cell is the LCA of its block), and the
numbers of slider steps, frames, layers and classes are capped (:class:`Bounds`);
arrays are embedded as base64 typed arrays (float32)."""
from __future__ import annotations

import html
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from . import analysis
from ._extras import missing, require
from .run import Run, load_run

__all__ = ["Bounds", "write_interactive", "report_link", "pool_frame", "group_layers"]

FILE_NAME = "interactive.html"
# green = negative LCA (helped), white = 0, red = positive LCA (hurt)
COLORSCALE = [[0.0, "#1a9641"], [0.5, "#ffffff"], [1.0, "#d7191c"]]


@dataclass(frozen=True)
class Bounds:
    """Caps on what the page embeds (its size beyond plotly.js grows with these).

    max_steps    slider steps (evenly spaced over the tracked steps)
    max_frames   distinct per-parameter frames (evenly spaced over run.frames)
    max_cells    heatmap cells per frame, over all frame tensors together;
                 bigger tensors are pooled by summing square blocks
    max_tensors  frame tensors shown (the first ones)
    max_layers   per-layer columns; more layers are grouped by block, as the
                 static report groups them (lca_ext.analysis.layer_groups)
    max_classes  class rows; more classes keep the biggest |LCA| and sum the rest
    """
    max_steps: int = 200
    max_frames: int = 40
    max_cells: int = 8192
    max_tensors: int = 3
    max_layers: int = 24
    max_classes: int = 20

    def __post_init__(self):
        for name, value in vars(self).items():
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"lca_ext.interactive.Bounds: {name} must be a positive "
                                 f"integer, got {value!r}")

    def max_data_bytes(self) -> int:
        """An upper bound on the page's data beyond plotly.js: the pooled frames
        (float32, base64: 16/3 bytes a cell) and, per slider step, the frames'
        visibility flags, the bars, the class x layer cells and the markers."""
        frames = self.max_frames * (self.max_cells * 16 // 3 + 200)
        per_step = (self.max_frames * self.max_tensors * 40 + self.max_layers * 40
                    + self.max_classes * self.max_layers * 6 + 500)
        return frames + self.max_steps * per_step


# ---------------------------------------------------------------------------
# data: pooling, grouping, sampling (plain numpy, tested without plotly)

def as_matrix(values: np.ndarray) -> np.ndarray:
    """A tensor's values as rows (dim 0) x the rest flattened; 0-d and 1-d
    tensors are one row."""
    values = np.asarray(values)
    if values.ndim <= 1:
        return values.reshape(1, -1)
    return values.reshape(values.shape[0], -1)


def block_side(rows: int, cols: int, max_cells: int) -> int:
    """The smallest square block side b with ceil(rows/b)·ceil(cols/b) ≤ max_cells."""
    b = max(1, int(np.ceil(np.sqrt(rows * cols / max_cells))))
    while -(-rows // b) * -(-cols // b) > max_cells:
        b += 1
    return b


def pool_frame(values: np.ndarray, side: int) -> np.ndarray:
    """Sums of ``side`` x ``side`` blocks of ``as_matrix(values)`` (the last
    blocks of a row or column may be smaller): each cell is its block's LCA."""
    m = as_matrix(values).astype(np.float64)
    m = np.add.reduceat(m, np.arange(0, m.shape[0], side), axis=0)
    return np.add.reduceat(m, np.arange(0, m.shape[1], side), axis=1)


def group_layers(names: Sequence[str], max_groups: int) -> Tuple[List[str], np.ndarray]:
    """(group names, group index of each layer): the static report's grouping
    (:func:`lca_ext.analysis.layer_groups`: by block, e.g. a GPT-2's modules
    become "transformer.h.3"), so both pages show the same groups."""
    groups = analysis.layer_groups(list(names), max_groups)
    return list(groups["names"]), np.asarray(groups["of"])


def sum_groups(values: np.ndarray, group_of: np.ndarray, num_groups: int) -> np.ndarray:
    """Sums the last axis of ``values`` by group."""
    out = np.zeros((*values.shape[:-1], num_groups))
    for j, g in enumerate(group_of):
        out[..., g] += values[..., j]
    return out


def evenly(n: int, cap: int) -> np.ndarray:
    """At most ``cap`` indices into range(n), evenly spaced, first and last kept."""
    if n <= cap:
        return np.arange(n)
    return np.unique(np.round(np.linspace(0, n - 1, cap)).astype(np.int64))


def top_classes(class_layer: np.ndarray, cap: int) -> Tuple[List[str], np.ndarray]:
    """(row labels, [T, rows, L]): every class if there are at most ``cap``;
    else the cap − 1 classes with the largest total |LCA| and one row summing
    the others."""
    num = class_layer.shape[1]
    if num <= cap:
        return [f"class {c}" for c in range(num)], class_layer
    keep = np.sort(np.argsort(-np.abs(class_layer).sum(axis=(0, 2)), kind="stable")[:cap - 1])
    rest = np.setdiff1d(np.arange(num), keep)
    rows = np.concatenate([class_layer[:, keep], class_layer[:, rest].sum(1, keepdims=True)], 1)
    return [f"class {c}" for c in keep] + [f"other {rest.size} classes"], rows


def frame_index(frame_steps: np.ndarray, step: int) -> int:
    """The frame shown at ``step``: the latest taken at or before it (else the first)."""
    return max(int(np.searchsorted(frame_steps, step, side="right")) - 1, 0)


def symmetric_limit(values: Sequence[np.ndarray], quantile: float = 0.995) -> float:
    """A colour limit ±lim shared by all frames: a high quantile of |values|, so a
    few outliers do not wash the rest out (hover shows the true values)."""
    flat = np.concatenate([np.abs(np.ravel(v)) for v in values]) if values else np.zeros(1)
    lim = float(np.quantile(flat, quantile)) if flat.size else 0.0
    return lim if lim > 0 else float(flat.max(initial=0.0)) or 1.0


@dataclass
class PageData:
    """What the page shows, bounded, independent of plotly."""
    steps: np.ndarray                # [S] slider steps (run step numbers)
    step_rows: np.ndarray            # [S] their rows in the run's arrays
    tensors: List[str]               # frame tensor names shown
    sides: List[int]                 # pooling block side per tensor
    frame_steps: np.ndarray          # [F] steps of the frames kept
    frames: List[List[np.ndarray]]   # [tensor][frame] pooled float32 matrices
    shown_frame: np.ndarray          # [S] frame index shown at each slider step
    groups: List[str]                # layer (group) names
    layer_lca: np.ndarray            # [S, G]
    class_rows: List[str]            # class row labels (empty without num_classes)
    class_lca: np.ndarray            # [S, rows, G]
    frame_lims: List[float]          # [F] each kept frame's colour limit (±)


def page_data(run: Run, bounds: Bounds) -> PageData:
    rows = evenly(len(run), bounds.max_steps)
    keys = [k for k in run.frames if k != "step"][:bounds.max_tensors]
    kept = evenly(len(run.frames["step"]), bounds.max_frames) if keys else np.zeros(0, int)
    frame_steps = np.asarray(run.frames["step"])[kept] if keys else np.zeros(0, np.int64)
    per_tensor = bounds.max_cells // max(len(keys), 1)
    tensors, sides, frames = [], [], []
    for k in keys:
        raw = run.frames[k]
        shape = as_matrix(raw[0]).shape
        side = block_side(shape[0], shape[1], per_tensor)
        tensors.append(run.names[int(k)])
        sides.append(side)
        frames.append([pool_frame(raw[f], side).astype(np.float32) for f in kept])
    steps = run.steps[rows]
    shown = np.array([frame_index(frame_steps, s) for s in steps], dtype=np.int64)
    groups, group_of = group_layers(run.layer_names, bounds.max_layers)
    layer_lca = sum_groups(run.layer_sums()[rows], group_of, len(groups)).astype(np.float32)
    class_rows, class_lca = [], np.zeros((len(rows), 0, len(groups)))
    if run.meta.get("num_classes"):
        class_rows, by_class = top_classes(run.class_layer_sums()[rows], bounds.max_classes)
        class_lca = sum_groups(by_class, group_of, len(groups)).astype(np.float32)
    # a colour scale per frame: one fixed for the run left the early, small
    # frames nearly blank
    lims = [symmetric_limit([per[f] for per in frames]) for f in range(len(frame_steps))]
    return PageData(steps, rows, tensors, sides, frame_steps, frames, shown, groups,
                    layer_lca, class_rows, class_lca, lims)


# ---------------------------------------------------------------------------
# the figure (plotly)

def _layout_rows(data: PageData) -> Tuple[list, list, list]:
    """make_subplots specs, row heights in pixels and titles: one full-width row
    per frame tensor (a one-row tensor, e.g. a bias, gets a thin one), then
    loss | grounding, then layers | class x layer."""
    specs, heights, titles = [], [], []
    for name, side, per_frame in zip(data.tensors, data.sides, data.frames):
        specs.append([{"colspan": 2}, None])
        heights.append(420 if per_frame[0].shape[0] > 1 else 170)
        pooled = f" (cells: sums of {side}x{side} parameters)" if side > 1 else ""
        titles += [f"LCA per parameter of {name}{pooled}"]
    specs.append([{}, {}])
    heights.append(300)
    titles += ["loss (LCA set)", "|ΣLCA − ΔL| per step"]
    if data.class_rows:
        specs.append([{}, {}])
        titles += ["LCA per layer", "LCA per class and layer"]
    else:
        specs.append([{"colspan": 2}, None])
        titles += ["LCA per layer"]
    heights.append(330 + 8 * max(len(data.class_rows) - 10, 0))
    return specs, heights, titles


def _frame_traces(go, data: PageData) -> List:
    """Heatmaps of every tensor's kept frames, tensor by tensor; each is named
    "<tensor> @ <frame step>" (the browser check reads the visible one's name)."""
    traces = []
    for name, side, per_frame in zip(data.tensors, data.sides, data.frames):
        block = f" (block of {side}x{side})" if side > 1 else ""
        for f, z in enumerate(per_frame):
            step = int(data.frame_steps[f])
            traces.append(go.Heatmap(
                z=z, x0=0, dx=side, y0=0, dy=side, coloraxis="coloraxis",
                visible=bool(f == data.shown_frame[0]), name=f"{name} @ {step}",
                hovertemplate=(f"{html.escape(name)}, frame of step {step}<br>"
                               f"row %{{y}}, col %{{x}}{block}<br>LCA %{{z:.3g}}<extra></extra>")))
    return traces


def _bar_colors(values: np.ndarray) -> List[str]:
    return [COLORSCALE[0][1] if v < 0 else COLORSCALE[2][1] for v in values]


def build_figure(run: Run, bounds: Bounds = Bounds()):
    """The plotly Figure of the interactive page."""
    require("the interactive report", ["plotly"])
    return _figure(run, page_data(run, bounds))


def _figure(run: Run, data: PageData):
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    specs, heights, titles = _layout_rows(data)
    # pixels: the rows, 100 between rows (titles, axis labels), margins 130 + 60
    height = sum(heights) + 100 * (len(heights) - 1) + 190
    fig = make_subplots(rows=len(specs), cols=2, specs=specs, row_heights=heights,
                        subplot_titles=titles, vertical_spacing=100 / (height - 190),
                        horizontal_spacing=0.08)
    nt = len(data.tensors)
    heat_ids = _add_frames(fig, go, data)
    markers = _add_curves(fig, go, run, data, row=nt + 1)
    bar_id, class_id = _add_layers(fig, go, data, row=nt + 2)
    fig.frames = [_step_frame(go, data, j, heat_ids, markers, bar_id, class_id,
                              run.loss_after, run.error) for j in range(len(data.steps))]
    lim = data.frame_lims[data.shown_frame[0]] if data.frame_lims else 1.0
    _layout(fig, data, lim, nt, height)
    return fig


def _add_frames(fig, go, data: PageData) -> List[int]:
    """One heatmap per tensor and kept frame (only the current one visible: a
    slider step flips visibility instead of re-sending the frame's cells)."""
    for i, trace in enumerate(_frame_traces(go, data)):
        fig.add_trace(trace, row=1 + i // len(data.frame_steps), col=1)
    for t in range(len(data.tensors)):
        one_row = data.frames[t][0].shape[0] == 1
        fig.update_yaxes(autorange="reversed", title_text="" if one_row else "row (dim 0)",
                         showticklabels=not one_row, row=t + 1, col=1)
        fig.update_xaxes(title_text="column (other dims flattened)", row=t + 1, col=1)
    return list(range(len(fig.data)))


def _add_curves(fig, go, run: Run, data: PageData, row: int) -> List[int]:
    """The loss and |ΣLCA − ΔL| curves, each with a marker that follows the
    slider; returns the markers' trace indices."""
    loss, err = run.loss_after, run.error
    s0, row0 = data.steps[0], data.step_rows[0]
    markers = []
    for col, values, name, color in ((1, loss, "loss after step", "#444"),
                                     (2, err, "|ΣLCA − ΔL|", "#1f77b4")):
        fig.add_trace(go.Scatter(x=run.steps, y=values.astype(np.float32), mode="lines",
                                 name=name, line=dict(color=color), showlegend=False),
                      row=row, col=col)
        if col == 2:
            _add_flags(fig, go, run, row, col)
        markers.append(len(fig.data))
        fig.add_trace(go.Scatter(x=[s0], y=[float(values[row0])], mode="markers",
                                 name="this step", marker=dict(size=11, color="#ff7f0e"),
                                 showlegend=False), row=row, col=col)
    fig.update_xaxes(title_text="step", row=row)
    if np.all(err > 0):
        fig.update_yaxes(type="log", row=row, col=2)
    return markers


# the doubtful steps' markers (lca_ext.analysis.doubtful_steps), in the legend
FLAG_MARKERS = (("ungrounded", "not grounded", dict(symbol="x", color="red", size=9)),
                ("budget_limited", "stopped at the pass budget",
                 dict(symbol="diamond-open", color="#9467bd", size=11)),
                ("noise_limited", "at the rounding floor",
                 dict(symbol="circle-open", color="#8c564b", size=13)))


def _add_flags(fig, go, run: Run, row: int, col: int) -> None:
    """One marker trace per kind of doubtful step on the error curve, each a
    legend entry with its count (the only entries of the page's legend)."""
    flagged = analysis.doubtful_steps(run)
    for key, label, marker in FLAG_MARKERS:
        at = np.isin(run.steps, flagged[key])
        if at.any():
            fig.add_trace(go.Scatter(x=run.steps[at], y=run.error[at].astype(np.float32),
                                     mode="markers", name=f"{label} ({int(at.sum())})",
                                     marker=marker, showlegend=True), row=row, col=col)


def _add_layers(fig, go, data: PageData, row: int) -> Tuple[int, Optional[int]]:
    """The per-layer bars and the class x layer heatmap of the first step;
    returns their trace indices (None without classes)."""
    bar_id = len(fig.data)
    fig.add_trace(go.Bar(x=data.groups, y=data.layer_lca[0],
                         marker_color=_bar_colors(data.layer_lca[0]), name="LCA per layer",
                         showlegend=False,
                         hovertemplate="%{x}<br>LCA %{y:.4g}<extra></extra>"), row=row, col=1)
    # a fixed range: bars of different steps compare by height
    span = np.abs(data.layer_lca).max(initial=0.0) * 1.05 or 1.0
    fig.update_yaxes(range=[-span, span], title_text="LCA (−: helped)", row=row, col=1)
    if not data.class_rows:
        return bar_id, None
    fig.add_trace(go.Heatmap(z=data.class_lca[0], x=data.groups, y=data.class_rows,
                             coloraxis="coloraxis2",
                             hovertemplate="%{y}, %{x}<br>LCA %{z:.4g}<extra></extra>"),
                  row=row, col=2)
    fig.update_yaxes(autorange="reversed", row=row, col=2)
    return bar_id, bar_id + 1


def _step_frame(go, data: PageData, j: int, heat_ids, markers, bar_id, class_id, loss, err):
    """The plotly frame of slider step j: which pooled frame is visible, the
    markers, the per-layer bars and the class x layer heatmap."""
    shown = data.shown_frame[j]
    per = len(data.frame_steps)
    traces = [go.Heatmap(visible=bool(i % per == shown)) for i in range(len(heat_ids))]
    row, step = data.step_rows[j], int(data.steps[j])
    traces += [go.Scatter(x=[step], y=[float(loss[row])]),
               go.Scatter(x=[step], y=[float(err[row])]),
               go.Bar(y=data.layer_lca[j], marker_color=_bar_colors(data.layer_lca[j]))]
    ids = heat_ids + markers + [bar_id]
    if class_id is not None:
        traces.append(go.Heatmap(z=data.class_lca[j]))
        ids.append(class_id)
    lim = data.frame_lims[shown] if data.frame_lims else 1.0
    return go.Frame(name=str(step), data=traces, traces=ids,
                    layout=dict(coloraxis=dict(cmin=-lim, cmax=lim)))


def _layout(fig, data: PageData, lim: float, nt: int, height: int) -> None:
    # colour bars beside what they colour: all frame rows, and the class panel
    frame_domain = ((fig.get_subplot(nt, 1).yaxis.domain[0],
                     fig.get_subplot(1, 1).yaxis.domain[1]) if nt else (0, 1))
    class_domain = fig.get_subplot(nt + 2, 2).yaxis.domain if data.class_rows else (0, 1)
    class_lim = float(np.abs(data.class_lca).max(initial=0.0)) or 1.0
    curves = fig.get_subplot(nt + 1, 2)
    curves_x, curves_y = curves.xaxis.domain, curves.yaxis.domain
    fig.update_layout(
        height=height, template="plotly_white",
        margin=dict(t=130, b=60, l=70, r=40),
        # every panel is titled; the legend lists only the doubtful steps' markers,
        # inside the error panel (at the top it would sit on the slider)
        showlegend=True,
        legend=dict(x=curves_x[1], y=curves_y[1], xanchor="right", yanchor="top",
                    bgcolor="rgba(255,255,255,0.8)", font=dict(size=10)),
        coloraxis=dict(colorscale=COLORSCALE, cmin=-lim, cmax=lim,
                       colorbar=dict(title="LCA", len=frame_domain[1] - frame_domain[0],
                                     y=frame_domain[0], yanchor="bottom")),
        coloraxis2=dict(colorscale=COLORSCALE, cmin=-class_lim, cmax=class_lim,
                        colorbar=dict(title="LCA", len=class_domain[1] - class_domain[0],
                                      y=class_domain[0], yanchor="bottom")),
        sliders=[dict(active=0, y=1.0, yanchor="bottom", x=0.08, len=0.92,
                      pad=dict(t=0, b=45), currentvalue=dict(prefix="step ", font=dict(size=15)),
                      ticklen=2, font=dict(size=9),
                      steps=[dict(method="animate", label=str(int(s)),
                                  args=[[str(int(s))], _animation(0, redraw=True)])
                             for s in data.steps])],
        updatemenus=[dict(type="buttons", direction="left", x=0, y=1.0, yanchor="bottom",
                          xanchor="left", pad=dict(t=0, b=50, r=10),
                          buttons=[dict(label="▶ play", method="animate",
                                        args=[None, dict(_animation(250, redraw=True),
                                                         fromcurrent=True)]),
                                   dict(label="❚❚", method="animate",
                                        args=[[None], _animation(0, redraw=False)])])])


def _animation(frame_ms: int, redraw: bool) -> dict:
    """Plotly.animate options: no tweening (heatmaps cannot tween), jump at once."""
    return dict(mode="immediate", transition=dict(duration=0),
                frame=dict(duration=frame_ms, redraw=redraw))


# ---------------------------------------------------------------------------
# the page

def _notes(run: Run, data: PageData) -> str:
    pooled = [f"{n}: {s}x{s} blocks" for n, s in zip(data.tensors, data.sides) if s > 1]
    parts = [
        "Drag the slider or press play: every panel shows the selected step. Negative LCA "
        "(green) = the parameter helped lower the loss; positive (red) = it hurt; the "
        "colour scales are symmetric around 0 and saturate at a high quantile of |LCA| "
        "(the parameter frames' scale is each step's own; hover shows the exact value).",
        "Steps not fully certified: " + analysis.describe_doubtful_objectives(run) +
        " (the train set's marked on the |ΣLCA − ΔL| curve; the legend names each kind).",
        f"Slider: {len(data.steps)} of the run's {len(run)} tracked steps"
        + (" (evenly spaced)" if len(data.steps) < len(run) else "") + ". "
        + (f"Parameter frames: {len(data.frame_steps)} of {len(run.frames['step'])} stored "
           "frames; each step shows the latest frame taken at or before it."
           if data.tensors else "This run stored no per-parameter frames "
           "(LCATracker(frames=[...]) stores them)."),
    ]
    if pooled:
        parts.append("Pooled frames (LCA is additive, so a pooled cell is the summed LCA of "
                     "its block of parameters): " + "; ".join(pooled) + ".")
    if len(data.groups) < len(run.layer_names):
        parts.append(f"Layers: the run's {len(run.layer_names)} layers are shown as "
                     f"{len(data.groups)} groups (sums of their layers' LCA).")
    if data.class_rows and len(data.class_rows) < run.meta["num_classes"]:
        parts.append(f"Classes: the {len(data.class_rows) - 1} with the largest total |LCA|, "
                     "the others summed in one row.")
    return "\n".join(f"<p>{html.escape(p)}</p>" for p in parts)


# plotly.js rejects a running animation's promise, with no reason, when a newer
# one interrupts it (pause, or the slider moved during play), and its buttons and
# slider do not catch that: mark exactly those rejections handled
_QUIET_INTERRUPTED = ("window.addEventListener('unhandledrejection', function (e) "
                      "{ if (e.reason === undefined) e.preventDefault(); });")


def write_interactive(run: Union[Run, str], path: str, bounds: Bounds = Bounds()) -> str:
    """Writes the self-contained interactive page of ``run`` (a Run or a run
    directory) to ``path``; returns ``path``.  Needs plotly (the "demo" extra):
    raises :class:`lca_ext._extras.MissingExtra` without it."""
    require("the interactive report", ["plotly"])
    if isinstance(run, str):
        run = load_run(run)
    if not isinstance(run, Run):
        raise TypeError(f"lca_ext.write_interactive: run must be a Run or a run directory, "
                        f"got {type(run).__name__}")
    if len(run) < 1:
        raise ValueError("lca_ext.write_interactive: run has no tracked steps")
    if not isinstance(bounds, Bounds):
        raise TypeError(f"lca_ext.write_interactive: bounds must be a Bounds, got "
                        f"{type(bounds).__name__}")
    data = page_data(run, bounds)
    fig = _figure(run, data)
    div = fig.to_html(full_html=False, include_plotlyjs=True, div_id="lca-interactive",
                      auto_play=False, config=dict(displaylogo=False, responsive=True))
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LCA by step</title>
<style>body{{font-family:sans-serif;max-width:1300px;margin:auto;padding:0 1em}}
p{{margin:.4em 0;font-size:14px}}</style>
<script>{_QUIET_INTERRUPTED}</script></head><body>
<h1>Loss Change Allocation, step by step</h1>
{_notes(run, data)}
{div}
</body></html>
"""
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


def report_link(run: Run, out_dir: str) -> str:
    """For the static report: writes ``out_dir/interactive.html`` and returns an
    HTML link to it; without plotly, returns a note saying how to get it (the
    static report never fails for the interactive page's optional dependency)."""
    if missing(["plotly"]):
        return ('<p class="interactive"><b>Interactive view (slider over steps):</b> not built: '
                'it needs plotly, <code>pip install "lca_ext[demo]"</code>.</p>')
    write_interactive(run, os.path.join(out_dir, FILE_NAME))
    return (f'<p class="interactive" style="font-size:1.2em"><b><a href="{FILE_NAME}">'
            "Interactive view: every panel by step, with a slider and play button</a></b> "
            "(self-contained, works offline).</p>")
