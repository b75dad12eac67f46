"""RuleOptions: how each step's path integral is computed and when it is good
enough, in one documented dataclass (the tracker's ``rule=``), and
``rule_options``, which builds it from ``rule=`` or the tracker's shorthand
keywords.  The rules that read it: lca_ext.budget_rule (the default),
lca_ext.quadrature (certified) and lca_ext.uniform_rules; the run's pass
account: lca_ext.pass_account."""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from ._options import grouped

METHODS = ("budget", "certified", "adaptive", "simpson", "first_order")
# total-only rules' tolerance when rtol / atol are None (the rule before certified)
TOTAL_ONLY_RTOL, TOTAL_ONLY_ATOL = 1e-3, 1e-4


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
    bars:        95% error bars from randomised group samples (one more pass a
                 step, a mixed one; lca_ext.bars).  None (default): on for
                 budget and certified, off for the total-only rules and
                 first_order, whose price is one pass a step.  True on those:
                 ``tensor_error`` is the honest 95% bar of the rule's own value
                 (the trapezoid's, Simpson's or g(θ_t)'s; it does not change
                 what the rule refines) at one pass more a step.  False: no
                 mixed pass, tensor_error is the rule's own estimate (the
                 certified rule's, as before; an estimate, not an interval:
                 bar_dof 0), and the budget rule refines on that estimate
                 (tensor_rtol, min_share).  No bars where the set is one
                 group, nor in the low-memory mode (reuse_gradients=False:
                 bars=True is refused there)
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
    bars: Optional[bool] = None
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
        if self.bars not in (None, True, False):
            raise ValueError(f"lca_ext: bars={self.bars!r}; expected None (by method), "
                             "True or False")
        if not (isinstance(self.groups, int) and self.groups >= 1):
            raise ValueError(f"lca_ext: groups={self.groups!r}; expected an int >= 1")
        if not (isinstance(self.path_memory_budget, int) and self.path_memory_budget >= 0):
            raise ValueError(f"lca_ext: path_memory_budget={self.path_memory_budget!r}; "
                             "expected bytes (an int >= 0)")

    @property
    def with_bars(self) -> bool:
        """Does the rule store 95% bars (``bars``, None resolved by method)?"""
        return (self.method in ("budget", "certified")) if self.bars is None \
            else bool(self.bars)

    @property
    def total_only(self) -> bool:
        return self.method not in ("certified", "budget")

    def total_tolerance(self, d_loss: float, gross: float, noise: float) -> float:
        """The bound on |ΣLCA − ΔL| (see the fields)."""
        if self.atol is None and not self.total_only:
            # the default rule holds the total to its tensors' bar target: a
            # tighter one cost 0.3-0.5 passes a step on the LSTM and the CNN
            rtol = self.rtol if self.rtol is not None else (
                self.bar_rtol if self.method == "budget" and self.with_bars else self.tensor_rtol)
            return rtol * max(abs(d_loss), self.total_share * gross) + noise
        rtol = TOTAL_ONLY_RTOL if self.rtol is None else self.rtol
        atol = TOTAL_ONLY_ATOL if self.atol is None else self.atol
        return atol + rtol * abs(d_loss)


def rule_options(rule=None, **shorthands) -> RuleOptions:
    """RuleOptions from ``rule`` (RuleOptions, dict or None) or the tracker's
    shorthand keywords (method, rtol, atol, max_splits; None = not given)."""
    return grouped(RuleOptions, "rule", rule, shorthands)
