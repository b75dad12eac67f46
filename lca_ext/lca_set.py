"""The fixed LCA set: the batches a gradient pass runs over, in the same order
every time, whatever form the user's data has.

``lca_data`` (and each eval set) may be

* an ``(inputs, targets)`` pair of tensors: cut into ``batch_size`` chunks;
* a ``torch.utils.data.Dataset`` (e.g. ``TensorDataset``, a tokenised dataset):
  read through a ``DataLoader(batch_size, shuffle=False)`` with the default
  collate function (pass your own DataLoader for another collate function);
* a ``DataLoader`` without shuffling: re-iterated on every pass; a loader whose
  sampler shuffles is refused (the set must be the same at every point of a step);
* any re-iterable of batches (a list, a ``datasets.Dataset`` of batches, ...).

A batch is whatever the data yields: a tensor, a tuple or list, a dict or a
``BatchEncoding``, nested; it is moved to the model's device before each use
(``cache=True`` keeps the moved batches, when the set fits on the device).
Iterating never touches the training's random streams: the evaluator runs every
pass under forked RNG states (a DataLoader draws its base seed from the global
torch generator on every ``iter()``).

Under torch.distributed each rank takes its share: example i of a tensor pair,
or batch i of any other form, goes to rank i mod world.
"""
from __future__ import annotations

import collections.abc as abc
from typing import Iterator, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


def map_tensors(batch, fn):
    """``batch`` with ``fn`` applied to every tensor in it (same structure: tensors,
    mappings, namedtuples, lists and tuples, nested)."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, abc.Mapping):
        mapped = {k: map_tensors(v, fn) for k, v in batch.items()}
        return mapped if type(batch) is dict else type(batch)(mapped)
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):     # namedtuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    return batch


def to_device(batch, device: torch.device):
    """``batch`` with every tensor in it moved to ``device`` (same structure)."""
    if hasattr(batch, "to") and isinstance(batch, abc.Mapping):   # BatchEncoding
        return batch.to(device)
    return map_tensors(batch, lambda t: t.to(device, non_blocking=True))


HALF = (torch.float16, torch.bfloat16)


def at_least_float32(loss: torch.Tensor) -> torch.Tensor:
    """A 16-bit loss in float32 (exactly), before it is scaled by its weight."""
    return loss.float() if loss.dtype in HALF else loss


def cast_up(batch, dtype: torch.dtype):
    """``batch`` with every floating tensor of fewer bits than ``dtype`` cast to it
    (same structure): the inputs of a pass in a higher precision than the model's."""
    bits = torch.finfo(dtype).bits
    return map_tensors(batch, lambda t: t.to(dtype) if t.is_floating_point()
                       and torch.finfo(t.dtype).bits < bits else t)


def first_tensor(batch) -> Optional[torch.Tensor]:
    """The first tensor in a batch (depth first), or None."""
    if isinstance(batch, torch.Tensor):
        return batch
    values = batch.values() if isinstance(batch, abc.Mapping) else \
        batch if isinstance(batch, (list, tuple)) else ()
    for v in values:
        t = first_tensor(v)
        if t is not None:
            return t
    return None


def nonfinite_in(batches) -> Optional[str]:
    """Where the first NaN/Inf floating element of ``batches`` is ("batch 3,
    tensor 0, index (2, 1): inf"), or None (read on an error path only)."""
    for i, batch in enumerate(batches):
        found = []
        map_tensors(batch, lambda t: found.append(t) if t.is_floating_point() else None)
        for j, t in enumerate(found):
            bad = torch.nonzero(~torch.isfinite(t))
            if bad.numel():
                idx = tuple(int(k) for k in bad[0].tolist())
                return f"batch {i}, its floating tensor {j}, index {idx}: {t[idx].item()}"
    return None


def _shuffles(loader: DataLoader) -> bool:
    samplers = [loader.sampler, getattr(loader.batch_sampler, "sampler", None)]
    for s in samplers:
        if isinstance(s, RandomSampler) or getattr(s, "shuffle", False) is True:
            return True
    return False


