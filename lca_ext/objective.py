"""One loss whose change a tracker allocates (the LCA set, or a named eval set),
and what it holds between steps: g(θ_t) and the loss there (reused from the
previous step's end point), the class losses in per-class mode, and each LCA
group's gradient at θ_t for the default rule's two-pass stage
(lca_ext.budget_rule), and its pass account (lca_ext.pass_account).  Buffers come from and go back to the tracker's
lca_ext.buffer_pool.BufferPool."""
from __future__ import annotations

from typing import List, Optional

import numpy as np
import torch

from .evaluate import Evaluator
from .pass_account import PassAccount
from .buffer_pool import BufferPool
from .rule_options import RuleOptions


class Objective:
    def __init__(self, name: str, evaluator: Evaluator, rule: RuleOptions,
                 account: bool = True):
        self.name = name
        self.evaluator = evaluator
        self.account = PassAccount(rule, enabled=account)   # the run's pass budget
        self.g_start: Optional[List[torch.Tensor]] = None   # g(θ_t), when valid
        self.loss_start = float("nan")
        self.start_buffers: List[torch.Tensor] = []
        self.start_passes = 0
        self.classes = False    # per-class mode: buffers [C, *shape], class passes
        self.class_loss_start: Optional[np.ndarray] = None   # [C] at θ_t (per-class mode)
        # each group's (LCA batch's) gradient at θ_t, for the two-pass stage
        self.group_start: Optional[List[List[torch.Tensor]]] = None
        self.group_start_losses = None        # [G] their shares of the loss there

    def drop_start(self, pool: BufferPool) -> None:
        """Forget θ_t's gradients (stale, or about to be), buffers back to ``pool``."""
        if self.g_start is not None:
            pool.give(self.g_start)
            self.g_start = None
        self.drop_groups(pool)

    def drop_groups(self, pool: BufferPool, groups=None) -> None:
        """The groups' gradients (this objective's, or ``groups``) back to ``pool``."""
        for buf in (self.group_start if groups is None else groups) or ():
            pool.give(buf)
        if groups is None:
            self.group_start = self.group_start_losses = None

    def start_from_end(self, result, step_path, reuse: bool, pool: BufferPool) -> None:
        """After a step (``result``: its rule's PathResult): θ_{t+1}'s gradients,
        loss and class losses become the next step's start where they are kept
        (``reuse``), else they go back to ``pool``.  g(θ_t)'s buffer is already
        given back by the caller."""
        self.g_start = None
        self.drop_groups(pool)
        if result.g_end is not None and reuse:
            self.g_start, self.loss_start = result.g_end, result.loss_after
            self.class_loss_start = None if result.class_loss is None else \
                result.class_loss[1]
            self.group_start = step_path.group_end
            self.group_start_losses = step_path.group_end_losses
        else:
            self.drop_groups(pool, step_path.group_end)
