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
``frames_committed``.

Crash safety (kill -9 at any instant loses no completed step): a step's rows are
written into data.zarr first, then its per-parameter state into a *new* state
group, then lca_run.json is replaced atomically (write, fsync, rename) with the
new counts; the commit is that rename.  zarr writes each chunk file atomically
(temporary file + rename), so a committed row is never torn; rows past
``steps_committed`` are ignored on load and overwritten on resume.  Nothing is
pickled: arrays are zarr, metadata is JSON.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
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
            self.meta = old
        else:
            os.makedirs(path, exist_ok=True)
            self.meta = dict(meta, format=FORMAT, version=VERSION, steps_committed=0,
                             state_version=None, frames_committed=0)
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
            arr = group[key]
            if arr.shape[0] < index + 1:
                arr.resize((index + 1, *arr.shape[1:]))
        else:
            arr = group.create_array(key, shape=(index + 1, *row.shape), dtype=row.dtype,
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
            for field_name, tensors in state.items():
                for k, t in enumerate(tensors):
                    group.create_array(f"{field_name}/{k}", data=np.ascontiguousarray(t))
        self.meta.update(steps_committed=index + 1, state_version=version,
                         frames_committed=n_frames)
        if state:
            self.meta["state_steps"] = index + 1   # the state is as of this many steps
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
        for field_name, tensors in state.items():
            for k, t in enumerate(tensors):
                group.create_array(f"{field_name}/{k}", data=np.ascontiguousarray(t))
        self.meta.update(state_version=version, state_steps=self.steps_committed)
        _write_json_atomic(os.path.join(self.path, META), self.meta)
        if old_version is not None:
            shutil.rmtree(os.path.join(self.path, f"state.{old_version}.zarr"),
                          ignore_errors=True)


def _read_state(path: str, meta: dict) -> Optional[Dict[str, List[np.ndarray]]]:
    if meta.get("state_version") is None:
        return None
    zarr = _zarr()
    group = zarr.open_group(os.path.join(path, f"state.{meta['state_version']}.zarr"),
                            mode="r")
    out: Dict[str, List[np.ndarray]] = {}
    k_count = len(meta["names"])
    for field_name in group.group_keys():
        out[field_name] = [group[f"{field_name}/{k}"][...] for k in range(k_count)]
    return out


def read_arrays(path: str, meta: dict) -> Dict[str, np.ndarray]:
    """Every committed per-step array, keyed "<objective>/<field>"."""
    zarr = _zarr()
    n = int(meta["steps_committed"])
    out: Dict[str, np.ndarray] = {}
    data_path = os.path.join(path, "data.zarr")
    if n == 0 or not os.path.exists(data_path):
        return out
    try:
        group = zarr.open_group(data_path, mode="r")
        for name, arr in group.arrays():
            out[name] = arr[:n]
        for sub_name, sub in group.groups():
            for name, arr in sub.arrays():
                out[f"{sub_name}/{name}"] = arr[:n]
    except Exception as err:
        raise RunStoreError(f"lca_ext: the arrays of {path!r} are unreadable: {err}") from err
    return out


def read_frames(path: str, meta: dict) -> Dict[str, np.ndarray]:
    zarr = _zarr()
    n = int(meta.get("frames_committed", 0))
    frames_path = os.path.join(path, "frames.zarr")
    if n == 0 or not os.path.exists(frames_path):
        return {}
    group = zarr.open_group(frames_path, mode="r")
    return {name: arr[:n] for name, arr in group.arrays()}
