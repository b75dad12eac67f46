"""The paper's analyses, as pure numpy functions of a loaded ``Run``.

Each function reads plain arrays of a run (see ``lca_ext.run.Run``) and
returns numbers or arrays; nothing here touches a model.  Sign convention as in
the paper: negative LCA = the parameter helped (lowered the loss).
"""
from __future__ import annotations

from typing import Dict, List, Optional

import numpy as np


# -- grounding ----------------------------------------------------------------

def grounding(run, objective: str = "train") -> Dict[str, object]:
    """Per-step error series and the whole-run relative error
    |Σ_t ΣLCA_t − (L_T − L_0)| / |L_T − L_0| (contiguous tracked steps)."""
    lca = run.get("lca_sum", objective)
    before, after = run.get("loss_before", objective), run.get("loss_after", objective)
    d_total = after[-1] - before[0] if len(lca) else 0.0
    rel = abs(lca.sum() - d_total) / abs(d_total) if d_total else float("nan")
    return dict(step_error=run.get("error", objective), relative_error=float(rel),
                total_lca=float(lca.sum()), total_loss_change=float(d_total))


# -- noise ----------------------------------------------------------------------

def helped_fraction(run, objective: str = "train") -> Dict[str, np.ndarray]:
    """Fraction of parameters that helped at each iteration: "overall" [T] and
    "per_layer" [T, layers] (helped / numel; zero-LCA parameters count as not)."""
    counts = run.get("counts", objective)                   # [T, K, 4]
    numel = counts.sum(-1)                                  # [T, K]
    overall = counts[..., 0].sum(1) / np.maximum(numel.sum(1), 1)
    layers = run.layer_counts(objective)                    # [T, L, 4]
    per_layer = layers[..., 0] / np.maximum(layers.sum(-1), 1)
    return dict(overall=overall, per_layer=per_layer)


def helped_iterations_distribution(run, bins: int = 20) -> Dict[str, np.ndarray]:
    """"Heroes and villains": over parameters, the fraction of tracked iterations
    each one helped, and its histogram.  Parameters whose total LCA is exactly
    zero (never moved along a gradient, e.g. weights of always-blank input
    pixels) are left out of the histogram and counted in ``idle``."""
    t = max(len(run), 1)
    frac = np.concatenate([h.ravel() for h in run.state["helped_steps"]]) / t
    idle = np.zeros(frac.shape, dtype=bool)
    if "cum_lca" in run.state:
        idle = np.concatenate([c.ravel() for c in run.state["cum_lca"]]) == 0
    hist, edges = np.histogram(frac[~idle], bins=bins, range=(0.0, 1.0))
    return dict(fraction=frac, hist=hist, edges=edges, idle=int(idle.sum()))


def lca_value_summary(run, objective: str = "train") -> Dict[str, object]:
    """The LCA value histogram over all steps and parameters, its mean against
    its spread, and a heavy-tail summary.

    The mean is exact (ΣLCA / count); spread and tail use bin centres of the
    log-spaced histogram (geometric centres; the under/overflow and middle bins
    take their edge values), so they are approximations at bin resolution."""
    hist = run.get("histogram", objective).sum(axis=(0, 1)).astype(np.float64)  # [B + 2]
    edges = run.bin_edges
    centres = _bin_centres(edges)
    n = hist.sum()
    mean = run.get("lca_sum", objective).sum() / max(n, 1)
    var = (hist * (centres - mean) ** 2).sum() / max(n, 1)
    std = float(np.sqrt(var))
    kurtosis = float((hist * (centres - mean) ** 4).sum() / max(n, 1) / var ** 2) if var else float("nan")
    mass = hist * np.abs(centres)
    order = np.argsort(-np.abs(centres))
    cum = np.cumsum(hist[order]) / max(n, 1)
    top = order[cum <= 0.01]
    top_share = float(mass[top].sum() / mass.sum()) if mass.sum() else float("nan")
    return dict(hist=hist, edges=edges, centres=centres, mean=float(mean), std=std,
                mean_over_std=float(abs(mean) / std) if std else float("nan"),
                kurtosis=kurtosis, top1pct_share_of_abs=top_share)


def _bin_centres(edges: np.ndarray) -> np.ndarray:
    lo, hi = edges[:-1], edges[1:]
    same_sign = lo * hi > 0
    centres = np.where(same_sign, np.sign(lo) * np.sqrt(np.abs(lo * hi)), 0.0)
    return np.concatenate([[edges[0]], centres, [edges[-1]]])


# -- layers -----------------------------------------------------------------------

def layer_totals(run, objective: str = "train") -> Dict[str, np.ndarray]:
    """Per-layer total LCA, raw and per parameter, and cumulative trajectories [T, L]."""
    per_step = run.layer_sums(objective)
    sizes = np.zeros(len(run.layer_names))
    for k, layer in enumerate(run.layer_of):
        sizes[layer] += int(np.prod(run.meta["shapes"][k]))
    total = per_step.sum(0)
    return dict(names=list(run.layer_names), total=total, per_parameter=total / sizes,
                cumulative=np.cumsum(per_step, axis=0), sizes=sizes)


def neuron_heatmap(run, tensor: int = 0, objective: str = "train") -> np.ndarray:
    """[T, rows]: per-neuron LCA over time for one parameter tensor."""
    rows = run.get("row_sums", objective)
    sizes = [s[0] if len(s) else 1 for s in run.meta["shapes"]]
    start = int(np.sum(sizes[:tensor]))
    return rows[:, start:start + sizes[tensor]]


# -- oscillation ---------------------------------------------------------------------

