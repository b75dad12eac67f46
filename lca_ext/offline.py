"""Offline LCA: the Loss Change Allocation of a saved training trajectory.

Train as usual and save the model's ``state_dict`` after every optimiser step
(``step_000000.pt`` is the initial state θ_0, ``step_000001.pt`` the state after
the first step, ...); LCA is computed afterwards, possibly split over many
processes::

    torch.save(model.state_dict(), f"traj/step_{0:06d}.pt")
    for t, (x, y) in enumerate(loader):
        ...; opt.step()
        torch.save(model.state_dict(), f"traj/step_{t + 1:06d}.pt")

    run = lca_ext.offline.compute(make_model(), loss_fn, (X, Y), "traj", "lca_run")

The computation is the ordinary :class:`~lca_ext.LCATracker` driven over the
saved states: for each consecutive pair (θ_t, θ_{t+1}) the model's parameters
are set to θ_t, ``tracker.begin()``, set to θ_{t+1}, ``tracker.end()``.  So the
results are those that tracking during training would have given (same
gradients at the same points, the same adaptive Simpson refinement, the same
reuse of g(θ_{t+1}) as the next step's start: two new gradient passes per step),
except the run's pass account (RuleOptions.mean_passes): offline, each step has
``max_passes`` alone, so that parts computed apart merge exactly.

Trajectory
  * a **directory**: every ``*.pt`` / ``*.pth`` file in it (dot-files skipped),
    ordered by the *last integer in its name*, which is the state's step index
    (``step_000123.pt``, ``ckpt-123.pth`` -> 123).  A file without a number, or
    two files with the same number, is an error.  Other files are ignored.
  * an explicit, ordered **list of paths** (step indices 0, 1, ... unless
    ``step_indices`` is given), or a list of in-memory **state dicts**.

  Files are read with ``torch.load(path, weights_only=True)``: each must hold a
  plain mapping of parameter / buffer name -> tensor (``key=`` picks the state
  dict out of a checkpoint dict such as ``{"model": ..., "optimizer": ...}``).
  Anything else (a pickled Python object, a nested non-tensor) is refused.
  Names are checked strictly against the model (missing or unexpected entries,
  wrong shapes are errors naming the file).

Steps and buffers.  The LCA step from state k to state k + 1 is numbered with
state k's step index; with gaps (a state saved every 10 steps) each pair is one
LCA step along the straight line between them.  Module buffers (BatchNorm
running statistics) are taken from the step's *end* state for both ends of the
step: a state saved after ``opt.step()`` holds the running statistics that
step's forward pass produced, which is what the in-training tracker saw (this
matters only for ``batchnorm="eval"``).

Splitting.  ``split_ranges(num_steps, parts)`` cuts the steps into contiguous
ranges; each is computed by one worker (``steps=(start, stop)``, or
``rank=, world_size=``, by default torch.distributed's when it is initialised)
into its own run store, and :func:`merge_runs` joins the stores into one, in
step order.  The merged run equals one unsplit run: per-step arrays are
concatenated, per-parameter ``cum_lca`` and ``helped_steps`` summed (cum_lca
to float32 rounding: the additions are grouped differently), and the
oscillation counters come out *exactly* equal, as follows.

Oscillation counters across a split.  At step t the tracker counts, per
element, a change when s · last < 0, where s = sign(θ_{t+1} − θ_t) (resp.
sign(g(θ_t)), the whole-set gradient at the step's start) and ``last`` is the
last *nonzero* sign seen before; a zero sign keeps the older one.  Priming a
range that starts at step a with the signs of step a − 1 alone is therefore
not exact (where that sign is 0 the unsplit run holds an older one), and
finding the older ones could cost a gradient pass per earlier step.  Instead
each range starts unprimed and also records, per element, the *first* nonzero
sign it saw (state fields ``first_delta_sign`` and ``first_grad_sign``, int8).
Merging range A then range B adds the change at the seam,
first_B · last_A < 0, to the summed counters; last = last_B where nonzero,
else last_A; first = first_A where nonzero, else first_B.  This is exact, needs
no extra pass, and is associative (merged runs can be merged again).  The one
extra cost of a split is the start gradient of each range after the first
(its ``grad_passes`` shows it).
"""
from __future__ import annotations

