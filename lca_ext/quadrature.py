"""The path integral of one tracked step: ḡ, the average gradient along the
straight line θ_t → θ_{t+1}, its error estimate, and when to stop refining.

Everything a rule decides is decided on *samples*: at every path point f the
step evaluates, one fused call gives φ_k(f) = Σ_{i∈k} Δθ_i·g_i(θ_t + fΔθ) per
parameter tensor k (and per class in per-class mode).  LCA is linear in ḡ, so a
rule's per-tensor sums, the trapezoid on the same points and the error
estimates are all sums of these samples, known before ḡ itself is formed.

Rules (``RuleOptions.method``; the options: lca_ext.rule_options):

* ``budget`` (the default): lca_ext.budget_rule, on the LocalSimpson below, with
  95% error bars from lca_ext.bars and a pass budget.
* ``certified``: Simpson on θ_t, the midpoint and θ_{t+1}, then
  *local* refinement: only the sub-intervals whose error estimate is too large
  get their two quarter points, until every criterion below holds.  Each point's
  gradient is kept in its own buffer (within ``path_memory_budget``; points
  beyond it are recomputed once when ḡ is formed), and ḡ = Σ_j w_j·g(f_j) with
  the composite Simpson weights of the final intervals.
* ``adaptive`` (total-only): the trapezoid on the end points, then Simpson, then
  uniform composite Simpson, the first whose *total* is grounded.  Cheapest
  (1.3–1.6 passes a step on the demo), with no per-tensor guarantee.
* ``simpson``: Simpson, then uniform composite Simpson, total-only.
* ``first_order``: ḡ = g(θ_t).

The error estimate of a tensor's sum (``tensor_error``) is a sum over the
step's intervals of |e|, e per interval: for the first interval [0, 1], S − T₂
(Simpson against the trapezoid on the same three points, T₂'s error to leading
order: an upper estimate wherever Simpson beats the trapezoid); for the halves
of a split interval, (S_l + S_r − S_p)/(2·PAIR_DIVISOR) each, PAIR_DIVISOR = 2
(the halves against their parent: 1.5x over for a rule converging as h², 7.5x
for a smooth loss, 2x under across a jump of the gradient, as ReLU makes, where
many small jumps partly average out: the benchmark measures how often it
covers).  The total-only rules record |S_n − T_n| (T_n the trapezoid on
the same points), or |φ(1) − φ(0)|/2 for a step the trapezoid accepted (the
trapezoid against the left-point rule), and never stop on it.

The certified stop (all of them, each step):

* total, exact: |ΣLCA − ΔL| ≤ rtol·max(|ΔL|, total_share·G) + noise, G = Σ_k |LCA_k|
  the step's gross movement and noise the pass precision's floor
  (``noise_floor``); rtol defaults to tensor_rtol.  total_share (0.1) keeps a
  step whose ΔL is a small remainder of large opposite movements from being
  refined to a fraction of a percent of that remainder: the tensors' own
  tolerances already allow an allocation error of up to tensor_rtol·G in sum,
  and the total is then held to a tenth of that.  An explicit ``atol`` makes it
  atol + rtol·|ΔL|, the total-only rules' check (there rtol = 1e-3 and
  atol = 1e-4 unless told otherwise, as before the certified rule);
* every tensor: tensor_error_k ≤ tensor_rtol·max(|LCA_k|, min_share·G): tensors
  carrying ≥ min_share of G are certified to tensor_rtol of their own value,
  smaller ones to tensor_rtol·min_share·G;
* per-class mode, every class total, exact (each class's loss is known at θ_t and
  θ_{t+1}): |Σ_k LCA_ck − ΔL_c| ≤ tensor_rtol·max(|LCA_c|, min_share·Σ_c|LCA_c|)
  + noise.

Refinement stops early, and the step is flagged ``noise_limited`` (not
grounded), when two further rounds have not brought the worst criterion's
error/tolerance ratio below 3/4 of what it was and rounding explains it: 16-bit
or TF32 passes, or float32 passes with the total's error within 10x the loss's
noise floor.  The passes' rounding, not the curvature, sets the error then, and
more points cannot help.  (A loss with many kinks
along the step converges slowly too; in float64 it is refined to max_splits.)
A step whose total meets its tolerance only thanks to the noise allowance is
flagged the same way: its ΔL is rounding (16-bit passes quantise the loss).  A
step whose finest interval reached 1/max_splits without meeting the criteria is
flagged not grounded.

The uniform rules (total-only ``adaptive`` and ``simpson``, and ``low_memory``
for ``reuse_gradients=False``: three buffers, a step that misses recomputed from
scratch with twice the intervals, judged by the certified criteria) are in
lca_ext.uniform_rules; ``recomputed_classes`` gives per-class LCA outside per-class mode at
the step's own points and weights.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from . import bars

from .rule_options import (METHODS, TOTAL_ONLY_ATOL, TOTAL_ONLY_RTOL,  # noqa: F401
                           RuleOptions, rule_options)

NOISE_FACTOR = 16     # noise floor = NOISE_FACTOR · u · (|L(θ_t)| + |L(θ_{t+1})|)


@dataclasses.dataclass
class PathResult:
    """One objective's path integral for one step (what the tracker stores)."""
    avg: List[torch.Tensor]            # ḡ ([C, *shape] stacks in per-class mode)
    points: List[Tuple[float, float]]  # (path fraction, weight) of the rule, Σ w = 1
    loss_after: float
    g_end: Optional[List[torch.Tensor]]   # g(θ_{t+1}) to start the next step, or None
    splits: int                        # sub-intervals between the rule's points
                                       # (1: trapezoid, 2: Simpson, n: composite)
    tensor_error: np.ndarray           # [K] estimated |error| of each tensor's sum
    grounded: bool                     # every criterion of the rule met
    noise_limited: bool
    class_loss: Optional[Tuple[np.ndarray, np.ndarray]] = None   # [C] at θ_t, θ_{t+1}
    budget_limited: bool = False       # stopped at max_passes (method="budget")
    tensor_bias: Optional[np.ndarray] = None   # [K] Ê, the bars' signed error estimate
    tensor_sd: Optional[np.ndarray] = None     # [K] √V̂ (lca_ext.bars)
    bar_dof: int = 0                   # the bars' degrees of freedom (0: no bars)


