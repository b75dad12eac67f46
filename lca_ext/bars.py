"""Error bars from randomised group samples: a 95% interval for each tensor's
(and each step-sum's) quadrature error that holds whatever the smoothness.

Why not the rule's own difference: on three points every per-tensor estimate
is a multiple of one second difference; across ReLU's jumps in the gradient it
is not a bound (docs/guides/accuracy.md measures 56–88% coverage).  What is
needed is more than one sample of the error, so the LCA set is split into G
*groups* (its batches), whose gradients add up to the whole set's, and one
more pass evaluates each group g at its own random point U_g, drawn
independently per group and per step from a density p on (0, 1) (mostly
Beta(2, 2): :func:`draw_points`).

The estimate.  Let the step's rule be composite Simpson on intervals
[a_j, b_j] (midpoints m_j sampled), S its per-tensor value and E = I − S its
error.  For group g let P_g be its piecewise interpolant of φ_g: on an
interval with a_j > 0, the quadratic through its three points; on the first
interval [0, b_1] too where the groups' gradients at θ_t are held (the
default rule's, lca_ext.budget_rule), else the line through m_1 and b_1 plus
1/G of the whole set's curvature there (the whole quadratic minus its line
through m_1 and b_1: g(θ_t) is then known only as a whole).  (The two-pass
stage's estimate is :func:`monte_carlo`.)  The P_g add up to the whole set's interpolant,
whose integral is S.  So c_g = (φ_g(U_g) − P_g(U_g))/p(U_g), with expectation
∫φ_g − ∫P_g, gives

    Ê = Σ_g c_g,    E[Ê] = I − S = E

for any integrable φ, jumps included: an *unbiased* estimate of the error.
The c_g are independent, so V̂ = G/(G−1)·Σ_g (c_g − c̄)² estimates Var(Ê)
(conservatively: groups whose means differ only add to it; in per-class mode
pooled within each class, whose units are alike: :func:`spread`).  The stored bar
is the half-width of a 95% interval for |E|,

    tensor_error = |Ê| + t_{G−1}·√V̂        (t the Student quantile, 0.975)

(|E| ≤ |Ê| + |Ê − E|, and |Ê − E| ≤ t·√V̂ 95% of the time), and the step
also stores Ê (``tensor_bias``) and √V̂ (``tensor_sd``), from which sums over
steps get their own interval (:func:`sum_error`: the Ê of independent steps
add, their variances add).  It holds to the extent that a sum of G independent
terms is near normal: the rule lab (benchmarks/rule_lab.py) measures it.
"""
from __future__ import annotations

import math
import zlib
from typing import Dict, Sequence, Tuple

import numpy as np

# Student's t, 0.975 quantile, by degrees of freedom (1..30); 1.96 beyond
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201,
         2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074,
         2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]


def t975(dof: int) -> float:
    """Student's t 0.975 quantile (a two-sided 95% interval)."""
    if dof < 1:
        return math.inf
    return _T975[dof - 1] if dof <= len(_T975) else 1.96


def _t_inside(theta: float, dof: int) -> float:
    """P(|T| <= √dof·tan θ) for Student's t with integer ``dof`` (the closed
    forms of Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if dof % 2:
        if dof == 1:
            return 2.0 * theta / math.pi
        term = total = math.cos(theta)
        for k in range(1, (dof - 3) // 2 + 1):
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * total)
    term = total = 1.0
    for k in range(1, (dof - 2) // 2 + 1):
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


# beyond this many degrees of freedom the quantile is taken at it (1.98 against
# 1.96 at 0.975: a slightly stricter refine decision, never a bar)
_T_DOF_CAP = 200


def t_two_sided(alpha: float, dof: int) -> float:
    """The t with P(|T_dof| > t) = alpha (Student's t, integer dof >= 1; dof
    above 200 taken as 200), solved by bisection on the closed form."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"lca_ext.bars.t_two_sided: alpha={alpha!r}; expected 0 < alpha < 1")
    if dof < 1:
        return math.inf
    dof = min(int(dof), _T_DOF_CAP)
    lo, hi = 0.0, math.pi / 2
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if 1.0 - _t_inside(mid, dof) > alpha:
            lo = mid
        else:
            hi = mid
    return math.sqrt(dof) * math.tan(0.5 * (lo + hi))


# The points' density: 9/10 Beta(2, 2), 1/10 uniform (DEFENSIVE).  Each group's
# correction is weighted by 1/p(U_g), so Ê stays unbiased for any integrand;
# p ∝ u(1−u) matches the trapezoid's error shape, which makes a curved, smooth
# group's weighted correction nearly constant (small V̂), and the uniform share
# bounds the weights by 1/DEFENSIVE where a jump lands near an end.  The rule lab
# measured it against uniform points: the two-pass stage ends 76 of 140 ViT
# steps instead of 43 and 101 of 140 LSTM steps instead of 86, coverage >= 99%.
DEFENSIVE = 0.1


