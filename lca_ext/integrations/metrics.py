"""The scalars a framework callback logs for one tracked step (shared by the
Lightning and the transformers callbacks): per objective ``lca/<objective>/``
lca_sum, loss_before, loss_after, error (|ΣLCA − ΔL|), grad_passes,
helped_fraction (helped / (helped + hurt + zero) elements) and the step's flags
as 0/1 (grounded, noise_limited, budget_limited), and with layers
``lca/train/layer/<module path>``.  Everything is read from the tracker's
record of the step, already on the host."""
from __future__ import annotations

import logging
import warnings
from typing import Dict, Optional, Sequence

import numpy as np

from .. import analysis
from ..run import load_run


def step_metrics(record: dict, objectives: Sequence[str],
                 layer_of: Optional[Sequence[int]] = None,
                 layer_names: Optional[Sequence[str]] = None) -> Dict[str, float]:
    metrics: Dict[str, float] = {}
    for name in objectives:
        p = name + "/"
        counts = np.asarray(record[p + "counts"])          # [K, 4]
        metrics.update({
            f"lca/{p}lca_sum": float(record[p + "lca_sum"]),
            f"lca/{p}loss_before": float(record[p + "loss_before"]),
            f"lca/{p}loss_after": float(record[p + "loss_after"]),
            f"lca/{p}error": float(record[p + "error"]),
            f"lca/{p}grad_passes": float(record[p + "grad_passes"]),
            f"lca/{p}helped_fraction":
                float(counts[:, 0].sum() / max(counts[:, :3].sum(), 1))})
        for flag in ("grounded", "noise_limited", "budget_limited"):
            if p + flag in record:
                metrics[f"lca/{p}{flag}"] = float(bool(record[p + flag]))
    if layer_of is not None:
        sums = np.bincount(np.asarray(layer_of), weights=record["train/tensor_sums"],
                           minlength=len(layer_names))
        for layer, value in zip(layer_names, sums):
            metrics[f"lca/train/layer/{layer}"] = float(value)
    return metrics


def end_of_run(tracker) -> None:
    """The line a framework callback gives when training ends (rank 0 only): a
    warning naming every objective's steps that are not fully certified (the
    training set's and each eval set's, named where there are several), or an
    info log line when every step is grounded.  With a store, the whole stored
    run's steps (a resumed run's earlier ones too)."""
    if tracker.ctx.rank != 0:
        return
    link = tracker.store_link
    run = load_run(link.path) if link is not None and link.writer is not None else None
    parts, flagged = [], False
    names = [obj.name for obj in tracker.objectives]
    for name in names:
        if run is not None:
            doubtful, count = analysis.doubtful_steps(run, name), len(run)
        else:
            doubtful, count = tracker.flags.doubtful(name), tracker.flags.seen.get(name, 0)
        flagged = flagged or any(doubtful.values())
        text = analysis.format_doubtful(doubtful, count)
        parts.append(text if len(names) == 1 else f"{name}: {text}")
    line = "lca_ext: " + "; ".join(parts)
    if flagged:
        warnings.warn(line + " (run.get('grounded'), run.get('budget_limited') and "
                      "run.tensor_error say which and by how much)", RuntimeWarning,
                      stacklevel=3)
    else:
        logging.getLogger("lca_ext").info(line)