@dataclasses.dataclass
class _Point:
    grad: Optional[List[torch.Tensor]]   # its gradient buffer (None: not held)
    phi: np.ndarray                      # [C or 1, K] samples Δθ·g per tensor (class)
    loss: float
    class_loss: Optional[np.ndarray]


# -- samples ------------------------------------------------------------------------

def simpson_sum(phi: Dict[float, np.ndarray], a: float, b: float) -> np.ndarray:
    """Simpson on [a, b] (its midpoint sampled), shaped like the samples."""
    return (b - a) / 6 * (phi[a] + 4 * phi[(a + b) / 2] + phi[b])


def embedded_error(phi: Dict[float, np.ndarray], a: float, b: float) -> np.ndarray:
    """S − T₂ on [a, b]: Simpson against the trapezoid on the same three points
    (the estimate of an interval that has no parent)."""
    h, m = b - a, (a + b) / 2
    return simpson_sum(phi, a, b) - h / 4 * (phi[a] + 2 * phi[m] + phi[b])


def pair_error(s_parent, s_left, s_right) -> np.ndarray:
    """Each half's error estimate after splitting an interval: the halves'
    Simpson against the parent's, (S_l + S_r − S_p) / (2·PAIR_DIVISOR)."""
    return (s_left + s_right - s_parent) / (2 * PAIR_DIVISOR)


def noise_floor(path, losses: Sequence[float]) -> float:
    """The loss difference's rounding floor: NOISE_FACTOR·u·Σ|L| with u the
    unit roundoff of the passes' arithmetic (``path.unit_roundoff()``)."""
    return NOISE_FACTOR * path.unit_roundoff() * sum(abs(v) for v in losses)


@dataclasses.dataclass
class _Verdict:
    ok: bool
    excess: float                      # worst error / tolerance over the criteria
    badness: List[float]               # per interval, for choosing what to refine
    tensor_error: np.ndarray           # [K]
    within_noise_only: bool = False    # the total passed only by the noise allowance
    total_error: float = 0.0           # |ΣLCA − ΔL| of the rule, exact


