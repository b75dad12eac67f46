"""A tracker's side of its run directory (``LCATracker(store=...)``): what each
commit writes, the state points kept for checkpoints, and the resume check.

lca_ext.store is the directory (layout, atomic commits, fingerprints, reading,
truncate_run); this module is what a tracker does with it.  Rank 0 writes
(``writer``); on the other ranks ``writer`` is None and they take part only in
the collective parts (gathering the state, summing FSDP2 fingerprints).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Optional, Union

import numpy as np
import torch

from . import store as run_store


@dataclasses.dataclass
class StoreOptions:
    """Where a tracker writes its run and how it continues one.

    path:        the run directory every tracked step is appended to
                 (crash-safe; see lca_ext.store)
    resume:      continue the run at ``path`` (checked: the model must be the θ
                 of the run's last commit, with a state saved there; see
                 LCATracker and lca_ext.truncate_run)
    state_every: write the per-parameter state with every k-th committed step
                 (and in ``result()``); the latest two are kept (about 18 bytes
                 a parameter each)
    """

    path: Union[str, os.PathLike]
    resume: bool = False
    state_every: int = 1

    def __post_init__(self):
        if not isinstance(self.path, (str, os.PathLike)):
            raise TypeError(f"lca_ext.LCATracker: store={self.path!r}; expected a directory "
                            "path or a lca_ext.StoreOptions")
        if not (isinstance(self.state_every, int) and self.state_every >= 1):
            raise ValueError(f"lca_ext.LCATracker: state_every={self.state_every!r}; "
                             "expected an int >= 1")


def store_options(store=None, resume=None, state_every=None) -> Optional[StoreOptions]:
    """StoreOptions from the tracker's ``store=`` (a path, StoreOptions, dict or
    None) and its ``resume=`` / ``state_every=`` keywords (None = not given)."""
    given = {k: v for k, v in (("resume", resume), ("state_every", state_every))
             if v is not None}
    if isinstance(store, (StoreOptions, dict)) and given:
        raise ValueError(f"lca_ext.LCATracker: give {', '.join(sorted(given))}= inside "
                         "store= (a StoreOptions or dict), not beside it")
    if isinstance(store, StoreOptions):
        return store
    if isinstance(store, dict):
        fields = {f.name for f in dataclasses.fields(StoreOptions)}
        unknown = sorted(set(store) - fields)
        if unknown:
            raise TypeError(f"lca_ext.LCATracker: store has unknown fields {unknown}; "
                            f"StoreOptions has {sorted(fields)}")
        return StoreOptions(**store)
    if store is None:
        if resume:
            raise ValueError("lca_ext.LCATracker: resume=True needs store= (the run "
                             "directory to continue)")
        if state_every is not None:
            StoreOptions("", state_every=state_every)    # (checks the value)
        return None
    return StoreOptions(store, **given)


def fingerprint(tracker) -> np.ndarray:
    """[K, 2] int64 fingerprint of the tracker's θ (lca_ext.store.fingerprint);
    under FSDP2 each rank sums its shards at their global offsets (collective)."""
    params = tracker.params.params
    if not getattr(tracker.ctx, "sharded", False):
        return run_store.fingerprint(params)
    offsets = [off * (p.numel() // max(1, p.shape[0]) if p.dim() else 0)
               for off, p in zip(tracker.ctx.row_offsets, params)]
    local = torch.from_numpy(run_store.fingerprint(params, offsets))
    return tracker.ctx.sum_(local.to(params[0].device)).cpu().numpy()


class StoreLink:
    """The tracker's run directory: ``commit`` each tracked step, ``save_state``
    at checkpoints, ``flush_state`` before a result.  Opening it with
    ``resume=True`` checks the model against the run and restores the
    per-parameter state into ``tracker.state``; ``next_step`` and
    ``steps_committed`` then say where the tracker continues."""

    def __init__(self, tracker, options: StoreOptions):
        path, resume = options.path, options.resume
        self.tracker, self.path, self.state_every = tracker, path, options.state_every
        self.writer: Optional[run_store.RunWriter] = None
        self.next_step: Optional[int] = None
        self.steps_committed = 0
        ctx = tracker.ctx
        if ctx.is_writer:
            self.writer = run_store.RunWriter(path, tracker.run_meta(), resume=resume)
        ctx.barrier()
        if resume:
            self._resume()

    def commit(self, record: dict, frames, tracked_count: int, next_step: int) -> bool:
        """Append one tracked step (its rows, the state every ``state_every``
        commits, θ_{t+1}'s fingerprint).  False on ranks that do not write."""
        # (FSDP2: gathering the state is collective, so every rank takes part)
        state = self.tracker.state_arrays() if tracked_count % self.state_every == 0 else {}
        if self.writer is None and not getattr(self.tracker.ctx, "sharded", False):
            return False                 # (only FSDP2's fingerprint is collective)
        fp = fingerprint(self.tracker)   # θ_{t+1}: the store checks a resume against it
        if self.writer is None:
            return False
        self.writer.commit(dict(record, fingerprint=fp), state, frames,
                           point=dict(next_step=next_step, fingerprint=fp))
        return True

    def save_state(self, next_step: int, tag: Optional[str] = None,
                   pinned: bool = True, keep: Optional[int] = None) -> None:
        """Write the per-parameter state as of the last commit (collective);
        ``keep``: then drop all but the latest ``keep`` pinned states."""
        state, fp = self.tracker.state_arrays(), fingerprint(self.tracker)
        if self.writer is None:
            return
        self.writer.write_state(state, next_step=next_step, fingerprint=fp,
                                pinned=pinned, tag=tag)
        if keep is not None:
            pinned_points = sorted((p for p in self.writer.meta["states"] if p.get("pinned")),
                                   key=lambda p: (p["steps"], p["version"]))
            kept = {p["version"] for p in pinned_points[-keep:]}
            self.writer.unpin(lambda p: p["version"] in kept)

    def flush_state(self, tracked_count: int, next_step: int) -> None:
        """state_every > 1: the stored state may be older than the last step;
        store it now."""
        if tracked_count % self.state_every:
            self.save_state(next_step, pinned=False)

    def _resume(self) -> None:
        tracker, path, ctx = self.tracker, self.path, self.tracker.ctx
        fp = fingerprint(tracker) if tracker.verify_resume else None
        if tracker.resume_cuts_back and fp is not None:
            # the framework callbacks: a resume from an older checkpoint first
            # cuts the run back to the state saved with it
            if self.writer is not None:
                cut = run_store.cut_back_to(path, self.writer.meta, fp)
                if cut:
                    self.writer = run_store.RunWriter(path, tracker.run_meta(), resume=True)
                    warnings.warn(f"lca_ext: training resumed from a checkpoint taken after "
                                  f"{cut[1]} committed steps of {path!r}; the run is cut back "
                                  f"from {cut[0]} to {cut[1]} steps (lca_ext.truncate_run) and "
                                  "the steps after it are tracked again", UserWarning,
                                  stacklevel=5)
            ctx.barrier()
        meta = self.writer.meta if self.writer else run_store.read_meta(path)
        point = run_store.resume_point(path, meta, fp)   # RunStoreError if θ is not it
        if tracker.verify_resume and point is not None and point.get("next_step") is None:
            warnings.warn(f"lca_ext: {path!r} was written before runs recorded parameter "
                          "fingerprints; resuming without checking that the model is at "
                          "its last committed step", RuntimeWarning, stacklevel=5)
        state = None if point is None else run_store.read_state(path, meta, point=point)
        for name, arrays in (state or {}).items():
            if name in tracker.state:
                for k, (t, a) in enumerate(zip(tracker.state[name], arrays)):
                    t.copy_(torch.from_numpy(np.ascontiguousarray(ctx.local_part(k, a))))
        if point is not None and point.get("next_step") is not None:
            self.next_step = int(point["next_step"])
        elif meta["steps_committed"]:
            self.next_step = int(run_store.read_arrays(path, meta)["step"][-1]) + 1
        # the pass accounts go on from their last recorded balances
        accounts = {o.name + "/pass_credit": o.account for o in tracker.objectives}
        for key, balance in run_store.read_last_row(path, meta, accounts).items():
            accounts[key].resume(float(balance))
        self.steps_committed = int(meta["steps_committed"])
