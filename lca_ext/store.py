"""The run store: a directory that a tracked run appends to, step by step.

Layout (schema version 1)::

    RUN_DIR/
      lca_run.json   metadata and the commit record (JSON, replaced atomically)
      data.zarr/     per-step arrays, time first: "<objective>/<field>" [T, ...],
                     "step" [T] and "fingerprint" [T, K, 2] (θ after each step;
                     checked but not returned by load_run)
      state.N.zarr/  per-parameter state (one or more kept "state points"):
                     "<field>" [Σ numel], every tensor flattened and concatenated
                     in parameter order ("state_layout": "flat"; runs written
                     before it hold "<field>/<k>" per tensor), and "fingerprint"
                     [K, 2] of θ when it was saved
      frames.zarr/   optional raw per-element LCA of chosen tensors: "<k>" [F, ...]

``lca_run.json`` holds ``format`` ("lca_ext.run"), ``version`` (1), the
parameter ``names`` / ``shapes`` / ``layer_names`` / ``layer_of``, ``objectives``
(e.g. ["train", "val"]), ``bin_edges``, ``num_classes``, the tracker ``config``,
and the commit: ``steps_committed`` (rows of data.zarr that are complete),
``states`` (the kept state points: ``version`` (the N of state.N.zarr),
``steps`` (the state is as of that many committed steps), ``next_step`` (the
label the next tracked step gets), ``pinned`` and ``tag``), ``state_version`` /
``state_steps`` (the latest of them: what ``load_run`` returns) and
``frames_committed``; and what a reader must find: ``arrays`` (the keys of
data.zarr; with ``row_fingerprints`` also "fingerprint"), ``state_fields``, ``frame_arrays`` and ``chunks_complete`` (every
chunk file is written, even one that equals the fill value).

Reading checks the directory against that record: a committed row, state
array or frame that is missing, too short, or unreadable is a RunStoreError
naming it (zarr itself would read a missing chunk file as zeros).

Crash safety (kill -9 at any instant loses no completed step): a step's rows are
written into data.zarr first, then its per-parameter state into a *new* state
group, then lca_run.json is replaced atomically (write, fsync, rename) with the
new counts; the commit is that rename.  zarr writes each chunk file atomically
(temporary file + rename), so a committed row is never torn; rows past
``steps_committed`` are ignored on load and overwritten on resume.  State
groups are deleted only after a commit that no longer lists them.  Nothing is
pickled: arrays are zarr, metadata is JSON.

Resume and checkpoints.  Each committed row records the fingerprint of θ_{t+1}
(:func:`fingerprint`: per tensor, exact integer sums of its bits), and each
state point the fingerprint of θ when it was saved.  A run resumes only from a
state point at its last committed step whose fingerprint equals the model's
(:func:`resume_point`; anything else is a RunStoreError saying which committed
step the model matches and what to do), so a resumed run can neither count a
step twice nor miss one.  Kept state points: the two latest ones written with
the steps (``state_every``; two, so that a checkpoint saved just after the
store's commit can still be cut back to) and every *pinned* one
(``LCATracker.save_state()``, which the Trainer and Lightning callbacks call at
each checkpoint save).  :func:`truncate_run` cuts a run back to a state point.
"""
from __future__ import annotations

import itertools
import json
import os
import shutil

from typing import Dict, List, Optional

import numpy as np

FORMAT = "lca_ext.run"
VERSION = 1
META = "lca_run.json"
TIME_CHUNK = 64


class RunStoreError(RuntimeError):
    """A path that is not a readable lca_ext run directory."""


def _zarr():
    try:
        import zarr
    except ImportError as err:  # pragma: no cover - zarr is a dependency
        raise ImportError("lca_ext's run store needs the 'zarr' package "
                          "(pip install zarr)") from err
    return zarr