def draw_points(rng: np.random.Generator, groups: int) -> np.ndarray:
    """One independent point per group, inside (0, 1), from the density p
    (:func:`point_weights`)."""
    uniform = rng.uniform(0.0, 1.0, size=groups)
    beta = rng.beta(2.0, 2.0, size=groups)
    pick = rng.uniform(0.0, 1.0, size=groups) < DEFENSIVE
    # (an end point itself, drawn with probability ~1e-16, would be θ_t or θ_{t+1}
    # as a tensor, not a point: kept strictly inside)
    return np.clip(np.where(pick, uniform, beta), 1e-12, 1.0 - 1e-12)


def point_weights(u: np.ndarray) -> np.ndarray:
    """1/p(u): each group's correction weight for the points draw_points gives."""
    u = np.asarray(u, dtype=np.float64)
    return 1.0 / (DEFENSIVE + (1.0 - DEFENSIVE) * 6.0 * u * (1.0 - u))


def _interval_of(u: float, intervals: Sequence[Tuple[float, float]]) -> Tuple[float, float]:
    for a, b in intervals:
        if a <= u <= b:
            return a, b
    raise ValueError(f"lca_ext.bars: point {u} outside the rule's intervals")


def _quadratic(u, a, m, b, fa, fm, fb):
    la = (u - m) * (u - b) / ((a - m) * (a - b))
    lm = (u - a) * (u - b) / ((m - a) * (m - b))
    lb = (u - a) * (u - m) / ((b - a) * (b - m))
    return la * fa + lm * fm + lb * fb


def control(u: float, a: float, b: float, at, known_start: bool = False,
            whole=None, groups: int = 1, order: int = 2) -> np.ndarray:
    """P_g(u): the group's interpolant at u on [a, b] (``at(f)`` its samples) of
    the rule's ``order``: 2 Simpson's quadratic through a, m and b, 1 the
    trapezoid's line through a and b.  On an interval starting at θ_t without
    the group's values there, what the group's own later samples give plus 1/G
    of the rest of the whole set's interpolant (``whole(f)``), so that the
    groups' controls still add up to the whole set's: Simpson, the group's line
    through m and b plus 1/G of the whole quadratic's curvature; the trapezoid,
    the group's value at b plus 1/G of the whole line's change from b."""
    m = (a + b) / 2
    if a == 0.0 and not known_start:
        if order == 1:
            return at(b) + (u - b) / (b - a) * (whole(b) - whole(a)) / groups
        line = at(m) + (u - m) / (b - m) * (at(b) - at(m))
        whole_line = whole(m) + (u - m) / (b - m) * (whole(b) - whole(m))
        curve = _quadratic(u, a, m, b, whole(a), whole(m), whole(b)) - whole_line
        return line + curve / groups
    if order == 1:
        return at(a) + (u - a) / (b - a) * (at(b) - at(a))
    return _quadratic(u, a, m, b, at(a), at(m), at(b))


def estimate(intervals: Sequence[Tuple[float, float]], whole: Dict[float, np.ndarray],
             groups: Dict[float, np.ndarray], u: np.ndarray,
             at_u: np.ndarray, strata=None,
             order: int = 2) -> Tuple[np.ndarray, np.ndarray, int]:
    """(Ê [K], √V̂ [K], degrees of freedom) for the rule on ``intervals``
    (``order``: the rule's interpolant, :func:`control`).

    whole:   {f: [K]} the whole set's samples (f = 0 included)
    groups:  {f: [G, K]} the groups' samples at every point but 0 (or at every
             point: then the first interval's control is a quadratic too)
    u, at_u: the groups' random points [G] and their samples there [G, K]
    strata:  [G] labels of groups alike, or None (:func:`spread`)
    """
    G = len(u)
    c = np.empty_like(at_u)
    known_start = 0.0 in groups        # the groups' gradients at θ_t held
    w = point_weights(u)
    for g in range(G):
        a, b = _interval_of(float(u[g]), intervals)
        c[g] = w[g] * (at_u[g] - control(float(u[g]), a, b, lambda f: groups[f][g],
                                         known_start, whole.__getitem__, G, order))
    # the controls add up to the whole set's interpolant, whose integral is the
    # rule's value: Ê = Σ c_g is unbiased for E
    e_hat = c.sum(0)
    sd, dof = spread(c, strata)
    return e_hat, sd, dof