import dataclasses
import inspect
import operator
import os
import pickle
import re
import shutil
from collections.abc import Mapping
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import store as run_store
from .rule_options import rule_options
from .run import Run, load_run
from .tracker import LCATracker

STATE_SUFFIXES = (".pt", ".pth")
FIRST_SIGN = {"first_delta_sign": "last_delta_sign", "first_grad_sign": "last_grad_sign"}
COUNTER_SIGNS = {"direction_changes": ("first_delta_sign", "last_delta_sign"),
                 "grad_sign_changes": ("first_grad_sign", "last_grad_sign")}
PART_PREFIX = "part-"
# metadata that must agree for parts to be merged into one run
_SAME_IN_PARTS = ("names", "shapes", "layer_names", "layer_of", "objectives", "num_classes",
                  "bin_edges", "frame_names", "config")
_LAST_DIGITS = re.compile(r"(\d+)\D*$")

PathOrState = Union[str, os.PathLike, Mapping]


class TrajectoryError(ValueError):
    """A saved trajectory (or one state of it) that offline LCA cannot use."""


def _short(names: Sequence[str], k: int = 5) -> str:
    names = list(names)
    return repr(names) if len(names) <= k else \
        f"{names[:k]!r} (and {len(names) - k} more)"


# -- the trajectory ---------------------------------------------------------------

def state_files(directory: str) -> List[Tuple[int, str]]:
    """(step index, path) of every state file in ``directory``, in step order:
    ``*.pt`` / ``*.pth`` files, indexed by the last integer in the name."""
    found: Dict[int, str] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if name.startswith(".") or not name.lower().endswith(STATE_SUFFIXES) \
                or not os.path.isfile(path):
            continue
        stem = os.path.splitext(name)[0]
        match = _LAST_DIGITS.search(stem)
        if match is None:
            raise TrajectoryError(
                f"lca_ext: {path!r} has no step number in its name; state files are "
                "ordered by the last integer in their name (e.g. step_000123.pt)")
        index = int(match.group(1))
        if index in found:
            raise TrajectoryError(f"lca_ext: {found[index]!r} and {path!r} both have step "
                                  f"number {index}; expected one state file per step")
        found[index] = path
    return sorted(found.items())


class Trajectory:
    """An ordered sequence of model states θ_0, ..., θ_N (file paths or state
    dicts) with their step indices, read one at a time; N LCA steps."""

    def __init__(self, states: Sequence[PathOrState], step_indices: Optional[Sequence[int]] = None,
                 *, key: Optional[str] = None, source: Optional[str] = None):
        self.states = list(states)
        self.key = key
        self.source = source
        where = f" in {source!r}" if source else ""
        if len(self.states) < 2:
            raise TrajectoryError(
                f"lca_ext: the trajectory{where} has {len(self.states)} state(s); offline LCA "
                "needs at least 2 (θ_t and θ_t+1) for one step")
        steps = list(range(len(self.states))) if step_indices is None else \
            [int(s) for s in step_indices]
        if len(steps) != len(self.states):
            raise TrajectoryError(f"lca_ext: {len(steps)} step indices for "
                                  f"{len(self.states)} states; expected one per state")
        if any(b <= a for a, b in zip(steps, steps[1:])):
            raise TrajectoryError(f"lca_ext: step indices {_short(steps, 8)} are not "
                                  "strictly increasing")
        self.steps = steps

    def __len__(self) -> int:
        return len(self.states)

    @property
    def num_steps(self) -> int:
        """LCA steps: one per consecutive pair of states."""
        return len(self.states) - 1

    def label(self, i: int) -> str:
        src = self.states[i]
        return repr(os.fspath(src)) if not isinstance(src, Mapping) else \
            f"state {i} (step {self.steps[i]})"

    def load(self, i: int, map_location=None) -> Dict[str, torch.Tensor]:
        """State i as a name -> tensor mapping (checked to be one)."""
        src = self.states[i]
        label = self.label(i)
        obj = src if isinstance(src, Mapping) else _torch_load(os.fspath(src), map_location)
        if self.key is not None:
            if not isinstance(obj, Mapping) or self.key not in obj:
                have = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
                raise TrajectoryError(f"lca_ext: {label} has no entry {self.key!r} (key=); "
                                      f"it has {_short(have) if isinstance(have, list) else have}")
            obj = obj[self.key]
        return _check_state(obj, label)


