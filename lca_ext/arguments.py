"""LCATracker's arguments, checked when the tracker is built: each refusal names
the argument, what was given and what to do (a mistake found at the first step,
from deep inside torch, names none of them)."""
from __future__ import annotations

import numbers
from typing import Callable, Optional

import torch
from torch import nn


def check(model, loss_fn, batch_loss, lca_data, schedule, batch_size, num_classes):
    """Every check below, in the order a reader meets the arguments; returns the
    schedule as the tracker keeps it (:func:`check_schedule`)."""
    check_model(model)
    if (loss_fn is None) == (batch_loss is None):
        raise ValueError("lca_ext.LCATracker: give exactly one of loss_fn "
                         "(loss_fn(model(x), y)) and batch_loss (batch_loss(model, "
                         "batch)); got " + ("both" if loss_fn is not None else "neither"))
    check_loss(loss_fn, batch_loss)
    if lca_data is None:
        raise ValueError("lca_ext.LCATracker: lca_data is required (the fixed set whose "
                         "loss change is allocated)")
    check_batch_size(batch_size)
    if num_classes is not None and not (isinstance(num_classes, numbers.Integral) and
                                        not isinstance(num_classes, bool) and num_classes >= 1):
        raise ValueError(f"lca_ext.LCATracker: num_classes={num_classes!r}; "
                         "expected an int >= 1")
    return check_schedule(schedule)


def check_bars(rule, reuse_gradients: bool) -> None:
    """Bars asked for explicitly where they cannot be had: the low-memory mode
    forms ḡ in one buffer with fixed weights and has no groups' samples."""
    if rule.bars is True and not reuse_gradients:
        raise ValueError(f"lca_ext.LCATracker: rule bars=True with reuse_gradients=False: "
                         "the low-memory mode has no error bars (its tensor_error is the "
                         "rule's own estimate); drop reuse_gradients=False for the bars "
                         "(they need the groups' gradients), or drop bars=True")


def check_model(model) -> None:
    if not isinstance(model, nn.Module):
        hint = (" (it looks like model.parameters(): pass the model itself)"
                if hasattr(model, "__next__") or isinstance(model, (list, tuple)) else "")
        raise TypeError(f"lca_ext.LCATracker: model must be a torch.nn.Module; got a "
                        f"{type(model).__name__}{hint}")


def check_loss(loss_fn: Optional[Callable], batch_loss: Optional[Callable]) -> None:
    for name, f in (("loss_fn", loss_fn), ("batch_loss", batch_loss)):
        if f is None:
            continue
        if isinstance(f, type):
            raise TypeError(f"lca_ext.LCATracker: {name}={f.__name__} is a class; pass an "
                            f"instance ({name}={f.__name__}()) or a function")
        if isinstance(f, torch.optim.Optimizer):
            raise TypeError(f"lca_ext.LCATracker: {name} is an optimizer "
                            f"({type(f).__name__}); pass the loss, e.g. "
                            "loss_fn=torch.nn.functional.cross_entropy (the optimizer goes "
                            "to tracker.attach(optimizer), or stays in your loop)")
        if not callable(f):
            raise TypeError(f"lca_ext.LCATracker: {name} must be callable; got a "
                            f"{type(f).__name__}")


def check_schedule(schedule):
    """None, an int k >= 1, or the step indices (ints >= 0): returned as None, the
    int, or a frozenset (an iterator is read once, here)."""
    if schedule is None:
        return None
    if isinstance(schedule, bool) or (isinstance(schedule, numbers.Integral)
                                      and schedule < 1):
        raise ValueError(f"lca_ext.LCATracker: schedule={schedule!r}; expected None (every "
                         "step), an int k >= 1 (every k-th step) or the step indices to track")
    if isinstance(schedule, numbers.Integral):
        return int(schedule)
    if isinstance(schedule, torch.Tensor):
        raise TypeError("lca_ext.LCATracker: schedule is a tensor; pass its step indices "
                        "as a list (schedule=steps.tolist())")
    try:
        steps = list(schedule)
    except TypeError:
        raise TypeError(f"lca_ext.LCATracker: schedule={schedule!r}; expected None, an int "
                        "k >= 1 or an iterable of step indices") from None
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, numbers.Integral)
           or s < 0]
    if bad:
        raise ValueError(f"lca_ext.LCATracker: schedule holds {bad[:3]!r}; step indices are "
                         "ints >= 0 (the optimizer steps, counted from 0)")
    return frozenset(int(s) for s in steps)


def check_batch_size(batch_size) -> None:
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, numbers.Integral) or batch_size < 1):
        raise ValueError(f"lca_ext.LCATracker: batch_size={batch_size!r}; expected None "
                         "(cut the set for the error bars' groups) or an int >= 1")
