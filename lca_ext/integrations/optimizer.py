"""``tracker.attach(optimizer)``: LCA of every optimizer step, through torch's
optimizer step hooks, with no change to the training loop.

The pre-hook is ``tracker.begin()`` (θ_t is snapshotted right before the update),
the post-hook ``tracker.end()``.  So whatever happens around the step needs
nothing special: gradient clipping and accumulation happen before it, LR
schedulers after it, and a step that never runs records nothing (a
``GradScaler`` that found inf/NaN gradients skips ``optimizer.step()``, so
neither hook fires).  A step that raised half-way leaves nothing recorded.
"""
from __future__ import annotations

import torch


class AttachedHandle:
    """What ``attach`` returns: ``.remove()`` detaches the tracker."""

    def __init__(self, handles, tracker=None):
        self._handles = handles
        self._tracker = tracker

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._tracker is not None:
            self._tracker.attached = False
            self._tracker = None


def attach(tracker, optimizer: torch.optim.Optimizer) -> AttachedHandle:
    # wrappers (accelerate's AcceleratedOptimizer, Lightning's) hold the optimizer
    # that really steps in .optimizer; its hooks fire only for steps that run
    while isinstance(getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = optimizer.optimizer
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"lca_ext: attach(optimizer) got a {type(optimizer).__name__}; "
                        "expected a torch.optim.Optimizer (or a wrapper holding one "
                        "in .optimizer)")

    def before(opt, args, kwargs):
        if tracker.step_open:      # the last step raised inside optimizer.step()
            tracker.step_open = False
        tracker.begin()

    def after(opt, args, kwargs):
        tracker.end()

    tracker.attached = True      # (a `with tracker.step():` block is then refused)
    return AttachedHandle([optimizer.register_step_pre_hook(before),
                           optimizer.register_step_post_hook(after)], tracker)