_EXPECTED = ("expected a state dict: a mapping of parameter/buffer name -> tensor, as "
             "saved by torch.save(model.state_dict(), path)")


def _torch_load(path: str, map_location):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"lca_ext: trajectory file {path!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message is many lines; keep its one informative phrase
        match = re.search(r"WeightsUnpickler error:\s*(.+?)(?: was not an allowed|\n|$)",
                          str(err))
        detail = match.group(1).strip() if match else ""
        if "GLOBAL" in detail:   # a class or function: a pickled Python object
            raise TrajectoryError(
                f"lca_ext: {path!r} holds a pickled Python object ({detail}), which "
                f"torch.load(weights_only=True) refuses to load (it could run code); "
                f"{_EXPECTED}") from None
        failure = detail or "the weights-only unpickler failed"
    except Exception as err:   # a corrupt file fails in many ways (EOFError, IndexError, ...)
        failure = (str(err).strip().splitlines() or [type(err).__name__])[0]
    raise TrajectoryError(f"lca_ext: {path!r} is not a readable torch.save file "
                          f"({failure}); {_EXPECTED}")


def _check_state(obj, label: str) -> Dict[str, torch.Tensor]:
    expected = _EXPECTED
    if not isinstance(obj, Mapping):
        raise TrajectoryError(f"lca_ext: {label} holds a {type(obj).__name__}; {expected}")
    for name, value in obj.items():
        if not isinstance(name, str):
            raise TrajectoryError(f"lca_ext: {label} has a key {name!r} that is not a "
                                  f"string; {expected}")
        if not isinstance(value, torch.Tensor):
            hint = (" (a checkpoint dict? pass key= to pick the state dict out of it)"
                    if isinstance(value, Mapping) else "")
            raise TrajectoryError(f"lca_ext: {label}: entry {name!r} is a "
                                  f"{type(value).__name__}, not a tensor{hint}; {expected}")
    return dict(obj)


def open_trajectory(source, *, step_indices: Optional[Sequence[int]] = None,
                    key: Optional[str] = None) -> Trajectory:
    """A :class:`Trajectory` from a directory of state files, an ordered list of
    file paths, a list of state dicts, or a Trajectory (returned as is)."""
    if isinstance(source, Trajectory):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.exists(path):
            raise FileNotFoundError(f"lca_ext: trajectory directory {path!r} does not exist")
        if not os.path.isdir(path):
            raise TrajectoryError(
                f"lca_ext: {path!r} is a file; expected a directory of per-step state_dict "
                "files (step_000000.pt, step_000001.pt, ...) or a list of paths")
        found = state_files(path)
        return Trajectory([p for _, p in found],
                          [i for i, _ in found] if step_indices is None else step_indices,
                          key=key, source=path)
    if isinstance(source, Mapping):
        raise TrajectoryError("lca_ext: got a single state dict; expected a sequence of "
                              "states (θ_0, θ_1, ...)")
    states = list(source)
    if all(isinstance(s, (str, os.PathLike)) for s in states):
        for s in states:
            if not os.path.isfile(s):
                raise FileNotFoundError(f"lca_ext: trajectory file {os.fspath(s)!r} does "
                                        "not exist")
        return Trajectory(states, step_indices, key=key)
    if all(isinstance(s, Mapping) for s in states):
        return Trajectory(states, step_indices, key=key)
    kinds = sorted({type(s).__name__ for s in states})
    raise TrajectoryError(f"lca_ext: a trajectory of {kinds}; expected a directory, a list "
                          "of file paths or a list of state dicts")


