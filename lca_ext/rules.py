"""Which rule integrates a step: ``integrate(path, opts)`` dispatches on
``opts.method`` (lca_ext.rule_options.RuleOptions) to a function of the path
(lca_ext.path) and the options.  The rules themselves: lca_ext.budget_rule
(budget, the default), lca_ext.quadrature (certified) and lca_ext.uniform_rules
(adaptive, simpson, low_memory)."""
from __future__ import annotations

import numpy as np

from . import budget_rule, quadrature, uniform_rules
from .quadrature import PathResult
from .rule_options import RuleOptions


def first_order(path, opts: RuleOptions) -> PathResult:
    """ḡ = g(θ_t); the recorded error is the trapezoid against it, |φ(1) − φ(0)|/2
    (with ``bars=True`` the honest 95% bar of g(θ_t)'s value instead)."""
    g_end = path.buffer()
    loss_after = path.grad(1.0, g_end)
    phi0 = path.dots(path.g_start)
    trap_err = np.abs(path.dots(g_end) - phi0).sum(0) / 2
    fields = uniform_rules.uniform_bars(path, opts, 1, phi0.sum(0), first_order=True)
    return PathResult(path.g_start, [(0.0, 1.0)], loss_after, g_end, 1,
                      fields.pop("tensor_error", trap_err), True, False, path.class_loss(),
                      **fields)


RULES = {"budget": budget_rule.budget, "certified": quadrature.certified, "adaptive": uniform_rules.adaptive,
         "simpson": uniform_rules.simpson, "first_order": first_order}


# the rules that leave g(θ_t)'s buffer (path.g_start) as it was (the others
# build ḡ inside it)
KEEP_START = frozenset({"budget", "certified", "first_order"})


def integrate(path, opts: RuleOptions, reuse_gradients: bool = True) -> PathResult:
    """The path integral of one step by the rule of ``opts`` (the low-memory
    variant for ``reuse_gradients=False``)."""
    if not reuse_gradients:
        return uniform_rules.low_memory(path, opts)
    return RULES[opts.method](path, opts)
