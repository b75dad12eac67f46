"""Figures of a run's analyses (matplotlib, Agg backend), in the paper's colours:
green helps (negative LCA), red hurts (positive LCA).  Each function takes a
``Run`` (and analysis results) and writes one PNG, returning its path."""
from __future__ import annotations

import os
from typing import Dict, List

from ._extras import require

require("lca_ext.plots (the report's figures)", ["matplotlib", "PIL"])
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import analysis  # noqa: E402

GREEN, RED, GREY = "#2ca02c", "#d62728", "#7f7f7f"


def _save(fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def grounding(run, out_dir: str) -> str:
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    steps = run.steps
    d = run.loss_after - run.loss_before
    a.plot(steps, d, color=GREY, label="ΔL measured")
    a.plot(steps, run.lca_sum, "--", color="k", label="ΣLCA (Simpson)")
    a.set(xlabel="iteration", ylabel="loss change per step", title="LCA is grounded")
    a.legend()
    b.semilogy(steps, np.maximum(run.error, 1e-16), color="k")
    b.set(xlabel="iteration", ylabel="|ΣLCA − ΔL| (loss units)", title="per-step error")
    return _save(fig, os.path.join(out_dir, "grounding.png"))


def helped_fraction(run, out_dir: str) -> str:
    hf = analysis.helped_fraction(run)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(run.steps, 100 * hf["overall"], color="k", lw=2, label="all parameters")
    for i, name in enumerate(run.layer_names):
        ax.plot(run.steps, 100 * hf["per_layer"][:, i], lw=1, label=name)
    ax.axhline(50, color=GREY, ls=":")
    ax.set(xlabel="iteration", ylabel="% of parameters that helped",
           title="Barely over half the parameters help at each step")
    ax.legend(fontsize=8, ncol=2)
    return _save(fig, os.path.join(out_dir, "helped_fraction.png"))


def heroes_villains(run, out_dir: str) -> str:
    hv = analysis.helped_iterations_distribution(run)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    centres = (hv["edges"][:-1] + hv["edges"][1:]) / 2
    colors = [GREEN if c >= 0.5 else RED for c in centres]
    ax.bar(100 * centres, hv["hist"], width=100 * np.diff(hv["edges"]), color=colors)
    ax.set(xlabel="% of iterations the parameter helped", ylabel="parameters",
           title=f"Heroes and villains ({hv['idle']} idle parameters left out)")
    return _save(fig, os.path.join(out_dir, "heroes_villains.png"))


def lca_histogram(run, out_dir: str) -> str:
    s = analysis.lca_value_summary(run)
    hist, centres = s["hist"], s["centres"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    pos = np.arange(len(hist))
    ax.bar(pos, hist, color=[GREEN if c < 0 else RED if c > 0 else GREY for c in centres])
    ticks = pos[:: max(1, len(pos) // 8)]
    ax.set_xticks(ticks, [f"{centres[i]:.0e}" for i in ticks], rotation=45, fontsize=7)
    ax.set_yscale("log")
    ax.set(xlabel="LCA value (signed log bins)", ylabel="count (all steps, parameters)",
           title=f"LCA values: mean {s['mean']:.1e}, std {s['std']:.1e}")
    return _save(fig, os.path.join(out_dir, "lca_histogram.png"))


def layers(run, out_dir: str) -> str:
    lt = analysis.layer_totals(run)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    colors = [GREEN if v < 0 else RED for v in lt["total"]]
    a.bar(lt["names"], lt["total"], color=colors)
    a.axhline(0, color="k", lw=0.5)
    a.set(ylabel="total LCA (loss units)", title="LCA per layer")
    a.tick_params(axis="x", rotation=45)
    for i, name in enumerate(lt["names"]):
        b.plot(run.steps, lt["cumulative"][:, i], label=name)
    b.set(xlabel="iteration", ylabel="cumulative LCA", title="Layers learn over time")
    b.legend(fontsize=8)
    return _save(fig, os.path.join(out_dir, "layers.png"))


def neuron_heatmap(run, out_dir: str, tensor: int = 0) -> str:
    h = analysis.neuron_heatmap(run, tensor)
    lim = np.abs(h).max() or 1.0
    fig, ax = plt.subplots(figsize=(8, 3.8))
    im = ax.imshow(h.T, aspect="auto", cmap="RdYlGn_r", vmin=-lim, vmax=lim,
                   extent=[run.steps[0], run.steps[-1] + 1, h.shape[1], 0],
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="LCA")
    ax.set(xlabel="iteration", ylabel=f"neuron of {run.names[tensor]}",
           title="Per-neuron LCA (green helps)")
    return _save(fig, os.path.join(out_dir, "neurons.png"))


def class_layers(run, out_dir: str) -> str:
    cls = run.class_layer_sums().sum(0)                   # [C, L]
    lim = np.abs(cls).max() or 1.0
    fig, ax = plt.subplots(figsize=(6, 4))
    im = ax.imshow(cls, cmap="RdYlGn_r", vmin=-lim, vmax=lim, aspect="auto")
    fig.colorbar(im, ax=ax, label="total LCA")
    ax.set_xticks(range(len(run.layer_names)), run.layer_names, rotation=45)
    ax.set(ylabel="class", title="LCA per class and layer")
    return _save(fig, os.path.join(out_dir, "class_layers.png"))


def synchronization(run, out_dir: str, sync: List[Dict], cls: int = 0) -> str:
    series = run.class_layer_sums()[:, cls, :]
    fig, ax = plt.subplots(figsize=(9, 3.8))
    for i, name in enumerate(run.layer_names):
        s = series[:, i] / (np.abs(series[:, i]).max() or 1)
        ax.plot(run.steps, s - 2.2 * i, lw=1, label=name)
        peaks = sync[cls]["peaks"][i]
        ax.plot(run.steps[peaks], s[peaks] - 2.2 * i, "v", color=GREEN, ms=5)
    ax.set_yticks([])
    ax.set(xlabel="iteration", title=f"Class {cls}: per-layer LCA and peak moments "
           f"(p = {sync[cls]['p_value']:.3f})")
    ax.legend(fontsize=8, loc="upper right")
    return _save(fig, os.path.join(out_dir, "synchronization.png"))


def concentration(run, out_dir: str) -> str:
    """Lorenz-style curve of learning over parameters, and oscillation histograms."""
    total = np.concatenate([c.ravel() for c in run.state["cum_lca"]]).astype(np.float64)
    conc = analysis.concentration(run)
    learning = np.sort(-total)[::-1]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    x = np.arange(1, learning.size + 1) / learning.size
    a.plot(100 * x, np.cumsum(learning) / max(learning.sum(), 1e-300), color=GREEN)
    a.axhline(0.9, color=GREY, ls=":")
    a.set(xlabel="% of parameters (largest learning first)", ylabel="share of net learning",
          title=f"Concentration: 90% by {100 * conc['fraction_doing_share']:.1f}% "
                f"(Gini {conc['gini_abs_total']:.2f})")
    t = max(len(run), 1)
    for key, color, label in (("direction_changes", "k", "weight direction"),
                              ("grad_sign_changes", GREY, "gradient sign")):
        if key in run.state:
            c = np.concatenate([s.ravel() for s in run.state[key]])
            c = c[c > 0]
            if c.size:
                b.hist(t / c, bins=40, histtype="step", color=color, label=label)
    b.set(xlabel="tracked steps between changes", ylabel="parameters", title="Oscillation")
    b.legend()
    return _save(fig, os.path.join(out_dir, "concentration_oscillation.png"))


def overfitting(run, out_dir: str, eval_set: str = "val") -> str:
    """Per-layer total LCA on the LCA set against the eval set."""
    of = analysis.overfitting(run, eval_set)
    names = run.layer_names
    pos = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.bar(pos - 0.2, of["train_layer_totals"], 0.4, color=GREEN, label="train (LCA set)")
    ax.bar(pos + 0.2, of["val_layer_totals"], 0.4, color="#1f77b4", label=eval_set)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(pos, names, rotation=45)
    ax.set(ylabel="total LCA", title=f"Train vs {eval_set}: {100 * of['neuron_fraction']:.1f}% "
           f"of neurons help train but hurt {eval_set}")
    ax.legend()
    return _save(fig, os.path.join(out_dir, "overfitting.png"))


def first_layer_animation(run, out_dir: str, max_tiles: int = 100) -> str:
    """An animated GIF of the per-element LCA frames of the first tracked layer:
    each hidden unit's 28x28 incoming weights as one tile (green helps)."""
    from PIL import Image

    keys = [k for k in run.frames if k != "step"]
    if not keys:
        return ""
    frames = run.frames[keys[0]]                          # [F, units, 784]
    units = min(frames.shape[1], max_tiles)
    if frames.shape[-1] != 784:
        return ""
    side = int(np.ceil(np.sqrt(units)))
    lim = np.quantile(np.abs(frames), 0.99) or 1.0
    images = []
    for f in frames:
        grid = np.zeros((side * 29, side * 29))
        for u in range(units):
            r, c = divmod(u, side)
            grid[r * 29:r * 29 + 28, c * 29:c * 29 + 28] = f[u].reshape(28, 28)
        v = np.clip(grid / lim, -1, 1)
        rgb = np.stack([np.clip(v, 0, 1), np.clip(-v, 0, 1), np.zeros_like(v)], -1)
        images.append(Image.fromarray((255 * rgb).astype(np.uint8)).resize(
            (side * 29 * 2, side * 29 * 2), Image.NEAREST))
    path = os.path.join(out_dir, "first_layer.gif")
    images[0].save(path, save_all=True, append_images=images[1:], duration=200, loop=0)
    return path