class _StateLoader:
    """Copies states of the trajectory into the model's own tensors (in place,
    so the tracker, which holds the live parameters, sees them)."""

    def __init__(self, model: nn.Module, tracked: Sequence[str]):
        self.targets = model.state_dict(keep_vars=True)
        self.is_param = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        self.tracked = set(tracked)

    def check(self, state: Dict[str, torch.Tensor], label: str) -> None:
        missing = [n for n in self.targets if n not in state]
        tracked = [n for n in missing if n in self.tracked]
        if tracked:
            raise TrajectoryError(f"lca_ext: {label} has no entry for the tracked "
                                  f"parameter(s) {_short(tracked)}")
        if missing:
            raise TrajectoryError(f"lca_ext: {label} lacks {_short(missing)}; every "
                                  "parameter and buffer of the model is loaded (strictly)")
        unexpected = [n for n in state if n not in self.targets]
        if unexpected:
            raise TrajectoryError(f"lca_ext: {label} has entries {_short(unexpected)} that "
                                  "are not parameters or buffers of the model")
        for name, target in self.targets.items():
            if state[name].shape != target.shape:
                raise TrajectoryError(f"lca_ext: {label}: {name!r} has shape "
                                      f"{tuple(state[name].shape)}, the model's is "
                                      f"{tuple(target.shape)}")

    def load(self, state: Dict[str, torch.Tensor], *, params: bool) -> None:
        """The parameters (params=True) or the buffers (False) of ``state``."""
        with torch.no_grad():
            for name, target in self.targets.items():
                if (name in self.is_param) == params:
                    target.copy_(state[name])


# -- splitting ----------------------------------------------------------------------

def split_ranges(num_steps: int, parts: int) -> List[Tuple[int, int]]:
    """``parts`` contiguous (start, stop) ranges covering range(num_steps), sizes
    differing by at most one (the first ones larger); empty when parts > num_steps."""
    if not (isinstance(num_steps, int) and num_steps >= 0):
        raise ValueError(f"lca_ext.split_ranges: num_steps={num_steps!r}; expected an int >= 0")
    if not (isinstance(parts, int) and parts >= 1):
        raise ValueError(f"lca_ext.split_ranges: parts={parts!r}; expected an int >= 1")
    base, extra = divmod(num_steps, parts)
    out, start = [], 0
    for p in range(parts):
        stop = start + base + (1 if p < extra else 0)
        out.append((start, stop))
        start = stop
    return out


def part_path(out_dir: str, rank: int, world_size: int) -> str:
    """Where worker ``rank`` of ``world_size`` writes: ``out_dir/part-RRRRR``
    (just ``out_dir`` when there is one worker)."""
    return out_dir if world_size == 1 else os.path.join(out_dir, f"{PART_PREFIX}{rank:05d}")


def _rank_world(rank, world_size, tracker_kwargs) -> Tuple[int, int]:
    if rank is None and world_size is None:
        if tracker_kwargs.get("distributed") not in (None, False):
            return 0, 1   # the tracker's own data-parallel mode: every rank, every step
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():
            return dist.get_rank(), dist.get_world_size()
        return 0, 1
    if rank is None or world_size is None:
        raise ValueError(f"lca_ext.offline: rank={rank!r}, world_size={world_size!r}; "
                         "give both or neither")
    if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int)
            and 0 <= rank < world_size):
        raise ValueError(f"lca_ext.offline: rank={rank!r}, world_size={world_size!r}; "
                         "expected ints with 0 <= rank < world_size")
    return rank, world_size


def _check_range(steps, num_steps: int) -> Tuple[int, int]:
    try:
        start, stop = steps
    except (TypeError, ValueError):
        raise ValueError(f"lca_ext.offline: steps={steps!r}; expected (start, stop)") from None
    try:
        start = 0 if start is None else operator.index(start)
        stop = num_steps if stop is None else operator.index(stop)
    except TypeError:
        start = stop = -1   # not integers: refused below
    if not 0 <= start <= stop <= num_steps:
        raise ValueError(f"lca_ext.offline: steps={steps!r}; expected 0 <= start <= stop <= "
                         f"{num_steps} (the trajectory has {num_steps} steps)")
    return start, stop


# -- the computation ----------------------------------------------------------------

def _update_first_signs(state: Dict[str, List[torch.Tensor]]) -> None:
    # a range starts with every last sign 0 and a last sign, once nonzero, stays
    # nonzero: so the first nonzero last sign is the first nonzero sign seen
    for first_key, last_key in FIRST_SIGN.items():
        for first, last in zip(state[first_key], state[last_key]):
            first.copy_(torch.where(first == 0, last, first))


