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
    """Per-layer total LCA, raw and per parameter, and cumulative trajectories [T, L];
    ``error`` [L]: the total's 95% bar, the sum of its tensors' ``run.sum_error()``
    (an upper bar: the tensors' errors are not independent within a step)."""
    per_step = run.layer_sums(objective)
    sizes = np.zeros(len(run.layer_names))
    error = np.zeros(len(run.layer_names))
    tensor_bars = run.sum_error(objective=objective) if len(run) else np.zeros(len(run.names))
    for k, layer in enumerate(run.layer_of):
        sizes[layer] += int(np.prod(run.meta["shapes"][k]))
        error[layer] += tensor_bars[k]
    total = per_step.sum(0)
    return dict(names=list(run.layer_names), total=total, per_parameter=total / sizes,
                cumulative=np.cumsum(per_step, axis=0), sizes=sizes, error=error)


def cumulative_layer_error(run, at: np.ndarray, objective: str = "train") -> np.ndarray:
    """[len(at), L]: the 95% bar of each layer's cumulative LCA through step row
    ``at[i]`` (its tensors' ``run.sum_error`` over steps 0..at[i], added: an
    upper bar); ``at``: rows of the run's tracked steps (thin a long run)."""
    out = np.zeros((len(at), len(run.layer_names)))
    layer_of = np.asarray(run.layer_of)
    for i, row in enumerate(at):
        bars = run.sum_error(steps=slice(0, int(row) + 1), objective=objective)
        out[i] = np.bincount(layer_of, weights=np.nan_to_num(bars),
                             minlength=len(run.layer_names))
    return out


def doubtful_steps(run, objective: str = "train") -> Dict[str, List[int]]:
    """The tracked steps (their labels) that are not fully certified: ``ungrounded``
    (ΣLCA misses ΔL beyond the rule's tolerance, for any reason), of which
    ``noise_limited`` (the passes' rounding is the limit) and ``budget_limited``
    (the default rule stopped at its pass budget; its bars say what is left)."""
    steps = run.steps
    flag = lambda name: (run.get(name, objective).astype(bool)   # noqa: E731
                         if f"{objective}/{name}" in run.arrays else np.zeros(len(steps), bool))
    return dict(ungrounded=[int(s) for s in steps[~run.grounded(objective)]],
                noise_limited=[int(s) for s in steps[flag("noise_limited")]],
                budget_limited=[int(s) for s in steps[flag("budget_limited")]])


def describe_doubtful(run, objective: str = "train") -> str:
    """One line naming every step that is not fully certified (or saying none is)."""
    return format_doubtful(doubtful_steps(run, objective), len(run))


def describe_doubtful_objectives(run) -> str:
    """:func:`describe_doubtful` for every objective of the run, each named
    where there are several (a doubtful eval-set step is shown, not hidden
    behind a train set whose steps are all grounded)."""
    if len(run.objectives) == 1:
        return describe_doubtful(run, run.objectives[0])
    return "; ".join(f"{name}: {describe_doubtful(run, name)}" for name in run.objectives)


def format_doubtful(d: Dict[str, List[int]], tracked: int) -> str:
    """The line of :func:`describe_doubtful` for ``d`` (:func:`doubtful_steps`'
    form) out of ``tracked`` steps."""
    if not any(d.values()):
        return f"every one of the {tracked} tracked steps is grounded"

    def listed(steps):
        return ", ".join(map(str, steps[:12])) + (f", … ({len(steps)} in all)"
                                                   if len(steps) > 12 else "")
    parts = []
    if d["ungrounded"]:
        parts.append(f"not grounded: step {listed(d['ungrounded'])}")
    if d["noise_limited"]:
        parts.append(f"at the passes' rounding floor: {listed(d['noise_limited'])}")
    if d["budget_limited"]:
        parts.append(f"stopped at the pass budget (bars above target): "
                     f"{listed(d['budget_limited'])}")
    return f"of {tracked} tracked steps, " + "; ".join(parts)


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


# -- the original authors' concentration and oscillation measures -------------------------

def parameter_totals(run) -> np.ndarray:
    """Every parameter's total LCA over the run (state "cum_lca"), flattened."""
    if "cum_lca" not in run.state:
        raise KeyError("lca_ext: this run has no per-parameter state 'cum_lca' (track "
                       "with a store, or call tracker.result())")
    return np.concatenate([c.ravel() for c in run.state["cum_lca"]]).astype(np.float64)


def layer_slices(run) -> List[np.ndarray]:
    """Per layer, the indices of its parameters in the flattened state order."""
    sizes = [int(np.prod(run.meta["shapes"][k])) for k in range(len(run.layer_of))]
    starts = np.r_[0, np.cumsum(sizes)]
    out = [[] for _ in run.layer_names]
    for k, layer in enumerate(run.layer_of):
        out[layer].append(np.arange(starts[k], starts[k + 1]))
    return [np.concatenate(s) if s else np.zeros(0, dtype=np.int64) for s in out]


