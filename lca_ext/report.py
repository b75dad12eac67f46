"""The HTML report of a run: every figure, and headline numbers next to the
paper's findings (Lan et al. 2019).  ``build_report(run_dir, out_dir)``."""
from __future__ import annotations

import html
import os
from typing import Dict, List

import numpy as np

from . import analysis, plots
from .run import Run, load_run

PAPER = {
    "helped": "barely over 50% of parameters help at any step",
    "grounding": "ΣLCA matches ΔL to the integration tolerance",
    "layers": "some layers hurt overall (first and last layer of ResNet)",
    "sync": "layers' peak moments of learning coincide (synchronized, p < 0.001)",
    "concentration": "learning is concentrated in few parameters",
}


def headline(run: Run) -> Dict[str, object]:
    """The numbers the report's table shows (plain data, also used by the CLI)."""
    g = analysis.grounding(run)
    hf = analysis.helped_fraction(run)
    lt = analysis.layer_totals(run)
    conc = analysis.concentration(run)
    osc = analysis.oscillation(run)
    out = dict(steps=len(run), loss_start=float(run.loss_before[0]),
               loss_end=float(run.loss_after[-1]), relative_error=g["relative_error"],
               max_step_error=float(np.max(g["step_error"])),
               helped_mean=float(hf["overall"].mean()),
               hurting_layers=[n for n, v in zip(lt["names"], lt["total"]) if v > 0],
               layer_totals=dict(zip(lt["names"], map(float, lt["total"]))),
               gini=conc["gini_abs_total"], fraction_90=conc["fraction_doing_share"],
               **osc)
    if run.meta.get("num_classes"):
        sync = analysis.class_synchronization(run, permutations=500)
        out["sync_p_values"] = [s["p_value"] for s in sync]
        out["sync_observed"] = [s["observed"] for s in sync]
    if "val" in run.objectives:
        of = analysis.overfitting(run)
        out["overfitting_layers"] = of["layers"]
        out["overfitting_neuron_fraction"] = of["neuron_fraction"]
    return out


def build_report(run_dir: str, out_dir: str) -> str:
    """Writes PNG figures and index.html into ``out_dir``; returns the HTML path."""
    run = load_run(run_dir)
    if len(run) < 2:
        raise ValueError(f"lca_ext: {run_dir!r} has {len(run)} tracked steps; a report "
                         "needs at least 2")
    os.makedirs(out_dir, exist_ok=True)
    figures = [plots.grounding(run, out_dir), plots.helped_fraction(run, out_dir),
               plots.heroes_villains(run, out_dir), plots.lca_histogram(run, out_dir),
               plots.layers(run, out_dir), plots.neuron_heatmap(run, out_dir),
               plots.concentration(run, out_dir)]
    if "val" in run.objectives:
        figures.append(plots.overfitting(run, out_dir))
    h = headline(run)
    if run.meta.get("num_classes"):
        sync = analysis.class_synchronization(run, permutations=500)
        figures += [plots.class_layers(run, out_dir), plots.synchronization(run, out_dir, sync)]
    gif = plots.first_layer_animation(run, out_dir)
    if gif:
        figures.append(gif)
    rows = [
        ("steps tracked", f"{h['steps']}", ""),
        ("loss (LCA set)", f"{h['loss_start']:.4f} → {h['loss_end']:.4f}", ""),
        ("whole-run |ΣΣLCA − ΔL| / |ΔL|", f"{h['relative_error']:.2e}", PAPER["grounding"]),
        ("parameters that helped, mean per step", f"{100 * h['helped_mean']:.1f}%",
         PAPER["helped"]),
        ("layers with positive total LCA (hurt)", ", ".join(h["hurting_layers"]) or "none",
         PAPER["layers"]),
        ("Gini of |total LCA| over parameters", f"{h['gini']:.2f}", PAPER["concentration"]),
        ("fraction of parameters doing 90% of the learning", f"{100 * h['fraction_90']:.1f}%", ""),
    ]
    pc = analysis.pruning_candidates(run)
    rows.append(("pruning / re-init candidates: parameters whose total LCA is > 0 (hurt) "
                 "or exactly 0 (idle)",
                 f"{pc['params_hurt']} hurt, {pc['params_idle']} idle of {pc['params']}; "
                 f"neurons: {pc['neurons_hurt'].size} hurt of {pc['neurons']}", ""))
    if "steps_between_direction_changes" in h:
        rows.append(("mean steps between a weight's direction changes",
                     f"{h['steps_between_direction_changes']:.1f}", ""))
    if "sync_p_values" in h:
        p = np.array(h["sync_p_values"])
        rows.append(("classes whose layers peak together (p < 0.01)",
                     f"{int((p < 0.01).sum())} of {p.size}", PAPER["sync"]))
    if "overfitting_layers" in h:
        rows.append(("layers helping train but hurting val",
                     ", ".join(h["overfitting_layers"]) or "none",
                     "the paper's proposed use: find what overfits"))
    table = "\n".join(f"<tr><td>{html.escape(a)}</td><td>{html.escape(b)}</td>"
                      f"<td>{html.escape(c)}</td></tr>" for a, b, c in rows)
    imgs = "\n".join(f'<figure><img src="{os.path.basename(f)}" alt="{os.path.basename(f)}">'
                     f"</figure>" for f in figures)
    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>LCA report: {html.escape(run_dir)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:auto;padding:1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%}}figure{{margin:1em 0}}</style></head><body>
<h1>Loss Change Allocation report</h1>
<p>Run <code>{html.escape(os.path.abspath(run_dir))}</code>: {', '.join(run.names)}.
Negative LCA (green) = the parameter helped lower the loss; positive (red) = it hurt.
Method: Lan, Liu, Zhou &amp; Yosinski, <i>LCA: Loss Change Allocation for Neural Network
Training</i>, NeurIPS 2019.</p>
<table><tr><th>measure</th><th>this run</th><th>paper</th></tr>
{table}
</table>
{imgs}
</body></html>
"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path


def build_comparison(run_dirs: List[str], out_dir: str) -> str:
    """Runs side by side: losses and per-layer totals in one page."""
    import matplotlib.pyplot as plt

    runs = [load_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    width = 0.8 / len(runs)
    for i, (d, r) in enumerate(zip(run_dirs, runs)):
        label = os.path.basename(os.path.dirname(os.path.abspath(d))) or d
        a.plot(r.steps, r.loss_after, label=label)
        lt = analysis.layer_totals(r)
        b.bar(np.arange(len(lt["names"])) + i * width, lt["total"], width, label=label)
    a.set(xlabel="iteration", ylabel="loss (LCA set)", title="Loss")
    a.legend(fontsize=8)
    names = analysis.layer_totals(runs[0])["names"]
    b.set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45)
    b.axhline(0, color="k", lw=0.5)
    b.set(ylabel="total LCA", title="LCA per layer")
    b.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "compare.png"), dpi=110)
    plt.close(fig)
    rows = "\n".join(
        f"<tr><td>{html.escape(d)}</td><td>{r.loss_after[-1]:.4f}</td>"
        + "".join(f"<td>{v:+.4f}</td>" for v in analysis.layer_totals(r)["total"]) + "</tr>"
        for d, r in zip(run_dirs, runs))
    head = "".join(f"<th>{html.escape(n)}</th>" for n in names)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>LCA comparison</title>
</head><body><h1>LCA comparison</h1><table border="1"><tr><th>run</th><th>final loss</th>
{head}</tr>{rows}</table><img src="compare.png" style="max-width:100%"></body></html>"""
    path = os.path.join(out_dir, "index.html")
    with open(path, "w") as f:
        f.write(page)
    return path
