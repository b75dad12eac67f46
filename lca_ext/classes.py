"""Per-class passes: the gradient of each class's share of the LCA loss.

Class c's share of the whole-set loss is (1/W) Σ w·loss over the targets of
class c (W the set's total weight).  The shares add up to the loss, so their
gradients add up to the whole-set gradient: one class pass gives the per-class
gradients *and* the total, which is why the tracker's per-class mode runs no
plain pass at all (lca_ext.tracker).

How a pass splits the set by class, chosen per set:

* ``regrouped``: an (inputs, targets) tensor-pair set with ``loss_fn`` whose
  samples are independent (no BatchNorm on batch statistics).  Batch
  composition then does not change any example's loss, so the set is re-cut
  once into class-pure batches (each class's examples in set order, in chunks
  of at most the set's batch size, at least min(UNITS_PER_CLASS,
  ⌈TARGET_UNITS/C⌉) chunks a class) and kept: one more copy of this rank's set
  in memory.  A class pass is a plain pass over those batches, each batch's
  gradient going to its class: more, smaller batches than a plain pass's, and
  no other cost.
* ``per batch``: other (x, y) sets with ``loss_fn`` (a DataLoader, or
  BatchNorm on batch statistics).  Independent samples: each class's examples
  of a batch run on their own.  BatchNorm on batch statistics: one forward of
  the whole batch (the statistics stay the batch's) and one backward per class
  present.
* ``masked``: any other batch (``batch_loss``: token targets, dicts): the batch
  runs once per class with the other classes' targets set to -100 (ignored);
  batch_loss must return (mean, weight) with the weight counting the targets
  the mean is over, so that the class shares add up (checked over the set).

Each class part of a batch (a *unit*) is an independent group of the default
rule's error bars: a mixed pass runs unit i at its own point, and every pass
over all classes records the units' classes (``ev.class_unit_slots``).  With
BatchNorm on batch statistics a unit is a whole batch (its classes share one
forward): bars, but no two-pass stage (whose correction goes to a unit's class).

Cost, in plain passes: regrouped about 1 (plus per-call overhead for the
extra batches); per batch and masked about C small forward/backward calls per
batch (masked: C full forwards).  Each function adds ``weight / W`` x the
class gradients into ``grad_out[k][j]`` for ``classes[j]`` and returns
(Σ w·loss per class [len(classes)], Σ w) over the classes' targets (device
tensors, float64 sums of at least float32 values).
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch

from .lca_set import at_least_float32, cast_up
from .params import call_at

# the regrouped set cuts each class into at least min(UNITS_PER_CLASS,
# ⌈TARGET_UNITS/C⌉) batches (4 a class for 2-4 classes, 2 for 10, 1 from 16 on;
# more where a class has more than that many batch sizes of examples;
# 4 a class for 10 classes made a class pass 2.6x a plain one on the demo, 2 1.8x):
# with the other modes' (batch, class) parts, the independent groups of the error
# bars (lca_ext.bars) are these units, not the classes (a sum of a few unequal
# class terms is far from normal); more units cost small batches and samples
UNITS_PER_CLASS, TARGET_UNITS = 4, 16


def targets_of(ev, batch) -> torch.Tensor:
    """The class index of every target in ``batch``."""
    if ev.targets is not None:
        return ev.targets(batch)
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[1]
    if hasattr(batch, "get") and batch.get("labels") is not None:
        return batch["labels"]
    raise ValueError("lca_ext: num_classes needs the class targets of each batch: the "
                     "second element of an (inputs, targets) pair, batch['labels'], or "
                     "targets=f with f(batch) -> class indices")


def class_pass(ev, point, classes: Sequence[int], grad_out, weight: float, probe=None):
    """One pass over the set: ``grad_out[k][j] += weight/W · d(share of
    classes[j])/dθ_k`` (forward only when grad_out is None); returns
    (Σ w·loss, Σ w) over these classes (tensors).  ``probe``
    (lca_ext.group_probe.GroupProbe, all classes): every class gradient part also goes
    to ``probe.add(unit, grads, weight/W, slot=j)``; with ``point`` None,
    each unit runs at ``probe.point(unit)`` (a mixed pass)."""
    if not getattr(ev.batch_loss, "classic", False):
        return _masked(ev, point, classes, grad_out, weight, probe)
    if ev.batch_coupled():
        return _per_batch_coupled(ev, point, classes, grad_out, weight, probe)
    if ev.data.pair is not None:
        return _regrouped(ev, point, classes, grad_out, weight, probe)
    return _per_batch(ev, point, classes, grad_out, weight, probe)


def units_class_pure(ev) -> bool:
    """Is each unit one class's part of a batch?  Not with BatchNorm on batch
    statistics (or examples that interact): there a unit is a whole batch, its
    classes sharing its forward pass (its slot in class_unit_slots is None)."""
    return not (getattr(ev.batch_loss, "classic", False) and ev.batch_coupled())


def _leaves(ev, point, probe, unit, need_grad):
    """The pass's tensors at ``point``, or the unit's own point in a mixed pass."""
    return ev.tensors_at(probe.point(unit) if point is None else point, need_grad)


def _zeros(ev, classes):
    """(per-class Σ w·loss, Σ w) accumulators on the pass device."""
    return (torch.zeros(len(classes), dtype=torch.float64, device=ev.device),
            torch.zeros((), dtype=torch.float64, device=ev.device))


def _add_grads(ev, leaves, value, out_j, scale, retain=False, probe=None, j=0,
               unit=0) -> None:
    if out_j is None and probe is None:                   # forward only
        return
    grads = torch.autograd.grad(value, leaves, allow_unused=True, retain_graph=retain)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, leaves)]
    if out_j is not None:
        ev.kernels.accumulate_(out_j, grads, scale)
    if probe is not None:
        probe.add(unit, grads, scale, slot=j, loss=value)


def _slot(grad_out, j):
    """Class slot j of every stacked buffer (None: a forward-only pass)."""
    return None if grad_out is None else [g[j] for g in grad_out]


def _class_targets(ev, x, t) -> torch.Tensor:
    if t.dim() != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"lca_ext: num_classes with loss_fn needs one class index per "
                         f"example (targets of shape [N]); got targets of shape "
                         f"{tuple(t.shape)}. For token targets pass batch_loss=f "
                         "returning (mean loss, number of targets it is over)")
    return t


def _share(ev, tensors, x, y):
    """loss_fn's mean over (x, y) x the example count (``tensors``: the model's
    own names)."""
    out = call_at(ev.model, ev.model_ties, tensors, (x,))
    return at_least_float32(ev.batch_loss.loss_fn(out, y)) * y.shape[0]


def class_batches(ev) -> List[tuple]:
    """The regrouped set: [(class, x, y)], class-pure batches of at most the
    set's batch size, at least min(UNITS_PER_CLASS, ⌈TARGET_UNITS/C⌉) a class
    (where it has the examples), each class's
    examples in set order (built once)."""
    if ev.class_batches is None:
        # (under DDP a rank may hold no example of a small set)
        pair = [(x.to(ev.device), y.to(ev.device)) for x, y in ev.data.pair if x.shape[0]]
        if ev.pass_dtype is not None:
            pair = [cast_up(p, ev.pass_dtype) for p in pair]
        if not pair:
            ev.class_batches = []
            return ev.class_batches
        x = torch.cat([p[0] for p in pair])
        y = torch.cat([p[1] for p in pair])
        t = _class_targets(ev, x, targets_of(ev, (x, y)))
        size = max(p[0].shape[0] for p in pair)
        order = torch.argsort(t, stable=True)
        counts = torch.bincount(t[(t >= 0) & (t < ev.num_classes)],
                                minlength=ev.num_classes).tolist()
        if sum(counts) != t.numel():
            raise ValueError(f"lca_ext: per-class LCA: class targets must lie in "
                             f"0..{ev.num_classes - 1} (num_classes={ev.num_classes}); "
                             f"got values from {int(t.min())} to {int(t.max())}")
        batches, start = [], 0
        parts = min(UNITS_PER_CLASS, -(-TARGET_UNITS // ev.num_classes))
        for c, n in enumerate(counts):
            idx = order[start:start + n]
            # up to `parts` batches a class: the error bars' groups
            step = max(1, min(size, -(-n // parts)))
            for i in range(0, n, step):
                batches.append((c, x[idx[i:i + step]], y[idx[i:i + step]]))
            start += n
        ev.class_batches = batches
    return ev.class_batches


def _regrouped(ev, point, classes, grad_out, weight, probe=None):
    slot = {c: j for j, c in enumerate(classes)}
    total, wsum = _zeros(ev, classes)
    units: List[Optional[int]] = []
    need = grad_out is not None or probe is not None
    with ev.quiet_model(), torch.set_grad_enabled(need):
        if point is not None:
            tensors, leaves = ev.tensors_at(point, need)
            tensors = _strip(tensors)
        for c, x, y in class_batches(ev):
            if c not in slot:
                continue
            unit = _unit(units, slot[c])
            if point is None:
                tensors, leaves = _leaves(ev, point, probe, unit, True)
                tensors = _strip(tensors)
            share = _share(ev, tensors, x, y)
            total[slot[c]] += share.detach().double()
            wsum += y.shape[0]
            _add_grads(ev, leaves, share, _slot(grad_out, slot[c]),
                       weight / ev.count, probe=probe, j=slot[c], unit=unit)
    _count_units(ev, classes, units)
    return total, wsum


def _sorted_pairs(ev, classes):
    """(x, y, [(slot, slice)]) per batch: the batch sorted by class, one
    contiguous slice per class present (one host sync per batch)."""
    for batch in ev.batches():
        x, y = batch
        t = _class_targets(ev, x, targets_of(ev, batch))
        order = torch.argsort(t, stable=True)
        x, y, t = x[order], y[order], t[order]
        want = torch.tensor(list(classes), device=t.device)
        lo = torch.searchsorted(t, want).tolist()
        hi = torch.searchsorted(t, want, right=True).tolist()
        yield x, y, [(j, slice(a, b)) for j, (a, b) in enumerate(zip(lo, hi)) if b > a]


def _masked_pairs(ev, classes):
    """(x, y, [(slot, mask)]) per batch, in the batch's own order: one boolean
    mask per class present (one host sync per batch)."""
    for batch in ev.batches():
        x, y = batch
        t = _class_targets(ev, x, targets_of(ev, batch))
        present = set(torch.unique(t).tolist())
        yield x, y, [(j, t == c) for j, c in enumerate(classes) if c in present]


def _per_batch(ev, point, classes, grad_out, weight, probe=None):
    total, wsum = _zeros(ev, classes)
    units: List[Optional[int]] = []
    need = grad_out is not None or probe is not None
    with ev.quiet_model(), torch.set_grad_enabled(need):
        if point is not None:
            tensors, leaves = ev.tensors_at(point, need)
            tensors = _strip(tensors)
        for x, y, parts in _sorted_pairs(ev, classes):
            for j, s in parts:
                unit = _unit(units, j)
                if point is None:
                    tensors, leaves = _leaves(ev, point, probe, unit, True)
                    tensors = _strip(tensors)
                share = _share(ev, tensors, x[s], y[s])
                total[j] += share.detach().double()
                wsum += y[s].shape[0]
                _add_grads(ev, leaves, share, _slot(grad_out, j),
                           weight / ev.count, probe=probe, j=j, unit=unit)
    _count_units(ev, classes, units)
    return total, wsum


def _per_batch_coupled(ev, point, classes, grad_out, weight, probe=None):
    total, wsum = _zeros(ev, classes)
    units: List[Optional[int]] = []
    need = grad_out is not None or probe is not None
    with ev.quiet_model(), torch.set_grad_enabled(need):
        for x, y, parts in _masked_pairs(ev, classes):
            # fresh buffer copies per batch: BatchNorm runs once on each; the
            # batch in its own order (a graph's nodes must not be permuted); the
            # whole batch is the unit (at its own point in a mixed pass)
            unit = _unit(units, None)
            tensors, leaves = _leaves(ev, point, probe, unit, need)
            out = call_at(ev.model, ev.model_ties, _strip(tensors), (x,))
            for i, (j, s) in enumerate(parts):
                share = at_least_float32(ev.batch_loss.loss_fn(out[s], y[s])) * y[s].shape[0]
                total[j] += share.detach().double()
                wsum += y[s].shape[0]
                _add_grads(ev, leaves, share, _slot(grad_out, j), weight / ev.count,
                           retain=i + 1 < len(parts), probe=probe, j=j, unit=unit)
    _count_units(ev, classes, units)
    return total, wsum


def _masked(ev, point, classes, grad_out, weight, probe=None):
    total, wsum = _zeros(ev, classes)
    units: List[Optional[int]] = []
    need = grad_out is not None or probe is not None
    with ev.quiet_model(), torch.set_grad_enabled(need):
        for batch in ev.batches():
            t = targets_of(ev, batch)
            if point is not None:
                tensors, leaves = ev.tensors_at(point, need)
            present = torch.unique(t).tolist()          # one host sync per batch
            for j, c in enumerate(classes):
                if c not in present:
                    continue
                unit = len(units)
                if point is None:   # (a part skipped below for its zero weight runs at
                    # the last unit's point: its result is dropped)
                    last = max(len(ev.class_unit_slots or ()) - 1, 0)
                    tensors, leaves = _leaves(ev, point, probe, min(unit, last), True)
                loss, w = ev.batch_loss_at(tensors, _keep_targets(batch, t == c, ev.targets))
                if float(w) == 0:   # class c only where no loss is taken (e.g. the
                    continue        # first token, before the shift): a 0/0 mean
                units.append(j)
                share = at_least_float32(loss) * w
                total[j] += loss.detach().double() * w
                wsum += w
                _add_grads(ev, leaves, share, _slot(grad_out, j),
                           weight / ev.count, probe=probe, j=j, unit=unit)
    _count_units(ev, classes, units)
    return total, wsum


def _unit(units: List[Optional[int]], j: Optional[int]) -> int:
    """The next unit's index (a class's part of a batch), its class slot noted
    (None: a whole batch of several classes)."""
    units.append(j)
    return len(units) - 1


def _count_units(ev, classes, units: List[Optional[int]]) -> None:
    """After a pass over every class: each unit's class slot, in pass order
    (the same at every point of a step: the bars' groups, lca_ext.bars)."""
    if len(classes) == ev.num_classes:
        ev.class_unit_slots = list(units)


def _keep_targets(batch, keep: torch.Tensor, custom_targets):
    """The batch with every target outside ``keep`` set to -100 (ignored)."""
    if custom_targets is not None:
        raise NotImplementedError("lca_ext: per-class LCA with a custom targets= and "
                                  "masked targets is not supported; use (inputs, targets) "
                                  "pairs or batch['labels']")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return type(batch)((batch[0], torch.where(keep, batch[1], -100)))
    masked = dict(batch)
    masked["labels"] = torch.where(keep, batch["labels"], -100)
    return masked


def _strip(tensors):
    """The bound module's names ("model.<name>") as the model's own."""
    return {k[len("model."):]: v for k, v in tensors.items()}


def check_shares(ev, wsum: float) -> None:
    """Every class pass over all classes must weigh the whole set."""
    if abs(wsum - ev.count) > 1e-9 * ev.count:
        raise ValueError(
            f"lca_ext: per-class LCA: the class shares of the {ev.data.name} set weigh "
            f"{wsum}, the set weighs {ev.count}; every target must lie in "
            f"0..{ev.num_classes - 1} (num_classes={ev.num_classes}) or be -100, and "
            "batch_loss must return (mean, weight) with the weight counting the targets "
            "the mean is over")