def strata_of(strata, groups: int) -> list:
    """The groups' indices by stratum: ``strata`` [G] labels (None: one
    stratum), labels taken together in order until a stratum holds
    MIN_STRATUM groups (the last few join the stratum before)."""
    if strata is None:
        return [np.arange(groups)]
    labels = np.asarray(strata)
    if labels.shape != (groups,):
        raise ValueError(f"lca_ext.bars: strata has shape {labels.shape}; expected "
                         f"({groups},), one label a group")
    parts, small = [], []
    for h in np.unique(labels):
        small.append(np.flatnonzero(labels == h))
        if sum(len(p) for p in small) >= MIN_STRATUM:
            parts.append(np.sort(np.concatenate(small)))
            small = []
    if small:
        rest = np.sort(np.concatenate(small))
        if parts:
            parts[-1] = np.sort(np.concatenate([parts[-1], rest]))
        else:
            parts.append(rest)
    return parts


# strata are labels taken together, in order, until each holds this many groups
# (three degrees of freedom: a stratum's share of V̂ is then known well enough
# for the Welch–Satterthwaite degrees of freedom; pairs made it 1 a stratum)
MIN_STRATUM = 4


def spread(c: np.ndarray, strata=None, covariate=None) -> Tuple[np.ndarray, int]:
    """(√V̂ [K], degrees of freedom) of Ê = Σ_g c_g from the groups' terms c [G, K].

    V̂ pools each stratum's spread about its own mean, Σ_h n_h/(n_h−1)·Σ_{g∈h}
    (c_g − c̄_h)², with G − H degrees of freedom.  Its expectation is Var(Ê) plus
    n_h/(n_h−1)·Σ (μ_g − μ̄_h)² over each stratum: groups whose means differ
    within a stratum only widen it, so strata of groups alike (the units of
    one class in per-class mode: lca_ext.path.StepPath.group_strata) keep the
    classes' different curvatures out of the bar, where one stratum counts
    them as noise (the demo: the two-pass stage's bars were 2.3x their target
    at the median over all units, 0.8x within classes).

    ``covariate`` [G]: a value per group fixed before the points were drawn,
    which the groups' means follow (the two-pass stage: each group's exact
    total trapezoid error, lca_ext.budget_rule.trapezoid_errors).  Then V̂ is
    the spread about a regression of c_g on it within the strata, each residual
    e_g weighted by 1/(1 − h_g)² (h_g its leverage; "HC3"):
    E[e_g²] ≥ (1 − h_g)²·Var(c_g) for a fixed design, so E[V̂] ≥ Var(Ê)
    whatever the groups' variances, with one degree of freedom less.  It is
    used only where every stratum has MIN_STRATUM groups (in pairs the
    leverage of the strata alone, 1/2, doubled V̂), and left out
    where a group would carry nearly all of the fit (leverage above
    MAX_LEVERAGE) or the covariate is not finite or constant.

    Several strata whose spreads differ: a stratum of n_h groups gives its
    share of V̂ only n_h − 1 degrees of freedom, so where one stratum carries
    most of V̂ the t quantile of G − H overstates how well V̂ is known.  Each
    tensor's √V̂ is then widened by t(ν_k)/t(G − H), ν_k its Welch–Satterthwaite
    degrees of freedom (Σ_h V_h)²/Σ_h V_h²/(n_h − 1), so that t(G − H)·√V̂ is
    the 95% half-width at ν_k (a synthetic class with 30x the others' jumps:
    tests/test_bars_rules.py)."""
    G = len(c)
    if G < 2:
        return np.full(c.shape[1:], np.inf), 0
    parts = strata_of(strata, G)
    if covariate is not None and min(len(p) for p in parts) >= MIN_STRATUM:
        fitted = _regression_terms(c, parts, np.asarray(covariate, dtype=np.float64))
        if fitted is not None:
            return _welch(*fitted, parts)
    terms = [len(idx) / (len(idx) - 1) * ((c[idx] - c[idx].mean(0)) ** 2).sum(0)
             for idx in parts]
    return _welch(terms, G - len(parts), parts)


# a covariate that puts a group's leverage above this is left out of the
# spread (1/(1 − h)² would make V̂ rest on that one group)
MAX_LEVERAGE = 0.9


def _welch(terms, dof: int, parts) -> Tuple[np.ndarray, int]:
    """√(Σ_h terms_h) [K], each tensor's widened by t(ν_k)/t(dof) where its
    Welch–Satterthwaite ν_k (stratum h: len(parts[h]) − 1) is below ``dof``."""
    var = np.sum(terms, axis=0)
    sd = np.sqrt(var)
    if len(parts) < 2:
        return sd, dof
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = np.sum([t ** 2 / max(len(idx) - 1, 1) for t, idx in zip(terms, parts)], axis=0)
        nu = np.where(denom > 0, var ** 2 / denom, float(dof))
    nu = np.minimum(np.floor(np.nan_to_num(nu, nan=float(dof))), dof).astype(int)
    base = t975(dof)
    widen = np.array([t975(max(int(n), 1)) / base for n in nu.ravel()]).reshape(nu.shape)
    return sd * widen, dof


