"""What both framework callbacks do when training resumes from a checkpoint."""
from __future__ import annotations

from typing import Optional


def tracker_on_resume(tracker, store: Optional[str], global_step: int, who: str):
    """The tracker to keep when the framework resumed at ``global_step``:
    None (build it again) with a store, which is then cut back to the
    checkpoint; the same one without a store, unless its in-memory run already
    went past the checkpoint, which cannot be cut back (refused)."""
    if tracker is None:
        return None
    if store is None and tracker._step > global_step:
        raise RuntimeError(
            f"{who}: training resumed from a checkpoint at global step {global_step}, but "
            f"this callback's in-memory run already tracked {tracker._step} optimizer "
            "steps; it cannot be cut back (use store=PATH, which is cut back to the "
            "checkpoint, or a new LCACallback)")
    return None if store is not None else tracker
