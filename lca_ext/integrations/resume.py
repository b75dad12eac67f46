"""What both framework callbacks do when training resumes from a checkpoint."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from ..store_link import StoreOptions


def resumed(tracker_kwargs: dict) -> dict:
    """The tracker's keywords with its store resumed, whatever form ``store=``
    takes (a path: ``resume=True`` beside it; StoreOptions or a dict: inside)."""
    kw, store = dict(tracker_kwargs), tracker_kwargs.get("store")
    if isinstance(store, StoreOptions):
        kw["store"] = dataclasses.replace(store, resume=True)
    elif isinstance(store, dict):
        kw["store"] = dict(store, resume=True)
    else:
        kw["resume"] = True
    return kw


def tracker_on_resume(tracker, store: Optional[str], global_step: int, who: str):
    """The tracker to keep when the framework resumed at ``global_step``:
    None (build it again) with a store, which is then cut back to the
    checkpoint; the same one without a store, unless its in-memory run already
    went past the checkpoint, which cannot be cut back (refused)."""
    if tracker is None:
        return None
    if store is None and tracker.next_step > global_step:
        raise RuntimeError(
            f"{who}: training resumed from a checkpoint at global step {global_step}, but "
            f"this callback's in-memory run already tracked {tracker.next_step} optimizer "
            "steps; it cannot be cut back (use store=PATH, which is cut back to the "
            "checkpoint, or a new LCACallback)")
    return None if store is not None else tracker


def start_new_run_at(tracker, global_step: int, who: str) -> None:
    """Training resumed at ``global_step`` while the tracker's run holds nothing
    yet (no store, or a new, empty one): its labels start at the checkpoint's
    step, not at 0, with a warning.  A store that holds steps continues itself."""
    link = tracker.store_link
    if link is not None and (link.steps_committed or link.next_step is not None):
        return
    tracker.next_step = global_step
    where = "a new, empty store" if link is not None else "no store="
    warnings.warn(f"{who}: training resumed at global step {global_step} with {where}; "
                  "the LCA run starts there (per-parameter statistics from zero)",
                  UserWarning, stacklevel=3)