def compute(model: nn.Module, loss_fn, lca_data, trajectory, out_dir: Optional[str] = None, *,
            steps: Optional[Tuple[Optional[int], Optional[int]]] = None,
            rank: Optional[int] = None, world_size: Optional[int] = None,
            resume: bool = False, step_indices: Optional[Sequence[int]] = None,
            key: Optional[str] = None, map_location=None, **tracker_kwargs) -> Run:
    """LCA of the steps of a saved trajectory, with an LCATracker on ``model``.

    model, loss_fn, lca_data: as for :class:`~lca_ext.LCATracker` (``model``
        only provides the architecture: its parameters and buffers are
        overwritten with the saved states, and end at the range's last state).
    trajectory: a directory of state files, an ordered list of paths, a list of
        state dicts, or a :class:`Trajectory` (see the module docstring).
    out_dir:    the run store to write (None: keep the run in memory).  When
        the steps are split by ``rank`` / ``world_size`` (world_size > 1) the
        store is ``part_path(out_dir, rank, world_size)``.
    steps:      (start, stop): compute LCA steps start .. stop-1 only (positions
        in the trajectory; None = from the start / to the end); or
    rank, world_size: compute range ``split_ranges(num_steps, world_size)[rank]``;
        by default torch.distributed's rank and world size when it is
        initialised (each process then tracks on its own), else everything.
    resume:     continue a part whose store holds some of its steps (after a
        crash); a store holding all of them is returned as is.
    step_indices, key: see :func:`open_trajectory`.
    map_location: where states are loaded (default: the parameters' device).
    tracker_kwargs: passed to LCATracker (method, rtol, atol, batch_size,
        eval_sets, num_classes, batchnorm, frames, ...; not store/resume/schedule).

    Returns the :class:`~lca_ext.Run` of the range (steps numbered with the
    trajectory's step indices).
    """
    for name in ("store", "schedule"):
        if name in tracker_kwargs:
            raise TypeError(f"lca_ext.offline.compute: {name}= is not an option here "
                            + ("(use out_dir)" if name == "store"
                               else "(pass the states to use as the trajectory)"))
    traj = open_trajectory(trajectory, step_indices=step_indices, key=key)
    n = traj.num_steps
    store = out_dir
    if steps is not None:
        if rank is not None or world_size is not None:
            raise ValueError("lca_ext.offline.compute: give steps= or rank=/world_size=, "
                             "not both")
        start, stop = _check_range(steps, n)
    else:
        rank, world_size = _rank_world(rank, world_size, tracker_kwargs)
        start, stop = split_ranges(n, world_size)[rank]
        if out_dir is not None:
            store = part_path(out_dir, rank, world_size)
    if "distributed" in inspect.signature(LCATracker.__init__).parameters:
        # offline workers split the steps, not the LCA set: each tracks alone
        tracker_kwargs.setdefault("distributed", False)
    if store is not None:
        store = os.fspath(store)
    elif resume:
        raise ValueError("lca_ext.offline.compute: resume=True needs out_dir= (the stored run "
                         "to continue); without out_dir the run is kept in memory and there "
                         "is nothing to resume")
    tracker = _OfflineTracker(model, loss_fn, lca_data, store=store, resume=resume,
                              **tracker_kwargs)
    if getattr(getattr(tracker, "ctx", None), "sharded", False):
        raise NotImplementedError("lca_ext.offline: FSDP-sharded models are not supported; "
                                  "load the states into an unsharded model")
    loader = _StateLoader(tracker.model, tracker.params.names)
    oscillation = "last_delta_sign" in tracker.state
    if oscillation:
        for first_key, last_key in FIRST_SIGN.items():
            tracker.state[first_key] = [torch.zeros_like(t) for t in tracker.state[last_key]]
    done = _prepare_store(tracker, store, resume, start, stop, n, traj, oscillation)
    if map_location is None:
        map_location = tracker.params.params[0].device

    if start + done < stop:
        current = traj.load(start + done, map_location)
        loader.check(current, traj.label(start + done))
    for i in range(start + done, stop):
        following = traj.load(i + 1, map_location)
        loader.check(following, traj.label(i + 1))
        loader.load(following, params=False)   # the step's buffers: its end state's
        if i == start + done:                  # θ_t (later: already there, as the last θ_{t+1};
            loader.load(current, params=True)  # not rewritten, so the tracker reuses g(θ_t))
        # the tracker numbers steps itself; offline they are the trajectory's, and
        # frame_every counts from the trajectory's start so that parts agree
        tracker.position(traj.steps[i], i)
        if i == stop - 1 and tracker.store_link is not None:
            tracker.store_link.state_every = 1   # the range's final state is always stored
        tracker.begin()
        loader.load(following, params=True)    # θ_{t+1}
        tracker.end()
        if oscillation:
            _update_first_signs(tracker.state)
        current = following
    return tracker.result()


