"""Each LCA batch checked before the set's first pass: a batch that cannot give
a right loss is refused, naming the set, the batch and the cause (an unbatched
example, what ``batch_loss.check_batch`` reports, a class target outside
0..num_classes-1), on every rank alike under DDP."""
from __future__ import annotations

from collections import abc
from typing import Optional

import torch

from . import classes as per_class


def unbatched(batch, classic: bool = False) -> Optional[str]:
    """Why ``batch`` looks like one unbatched example rather than a batch, or
    None: a dict whose ``input_ids`` is 1-d (a token sequence; batches are
    [batch, length]), or, with ``loss_fn``, an (x, y) pair with a 0-d target."""
    what = None
    if isinstance(batch, abc.Mapping):
        ids = batch.get("input_ids")
        if isinstance(ids, torch.Tensor) and ids.dim() == 1:
            what = f"'input_ids' of shape {tuple(ids.shape)}"
        elif isinstance(ids, (list, tuple)) and ids and isinstance(ids[0], int):
            what = "'input_ids' a list of ints"
    elif classic and isinstance(batch, (tuple, list)) and len(batch) == 2 and \
            isinstance(batch[1], torch.Tensor) and batch[1].dim() == 0:
        what = "a 0-d target"
    if what is None:
        return None
    return (f"is a single example ({what}), not a batch: the set is read as a sequence "
            "of batches. Under the Hugging Face Trainer pass the examples to "
            "LCACallback(lca_data=examples), which collates them like the trainer; "
            "to LCATracker pass batches: a DataLoader(examples, batch_size=..., "
            "collate_fn=...), an (inputs, targets) tensor pair, or a list of collated "
            "batches")


def check_all(ev) -> None:
    """:func:`check_batch` on every batch of this rank's share of ``ev``'s set
    (lca_ext.evaluate.Evaluator), before any forward, then agreed over the
    ranks: a refused batch raises on *every* rank (a rank that raised alone
    would leave the others waiting in a collective)."""
    problem = None
    for i, batch in enumerate(ev.batches()):
        try:
            check_batch(ev, i, batch)
        except ValueError as err:
            problem = err
            break
    bad = ev.ctx.max_int(ev.ctx.rank + 1 if problem is not None else 0)
    if problem is not None:
        raise problem
    if bad:
        raise ValueError(f"lca_ext: the {ev.data.name} set: rank {bad - 1} refused one "
                         "of its batches (its error names the batch and the cause)")


def check_batch(ev, i: int, batch) -> None:
    """Refuses, naming the set, the batch and the cause, a batch that cannot
    give a right loss: a single unbatched example (:func:`unbatched`), what
    ``batch_loss.check_batch(model, batch)`` reports (a string; e.g.
    lca_ext.integrations.transformers.hf_batch_loss: labels outside the
    model's range), and with ``num_classes`` a class target outside
    0..num_classes-1 (other than -100 with batch_loss)."""
    classic = getattr(ev.batch_loss, "classic", False)
    problem = unbatched(batch, classic)
    check = getattr(ev.batch_loss, "check_batch", None)
    if problem is None and check is not None:
        problem = check(ev.model, batch)
    if problem is None and ev.num_classes:
        problem = _class_range(ev, batch, classic)
    if problem:
        where = f" (rank {ev.ctx.rank})" if ev.ctx.world > 1 else ""
        raise ValueError(f"lca_ext: {ev.data.name} batch {i}{where} {problem}")


def _class_range(ev, batch, classic: bool) -> Optional[str]:
    t = torch.as_tensor(per_class.targets_of(ev, batch))
    c = ev.num_classes
    outside = (t < 0) | (t >= c)
    bad = t[outside if classic else outside & (t != -100)]
    if not bad.numel():
        return None
    allowed = f"0..{c - 1}" if classic else f"0..{c - 1} or be -100 (ignored)"
    return (f"has class target {bad.flatten()[0].item()}, outside 0..{c - 1} "
            f"(num_classes={c}); every target must lie in {allowed}: fix the set's "
            "targets, or raise num_classes")