def helped_hurt_gini(values: np.ndarray) -> Dict[str, float]:
    """Gini of the helping and of the hurting parameters, separately (as in the
    paper's code).  ``values``: total LCA per parameter.

    helped: ``gini(−v)`` over the v < 0 (how unequally the helping is shared);
    hurt:   ``gini(v)``  over the v > 0 (how unequally the hurting is shared);
    zeros belong to neither.  ``gini`` of an empty set is 0."""
    v = np.asarray(values, dtype=np.float64).ravel()
    return dict(helped=gini(-v[v < 0]), hurt=gini(v[v > 0]),
                hurt_fraction=float((v > 0).mean()) if v.size else float("nan"))


def top_helpers_share(values: np.ndarray, top: float = 0.01) -> float:
    """Share of the total helped contributed by the top ``top`` of the helping
    parameters.  With H = {v < 0} (n = |H|) and k = ceil(top · n): the sum of the
    k most negative v divided by the sum of all of H.  NaN when nothing helped."""
    if not 0 < top <= 1:
        raise ValueError(f"lca_ext: top must be in (0, 1], got {top}")
    helped = np.sort(-np.asarray(values, dtype=np.float64).ravel())[::-1]
    helped = helped[helped > 0]
    if helped.size == 0:
        return float("nan")
    k = int(np.ceil(top * helped.size))
    return float(helped[:k].sum() / helped.sum())


def helpers_needed(values: np.ndarray, share: float = 0.9) -> Dict[str, float]:
    """How few parameters carry ``share`` of the *helped* total (the paper's
    definition; compare ``concentration``, which uses net learning).

    With the helping parameters' |v| sorted largest first, k is the smallest count
    whose sum reaches ``share`` × Σ |v|.  ``of_helping`` = k / (number helping), the
    paper code's denominator; ``of_all`` = k / (all parameters).  NaN when
    nothing helped."""
    if not 0 < share <= 1:
        raise ValueError(f"lca_ext: share must be in (0, 1], got {share}")
    v = np.asarray(values, dtype=np.float64).ravel()
    helped = np.sort(-v[v < 0])[::-1]
    if helped.size == 0:
        return dict(of_helping=float("nan"), of_all=float("nan"), count=0)
    # the tolerance keeps share = 1 from missing the last element to rounding
    reach = share * helped.sum() * (1 - 1e-12)
    k = int(np.searchsorted(np.cumsum(helped), reach) + 1)
    k = min(k, helped.size)
    return dict(of_helping=k / helped.size, of_all=k / v.size, count=k)


def helped_concentration(run, share: float = 0.9, top: float = 0.01) -> Dict[str, object]:
    """The paper code's concentration measures of the run's total LCA per
    parameter, overall and per layer: ``helped_hurt_gini``,
    ``top_helpers_share(top)`` and ``helpers_needed(share)``.  Per-layer entries
    are arrays in ``run.layer_names`` order."""
    total = parameter_totals(run)
    out = dict(helpers_needed(total, share), **helped_hurt_gini(total),
               top_share=top_helpers_share(total, top), share=share, top=top)
    per = [np.take(total, idx) for idx in layer_slices(run)]
    g = [helped_hurt_gini(p) for p in per]
    out["per_layer"] = dict(
        names=list(run.layer_names),
        helped_gini=np.array([x["helped"] for x in g]),
        hurt_gini=np.array([x["hurt"] for x in g]),
        top_share=np.array([top_helpers_share(p, top) for p in per]),
        of_helping=np.array([helpers_needed(p, share)["of_helping"] for p in per]))
    return out


def _sign_flips(x: np.ndarray) -> np.ndarray:
    """Per element, the number of adjacent pairs along axis 0 with opposite
    signs (a product < 0; a zero breaks the pair, as in the paper's code)."""
    return (x[:-1] * x[1:] < 0).sum(axis=0)