class _OfflineTracker(LCATracker):
    """The tracker offline LCA drives: it loads θ itself before each step, so a
    resumed part is not checked against the model it was built with.  It keeps
    no pass account (RuleOptions.mean_passes None): parts run independently and
    merge exactly, so a step's budget cannot depend on the steps before it."""
    verify_resume = False

    def __init__(self, model, loss_fn, lca_data, rule=None, **kwargs):
        shorthands = {k: kwargs.pop(k) for k in ("method", "rtol", "atol", "max_splits")
                      if k in kwargs}
        rule = dataclasses.replace(rule_options(rule, **shorthands), mean_passes=None)
        super().__init__(model, loss_fn, lca_data, rule=rule, **kwargs)

    def position(self, step: int, tracked: int) -> None:
        """The next step's label (the trajectory's) and how many came before."""
        self.next_step, self.tracked_count = step, tracked


def _prepare_store(tracker: LCATracker, store: Optional[str], resume: bool, start: int,
                   stop: int, n: int, traj: Trajectory, oscillation: bool) -> int:
    """Record the part's range in its store, restore a resumed part's first
    signs, and make every state commit carry the first signs up to date.
    Returns the number of the range's steps already in the store."""
    if store is None:
        return 0
    writer = tracker.store_link.writer if tracker.store_link else None
    meta = writer.meta if writer is not None else run_store.read_meta(store)
    info = {"range": [start, stop], "num_steps": n}
    if traj.source is not None:
        info["trajectory"] = os.path.abspath(traj.source)
    done = int(meta.get("steps_committed", 0))
    old = meta.get("offline")
    if done and not (isinstance(old, dict) and old.get("range") == [start, stop]
                     and old.get("num_steps") == n):
        what = (f"steps {old.get('range')} of a {old.get('num_steps')}-step trajectory"
                if isinstance(old, dict) else "a run not written by lca_ext.offline")
        raise run_store.RunStoreError(
            f"lca_ext: cannot resume {store!r}: it holds {what}, not steps "
            f"[{start}, {stop}] of a {n}-step trajectory")
    if done and meta.get("state_steps") != done:
        # (a resume from an older state would silently miss the steps after it)
        at = meta.get("state_steps")
        cut = (f"cut it back with lca_ext.truncate_run({store!r}, {at}) and resume, or "
               if at is not None else "")
        raise run_store.RunStoreError(
            f"lca_ext: cannot resume {store!r}: its per-parameter state is as of {at} of "
            f"its {done} committed steps (state_every > 1); {cut}compute the part again")
    if done and oscillation:
        saved = run_store.read_state(store, meta) or {}
        if not all(k in saved for k in FIRST_SIGN):
            raise run_store.RunStoreError(
                f"lca_ext: cannot resume {store!r}: its per-parameter state lacks the "
                "oscillation counters' first signs; compute the part again")
        for k in FIRST_SIGN:
            for t, a in zip(tracker.state[k], saved[k]):
                t.copy_(torch.from_numpy(np.ascontiguousarray(a)))
    if writer is None:
        return done
    if old != info:
        writer.meta["offline"] = info
        run_store.write_json_atomic(os.path.join(writer.path, run_store.META), writer.meta)
    if oscillation:
        commit = writer.commit

        def commit_with_first_signs(rows, state, frames=None, **kwargs):
            # the tracker gathers the state before its commit, when the first
            # signs have not seen this step yet: bring them up to date here
            _update_first_signs(tracker.state)
            if state:
                state = dict(state, **{k: [t.cpu().numpy().copy() for t in tracker.state[k]]
                                       for k in FIRST_SIGN})
            commit(rows, state, frames, **kwargs)

        writer.commit = commit_with_first_signs
    return done