def judge(opts: RuleOptions, pairs, phi_sum: np.ndarray, d_loss: float, noise: float,
          class_d_loss: Optional[np.ndarray] = None) -> _Verdict:
    """The certified criteria on one set of intervals (``pairs``: each
    interval's Simpson sum and signed error estimate, shaped like the samples
    [C or 1, K]); total-only rules use only the total's."""
    s = phi_sum                                       # [C, K] the rule's sums
    tensor = s.sum(0)                                 # [K]
    gross = float(np.abs(tensor).sum())
    est_i = [np.abs(e.sum(0)) for _, e in pairs]      # per interval, per tensor
    tensor_error = np.sum(est_i, axis=0)
    total_err = abs(float(tensor.sum()) - d_loss)
    tol_total = opts.total_tolerance(d_loss, gross, noise)
    ratios = [total_err / tol_total if tol_total > 0 else math.inf * (total_err > 0)]
    badness = [abs(float(e.sum())) / max(tol_total, 1e-300) for _, e in pairs]
    if not opts.total_only:
        tol_k = opts.tensor_rtol * np.maximum(np.abs(tensor), opts.min_share * gross) + 1e-300
        ratios.append(float((tensor_error / tol_k).max()))
        badness = [max(b, float((e / tol_k).max())) for b, e in zip(badness, est_i)]
        if class_d_loss is not None and s.shape[0] > 1:
            cls = s.sum(1)                            # [C] class totals
            tol_c = opts.tensor_rtol * np.maximum(
                np.abs(cls), opts.min_share * np.abs(cls).sum()) + noise + 1e-300
            ratios.append(float((np.abs(cls - class_d_loss) / tol_c).max()))
            badness = [max(b, float((np.abs(e.sum(1)) / tol_c).max()))
                       for b, (_, e) in zip(badness, pairs)]
    excess = max(ratios)
    signal_tol = opts.total_tolerance(d_loss, gross, 0.0)
    return _Verdict(excess <= 1.0, excess, badness, tensor_error,
                    total_err > signal_tol and not opts.total_only, total_err)


STALL_FACTOR = 0.75
# S_l + S_r − S_p is (2^p − 1) x the halves' error for a rule converging as h^p:
# 15 for a smooth loss (Simpson), 3 across a kink (a jump in the curvature), 1
# across a jump in the gradient (ReLU).  2 covers kinks with margin (4 left a
# CNN's grounded steps up to 7.8x over the tolerance) and costs ~10% more passes
PAIR_DIVISOR = 2
FLOAT64_U = 2.0 ** -53     # float64 passes: a stall is the loss's roughness, not rounding
ROUNDING_MARGIN = 10       # float32: a stall within 10x the noise floor is rounding


def ungrounded_message(opts: RuleOptions, unit_roundoff: float, name: str, step: int,
                       path: PathResult, error: float) -> str:
    """The warning for a step that missed its rule's criteria, naming the cause:
    the passes' rounding (noise-limited) or the curvature (max_splits)."""
    if path.noise_limited:
        if unit_roundoff > 2.0 ** -24:
            cause = ("the passes' rounding (16-bit or TF32 arithmetic), not the curvature, "
                     "limits this step. Run the passes in float32 (pass_dtype=torch.float32, "
                     "autocast=None; on a GPU torch.backends.cuda.matmul.allow_tf32 = False)")
        else:
            within = ("within the loss's float32 noise floor" if opts.method == "budget"
                      else "within the tolerance plus the loss's float32 noise floor")
            cause = (f"the rounding of float32 passes limits this step (|ΣLCA − ΔL| is "
                     f"{within}, or stopped shrinking under refinement within "
                     f"{ROUNDING_MARGIN}x it). Run the passes in float64 "
                     "(pass_dtype=torch.float64)")
        knobs = "bar_rtol, rtol" if opts.method == "budget" else "tensor_rtol, rtol"
        why = (f"the error is at the passes' rounding floor, where refining cannot shrink "
               f"it: {cause}, or loosen the tolerances (RuleOptions {knobs})")
    else:
        why = (f"the finest interval (1/{opts.max_splits} of the step) was reached: the "
               "loss is too curved along this step (large early steps) or not smooth in θ; "
               "raise max_splits or lower the learning rate")
    return (f"lca_ext: step {step} ({name!r}) is not grounded after {path.splits} "
            f"intervals: |ΣLCA − ΔL| = {error:.3g}, largest estimated tensor error "
            f"{float(np.max(path.tensor_error, initial=0.0)):.3g}; {why}. Later such steps "
            "are counted in tracker.ungrounded_steps (and run.grounded() is False for "
            "them) without a warning.")


def _stalled(history: List[float]) -> bool:
    """Two more rounds did not bring the worst error/tolerance ratio below
    STALL_FACTOR of what it was."""
    return len(history) >= 3 and history[-1] > STALL_FACTOR * min(history[:-2])


def rounding_limited(path, history: List[float], verdict, noise: float) -> bool:
    """Refinement stalled *and* rounding explains it: 16-bit or TF32 passes, or
    float32 passes whose total error is within ROUNDING_MARGIN of the loss's
    noise floor.  (A kinked loss stalls too, at errors far above the floor; it
    is refined on, to max_splits, and flagged as curvature.)"""
    if not _stalled(history):
        return False
    u = path.unit_roundoff()
    return u > 2.0 ** -24 or (u > FLOAT64_U and verdict.total_error <= ROUNDING_MARGIN * noise)


