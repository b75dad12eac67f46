"""The HTML report of a run: every figure, and headline numbers next to the
paper's findings (Lan et al. 2019).  ``build_report(run_dir, out_dir)``."""
from __future__ import annotations

import html
import os
from typing import Dict, List, Optional

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


def headline(run: Run, sync: Optional[List[Dict]] = None) -> Dict[str, object]:
    """The numbers the report's table shows (plain data, also used by the CLI).
    ``sync``: ``analysis.class_synchronization(run)`` if already computed."""
    g = analysis.grounding(run)
    hf = analysis.helped_fraction(run)
    lt = analysis.layer_totals(run)
    conc = analysis.concentration(run)
    osc = analysis.oscillation(run)
    hc = analysis.helped_concentration(run)
    turns = analysis.turns(run)
    out = dict(steps=len(run), loss_start=float(run.loss_before[0]),
               loss_end=float(run.loss_after[-1]), relative_error=g["relative_error"],
               max_step_error=float(np.max(g["step_error"])),
               helped_mean=float(hf["overall"].mean()),
               hurting_layers=[n for n, v in zip(lt["names"], lt["total"]) if v > 0],
               layer_totals=dict(zip(lt["names"], map(float, lt["total"]))),
               layer_bars={n: (float(v), float(e))
                           for n, v, e in zip(lt["names"], lt["total"], lt["error"])},
               doubtful=analysis.describe_doubtful_objectives(run),
               gini=conc["gini_abs_total"], fraction_90=conc["fraction_doing_share"],
               helped_gini=hc["helped"], hurt_gini=hc["hurt"],
               helped_gini_per_layer=dict(zip(lt["names"], map(float, hc["per_layer"]["helped_gini"]))),
               hurt_gini_per_layer=dict(zip(lt["names"], map(float, hc["per_layer"]["hurt_gini"]))),
               top1pct_helped_share=hc["top_share"],
               helped_90_of_helping=hc["of_helping"], helped_90_of_all=hc["of_all"],
               **osc, **{k: v for k, v in turns.items() if k.endswith(("_mean", "stride", "frames"))})
    if run.meta.get("num_classes"):
        sync = sync or analysis.class_synchronization(run, permutations=500)
        out["sync_p_values"] = [s["p_value"] for s in sync]
        out["sync_observed"] = [s["observed"] for s in sync]
    if "val" in run.objectives:
        of = analysis.overfitting(run)
        out["overfitting_layers"] = of["layers"]
        out["overfitting_neuron_fraction"] = of["neuron_fraction"]
    return out


def _percent(x: float, none: str = "n/a (nothing helped)") -> str:
    return none if not np.isfinite(x) else f"{100 * x:.2f}%"


def _number(x: float, fmt: str, none: str) -> str:
    """A table value, or what it means when there is none (NaN or infinite)."""
    return none if not np.isfinite(x) else format(x, fmt)


def _tensors(run: Run) -> str:
    names = run.names
    if len(names) <= 12:
        return ", ".join(names)
    return (f"{len(names)} parameter tensors in {len(run.layer_names)} layers "
            f"({', '.join(names[:3])}, …, {names[-1]})")