# -- merging ------------------------------------------------------------------------

def _part_dirs(parts) -> List[str]:
    """Run directories, with any directory that is not a run itself but holds
    ``part-*`` runs expanded to them."""
    items = [parts] if isinstance(parts, (str, os.PathLike)) else list(parts)
    out = []
    for item in items:
        path = os.fspath(item)
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, run_store.META)):
            found = sorted(os.path.join(path, d) for d in os.listdir(path)
                           if d.startswith(PART_PREFIX)
                           and os.path.exists(os.path.join(path, d, run_store.META)))
            if found:
                out.extend(found)
                continue
        out.append(path)
    if not out:
        raise ValueError("lca_ext.merge_runs: no parts given")
    return out


def _merge_states(states: List[Dict[str, List[np.ndarray]]], labels: List[str]
                  ) -> Dict[str, List[np.ndarray]]:
    acc = {k: [np.array(a) for a in v] for k, v in states[0].items()}
    for state, label in zip(states[1:], labels[1:]):
        if set(state) != set(acc):
            raise run_store.RunStoreError(
                f"lca_ext: {label} has per-parameter state {sorted(state)}, the parts "
                f"before it {sorted(acc)}; expected the same")
        merged = {}
        for name, arrays in acc.items():
            nxt = state[name]
            if name in ("cum_lca", "helped_steps"):
                merged[name] = [(a + b).astype(a.dtype) for a, b in zip(arrays, nxt)]
            elif name in COUNTER_SIGNS:
                first_key, last_key = COUNTER_SIGNS[name]
                if first_key not in acc:
                    raise run_store.RunStoreError(
                        f"lca_ext: {label} has {name} but no {first_key}; its oscillation "
                        "counters cannot be joined exactly")
                merged[name] = [
                    (a + b + (f.astype(np.int32) * last.astype(np.int32) < 0)).astype(a.dtype)
                    for a, b, f, last in zip(arrays, nxt, state[first_key], acc[last_key])]
            elif name in FIRST_SIGN.values():     # last signs: the latest nonzero
                merged[name] = [np.where(b != 0, b, a) for a, b in zip(arrays, nxt)]
            elif name in FIRST_SIGN:              # first signs: the earliest nonzero
                merged[name] = [np.where(a != 0, a, b) for a, b in zip(arrays, nxt)]
            else:
                raise run_store.RunStoreError(f"lca_ext: cannot merge the per-parameter "
                                              f"state field {name!r} of {label}")
        acc = merged
    return acc