def _regression_terms(c: np.ndarray, parts, x: np.ndarray):
    """(each stratum's HC3 share of V̂ [H][K], dof) about c's regression on
    the strata and ``x``, or None where x adds nothing or gives a group too
    much leverage."""
    G = len(c)
    if x.shape != (G,) or not np.isfinite(x).all():
        return None
    design = np.zeros((G, len(parts) + 1))
    for j, idx in enumerate(parts):
        design[idx, j] = 1.0
        design[idx, -1] = x[idx] - x[idx].mean()        # (centred within its stratum)
    scale = np.abs(design[:, -1]).max()
    if not scale > 0.0:
        return None
    design[:, -1] /= scale
    hat = design @ np.linalg.pinv(design)
    lev = np.diag(hat)
    if np.linalg.matrix_rank(design) < design.shape[1] or lev.max() > MAX_LEVERAGE:
        return None
    weighted = ((c - hat @ c) / (1.0 - lev)[:, None]) ** 2
    return [weighted[idx].sum(0) for idx in parts], G - design.shape[1]


def monte_carlo(g0: np.ndarray, g1: np.ndarray, u: np.ndarray,
                at_u: np.ndarray, strata=None,
                covariate=None) -> Tuple[np.ndarray, np.ndarray, int]:
    """The two-pass estimate (value [K], √V̂ [K], degrees of freedom) from each
    group's samples at θ_t and θ_{t+1} ([G, K]) and at its random point u_g:
    c_g = (φ_g(u_g) − ℓ_g(u_g))/p(u_g) (ℓ_g the group's line) has expectation
    ∫φ_g − ∫ℓ_g, so the trapezoid + Σ c_g is unbiased for the integral, and
    V̂ (:func:`spread`, within ``strata``, about ``covariate``) estimates its
    variance."""
    c = point_weights(u)[:, None] * (at_u - ((1 - u)[:, None] * g0 + u[:, None] * g1))
    value = 0.5 * (g0 + g1).sum(0) + c.sum(0)
    sd, dof = spread(c, strata, covariate)
    return value, sd, dof


def bar(e_hat: np.ndarray, sd: np.ndarray, dof: int) -> np.ndarray:
    """The 95% half-width for |E|: |Ê| + t·√V̂."""
    return np.abs(e_hat) + t975(dof) * sd


def sum_error(e_hat: np.ndarray, sd: np.ndarray, dof: np.ndarray) -> np.ndarray:
    """95% half-width for the error of a sum over steps ([T, K] inputs): |Σ Ê|
    + t·√(Σ V̂), t from the Welch–Satterthwaite degrees of freedom."""
    var = (sd ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        denom = ((sd ** 4) / np.maximum(dof, 1)[:, None]).sum(0)
        nu = np.where(denom > 0, var ** 2 / denom, np.inf)
    t = np.array([t975(int(min(n, 1e6))) if np.isfinite(n) else 1.96 for n in nu])
    return np.abs(e_hat.sum(0)) + t * np.sqrt(var)


def rng_for(seed: int, name: str, step: int) -> np.random.Generator:
    """The step's own generator (never torch's or NumPy's global streams, so
    the training's randomness is untouched): seeded by (seed, objective, step)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode()), step])


def group_samples(path, points) -> Dict[float, np.ndarray]:
    """The groups' samples at the rule's points (θ_t's only where the groups'
    gradients there are held)."""
    known = getattr(path, "group_start_known", False)
    return {f: path.group_dots(f) for f in points if f > 0.0 or known}


def honest_bars(path, seed: int, intervals, whole, order: int = 2):
    """One mixed pass and the 95% bars of a finished rule: the interpolant of
    ``order`` (:func:`control`; 2: composite Simpson) on ``intervals``, whose
    points' whole-set samples are ``whole`` ({f: [K]}).  Returns (bar, Ê, √V̂,
    dof), or None where the path has no groups."""
    if path.groups < 2:
        return None
    u = draw_points(rng_for(seed, path.name, path.step), path.groups)
    at_u = path.mixed(u)
    e_hat, sd, dof = estimate(intervals, whole, group_samples(path, whole), u, at_u,
                              getattr(path, "group_strata", None), order)
    return bar(e_hat, sd, dof), e_hat, sd, dof