def build_report(run_dir, out_dir: str) -> str:
    """Writes PNG figures and index.html into ``out_dir``; returns the HTML path.
    ``run_dir``: a run directory, or a ``Run`` (e.g. ``tracker.result()``)."""
    in_memory = isinstance(run_dir, Run)
    run = run_dir if in_memory else load_run(run_dir)
    where = "a Run in memory" if in_memory else os.path.abspath(run_dir)
    if len(run) < 2:
        raise ValueError(f"lca_ext: {where!r} has {len(run)} tracked steps; a report "
                         "needs at least 2")
    os.makedirs(out_dir, exist_ok=True)
    from .interactive import report_link   # the slider page, or a note without plotly
    interactive_link = report_link(run, out_dir)
    figures = [plots.grounding(run, out_dir), plots.helped_fraction(run, out_dir),
               plots.heroes_villains(run, out_dir), plots.lca_histogram(run, out_dir),
               plots.layers(run, out_dir), plots.neuron_heatmap(run, out_dir),
               plots.concentration(run, out_dir), plots.gini_per_layer(run, out_dir)]
    if "val" in run.objectives:
        figures.append(plots.overfitting(run, out_dir))
    sync = (analysis.class_synchronization(run, permutations=500)
            if run.meta.get("num_classes") else None)
    h = headline(run, sync)
    if sync:
        figures += [plots.class_layers(run, out_dir), plots.synchronization(run, out_dir, sync)]
    gif = plots.first_layer_animation(run, out_dir)
    if gif:
        figures.append(gif)
    rows = [
        ("steps tracked", f"{h['steps']}", ""),
        ("loss (LCA set)", f"{h['loss_start']:.4f} → {h['loss_end']:.4f}", ""),
        ("whole-run |ΣΣLCA − ΔL| / |ΔL|",
         _number(h["relative_error"], ".2e", "n/a (ΔL = 0)"), PAPER["grounding"]),
        ("steps not fully certified", html.escape(h["doubtful"]), ""),
        ("parameters that helped, mean per step", f"{100 * h['helped_mean']:.1f}%",
         PAPER["helped"]),
        ("layers with positive total LCA (hurt)", ", ".join(h["hurting_layers"]) or "none",
         PAPER["layers"]),
        ("total LCA per layer ± its 95% bar (run.sum_error)",
         ", ".join(f"{n} {v:+.4g} ± " + (f"{e:.2g}" if np.isfinite(e) else "n/a")
                   for n, (v, e) in h["layer_bars"].items()), ""),
        ("Gini of |total LCA| over parameters", f"{h['gini']:.2f}", PAPER["concentration"]),
        ("fraction of parameters doing 90% of the net learning (Σ −total LCA, largest "
         "first; hurting parameters count against)",
         _percent(h["fraction_90"], "n/a (no net learning: the total LCA is ≥ 0)"), ""),
        ("helped Gini (over helping parameters' |total LCA|) / hurt Gini (over hurting "
         "parameters' total LCA)", f"{h['helped_gini']:.2f} / {h['hurt_gini']:.2f}",
         PAPER["concentration"]),
        ("share of the helped total (Σ negative total LCA) from the top 1% of helping "
         "parameters", _percent(h["top1pct_helped_share"]), PAPER["concentration"]),
        ("parameters needed for 90% of the helped total: of the helping ones / of all",
         f"{_percent(h['helped_90_of_helping'])} / {_percent(h['helped_90_of_all'])}",
         PAPER["concentration"]),
    ]
    pc = analysis.pruning_candidates(run)
    rows.append(("pruning / re-init candidates: parameters whose total LCA is > 0 (hurt) "
                 "or exactly 0 (idle)",
                 f"{pc['params_hurt']} hurt, {pc['params_idle']} idle of {pc['params']}; "
                 f"neurons: {pc['neurons_hurt'].size} hurt of {pc['neurons']}", ""))
    if "steps_between_direction_changes" in h:
        rows.append(("mean steps between a weight's direction changes",
                     _number(h["steps_between_direction_changes"], ".1f",
                             "n/a (no weight changed direction)"), ""))
    if "gradient_sign_changes_mean" in h:
        rows.append(("gradient turns: sign changes of a parameter's gradient between tracked "
                     "steps, mean per parameter", f"{h['gradient_sign_changes_mean']:.2f} "
                     f"in {h['steps']} steps", ""))
    if "lca_sign_changes_mean" in h:
        rows.append(("LCA turns (frame tensors only): sign changes of a parameter's per-step "
                     "LCA / local extrema of it, mean per element",
                     f"{h['lca_sign_changes_mean']:.2f} / {h['lca_turns_mean']:.2f} over "
                     f"{h['frames']} frames, {h['frame_stride']} step(s) apart", ""))
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
<html><head><meta charset="utf-8"><title>LCA report: {html.escape(where)}</title>
<style>body{{font-family:sans-serif;max-width:1150px;margin:auto;padding:1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px}}
img{{max-width:100%}}figure{{margin:1em 0}}</style></head><body>
<h1>Loss Change Allocation report</h1>
{interactive_link}
<p>Run <code>{html.escape(where)}</code>: {html.escape(_tensors(run))}.
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
    runs = [load_run(d) for d in run_dirs]
    os.makedirs(out_dir, exist_ok=True)
    labels = [os.path.basename(os.path.dirname(os.path.abspath(d))) or d for d in run_dirs]
    plots.comparison(runs, labels, out_dir)
    names = analysis.layer_totals(runs[0])["names"]
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