def oscillation(run) -> Dict[str, float]:
    """Mean number of tracked steps between changes of a weight's direction of
    motion, and between changes of the sign of its whole-set gradient (over
    parameters that changed at least once)."""
    t = len(run)
    out = {}
    for key, name in (("direction_changes", "steps_between_direction_changes"),
                      ("grad_sign_changes", "steps_between_gradient_sign_changes")):
        if key not in run.state:
            continue
        c = np.concatenate([a.ravel() for a in run.state[key]]).astype(np.float64)
        moved = c > 0
        out[name] = float(np.mean(t / c[moved])) if moved.any() else float("inf")
        out[key.replace("changes", "changers_fraction")] = float(moved.mean())
    return out


# -- concentration ----------------------------------------------------------------------

def gini(values: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0 = equal, → 1 = concentrated)."""
    v = np.sort(np.asarray(values, dtype=np.float64).ravel())
    if v.size == 0 or v.sum() == 0:
        return 0.0
    n = v.size
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum()))


def concentration(run, share: float = 0.9) -> Dict[str, float]:
    """Gini of |total LCA| over parameters, and the smallest fraction of
    parameters whose learning (−total LCA, largest first) reaches ``share`` of
    the net learning Σ(−total LCA)."""
    total = np.concatenate([c.ravel() for c in run.state["cum_lca"]]).astype(np.float64)
    learning = -total
    net = learning.sum()
    frac = float("nan")
    if net > 0:
        order = np.sort(learning)[::-1]
        k = int(np.searchsorted(np.cumsum(order), share * net) + 1)
        frac = min(k, total.size) / total.size
    return dict(gini_abs_total=gini(np.abs(total)), fraction_doing_share=frac, share=share)


# -- synchronization ----------------------------------------------------------------------

def peak_moments(series: np.ndarray, top_k: int = 10) -> np.ndarray:
    """Indices of the ``top_k`` deepest local minima (strictly below both
    neighbours; ends compared with their one neighbour) of a 1-D series."""
    s = np.asarray(series, dtype=np.float64)
    if s.size < 2:
        return np.zeros(0, dtype=np.int64)
    left = np.r_[np.inf, s[:-1]]
    right = np.r_[s[1:], np.inf]
    minima = np.flatnonzero((s < left) & (s < right))
    return np.sort(minima[np.argsort(s[minima])[:top_k]])


def synchronization(series: np.ndarray, top_k: int = 10, permutations: int = 1000,
                    seed: int = 0) -> Dict[str, object]:
    """Do layers peak together?  ``series`` is [T, layers] (one class's per-layer
    LCA).  Counts iterations where every layer has one of its ``top_k`` peak
    moments, and compares with a null model that circularly shifts each layer's
    series by an independent random offset.  The count is small and discrete, so
    ties with the null are broken at random (a randomized permutation test):
    p = (#null > observed + U·(#null == observed + 1)) / (n + 1), U ~ Uniform(0, 1],
    which is uniform under the null instead of piling up at 1."""
    series = np.asarray(series, dtype=np.float64)
    t, layers = series.shape
    peaks = [peak_moments(series[:, l], top_k) for l in range(layers)]

    def together(peak_sets):
        common = set(peak_sets[0].tolist())
        for p in peak_sets[1:]:
            common &= set(p.tolist())
        return len(common)

    observed = together(peaks)
    rng = np.random.default_rng(seed)
    null = np.empty(permutations, dtype=np.int64)
    for i in range(permutations):
        shifted = [np.sort((p + rng.integers(0, t)) % t) for p in peaks]
        null[i] = together(shifted)
    u = 1.0 - rng.random()                                  # (0, 1]
    p_value = (np.sum(null > observed) + u * (np.sum(null == observed) + 1)) / (1 + permutations)
    return dict(observed=observed, null_mean=float(null.mean()), p_value=float(p_value),
                peaks=peaks)


def class_synchronization(run, top_k: int = 10, permutations: int = 1000,
                          seed: int = 0) -> List[Dict[str, object]]:
    """``synchronization`` of each class's per-layer LCA series (needs per-class
    tracking)."""
    cls = run.class_layer_sums()                            # [T, C, L]
    return [synchronization(cls[:, c, :], top_k, permutations, seed + c)
            for c in range(cls.shape[1])]


# -- candidates and overfitting ------------------------------------------------------------

def pruning_candidates(run, eps: float = 0.0) -> Dict[str, object]:
    """Parameters and neurons whose total LCA is positive (they hurt overall) or
    within ``eps`` of zero (they did nothing)."""
    total = np.concatenate([c.ravel() for c in run.state["cum_lca"]])
    rows = run.get("row_sums").sum(0)
    return dict(params_hurt=int((total > eps).sum()), params_idle=int((np.abs(total) <= eps).sum()),
                params=int(total.size), neurons_hurt=np.flatnonzero(rows > eps),
                neurons_idle=np.flatnonzero(np.abs(rows) <= eps), neurons=int(rows.size))


def overfitting(run, eval_set: str = "val") -> Dict[str, object]:
    """Layers and neurons whose train LCA helps (< 0) while their LCA on
    ``eval_set`` hurts (> 0), summed over the run."""
    train_l, val_l = run.layer_sums("train").sum(0), run.layer_sums(eval_set).sum(0)
    train_r = run.get("row_sums", "train").sum(0)
    val_r = run.get("row_sums", eval_set).sum(0)
    layers = [run.layer_names[i] for i in np.flatnonzero((train_l < 0) & (val_l > 0))]
    neurons = np.flatnonzero((train_r < 0) & (val_r > 0))
    return dict(layers=layers, neurons=neurons, neuron_fraction=neurons.size / max(train_r.size, 1),
                train_layer_totals=train_l, val_layer_totals=val_l)