def write_json_atomic(path: str, obj: dict) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_meta(path: str) -> dict:
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise RunStoreError(f"lca_ext: {path!r} is not a directory")
    if not os.path.exists(meta_path):
        raise RunStoreError(f"lca_ext: {path!r} is not an lca_ext run directory "
                            f"(no {META})")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as err:
        raise RunStoreError(f"lca_ext: {meta_path!r} is unreadable or corrupt: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise RunStoreError(f"lca_ext: {meta_path!r} is not an lca_ext run "
                            f"(format {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != VERSION:
        raise RunStoreError(f"lca_ext: {path!r} has schema version {meta.get('version')!r}; "
                            f"this lca_ext reads version {VERSION}")
    return meta


ROLLING_STATES = 2   # unpinned state points kept (the latest two written with steps)


class RunWriter:
    """Appends committed steps to a run directory (new, or resumed)."""

    def __init__(self, path: str, meta: dict, resume: bool = False):
        zarr = _zarr()
        self.path = path
        meta_path = os.path.join(path, META)
        if os.path.exists(meta_path):
            if not resume:
                raise FileExistsError(f"lca_ext: {path!r} already holds a run; pass "
                                      "resume=True to continue it or choose a new path")
            old = read_meta(path)
            for key in ("names", "shapes", "objectives", "num_classes"):
                if old.get(key) != meta.get(key):
                    raise RunStoreError(f"lca_ext: cannot resume {path!r}: its {key} "
                                        f"{old.get(key)!r} differ from this tracker's "
                                        f"{meta.get(key)!r}")
            check_run(path, old)   # never append to a run that lost committed data
            self.meta = old
            self.meta["states"] = state_points(old)
        else:
            os.makedirs(path, exist_ok=True)
            meta = {k: v for k, v in meta.items() if k not in _CONTENT_KEYS}
            self.meta = dict(meta, format=FORMAT, version=VERSION, steps_committed=0,
                             state_version=None, frames_committed=0, chunks_complete=True,
                             state_layout="flat", states=[])
            write_json_atomic(meta_path, self.meta)
        self.data = zarr.open_group(os.path.join(path, "data.zarr"), mode="a")
        self.frames = zarr.open_group(os.path.join(path, "frames.zarr"), mode="a")
        self._open_arrays: Dict[tuple, object] = {}

    @property
    def steps_committed(self) -> int:
        return int(self.meta["steps_committed"])

    def load_state(self) -> Optional[Dict[str, List[np.ndarray]]]:
        return read_state(self.path, self.meta)

    def _put_row(self, group, key: str, row: np.ndarray, index: int) -> None:
        row = np.asarray(row)
        handle = (id(group), key)
        arr = self._open_arrays.get(handle)
        if arr is None and key in group:
            # (a reopened array forgets write_empty_chunks: a row equal to the fill
            # value, e.g. a False flag, would leave its chunk file unwritten)
            arr = group[key].with_config({"write_empty_chunks": True})
        if arr is None:
            arr = create_array(group, key, shape=(index + 1, *row.shape), dtype=row.dtype,
                               chunks=(TIME_CHUNK, *row.shape) if group is self.data
                               else (1, *row.shape))
        elif arr.shape[0] < index + 1:
            arr.resize((index + 1, *arr.shape[1:]))
        self._open_arrays[handle] = arr
        arr[index] = row

    def commit(self, rows: Dict[str, np.ndarray], state: Dict[str, List[np.ndarray]],
               frames: Optional[Dict[str, np.ndarray]] = None,
               point: Optional[dict] = None) -> None:
        """Write one step: its rows, the per-parameter state (a new state point;
        ``point``: its ``next_step`` and ``fingerprint``), then the commit."""
        index = self.steps_committed
        for key, row in rows.items():
            self._put_row(self.data, key, row, index)
        n_frames = int(self.meta["frames_committed"])
        if frames:
            for key, frame in frames.items():
                self._put_row(self.frames, key, frame, n_frames)
            self._put_row(self.frames, "step", np.asarray(rows["step"]), n_frames)
            n_frames += 1
        self.meta.update(steps_committed=index + 1, frames_committed=n_frames)
        self.meta["arrays"] = sorted(set(self.meta.get("arrays", ()))
                                     | (set(rows) - {"fingerprint"}))
        if "fingerprint" in rows:
            self.meta["row_fingerprints"] = True
        if frames:
            self.meta["frame_arrays"] = sorted(set(self.meta.get("frame_arrays", ()))
                                               | set(frames) | {"step"})
        if state:   # a new state point; without one (state_every > 1) the last stays
            point = dict(point or {})
            if "next_step" not in point and "step" in rows:
                point["next_step"] = int(rows["step"]) + 1
            if point.get("fingerprint") is None and "fingerprint" in rows:
                point["fingerprint"] = rows["fingerprint"]
            self._add_state(state, point)
        else:
            self._commit_meta()

    def write_state(self, state: Dict[str, List[np.ndarray]], next_step: Optional[int] = None,
                    fingerprint: Optional[np.ndarray] = None, pinned: bool = False,
                    tag: Optional[str] = None) -> None:
        """Store the per-parameter state as of the last committed step (no new
        row): how a run with ``state_every > 1`` records its final state, and
        (``pinned``) what ``LCATracker.save_state()`` keeps for truncate_run."""
        latest = self._latest()
        if (latest is not None and latest["steps"] == self.steps_committed
                and latest.get("next_step") == next_step and fingerprint is not None
                and self._same_fingerprint(latest, fingerprint)):
            if pinned and not latest.get("pinned"):   # already written: pin it
                latest.update(pinned=True, tag=tag)
                self._commit_meta()
            return
        self._add_state(state, dict(next_step=next_step, fingerprint=fingerprint,
                                    pinned=pinned, tag=tag))

    def unpin(self, keep) -> None:
        """Drop the pinned state points for which ``keep(point)`` is false (not
        the latest one)."""
        latest = self._latest()
        before = list(self.meta["states"])
        self.meta["states"] = [p for p in before if p is latest or not p.get("pinned")
                               or keep(p)]
        if len(self.meta["states"]) != len(before):
            self._commit_meta()

    # -- internals ---------------------------------------------------------------

    def _latest(self) -> Optional[dict]:
        points = self.meta.get("states") or []
        return max(points, key=lambda p: (p["steps"], p["version"])) if points else None

    def _same_fingerprint(self, point: dict, fp: np.ndarray) -> bool:
        saved = _point_fingerprint(self.path, point)
        return saved is not None and np.array_equal(saved, fp)

    def _add_state(self, state: Dict[str, List[np.ndarray]], point: dict) -> None:
        zarr = _zarr()
        version = max([p["version"] for p in self.meta["states"]]
                      + [self.meta.get("state_serial", -1),
                         -1 if self.meta.get("state_version") is None
                         else self.meta["state_version"]]) + 1
        group = zarr.open_group(os.path.join(self.path, f"state.{version}.zarr"), mode="w")
        _write_state_group(group, state, flat=self.meta.get("state_layout") == "flat")
        fp = point.get("fingerprint")
        if fp is not None:
            fp = np.ascontiguousarray(fp, dtype=np.int64)
            create_array(group, "fingerprint", shape=fp.shape, dtype=fp.dtype,
                         chunks=fp.shape)[...] = fp
        new = dict(version=version, steps=self.steps_committed,
                   next_step=point.get("next_step"), pinned=bool(point.get("pinned")),
                   tag=point.get("tag"), fingerprint=fp is not None)
        pinned = [p for p in self.meta["states"] if p.get("pinned")]
        unpinned = [p for p in self.meta["states"] if not p.get("pinned")]
        (pinned if new["pinned"] else unpinned).append(new)
        order = lambda p: (p["steps"], p["version"])  # noqa: E731
        self.meta["states"] = sorted(pinned + sorted(unpinned, key=order)[-ROLLING_STATES:],
                                     key=order)
        self.meta["state_serial"] = version
        self.meta["state_fields"] = sorted(state)
        self._commit_meta()

    def _commit_meta(self) -> None:
        latest = self._latest()
        self.meta.update(state_version=None if latest is None else latest["version"],
                         state_steps=None if latest is None else latest["steps"])
        write_json_atomic(os.path.join(self.path, META), self.meta)   # the commit
        remove_unlisted_states(self.path, self.meta)


def remove_unlisted_states(path: str, meta: dict) -> None:
    """Delete the state.N.zarr groups the commit record no longer lists
    (after the commit, so a crash leaves at most an unlisted group behind)."""
    listed = {f"state.{p['version']}.zarr" for p in state_points(meta)}
    for name in os.listdir(path):
        if name.startswith("state.") and name.endswith(".zarr") and name not in listed:
            shutil.rmtree(os.path.join(path, name), ignore_errors=True)


def state_points(meta: dict) -> List[dict]:
    """The kept per-parameter state points of a run, oldest first (runs written
    before ``states``: the one state, its next label unknown)."""
    if "states" in meta:
        return [dict(p) for p in meta["states"]]
    if meta.get("state_version") is None:
        return []
    return [dict(version=meta["state_version"],
                 steps=meta.get("state_steps", meta["steps_committed"]),
                 next_step=None, pinned=False, tag=None, fingerprint=False)]


def _point_fingerprint(path: str, point: dict) -> Optional[np.ndarray]:
    if not point.get("fingerprint"):
        return None
    sub = f"state.{point['version']}.zarr"
    try:
        return np.asarray(_zarr().open_group(os.path.join(path, sub), mode="r")
                          ["fingerprint"][...])
    except Exception as err:
        raise _incomplete(path, f"{sub}/fingerprint is missing or unreadable: {err}") from err


# -- fingerprints, resume points, truncation -------------------------------------------

_FP_CHUNK = 1 << 22     # int16 words per reduction (a 32 MiB int64 temporary)
_FP_PERIOD = 4093       # weights (index mod 4093) + 1: |word · weight| < 2^27


def fingerprint(tensors, offsets: Optional[List[int]] = None) -> np.ndarray:
    """[K, 2] int64: per tensor, Σ b_i and Σ b_i·((i mod 4093) + 1) over its
    bits b read as int16 words (i: the word's index in the whole tensor, from
    ``offsets[k]`` elements on for a shard).  Exact integer sums: equal for the
    same bits on any device, thread count or reduction order, different for any
    two θ a training step apart (short of a 2^-64-ish coincidence; a tensor that
    did not move has the same fingerprint, as it should).  No overflow: |b| <=
    2^15 and the weight < 2^12, for tensors below 2^36 words.  Computed on the
    tensors' device, a chunk of 2^22 words at a time."""
    import torch

    out = []
    for k, t in enumerate(tensors):
        t = t.detach()
        size = t.element_size()     # 1-byte dtypes (float8) as int8 words
        words = t.contiguous().view(-1).view(torch.int16 if size >= 2 else torch.int8)
        base = (offsets[k] if offsets else 0) * max(1, size // 2)
        s1 = torch.zeros((), dtype=torch.int64, device=t.device)
        s2 = torch.zeros((), dtype=torch.int64, device=t.device)
        for start in range(0, words.numel(), _FP_CHUNK):
            c = words[start:start + _FP_CHUNK].to(torch.int64)
            w = torch.arange(base + start, base + start + c.numel(), dtype=torch.int64,
                             device=t.device).remainder_(_FP_PERIOD).add_(1)
            s1 += c.sum()
            s2 += (c * w).sum()
        out.append(torch.stack([s1, s2]))
    if not out:
        return np.zeros((0, 2), np.int64)
    if len({o.device for o in out}) == 1:
        return torch.stack(out).cpu().numpy()     # one copy (one GPU sync) for all
    return torch.stack([o.cpu() for o in out]).numpy()


def _labels(path: str, meta: dict) -> np.ndarray:
    n = int(meta["steps_committed"])
    if not n:
        return np.zeros(0, np.int64)
    return np.asarray(_read_checked(path, meta, "data.zarr", ["step"], n)["step"])


def _row_fingerprints(path: str, meta: dict) -> Optional[np.ndarray]:
    n = int(meta["steps_committed"])
    if not n or not meta.get("row_fingerprints"):
        return None
    zarr = _zarr()
    try:
        return np.asarray(zarr.open_group(os.path.join(path, "data.zarr"), mode="r")
                          ["fingerprint"][:n])
    except Exception as err:
        raise _incomplete(path, f"data.zarr/fingerprint is unreadable: {err}") from err


def _count_text(labels: np.ndarray, count: int) -> str:
    if count == 0:
        return "0 committed steps (the start)"
    return f"{count} committed steps (the last labelled step {int(labels[count - 1])})"


def resume_point(path: str, meta: dict, fp: Optional[np.ndarray]) -> Optional[dict]:
    """The state point a run resumes from: one at its last committed step whose
    fingerprint equals ``fp`` (the model's, :func:`fingerprint`).  None when the
    run has no committed step and no state (a fresh start).  Otherwise raises a
    RunStoreError naming the committed step the model matches (if any) and what
    to do (``truncate_run(path, that)``, another checkpoint, or a new store).
    Runs written before fingerprints: the latest state point, unchecked (the
    caller warns)."""
    n = int(meta["steps_committed"])
    points = state_points(meta)
    if n == 0 and not [p for p in points if p["steps"] == 0]:
        return None
    at_n = [p for p in points if p["steps"] == n]
    if fp is None or not any(p.get("fingerprint") for p in points):
        if at_n or not points or fp is None:
            return at_n[-1] if at_n else (points[-1] if points else None)
        s = points[-1]["steps"]   # a run written before fingerprints, state_every > 1
        raise RunStoreError(
            f"lca_ext: cannot resume {path!r}: its per-parameter state is as of {s} "
            f"committed steps and its rows go on to {n} (state_every > 1), so a resume would "
            f"miss the statistics of the steps between. Restore the checkpoint of step count "
            f"{s}, cut the run back with lca_ext.truncate_run({path!r}, {s}), then resume")
    for p in reversed(at_n):
        saved = _point_fingerprint(path, p)
        if saved is not None and np.array_equal(saved, fp):
            return p
    raise RunStoreError(resume_error(path, meta, fp))


def resume_error(path: str, meta: dict, fp: np.ndarray) -> str:
    """Why the model cannot resume the run at ``path``, and what to do."""
    n = int(meta["steps_committed"])
    labels = _labels(path, meta)
    points = state_points(meta)
    with_state = sorted({p["steps"] for p in points})
    matching_points = sorted({p["steps"] for p in points
                              if (lambda s: s is not None and np.array_equal(s, fp))(
                                  _point_fingerprint(path, p))})
    rows = _row_fingerprints(path, meta)
    matching_rows = [] if rows is None else         [c + 1 for c in range(len(rows)) if np.array_equal(rows[c], fp)]
    head = (f"lca_ext: cannot resume {path!r}: the model's parameters are not those after "
            f"its last commit, {_count_text(labels, n)}")
    states = ("states are saved at " + ", ".join(map(str, with_state)) + " committed steps"
              if with_state else "no per-parameter state is saved")
    if matching_points:
        s = matching_points[-1]
        return (f"{head}; they are those saved with its state at {_count_text(labels, s)}. "
                f"To resume from this checkpoint, cut the run back to it first: "
                f"lca_ext.truncate_run({path!r}, {s}) (the rows after it are dropped and "
                f"tracked again); or load the checkpoint taken after the last commit")
    if matching_rows:
        c = matching_rows[-1]
        if c == n:
            return (f"{head.replace('are not those after', 'are those after')}, but its "
                    f"per-parameter state is not (state_every > 1: {states}), so a resume "
                    f"would miss the statistics of the steps between. Restore the "
                    f"checkpoint of one of those step counts and cut the run back to it "
                    f"(lca_ext.truncate_run({path!r}, steps)), or start a new store; call "
                    f"tracker.result() or tracker.save_state() before stopping a run to "
                    f"store its state")
        return (f"{head}; they match {_count_text(labels, c)}, where no per-parameter "
                f"state was saved ({states}). Restore the checkpoint of one of those step "
                f"counts and cut the run back to it (lca_ext.truncate_run({path!r}, steps)), "
                f"or start a new store; to cut back to any checkpoint, call "
                f"tracker.save_state() where you save one")
    return (f"{head}, nor those after any of its committed steps or saved states ({states}). "
            f"Load the checkpoint this run was at, or start a new store (store=NEW_PATH); "
            f"lca_ext.truncate_run({path!r}, 0) empties it if the model is at the run's start")


def cut_back_to(path: str, meta: dict, fp: np.ndarray) -> Optional[tuple]:
    """What a framework callback does when training resumes from a checkpoint:
    if the model (fingerprint ``fp``) is not at the run's last commit but is
    the θ of an older saved state, cut the run back to that state
    (:func:`truncate_run`) and return (steps before, steps after); None when
    nothing is cut (the model is at the last commit, or matches no saved state:
    the resume then raises :func:`resume_error`'s message)."""
    n = int(meta["steps_committed"])
    best = None
    for p in state_points(meta):
        saved = _point_fingerprint(path, p)
        if saved is not None and np.array_equal(saved, fp):
            if p["steps"] == n:
                return None
            best = p["steps"] if best is None else max(best, p["steps"])
    if best is None:
        return None
    truncate_run(path, best)
    return n, best


def truncate_run(path: str, steps: int) -> None:
    """Cut the run directory ``path`` back to its first ``steps`` committed
    steps: the rows after them are dropped (and tracked again by a resumed run),
    and the per-parameter state (cum_lca, helped_steps, the oscillation
    counters) is the one saved at exactly that step count.  A state is saved
    with every ``state_every``-th step (the latest two are kept), by
    ``LCATracker.save_state()`` and by the Trainer / Lightning callbacks at every
    checkpoint save; cutting to a step count without one is a RunStoreError
    naming the counts it can be cut to.  ``steps=0`` empties the run.

    Crash-safe: one atomic commit of the metadata; state groups after the cut
    are deleted after it.  Then resume from the checkpoint taken at that step:
    ``LCATracker(..., store=path, resume=True)`` checks that the model is that
    checkpoint's θ (fingerprints) and continues the step labels from there.
    """
    meta = read_meta(path)
    n = int(meta["steps_committed"])
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
            or not 0 <= steps <= n:
        raise ValueError(f"lca_ext.truncate_run: steps={steps!r}; the run at {path!r} has "
                         f"{n} committed steps, so steps must be an int from 0 to {n}")
    steps = int(steps)
    check_run(path, meta)
    labels = _labels(path, meta)
    points = state_points(meta)
    if steps and not any(p["steps"] == steps for p in points):
        have = sorted({p["steps"] for p in points})
        below = [c for c in have if c < steps]
        above = [c for c in have if c > steps]
        near = ", ".join(f"{c} ({_count_text(labels, c)})"
                         for c in ([below[-1]] if below else []) + ([above[0]] if above else []))
        raise RunStoreError(
            f"lca_ext.truncate_run: {path!r} holds no per-parameter state at "
            f"{_count_text(labels, steps)}, so it cannot be cut back there (the statistics "
            f"of that point are not stored). It can be cut to "
            + (f"the nearest steps with a saved state: {near}; or 0" if near else "0 (empty)")
            + ". States are saved with every state_every-th step (the latest two kept), by "
            "tracker.save_state() and by the callbacks at each checkpoint save")
    if steps == n:
        return
    frames = 0
    n_frames = int(meta.get("frames_committed", 0))
    if steps and n_frames:
        frame_steps = _read_checked(path, meta, "frames.zarr", ["step"], n_frames)["step"]
        frames = int(np.sum(np.asarray(frame_steps) <= labels[steps - 1]))
    meta["states"] = [p for p in points if p["steps"] <= steps]
    latest = max(meta["states"], key=lambda p: (p["steps"], p["version"])) \
        if meta["states"] else None
    meta.update(steps_committed=steps, frames_committed=frames,
                state_version=None if latest is None else latest["version"],
                state_steps=None if latest is None else latest["steps"],
                state_serial=max([p["version"] for p in points]
                                 + [meta.get("state_serial", -1)]))
    write_json_atomic(os.path.join(path, META), meta)   # the commit of the cut
    remove_unlisted_states(path, meta)


def _incomplete(path: str, what: str) -> RunStoreError:
    return RunStoreError(f"lca_ext: run directory {path!r} is incomplete or damaged: {what}")


def _missing_chunks(root: str, name: str, arr, rows: Optional[int]) -> List[str]:
    """Chunk files of array ``name`` (under zarr group directory ``root``) that
    rows [0, rows) of it (all rows if None) need and that do not exist."""
    shape = list(arr.shape)
    if rows is not None:
        shape[0] = rows
    if not shape or 0 in shape:
        return [] if shape else ([] if os.path.exists(os.path.join(
            root, name, arr.metadata.chunk_key_encoding.encode_chunk_key(()))) else [name])
    counts = [-(-n // c) for n, c in zip(shape, arr.chunks)]
    encode = arr.metadata.chunk_key_encoding.encode_chunk_key
    missing = []
    for coords in itertools.product(*(range(c) for c in counts)):
        key = os.path.join(name, encode(coords))
        if not os.path.exists(os.path.join(root, key)):
            missing.append(key)
    return missing


def _read_checked(path: str, meta: dict, sub: str, expected: List[str],
                  rows: Optional[int], decode: bool = True) -> Dict[str, np.ndarray]:
    """Every array of the zarr group ``sub`` of a run directory, rows [0, rows)
    (whole arrays if None), after checking that each ``expected`` array is there,
    long enough, has all its chunk files and decodes (``decode=False``: the
    checks without reading the values; returns {})."""
    zarr = _zarr()
    root = os.path.join(path, sub)
    if not os.path.isdir(root):
        raise _incomplete(path, f"{sub} is missing (its {META} records "
                          f"{_what(meta, sub)})")
    try:
        group = zarr.open_group(root, mode="r")
        present = dict(group.arrays())
        for sub_name, g in group.groups():
            present.update({f"{sub_name}/{name}": arr for name, arr in g.arrays()})
    except Exception as err:
        raise _incomplete(path, f"{sub} is unreadable: {err}") from err
    absent = [k for k in expected if k not in present]
    if absent:
        raise _incomplete(path, f"{sub} lacks the arrays {absent} (its {META} records "
                          f"{_what(meta, sub)})")
    out: Dict[str, np.ndarray] = {}
    for name, arr in sorted(present.items()):
        if rows is not None and arr.shape[0] < rows:
            raise _incomplete(path, f"{sub}/{name} holds {arr.shape[0]} rows; its {META} "
                              f"records {_what(meta, sub)}")
        if meta.get("chunks_complete"):
            missing = _missing_chunks(root, name, arr, rows)
            if missing:
                more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
                raise _incomplete(path, "missing chunk files "
                                  + ", ".join(f"{sub}/{m}" for m in missing[:3]) + more
                                  + f" (its {META} records {_what(meta, sub)})")
        if not decode:
            continue
        try:
            out[name] = arr[:rows] if rows is not None else arr[...]
        except Exception as err:
            raise _incomplete(path, f"{sub}/{name} is unreadable: "
                              f"{type(err).__name__}: {err}") from err
    return out


def _what(meta: dict, sub: str) -> str:
    if sub == "data.zarr":
        return f"{meta.get('steps_committed')} committed steps"
    if sub == "frames.zarr":
        return f"{meta.get('frames_committed')} committed frames"
    return (f"per-parameter state {meta.get('state_fields') or ''} as of step count "
            f"{meta.get('state_steps')}").replace("  ", " ")


def create_array(group, name: str, shape, dtype, chunks):
    """A new array whose every chunk is written, even one equal to the fill value
    (zarr skips those by default): a missing chunk file then means lost data."""
    return group.create_array(name, shape=shape, dtype=dtype, chunks=chunks,
                              config={"write_empty_chunks": True})


def _write_state_group(group, state: Dict[str, List[np.ndarray]], flat: bool = True) -> None:
    """One array per field, every tensor flattened and concatenated (``flat``;
    a few arrays instead of one per field and tensor: the per-array cost of
    zarr dominated a commit), or one per field and tensor (older runs)."""
    for field_name, tensors in state.items():
        if flat:
            t = np.concatenate([np.ascontiguousarray(a).reshape(-1) for a in tensors]) \
                if tensors else np.zeros(0)
            arr = create_array(group, field_name, shape=t.shape, dtype=t.dtype,
                               chunks=(max(1, min(t.size, 1 << 24)),))
            arr[...] = t
            continue
        for k, t in enumerate(tensors):
            t = np.ascontiguousarray(t)
            arr = create_array(group, f"{field_name}/{k}", shape=t.shape, dtype=t.dtype,
                               chunks=t.shape if 0 not in t.shape and t.ndim else "auto")
            arr[...] = t


# what a writer records about the directory's content (recomputed for a new run)
_CONTENT_KEYS = ("arrays", "state_fields", "frame_arrays", "chunks_complete",
                 "states", "state_serial", "state_layout", "row_fingerprints")
# what a run of schema 1 must hold when its metadata predates "arrays"
_BASE_FIELDS = ("loss_before", "loss_after", "lca_sum")


def check_run(path: str, meta: dict) -> None:
    """Raise RunStoreError if a committed row, state array or frame of the run
    directory is missing (structure and chunk files; values are not decoded)."""
    read_arrays(path, meta, decode=False)
    for point in state_points(meta):
        read_state(path, meta, decode=False, point=point)
    read_frames(path, meta, decode=False)


def read_state(path: str, meta: dict, decode: bool = True, point: Optional[dict] = None
                ) -> Optional[Dict[str, List[np.ndarray]]]:
    """The per-parameter state of a state point (default: the latest, after
    checking that every other kept point is whole too; None if none yet)."""
    if point is None:
        points = state_points(meta)
        for other in points:
            if other["version"] != meta.get("state_version"):
                read_state(path, meta, decode=False, point=other)
        point = next((p for p in points if p["version"] == meta.get("state_version")), None)
        if point is None:
            return None
    version = point["version"]
    k_count = len(meta["names"])
    sub = f"state.{version}.zarr"
    fields = meta.get("state_fields")
    if fields is None:   # metadata written before state_fields: what is there
        try:
            fields = sorted(_zarr().open_group(os.path.join(path, sub), mode="r").group_keys())
        except Exception as err:
            raise _incomplete(path, f"{sub} is missing or unreadable: {err}") from err
    extra = ["fingerprint"] if point.get("fingerprint") else []
    if meta.get("state_layout") == "flat":
        flat = _read_checked(path, meta, sub, list(fields) + extra, None, decode)
        if not decode:
            return {}
        sizes = [int(np.prod(s)) for s in meta["shapes"]]
        out = {}
        for f in fields:
            if flat[f].shape != (sum(sizes),):
                raise _incomplete(path, f"{sub}/{f} holds {flat[f].shape} values; the "
                                  f"parameters have {sum(sizes)}")
            parts = np.split(flat[f], np.cumsum(sizes)[:-1])
            out[f] = [a.reshape(s) for a, s in zip(parts, meta["shapes"])]
        return out
    flat = _read_checked(path, meta, sub,
                         [f"{f}/{k}" for f in fields for k in range(k_count)] + extra, None,
                         decode)
    return {f: [flat[f"{f}/{k}"] for k in range(k_count)] for f in fields} if decode else {}


def read_last_row(path: str, meta: dict, keys) -> Dict[str, np.ndarray]:
    """The last committed step's value of each of ``keys`` ("<objective>/<field>")
    the run holds (the others left out), without reading the whole arrays."""
    n = int(meta["steps_committed"])
    present = [k for k in keys if k in meta.get("arrays", ())]
    if n == 0 or not present:
        return {}
    group = _zarr().open_group(os.path.join(path, "data.zarr"), mode="r")
    out = {}
    for key in present:
        arr = group[key]
        if arr.shape[0] >= n:
            out[key] = np.asarray(arr[n - 1])
    return out


def read_arrays(path: str, meta: dict, decode: bool = True) -> Dict[str, np.ndarray]:
    """Every committed per-step array, keyed "<objective>/<field>"."""
    n = int(meta["steps_committed"])
    if n == 0:
        return {}
    expected = meta.get("arrays")
    if expected is None:   # metadata written before "arrays"
        expected = ["step"] + [f"{o}/{f}" for o in meta.get("objectives", ["train"])
                               for f in _BASE_FIELDS]
    extra = ["fingerprint"] if meta.get("row_fingerprints") else []
    arrays = _read_checked(path, meta, "data.zarr", list(expected) + extra, n, decode)
    arrays.pop("fingerprint", None)   # the store's own (resume checks), not a Run field
    return arrays


def read_frames(path: str, meta: dict, decode: bool = True) -> Dict[str, np.ndarray]:
    n = int(meta.get("frames_committed", 0))
    if n == 0:
        return {}
    return _read_checked(path, meta, "frames.zarr", list(meta.get("frame_arrays", ["step"])),
                         n, decode)