def turns(run) -> Dict[str, object]:
    """Oscillation counts per parameter, from what a run stores.

    gradient_sign_changes  state "grad_sign_changes": how often the sign of the
        parameter's whole-LCA-set gradient at θ_t changed between consecutive
        tracked steps (a zero gradient keeps the last sign).  The paper's code
        calls this "grad cross zeros"; its "grad turns" (extrema of the gradient
        series) need the gradient history, which a run does not store.
    direction_changes  state "direction_changes": sign changes of θ_{t+1} − θ_t,
        the paper's "weight turns".
    lca_sign_changes, lca_turns  only for the frame tensors (the only per-step,
        per-element LCA a run keeps), over the stored frames in order:
        sign changes of the per-step LCA (helped ↔ hurt), and sign changes of its
        first difference (local extrema: the paper's "helped turns").  A zero
        breaks a pair.  With frame_every > 1 these count over the subsampled
        frames (``frame_stride`` says how many steps apart they are).
    Each count comes as a mean per parameter ("<name>_mean") and a total; absent
    data leaves the key out."""
    out: Dict[str, object] = {}
    for key, name in (("grad_sign_changes", "gradient_sign_changes"),
                      ("direction_changes", "direction_changes")):
        if key in run.state:
            c = np.concatenate([a.ravel() for a in run.state[key]]).astype(np.int64)
            out[name + "_mean"] = float(c.mean()) if c.size else float("nan")
            out[name + "_total"] = int(c.sum())
    keys = [k for k in run.frames if k != "step"]
    if keys:
        steps = np.asarray(run.frames.get("step", np.zeros(0)))
        flips = [_sign_flips(np.asarray(run.frames[k], dtype=np.float64)).ravel() for k in keys]
        extrema = [_sign_flips(np.diff(np.asarray(run.frames[k], dtype=np.float64), axis=0)).ravel()
                   for k in keys]
        flips, extrema = np.concatenate(flips), np.concatenate(extrema)
        out.update(lca_sign_changes_mean=float(flips.mean()), lca_sign_changes_total=int(flips.sum()),
                   lca_turns_mean=float(extrema.mean()), lca_turns_total=int(extrema.sum()),
                   frames=int(len(steps)), frame_tensors=[run.names[int(k)] for k in keys],
                   frame_stride=int(np.min(np.diff(steps))) if len(steps) > 1 else 0)
    return out


# -- layer groups (for figures of many layers) ---------------------------------------------

def _block_key(name: str):
    """(stem, number) for a name with a numeric component (``transformer.h.3.mlp``
    → ("transformer.h", 3)); (name, None) otherwise."""
    parts = name.split(".")
    for i, p in enumerate(parts):
        if p.isdigit():
            return ".".join(parts[:i]), int(p)
    return name, None


def _block_name(stem: str, first: int, last: int) -> str:
    span = str(first) if first == last else f"{first}–{last}"
    return f"{stem}.{span}" if stem else span


def layer_groups(names: List[str], max_groups: int = 12) -> Dict[str, object]:
    """Groups of layers for figures that cannot show every layer.

    Up to ``max_groups`` layers: one group per layer.  Otherwise layers are grouped
    by block, the name up to its first numeric component (``transformer.h.3.attn``
    → ``transformer.h.3``); if there are still too many, runs of consecutive
    numbered blocks of one stem are merged (``transformer.h.0–3``), as few at a
    time as fits; if the unnumbered layers alone exceed ``max_groups``, layers are
    merged in contiguous chunks in model order.  Returns ``names`` (group names in
    model order) and ``of`` (each layer's group index)."""
    if max_groups < 1:
        raise ValueError(f"lca_ext: max_groups must be >= 1, got {max_groups}")
    names = list(names)
    if len(names) <= max_groups:
        return dict(names=names, of=np.arange(len(names)))
    keys = [_block_key(n) for n in names]
    singles = len({k for k in keys if k[1] is None})
    stems: Dict[str, List[int]] = {}
    for stem, num in keys:
        if num is not None and num not in stems.setdefault(stem, []):
            stems[stem].append(num)
    for per in range(1, max(len(v) for v in stems.values()) + 1 if stems else 1):
        if singles + sum(-(-len(v) // per) for v in stems.values()) <= max_groups:
            return _group_by_blocks(keys, stems, per)
    return _group_in_chunks(names, max_groups)


def _group_by_blocks(keys, stems, per: int) -> Dict[str, object]:
    label = {}
    for stem, nums in stems.items():
        nums = sorted(nums)
        for i in range(0, len(nums), per):
            chunk = nums[i:i + per]
            for n in chunk:
                label[(stem, n)] = _block_name(stem, chunk[0], chunk[-1])
    group_names: List[str] = []
    of = []
    for key in keys:
        g = key[0] if key[1] is None else label[key]
        if g not in group_names:
            group_names.append(g)
        of.append(group_names.index(g))
    return dict(names=group_names, of=np.asarray(of))


def _group_in_chunks(names: List[str], max_groups: int) -> Dict[str, object]:
    per = -(-len(names) // max_groups)
    of = np.arange(len(names)) // per
    group_names = [names[i] if i + 1 == min(i + per, len(names)) else
                   f"{names[i]} … {names[min(i + per, len(names)) - 1]}"
                   for i in range(0, len(names), per)]
    return dict(names=group_names, of=of)


def group_sum(values: np.ndarray, groups: Dict[str, object]) -> np.ndarray:
    """Sum a [..., layers] array into [..., groups]."""
    values = np.asarray(values)
    out = np.zeros((*values.shape[:-1], len(groups["names"])), dtype=np.float64)
    for layer, g in enumerate(groups["of"]):
        out[..., g] += values[..., layer]
    return out
