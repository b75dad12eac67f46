"""The path integral of one tracked step: ḡ, the average gradient along the
straight line θ_t → θ_{t+1}, its error estimate, and when to stop refining.

Everything a rule decides is decided on *samples*: at every path point f the
step evaluates, one fused call gives φ_k(f) = Σ_{i∈k} Δθ_i·g_i(θ_t + fΔθ) per
parameter tensor k (and per class in per-class mode).  LCA is linear in ḡ, so a
rule's per-tensor sums, the trapezoid on the same points and the error
estimates are all sums of these samples, known before ḡ itself is formed.

Rules (``RuleOptions.method``):

* ``certified`` (the default): Simpson on θ_t, the midpoint and θ_{t+1}, then
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
from ._options import grouped

METHODS = ("budget", "certified", "adaptive", "simpson", "first_order")
# total-only rules' tolerance when rtol / atol are None (the rule before certified)
TOTAL_ONLY_RTOL, TOTAL_ONLY_ATOL = 1e-3, 1e-4
NOISE_FACTOR = 16     # noise floor = NOISE_FACTOR · u · (|L(θ_t)| + |L(θ_{t+1})|)


@dataclasses.dataclass
class RuleOptions:
    """How each step's path integral is computed and when it is good enough.

    method:      "budget" (default: lca_ext.budget_rule), "certified",
                 "adaptive" (total-only, trapezoid first), "simpson" (total-only)
                 or "first_order"; see lca_ext.quadrature
    rtol, atol:  the total.  Certified and budget: |ΣLCA − ΔL| ≤ rtol·max(|ΔL|,
                 total_share·G) + the noise floor, rtol None meaning tensor_rtol
                 (budget with bars: bar_rtol, the tensors' own target).  Total-only
                 rules, or any rule given an atol: |ΣLCA − ΔL| ≤ atol + rtol·|ΔL|,
                 None meaning rtol 1e-3 and atol 1e-4 (as before the certified rule)
    tensor_rtol: certified: each tensor's estimated error ≤ tensor_rtol·
                 max(|LCA_k|, min_share·G); each class total's exact error likewise
    min_share:   the share of G below which a tensor (or class) is held to
                 tensor_rtol·min_share·G instead of its own value
    total_share: certified: the share of G below which |ΔL| is replaced by
                 total_share·G in the total's tolerance (a ΔL that is a small
                 remainder of large opposite movements)
    max_splits:  the finest interval is 1/max_splits of the step (a power of two)
    max_passes:  budget: the most gradient passes a step may spend, the end
                 point's included (the start pass after an untracked step is
                 not); a step that stops there is flagged ``budget_limited``.
                 None: no budget (max_splits still bounds the step)
    mean_passes, pass_reserve: budget: the run's pass account
                 (lca_ext.pass_account), off by default (None): each tracked step
                 earns mean_passes (>= 3), unspent passes are saved up to
                 pass_reserve, and a step spends at most what the account holds
                 (at least 3): the rule's passes over any n tracked steps are at
                 most mean_passes·n + pass_reserve (start passes and recomputed
                 class passes aside; none in the low-memory mode or offline).
                 The price of that bound: a step it cuts may end with its total
                 off ΔL (flagged budget_limited, not grounded; its bars say what
                 is left): 11 of 150 LSTM steps at mean_passes=3 (the accuracy
                 guide)
    groups:      budget: the LCA set is cut into at least this many batches
                 (a tensor pair or Dataset set, when batch_size is not given):
                 the independent groups of the error bars (lca_ext.bars)
    bar_rtol, bar_share: budget: refine while a tensor's 95% bar exceeds
                 bar_rtol·max(|LCA_k|, bar_share·G) ...
    refine_level: ... and its error estimate Ê is nonzero at this family-wise
                 level over the tensors above target (a Student t test of
                 |Ê| against √V̂, Bonferroni: lca_ext.budget_rule.refine_threshold):
                 a systematic, curvature error, which a finer rule removes; the
                 jumps' noise shrinks only like √h: there the step stops and its
                 bar says what is left.  1: refine on the bar alone
    bars:        budget and certified: the 95% bars (one more pass a step;
                 lca_ext.bars).  False: no mixed pass, tensor_error is the
                 rule's own estimate (the certified rule's, as before), and the
                 budget rule refines on that estimate (tensor_rtol, min_share)
    seed:        seeds the bars' random points (with the step and the
                 objective; never the global random streams)
    path_memory_budget: bytes of gradients the rules may hold beyond the three
                 they always hold (θ_t's, the midpoint's and θ_{t+1}'s): the
                 default rule's groups' gradients at θ_t and θ_{t+1} first (its
                 two-pass stage, lca_ext.budget_rule; 2 x groups buffers, kept
                 only if they fit, shared by the objectives), then refined
                 points; points beyond it are recomputed once, with their final
                 weight, when ḡ is formed.  0: no group gradients (Simpson on
                 every step, deterministic per-element values)
    """

    method: str = "budget"
    rtol: Optional[float] = None
    atol: Optional[float] = None
    tensor_rtol: float = 0.01
    min_share: float = 0.01
    total_share: float = 0.1
    max_splits: int = 32
    path_memory_budget: int = 2 << 30
    max_passes: Optional[int] = 8
    mean_passes: Optional[float] = None
    pass_reserve: int = 4
    groups: int = 8
    bar_rtol: float = 0.02
    bar_share: float = 0.05
    refine_level: float = 0.05
    # (renamed: refine_sd, a per-tensor threshold, became the family-wise refine_level)
    refine_sd: dataclasses.InitVar[Optional[float]] = None
    bars: bool = True
    seed: int = 0

    def __post_init__(self, refine_sd=None):
        if refine_sd is not None:
            raise TypeError(f"lca_ext: refine_sd={refine_sd!r} is no longer an option: the "
                            "default rule now refines on a family-wise test over the tensors "
                            "above target, RuleOptions.refine_level (0.05; 1 refines on the "
                            "bars alone, as refine_sd=0 did)")
        if self.method not in METHODS:
            raise ValueError(f"lca_ext: method={self.method!r}; expected one of "
                             f"{', '.join(repr(m) for m in METHODS)}")
        m = self.max_splits
        if not (isinstance(m, int) and m >= 2 and m & (m - 1) == 0):
            raise ValueError(f"lca_ext: max_splits={m!r}; expected a power of two >= 2")
        for name in ("tensor_rtol", "min_share", "total_share", "rtol", "atol", "bar_rtol",
                     "bar_share"):
            v = getattr(self, name)
            if not (v is None and name in ("rtol", "atol")) and not (
                    isinstance(v, (int, float)) and v >= 0):
                raise ValueError(f"lca_ext: {name}={v!r}; expected a number >= 0"
                                 + (" or None" if name in ("rtol", "atol") else ""))
        if not (isinstance(self.refine_level, (int, float)) and 0 < self.refine_level <= 1):
            raise ValueError(f"lca_ext: refine_level={self.refine_level!r}; expected a "
                             "family-wise level in (0, 1] (1: refine on the bar alone)")
        if not (self.max_passes is None or (isinstance(self.max_passes, int)
                                             and self.max_passes >= 3)):
            raise ValueError(f"lca_ext: max_passes={self.max_passes!r}; expected None or an "
                             "int >= 3 (the end point, the midpoint and the bars' pass)")
        if not (self.mean_passes is None or (isinstance(self.mean_passes, (int, float))
                                              and 3 <= self.mean_passes < math.inf)):
            raise ValueError(f"lca_ext: mean_passes={self.mean_passes!r}; expected None or a "
                             "finite number >= 3 (a step that misses the two-pass stage "
                             "needs 3)")
        if self.mean_passes is not None and self.method != "budget":
            raise ValueError(f"lca_ext: mean_passes={self.mean_passes!r} with method="
                             f"{self.method!r}: the pass account bounds the default rule "
                             "only; use method='budget' or drop mean_passes")
        if not (isinstance(self.pass_reserve, int) and self.pass_reserve >= 0):
            raise ValueError(f"lca_ext: pass_reserve={self.pass_reserve!r}; expected an int "
                             ">= 0 (passes the run's account may save up)")
        if not (isinstance(self.groups, int) and self.groups >= 1):
            raise ValueError(f"lca_ext: groups={self.groups!r}; expected an int >= 1")
        if not (isinstance(self.path_memory_budget, int) and self.path_memory_budget >= 0):
            raise ValueError(f"lca_ext: path_memory_budget={self.path_memory_budget!r}; "
                             "expected bytes (an int >= 0)")

    @property
    def total_only(self) -> bool:
        return self.method not in ("certified", "budget")

    def total_tolerance(self, d_loss: float, gross: float, noise: float) -> float:
        """The bound on |ΣLCA − ΔL| (see the fields)."""
        if self.atol is None and not self.total_only:
            # the default rule holds the total to its tensors' bar target: a
            # tighter one cost 0.3-0.5 passes a step on the LSTM and the CNN
            rtol = self.rtol if self.rtol is not None else (
                self.bar_rtol if self.method == "budget" and self.bars else self.tensor_rtol)
            return rtol * max(abs(d_loss), self.total_share * gross) + noise
        rtol = TOTAL_ONLY_RTOL if self.rtol is None else self.rtol
        atol = TOTAL_ONLY_ATOL if self.atol is None else self.atol
        return atol + rtol * abs(d_loss)


def rule_options(rule=None, **shorthands) -> RuleOptions:
    """RuleOptions from ``rule`` (RuleOptions, dict or None) or the tracker's
    shorthand keywords (method, rtol, atol, max_splits; None = not given)."""
    return grouped(RuleOptions, "rule", rule, shorthands)


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
            cause = ("the rounding of float32 passes limits this step (ΔL is within "
                     f"{ROUNDING_MARGIN}x the loss's float32 noise floor). Run the passes in "
                     "float64 (pass_dtype=torch.float64)")
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
    honest = bars.honest_bars(path, opts.seed, rule.intervals, rule.phi) if opts.bars else None
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