# -- certified: local refinement -------------------------------------------------

class LocalSimpson:
    """Simpson on the step, refined locally: the points evaluated so far (each
    gradient in its own buffer while ``path_memory_budget`` allows), the
    intervals, and each interval's Simpson sum and signed error estimate.  The
    state both the certified and the budget rule (lca_ext.budget_rule) refine;
    building it costs the end point's and the midpoint's passes."""

    def __init__(self, path, opts: RuleOptions, end=None):
        """``end``: (buffer, loss) of θ_{t+1} already evaluated (its pass made)."""
        self.path = path
        # (the groups' gradients the default rule keeps count against the budget;
        # the same on every DDP rank, whatever its own share of the groups)
        kept = path.group_bytes() if hasattr(path, "group_bytes") else \
            2 * len(getattr(path, "group_start", None) or ()) * path.one_buffer
        self.held_extra = max(0, (opts.path_memory_budget - kept) // max(1, path.one_buffer))
        self.finest = 2.0 / opts.max_splits      # a Simpson interval: two sub-intervals
        self.pts: Dict[float, _Point] = {
            0.0: _Point(path.g_start, path.dots(path.g_start), path.loss_start,
                        path.class_loss_start)}
        if end is None:
            self._evaluate(1.0, True)
        else:
            self.pts[1.0] = _Point(end[0], path.dots(end[0]), end[1], path.last_class_losses)
        self._evaluate(0.5, True)
        first, end = self.pts[0.0], self.pts[1.0]
        self.d_loss = end.loss - first.loss
        self.class_d = (None if first.class_loss is None or end.class_loss is None
                        else end.class_loss - first.class_loss)
        self.noise = noise_floor(path, (first.loss, end.loss))
        self.intervals = [(0.0, 1.0)]
        self.phi = {f: p.phi for f, p in self.pts.items()}
        self.sums = {(0.0, 1.0): simpson_sum(self.phi, 0.0, 1.0)}
        self.est = {(0.0, 1.0): embedded_error(self.phi, 0.0, 1.0)}

    def _evaluate(self, f: float, hold: bool) -> None:
        buf = self.path.buffer()
        loss = self.path.grad(f, buf)
        self.pts[f] = _Point(buf, self.path.dots(buf), loss, self.path.last_class_losses)
        if not hold:
            self.path.release(buf)
            self.pts[f].grad = None

    def pairs(self):
        """(Simpson sum, signed error estimate) of every interval, [C or 1, K] each."""
        return [(self.sums[iv], self.est[iv]) for iv in self.intervals]

    def judge(self, opts: RuleOptions) -> "_Verdict":
        pairs = self.pairs()
        return judge(opts, pairs, sum(s for s, _ in pairs), self.d_loss, self.noise,
                     self.class_d)

    def splittable(self, badness) -> List[Tuple[float, Tuple[float, float]]]:
        """(badness, interval) of the intervals wider than the finest."""
        return [(b, iv) for b, iv in zip(badness, self.intervals)
                if iv[1] - iv[0] > self.finest]

    @property
    def unheld(self) -> int:
        """Points whose gradient was not held: each is recomputed once by form()."""
        return sum(1 for p in self.pts.values() if p.grad is None)

    def splits_within(self, passes: int) -> int:
        """How many splits ``passes`` passes pay for: a point held costs its pass,
        one past path_memory_budget a second (form() recomputes it), priced
        point by point as the memory runs out."""
        held, count = self.held_extra, 0
        while True:
            cost = (1 if held > 0 else 2) + (1 if held > 1 else 2)
            if cost > passes:
                return count
            passes, held, count = passes - cost, held - 2, count + 1

    def split(self, chosen) -> None:
        """The intervals in ``chosen`` get their two quarter points (two passes)."""
        new = []
        for a, b in self.intervals:
            if (a, b) in chosen:
                m = (a + b) / 2
                for f in ((a + m) / 2, (m + b) / 2):
                    self._evaluate(f, hold=self.held_extra > 0)
                    self.held_extra -= 1
                    self.phi[f] = self.pts[f].phi
                left, right = (a, m), (m, b)
                self.sums[left] = simpson_sum(self.phi, a, m)
                self.sums[right] = simpson_sum(self.phi, m, b)
                self.est[left] = self.est[right] = pair_error(
                    self.sums[(a, b)], self.sums[left], self.sums[right])
                new += [left, right]
            else:
                new.append((a, b))
        self.intervals = new

    def finish(self):
        """ḡ (composite Simpson weights of the final intervals) and the weights;
        the points' buffers other than θ_t's and θ_{t+1}'s go back to the pool."""
        weights = _weights(self.intervals)
        avg = _form(self.path, self.pts, weights)
        for f, p in self.pts.items():
            if f not in (0.0, 1.0) and p.grad is not None and p.grad is not avg:
                self.path.release(p.grad)
        return avg, weights

    def result(self, avg, weights, tensor_error, grounded: bool, noise_limited: bool,
               **bar_fields) -> PathResult:
        first, end = self.pts[0.0], self.pts[1.0]
        return PathResult(avg, sorted(weights.items()), end.loss, end.grad,
                          2 * len(self.intervals), np.asarray(tensor_error, np.float64),
                          grounded, noise_limited,
                          None if self.class_d is None else (first.class_loss, end.class_loss),
                          **bar_fields)


def certified(path, opts: RuleOptions) -> PathResult:
    """Simpson, then local refinement until every certified criterion holds
    (the module docstring)."""
    rule = LocalSimpson(path, opts)
    history: List[float] = []
    noise_limited = False
    while True:
        verdict = rule.judge(opts)
        history.append(verdict.excess)
        if verdict.ok:
            # a total inside the rounding floor only: ΔL itself is rounding
            noise_limited = verdict.within_noise_only
            break
        if rounding_limited(path, history, verdict, rule.noise):
            noise_limited = True
            break
        splittable = rule.splittable(verdict.badness)
        if not splittable:
            break                                  # max_splits everywhere
        worst = max(b for b, _ in splittable)
        rule.split({iv for b, iv in splittable if b >= 0.5 * worst})
    avg, weights = rule.finish()
    # the stored bar is the honest one (one more pass), the stop above the
    # calibrated estimate's (lca_ext.bars)
    honest = bars.honest_bars(path, opts.seed, rule.intervals,
                              {f: v.sum(0) for f, v in rule.phi.items()}) \
        if opts.with_bars else None
    bar_k, e_hat, sd, dof = honest or (verdict.tensor_error, None, None, 0)
    return rule.result(avg, weights, bar_k, verdict.ok and not noise_limited, noise_limited,
                       tensor_bias=e_hat, tensor_sd=sd, bar_dof=dof)


def _weights(intervals) -> Dict[float, float]:
    """Composite Simpson weights of the points of ``intervals`` (Σ = 1)."""
    w: Dict[float, float] = {}
    for a, b in intervals:
        h, m = b - a, (a + b) / 2
        for f, c in ((a, h / 6), (m, 4 * h / 6), (b, h / 6)):
            w[f] = w.get(f, 0.0) + c
    return w


def _form(path, pts, weights):
    """ḡ = Σ w_f·g(f), in the midpoint's buffer (never θ_t's or θ_{t+1}'s: the
    tracker releases the first and keeps the second); points whose gradient was
    not held are recomputed into it with their weight."""
    avg = pts[0.5].grad
    path.scale(avg, weights[0.5])
    for f, w in weights.items():
        if f == 0.5:
            continue
        p = pts[f]
        if p.grad is not None:
            path.accumulate(avg, p.grad, w)
        else:
            path.grad(f, avg, weight=w)
    return avg


def recomputed_classes(path, points, class_memory_budget: int):
    """Per-class LCA outside per-class mode: the class gradients recomputed at
    the points of the total's rule (``points``: (f, w) pairs), in groups of
    classes that fit ``class_memory_budget``.  Returns (class sums [C, K], class
    counts [C, K, 4], class losses at θ_t and θ_{t+1} [C] each)."""
    num = path.num_classes
    group = max(1, min(num, class_memory_budget // max(1, path.one_buffer)))
    sums, counts, before, after_loss = [], [], [], []
    ends = dict(points)
    ends.setdefault(0.0, 0.0)
    ends.setdefault(1.0, 0.0)            # the losses at both ends, even at weight 0
    for c0 in range(0, num, group):
        classes = list(range(c0, min(num, c0 + group)))
        stacked = path.class_stack(len(classes))
        for f, w in sorted(ends.items()):
            if w == 0.0:                  # a loss only (forward)
                part = path.class_losses(f, classes)
            else:
                part = path.class_grads(f, classes, stacked, w)
            if f == 0.0:
                before.append(part)
            elif f == 1.0:
                after_loss.append(part)
        s_, c_ = path.class_sums(stacked)
        sums.append(s_)
        counts.append(c_)
    before, after_loss = np.concatenate(before), np.concatenate(after_loss)
    path.check_class_split(float(before.sum()))
    return np.concatenate(sums), np.concatenate(counts), before, after_loss
