"""The run's pass budget: what tracking costs over many steps, known in advance.

``RuleOptions.max_passes`` bounds one step; the account bounds the run.  Each
tracked step of an objective earns ``mean_passes`` and spends what its rule
spent; unspent passes are saved up to ``pass_reserve`` (the account starts
full).  A step may spend at most its ``max_passes`` and what the account
holds, but never fewer than ``MIN_PASSES`` (where its two-pass stage misses, a
step needs the end point, the midpoint and the bars' pass).  So with
``mean_passes`` >= 3, the rule's passes over any n consecutive tracked steps of
an objective are at most ``mean_passes·n + pass_reserve``, whatever the model.
Not charged, and so outside that bound: a start pass (g(θ_t) computed afresh:
after an untracked step, or where θ or the model's buffers changed between
steps, as eval-mode BatchNorm's running statistics do every step), and class
gradients recomputed at the rule's points (num_classes outside per-class mode).
Cheap steps (the two-pass stage's 2) pay for the curved ones; a step the
account cuts short is flagged ``budget_limited`` like one stopped at
``max_passes``, and its bars say what is left.  The balance after each step is
recorded (``<objective>/pass_credit``, NaN without an account), and a resumed
run continues from its last committed step's balance.  The low-memory mode
(``reuse_gradients=False``) has no pass budget and no account.

It is off by default (``mean_passes=None``: each step has ``max_passes``
alone), because the bound has a price: a step it cuts may end with its total
off ΔL.  Measured over 30-step runs, 5 seeds (2-core CPU, 2026-12-06): with
``mean_passes=3`` the LSTM under Adam 1e-2 cost 2.86 passes a step from step 5
instead of 3.06, but 11 of its 150 steps ended ungrounded instead of 2 (up to
13% of ΔL off, flagged ``budget_limited``); the BatchNorm CNN 3.13 instead of
3.30, 143 of 150 grounded instead of 147.  Only the default rule
(``method="budget"``) draws on it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .rule_options import RuleOptions

# the most a step that misses the two-pass stage cannot do without: the end
# point, the midpoint and the bars' mixed pass (RuleOptions.max_passes' floor)
MIN_PASSES = 3


class PassAccount:
    """One objective's balance of passes (see the module docstring)."""

    def __init__(self, rule: RuleOptions, balance: Optional[float] = None,
                 enabled: bool = True):
        """``enabled`` False: no account whatever ``rule`` says (the tracker's
        low-memory mode, whose rule has no pass budget)."""
        self.active = enabled and rule.method == "budget" and rule.mean_passes is not None
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

    def charge(self, passes: int) -> Optional[float]:
        """After a step that spent ``passes`` (its start pass not counted): the
        balance to record, or None where the account is off."""
        if not self.active:
            return None
        self.balance = min(self.reserve, self.balance + self.mean - passes)
        return self.balance

    def resume(self, balance: Optional[float]) -> None:
        """Go on from a stored run's last recorded balance (None or NaN: it had
        no account then: start full)."""
        if balance is not None and math.isfinite(balance) and self.active:
            self.balance = min(self.reserve, float(balance))
