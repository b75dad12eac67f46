"""Which tracked steps missed their rule's criteria, and the warnings that say so.

A step that is not grounded warns once per cause (the passes' rounding, or
curvature the rule could not resolve); later ones are only counted.  Steps the
default rule stopped at its pass budget are not warned one by one: ``summary``
gives one line for all of them (LCATracker.result calls it).
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

from . import quadrature
from .rule_options import RuleOptions


def budget_text(rule: RuleOptions) -> str:
    """The pass budget in words, as the RuleOptions fields that set it."""
    text = (f"RuleOptions.max_passes={rule.max_passes} a step" if rule.max_passes is not None
            else "no per-step max_passes")
    if rule.mean_passes is not None:
        text += (f", mean_passes={rule.mean_passes:g} a step over the run with "
                 f"pass_reserve={rule.pass_reserve}")
    return text


class StepFlags:
    def __init__(self, rule: RuleOptions):
        self.rule = rule
        #: (objective, step) of every step that missed its rule's criteria
        self.ungrounded_steps: List[Tuple[str, int]] = []
        self.budget_steps: List[Tuple[str, int]] = []   # stopped at max_passes
        self.noise_steps: List[Tuple[str, int]] = []    # at the rounding floor
        self.seen: dict = {}                            # objective -> steps recorded
        self._warned_causes: List[bool] = []            # noise_limited values warned
        self._reported = 0
        self._no_bars_warned: set = set()               # objectives warned: no bars

    def record(self, name: str, step: int, path, error: float, unit_roundoff: float) -> None:
        """Note one finished step (``path``: its rule's PathResult)."""
        self.seen[name] = self.seen.get(name, 0) + 1
        if self.rule.bars is True and path.bar_dof == 0 and name not in self._no_bars_warned:
            self._no_bars_warned.add(name)
            warnings.warn(
                f"lca_ext: bars=True, but the {name!r} set gave step {step} no error bars: "
                "it forms fewer than 2 groups (one batch; or, under FSDP2, per-class "
                "units), so tensor_error is the rule's own estimate, not an interval "
                "(run.bar_dof 0); pass batch_size smaller than the set (or a DataLoader of "
                "several batches) so it is cut into RuleOptions.groups batches",
                RuntimeWarning, stacklevel=5)
        if path.noise_limited:
            self.noise_steps.append((name, step))
        if path.budget_limited:
            self.budget_steps.append((name, step))
        if path.budget_limited and not path.grounded and not path.noise_limited:
            self.ungrounded_steps.append((name, step))   # (in the summary line)
        elif self.rule.method != "first_order" and not path.grounded:
            if path.noise_limited not in self._warned_causes:
                self._warned_causes.append(path.noise_limited)
                warnings.warn(quadrature.ungrounded_message(
                    self.rule, unit_roundoff, name, step, path, error),
                    RuntimeWarning, stacklevel=5)
            self.ungrounded_steps.append((name, step))

    def summary(self, tracked: int, several_objectives: bool) -> None:
        """One warning line for the budget-limited steps since the last call."""
        if len(self.budget_steps) <= self._reported:
            return
        self._reported = len(self.budget_steps)
        per = {}
        for name, _ in self.budget_steps:
            per[name] = per.get(name, 0) + 1
        # (of the steps this process tracked: after a resume the run holds more)
        counts = ", ".join(f"{n} of {self.seen.get(name, tracked)} tracked steps" + (
            f" ({name!r})" if several_objectives else "") for name, n in per.items())
        warnings.warn(
            f"lca_ext: {counts} stopped at the pass budget ({budget_text(self.rule)}) with "
            "error bars above their target (bar_rtol); their bars (run.tensor_error) say "
            "what is left and run.get('budget_limited') lists them; raise " + (
                "mean_passes or pass_reserve (or max_passes)" if self.rule.mean_passes
                is not None else "max_passes") + " to refine them further", RuntimeWarning,
            stacklevel=3)

    def doubtful(self, name: str) -> Dict[str, List[int]]:
        """The steps of objective ``name`` recorded here that are not fully
        certified, as lca_ext.analysis.doubtful_steps gives them for a run."""
        pick = lambda pairs: [s for n, s in pairs if n == name]   # noqa: E731
        return dict(ungrounded=pick(self.ungrounded_steps), noise_limited=pick(self.noise_steps),
                    budget_limited=pick(self.budget_steps))
