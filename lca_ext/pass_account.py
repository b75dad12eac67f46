"""The run's pass budget: what tracking costs over many steps, known in advance.

``RuleOptions.max_passes`` bounds one step; the account bounds the run.  Each
tracked step of an objective earns ``mean_passes`` and spends what its rule
spent; unspent passes are saved up to ``pass_reserve`` (the account starts
full).  A step may spend at most its ``max_passes`` and what the account
holds, but never fewer than ``MIN_PASSES`` (where its two-pass stage misses, a
step needs the end point, the midpoint and the bars' pass).  So with
``mean_passes`` >= 3, any n consecutive tracked steps of an objective spend at
most ``mean_passes·n + pass_reserve`` passes, whatever the model: a step after
an untracked one adds its start pass (g(θ_t)), which the account does not
charge.  Cheap steps (the two-pass stage's 2) pay for the curved ones; a step
the account cuts short is flagged ``budget_limited`` like one stopped at
``max_passes``, and its bars say what is left.

Only the default rule (``method="budget"``) draws on it; ``mean_passes=None``
turns it off (each step then has ``max_passes`` alone).  The balance after
each step is recorded (``<objective>/pass_credit``), and a resumed run
continues from its last committed step's balance.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .quadrature import RuleOptions

# the most a step that misses the two-pass stage cannot do without: the end
# point, the midpoint and the bars' mixed pass (RuleOptions.max_passes' floor)
MIN_PASSES = 3


class PassAccount:
    """One objective's balance of passes (see the module docstring)."""

    def __init__(self, rule: RuleOptions, balance: Optional[float] = None):
        self.active = rule.method == "budget" and rule.mean_passes is not None
        self.mean = rule.mean_passes
        self.reserve = float(rule.pass_reserve)
        self.balance = self.reserve if balance is None else float(balance)

    def step_options(self, rule: RuleOptions) -> RuleOptions:
        """``rule`` with max_passes lowered to what the account allows this step."""
        if not self.active:
            return rule
        # (1e-9: a balance that is a whole number after float sums)
        allowed = max(MIN_PASSES, math.floor(self.mean + self.balance + 1e-9))
        if rule.max_passes is not None and rule.max_passes <= allowed:
            return rule
        return dataclasses.replace(rule, max_passes=allowed)

    def charge(self, passes: int) -> None:
        """After a step that spent ``passes`` (its start pass not counted)."""
        if self.active:
            self.balance = min(self.reserve, self.balance + self.mean - passes)