class LCASet:
    """Re-iterable batches of one set, this rank's share, on ``device``."""

    def __init__(self, data, *, batch_size: Optional[int] = 1024, name: str = "lca_data",
                 rank: int = 0, world: int = 1, cache: bool = False, min_batches: int = 1):
        self.name = name
        self.pair = None
        self.cut_for_groups = False
        self.rank, self.world = rank, world
        self.cache = cache
        self._cached: Optional[List] = None
        if isinstance(data, (tuple, list)) and len(data) == 2 and all(
                isinstance(t, torch.Tensor) for t in data):
            x, y = data
            if x.shape[0] != y.shape[0]:
                raise ValueError(f"lca_ext: {name} inputs have {x.shape[0]} rows but "
                                 f"targets have {y.shape[0]}; expected the same count")
            x, y = x[rank::world], y[rank::world]   # example i -> rank i mod world
            self._whole = (x, y)
            # cut for the error bars' groups (lca_ext.bars), undone by uncut()
            # for a model whose examples interact
            self.cut_for_groups = batch_size is None and min_batches > 1
            if batch_size is None:
                # at most 1024 examples a batch, and at least min_batches batches
                batch_size = max(1, min(1024, -(-x.shape[0] // max(1, min_batches))))
            self._cut(batch_size)
        elif isinstance(data, DataLoader):
            if _shuffles(data):
                raise ValueError(f"lca_ext: {name} is a DataLoader whose sampler shuffles; "
                                 "the LCA set must be the same batches at every point of a "
                                 "step: pass shuffle=False (or a sequential sampler)")
            self.source = data
        elif isinstance(data, Dataset) and not isinstance(data, abc.Iterable):
            if batch_size is None:
                batch_size = max(1, min(1024, -(-len(data) // max(1, min_batches))))
            self.source = DataLoader(data, batch_size=batch_size, shuffle=False)
        elif isinstance(data, abc.Iterable):
            if iter(data) is data:
                raise ValueError(f"lca_ext: {name} is a one-shot iterator (e.g. a generator); "
                                 "every gradient pass re-reads the set: pass a list, a "
                                 "Dataset, a DataLoader or another re-iterable")
            self.source = data
        else:
            raise TypeError(f"lca_ext: {name} is a {type(data).__name__}; expected an "
                            "(inputs, targets) tensor pair, a Dataset, a DataLoader or an "
                            "iterable of batches")

        if isinstance(self.source, abc.Sized) and len(self.source) == 0 and world == 1:
            raise ValueError(f"lca_ext: {name} is empty; expected at least one batch")

    def _cut(self, batch_size: int) -> None:
        x, y = self._whole
        self.pair = [(x[i:i + batch_size], y[i:i + batch_size])
                     for i in range(0, x.shape[0], batch_size)]
        self.source = self.pair

    def whole_pair(self) -> tuple:
        """This rank's (inputs, targets) of a tensor-pair set, uncut."""
        return self._whole

    def uncut(self) -> None:
        """Back to batches of 1024 examples (the set was cut for the bars'
        groups, but its examples interact: a graph over the whole set)."""
        if self.cut_for_groups:
            self._cut(1024)
            self.cut_for_groups = False

    def batches(self, device: Optional[torch.device] = None) -> Iterator:
        """This rank's batches, in order, moved to ``device``."""
        if self._cached is not None:
            yield from self._cached
            return
        kept = [] if self.cache else None
        n = 0
        for i, batch in enumerate(self.source):
            if self.pair is None and i % self.world != self.rank:
                continue                       # batch i -> rank i mod world
            n += 1
            batch = to_device(batch, device) if device is not None else batch
            if kept is not None:
                kept.append(batch)
            yield batch
        if n == 0 and self.world == 1:
            raise ValueError(f"lca_ext: {self.name} is empty; expected at least one batch")
        if kept is not None:
            self._cached = kept

    def __len__(self) -> int:
        """Batches on this rank (iterates once when the source has no len())."""
        if self.pair is not None:
            return len(self.pair)
        try:
            n = len(self.source)
        except TypeError:
            n = sum(1 for _ in self.source)
        return len(range(self.rank, n, self.world))