def merge_runs(parts, out_dir: str) -> Run:
    """Join the run stores of the ranges of one trajectory (written by
    :func:`compute`) into one run store ``out_dir``, in step order; the result
    equals computing the whole span in one go (see the module docstring).

    parts: run directories in any order (they are ordered by their recorded
        ranges), or a directory holding ``part-*`` runs.  The ranges must be
        contiguous and each part complete.  ``out_dir`` must not exist (or be
        empty); it appears complete or not at all (written aside, then renamed).
    """
    dirs = _part_dirs(parts)
    out_dir = os.path.normpath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not (os.path.isdir(out_dir) and not os.listdir(out_dir)):
        raise FileExistsError(f"lca_ext: {out_dir!r} already exists; choose a new path "
                              "for the merged run")
    loaded = []
    for d in dirs:
        meta = run_store.read_meta(d)
        info = meta.get("offline")
        if not isinstance(info, dict):
            raise run_store.RunStoreError(
                f"lca_ext: {d!r} is not a part written by lca_ext.offline (no offline "
                f"range in its {run_store.META})")
        start, stop = info["range"]
        run = load_run(d)
        if len(run) != stop - start:
            raise run_store.RunStoreError(
                f"lca_ext: {d!r} holds {len(run)} of the {stop - start} steps of its "
                f"range [{start}, {stop}) (still running or interrupted? finish it with "
                "resume)")
        loaded.append((start, stop, d, run, info))
    loaded.sort(key=lambda item: (item[0], item[1]))
    first_run, first_info = loaded[0][3], loaded[0][4]
    for (s0, e0, d0, _, _), (s1, e1, d1, run, info) in zip(loaded, loaded[1:]):
        if info.get("num_steps") != first_info.get("num_steps"):
            raise run_store.RunStoreError(
                f"lca_ext: {d1!r} is a part of a {info.get('num_steps')}-step trajectory, "
                f"{loaded[0][2]!r} of a {first_info.get('num_steps')}-step one")
        if s1 != e0:
            gap = "leave steps [{}, {}) out".format(e0, s1) if s1 > e0 else \
                "overlap on steps [{}, {})".format(s1, min(e0, e1))
            raise run_store.RunStoreError(f"lca_ext: parts {d0!r} and {d1!r} {gap}; "
                                          "expected contiguous ranges")
        for field_name in _SAME_IN_PARTS:
            if run.meta.get(field_name) != first_run.meta.get(field_name):
                raise run_store.RunStoreError(
                    f"lca_ext: {d1!r} differs from {loaded[0][2]!r} in its {field_name} "
                    f"({run.meta.get(field_name)!r} vs {first_run.meta.get(field_name)!r})")
    full = [item for item in loaded if item[1] > item[0]]
    if not full:
        raise run_store.RunStoreError("lca_ext: the parts hold no steps; nothing to merge")
    runs = [item[3] for item in full]
    labels = [repr(item[2]) for item in full]
    keys = sorted(runs[0].arrays)
    for run, label in zip(runs[1:], labels[1:]):
        if sorted(run.arrays) != keys:
            raise run_store.RunStoreError(f"lca_ext: {label} records {sorted(run.arrays)}, "
                                          f"{labels[0]} records {keys}; expected the same")
    arrays = {k: np.concatenate([r.arrays[k] for r in runs]) for k in keys}
    if np.any(np.diff(arrays["step"]) <= 0):
        raise run_store.RunStoreError("lca_ext: the parts' step numbers are not increasing "
                                      "in range order; were they computed from one trajectory?")
    for run, label in zip(runs, labels):
        if not run.state:
            raise run_store.RunStoreError(f"lca_ext: {label} has no per-parameter state")
    state = _merge_states([r.state for r in runs], labels)
    frame_keys = sorted({k for r in runs for k in r.frames})
    frames = {k: np.concatenate([r.frames[k] for r in runs if k in r.frames])
              for k in frame_keys}
    meta = {k: v for k, v in first_run.meta.items()
            if k not in ("format", "version", "steps_committed", "state_version",
                         "frames_committed")}
    meta["offline"] = dict(first_info, range=[loaded[0][0], loaded[-1][1]],
                           merged_from=[os.path.abspath(item[2]) for item in loaded])
    tmp = os.path.join(os.path.dirname(os.path.abspath(out_dir)),
                       f".{os.path.basename(out_dir)}.merging-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_run(tmp, meta, arrays, state, frames)
        os.replace(tmp, out_dir)   # the merged run appears whole, or not at all
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return load_run(out_dir)


def _write_run(path: str, meta: dict, arrays: Dict[str, np.ndarray],
               state: Dict[str, List[np.ndarray]], frames: Dict[str, np.ndarray]) -> None:
    """A complete run store through RunWriter: every row but the last written in
    bulk (a commit per row would take minutes for long runs), then the last row
    with the state and the commit that makes them all count."""
    writer = run_store.RunWriter(path, meta)
    n = len(arrays["step"])
    n_frames = len(frames.get("step", ()))
    last_framed = bool(n_frames) and frames["step"][-1] == arrays["step"][-1]

    def bulk(group, data: Dict[str, np.ndarray], rows: int, chunk: int) -> None:
        if rows == 0:
            return
        for name, values in data.items():
            arr = run_store.create_array(group, name, shape=(rows, *values.shape[1:]),
                                         dtype=values.dtype, chunks=(chunk, *values.shape[1:]))
            arr[...] = values[:rows]

    bulk(writer.data, arrays, n - 1, run_store.TIME_CHUNK)
    bulk(writer.frames, frames, n_frames - last_framed, 1)
    # the rows above are in place; the commit below records them with the last one
    writer.meta.update(steps_committed=n - 1, frames_committed=n_frames - last_framed)
    last_frame = ({k: v[-1] for k, v in frames.items() if k != "step"}
                  if last_framed else None)
    writer.commit({k: v[-1] for k, v in arrays.items()}, state, last_frame)
