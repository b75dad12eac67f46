"""The run store: a directory that a tracked run appends to, step by step.

Layout (schema version 1)::

    RUN_DIR/
      lca_run.json   metadata and the commit record (JSON, replaced atomically)
      data.zarr/     per-step arrays, time first: "<objective>/<field>" [T, ...]
      state.zarr/    per-parameter state at the last commit: "<field>/<k>"
      frames.zarr/   optional raw per-element LCA of chosen tensors: "<k>" [F, ...]

``lca_run.json`` holds ``format`` ("lca_ext.run"), ``version`` (1), the
parameter ``names`` / ``shapes`` / ``layer_names`` / ``layer_of``, ``objectives``
(e.g. ["train", "val"]), ``bin_edges``, ``num_classes``, the tracker ``config``,
and the commit: ``steps_committed`` (rows of data.zarr that are complete),
``state_version``, ``state_steps`` (the per-parameter state is as of that many
steps; fewer than steps_committed with ``state_every > 1``) and
``frames_committed``; and what a reader must find: ``arrays`` (the keys of
data.zarr), ``state_fields``, ``frame_arrays`` and ``chunks_complete`` (every
chunk file is written, even one that equals the fill value).

Reading checks the directory against that record: a committed row, state
array or frame that is missing, too short, or unreadable is a RunStoreError
naming it (zarr itself would read a missing chunk file as zeros).

Crash safety (kill -9 at any instant loses no completed step): a step's rows are
written into data.zarr first, then its per-parameter state into a *new* state
group, then lca_run.json is replaced atomically (write, fsync, rename) with the
new counts; the commit is that rename.  zarr writes each chunk file atomically
(temporary file + rename), so a committed row is never torn; rows past
``steps_committed`` are ignored on load and overwritten on resume.  Nothing is
pickled: arrays are zarr, metadata is JSON.
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


def _write_json_atomic(path: str, obj: dict) -> None:
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
        else:
            os.makedirs(path, exist_ok=True)
            meta = {k: v for k, v in meta.items() if k not in _CONTENT_KEYS}
            self.meta = dict(meta, format=FORMAT, version=VERSION, steps_committed=0,
                             state_version=None, frames_committed=0, chunks_complete=True)
            _write_json_atomic(meta_path, self.meta)
        self.data = zarr.open_group(os.path.join(path, "data.zarr"), mode="a")
        self.frames = zarr.open_group(os.path.join(path, "frames.zarr"), mode="a")

    @property
    def steps_committed(self) -> int:
        return int(self.meta["steps_committed"])

    def load_state(self) -> Optional[Dict[str, List[np.ndarray]]]:
        return _read_state(self.path, self.meta)

    def _put_row(self, group, key: str, row: np.ndarray, index: int) -> None:
        row = np.asarray(row)
        if key in group:
            # (a reopened array forgets write_empty_chunks: a row equal to the fill
            # value, e.g. a False flag, would leave its chunk file unwritten)
            arr = group[key].with_config({"write_empty_chunks": True})
            if arr.shape[0] < index + 1:
                arr.resize((index + 1, *arr.shape[1:]))
        else:
            arr = create_array(group, key, shape=(index + 1, *row.shape), dtype=row.dtype,
                               chunks=(TIME_CHUNK, *row.shape) if group is self.data
                               else (1, *row.shape))
        arr[index] = row

    def commit(self, rows: Dict[str, np.ndarray], state: Dict[str, List[np.ndarray]],
               frames: Optional[Dict[str, np.ndarray]] = None) -> None:
        """Write one step: its rows, the per-parameter state, then the commit."""
        zarr = _zarr()
        index = self.steps_committed
        for key, row in rows.items():
            self._put_row(self.data, key, row, index)
        n_frames = int(self.meta["frames_committed"])
        if frames:
            for key, frame in frames.items():
                self._put_row(self.frames, key, frame, n_frames)
            self._put_row(self.frames, "step", np.asarray(rows["step"]), n_frames)
            n_frames += 1
        old_version = version = self.meta["state_version"]
        if state:   # a new state group; without one (state_every > 1) the last stays
            version = 0 if old_version is None else old_version + 1
            group = zarr.open_group(os.path.join(self.path, f"state.{version}.zarr"),
                                    mode="w")
            _write_state_group(group, state)
        self.meta.update(steps_committed=index + 1, state_version=version,
                         frames_committed=n_frames)
        self.meta["arrays"] = sorted(set(self.meta.get("arrays", ())) | set(rows))
        if frames:
            self.meta["frame_arrays"] = sorted(set(self.meta.get("frame_arrays", ()))
                                               | set(frames) | {"step"})
        if state:
            self.meta["state_steps"] = index + 1   # the state is as of this many steps
            self.meta["state_fields"] = sorted(state)
        _write_json_atomic(os.path.join(self.path, META), self.meta)  # the commit
        if old_version is not None and version != old_version:
            shutil.rmtree(os.path.join(self.path, f"state.{old_version}.zarr"),
                          ignore_errors=True)


    def write_state(self, state: Dict[str, List[np.ndarray]]) -> None:
        """Store the per-parameter state as of the last committed step (no new
        row): how a run with ``state_every > 1`` records its final state."""
        zarr = _zarr()
        old_version = self.meta["state_version"]
        version = 0 if old_version is None else old_version + 1
        group = zarr.open_group(os.path.join(self.path, f"state.{version}.zarr"), mode="w")
        _write_state_group(group, state)
        self.meta.update(state_version=version, state_steps=self.steps_committed,
                         state_fields=sorted(state))
        _write_json_atomic(os.path.join(self.path, META), self.meta)
        if old_version is not None:
            shutil.rmtree(os.path.join(self.path, f"state.{old_version}.zarr"),
                          ignore_errors=True)


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


def _write_state_group(group, state: Dict[str, List[np.ndarray]]) -> None:
    for field_name, tensors in state.items():
        for k, t in enumerate(tensors):
            t = np.ascontiguousarray(t)
            arr = create_array(group, f"{field_name}/{k}", shape=t.shape, dtype=t.dtype,
                               chunks=t.shape if 0 not in t.shape and t.ndim else "auto")
            arr[...] = t


# what a writer records about the directory's content (recomputed for a new run)
_CONTENT_KEYS = ("arrays", "state_fields", "frame_arrays", "chunks_complete")
# what a run of schema 1 must hold when its metadata predates "arrays"
_BASE_FIELDS = ("loss_before", "loss_after", "lca_sum")


def check_run(path: str, meta: dict) -> None:
    """Raise RunStoreError if a committed row, state array or frame of the run
    directory is missing (structure and chunk files; values are not decoded)."""
    read_arrays(path, meta, decode=False)
    _read_state(path, meta, decode=False)
    read_frames(path, meta, decode=False)


def _read_state(path: str, meta: dict,
                decode: bool = True) -> Optional[Dict[str, List[np.ndarray]]]:
    """The per-parameter state of the last state commit (None if none yet)."""
    if meta.get("state_version") is None:
        return None
    k_count = len(meta["names"])
    sub = f"state.{meta['state_version']}.zarr"
    fields = meta.get("state_fields")
    if fields is None:   # metadata written before state_fields: what is there
        try:
            fields = sorted(_zarr().open_group(os.path.join(path, sub), mode="r").group_keys())
        except Exception as err:
            raise _incomplete(path, f"{sub} is missing or unreadable: {err}") from err
    flat = _read_checked(path, meta, sub,
                         [f"{f}/{k}" for f in fields for k in range(k_count)], None, decode)
    return {f: [flat[f"{f}/{k}"] for k in range(k_count)] for f in fields} if decode else {}


def read_arrays(path: str, meta: dict, decode: bool = True) -> Dict[str, np.ndarray]:
    """Every committed per-step array, keyed "<objective>/<field>"."""
    n = int(meta["steps_committed"])
    if n == 0:
        return {}
    expected = meta.get("arrays")
    if expected is None:   # metadata written before "arrays"
        expected = ["step"] + [f"{o}/{f}" for o in meta.get("objectives", ["train"])
                               for f in _BASE_FIELDS]
    return _read_checked(path, meta, "data.zarr", list(expected), n, decode)


def read_frames(path: str, meta: dict, decode: bool = True) -> Dict[str, np.ndarray]:
    n = int(meta.get("frames_committed", 0))
    if n == 0:
        return {}
    return _read_checked(path, meta, "frames.zarr", list(meta.get("frame_arrays", ["step"])),
                         n, decode)
