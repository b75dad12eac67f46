"""The check of the LCA set's examples, once, when a tracker is built.

With ``loss_fn`` (one loss of a model's output and the batch's targets), on the
first 1024 examples of a tensor pair or the first batch of any other set, with
every module in eval mode (so that BatchNorm does not couple examples) and the
training untouched:

* do the examples interact (a graph network over the whole set: the first
  rows' outputs differ when they run alone, or cannot run alone)?  Then a
  tensor pair is not cut into groups for the bars (``LCASet.uncut``) and
  per-class passes keep every batch whole (lca_ext.classes);
* is ``loss_fn`` a mean of per-example terms?  The batch's loss must equal the
  size-weighted mean of its first third's and the rest's; a
  ``reduction='sum'`` loss, a class-weighted one or a loss over pairs of
  examples (contrastive) is refused, saying which and what to do.

A batch that ``Evaluator.check_batch`` refuses, a model that fails or is random
here, is left to the first pass's clear error.  Under torch.distributed the
ranks agree on both answers (a rank refusing alone would leave the others
waiting in a collective).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .lca_set import HALF, to_device


def check_examples(ev) -> None:
    """Sets ``ev.examples_interact``; raises ValueError for a loss_fn that is not
    a mean (``ev``: a lca_ext.evaluate.Evaluator)."""
    ev.examples_interact = False
    if not getattr(ev.batch_loss, "classic", False) or ev.ctx.sharded:
        return
    interact, problem = _verdict(ev)
    if ev.ctx.world > 1:
        code = ev.ctx.max_int(int(interact) | (2 if problem else 0))
        interact = bool(code & 1)
        if code & 2 and problem is None:
            problem = (f"lca_ext: another rank found that loss_fn is not a mean of "
                       f"per-example terms on its first {ev.data.name} examples (its error "
                       "says why)")
    if interact:
        ev.examples_interact = True
        if ev.data.pair:
            ev.data.uncut()
    if problem:
        raise ValueError(problem)


def _first_examples(ev):
    if ev.data.pair:
        x, y = to_device(ev.data.whole_pair(), ev.device)
        return x[:1024], y[:1024]
    # (a DataLoader draws its workers' base seed from torch's global generator
    # when iterated: read outside the training's random stream)
    with torch.random.fork_rng(devices=[]):
        batches = ev.batches()          # a DataLoader or batches: its first batch
        first = next(batches, None)
        if ev.data.cache:               # read on to the end: the read fills the cache
            for _ in batches:
                pass
        batches.close()
    if not (isinstance(first, (tuple, list)) and len(first) == 2):
        return None
    return first


def _verdict(ev) -> Tuple[bool, Optional[str]]:
    """(examples interact, the refusal's message or None) on this rank."""
    pair = _first_examples(ev)
    if pair is None:
        return False, None
    x, y = pair
    if not (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and
            y.dim() >= 1 and x.shape[:1] == y.shape[:1] and y.shape[0] >= 2):
        return False, None
    try:
        ev.check_batch(0, (x, y))   # (a target out of range would fail a CUDA forward)
    except ValueError:
        return False, None          # the first pass refuses it, naming the batch
    model, loss_fn = ev.model, ev.batch_loss.loss_fn
    h = y.shape[0] // 2
    with ev.quiet_model(), torch.no_grad():
        for m in model.modules():
            m.training = False
        try:
            out = model(x)
            again = model(x)
        except Exception:        # (the first pass will say what is wrong)
            return False, None
        tensor = isinstance(out, torch.Tensor) and out.shape[:1] == x.shape[:1]
        if tensor and not torch.equal(out, again):
            return False, None   # a random model: the first pass says so, clearly
        try:
            head = model(x[:h])
            alone = not tensor or torch.allclose(
                head, out[:h], rtol=1e-4, atol=1e-6 * float(out.abs().max()))
        except Exception:        # the first rows cannot run alone
            alone = False
        if not alone:
            return True, None
        # a third and the rest (halves can weigh alike by chance: a
        # class-weighted loss with equal class counts in each half)
        n = y.shape[0]
        k = max(1, n // 3)
        try:
            whole = float(loss_fn(out, y))
            a = float(loss_fn(model(x[:k]), y[:k]))
            b = float(loss_fn(model(x[k:]), y[k:]))
        except Exception:
            return False, None
    mean = (a * k + b * (n - k)) / n
    scale = max(abs(whole), abs(mean), 1e-6)
    # rounding: 16-bit forwards differ by ~1e-2 (a sum is off by >= 2x)
    low = any(p.dtype in HALF for p in ev.params.params) or ev.autocast is not None
    if abs(whole - mean) <= (5e-2 if low else 1e-3) * scale:
        return False, None
    looks = (" It behaves as a sum (the parts' losses add up to it): reduction='sum'."
             if abs(whole - (a + b)) <= 1e-3 * max(abs(whole), 1e-6)
             else " A loss over pairs or sets of a batch's examples (contrastive, "
             "triplet, a class-weighted mean) is not one either.")
    return False, (
        f"lca_ext: loss_fn is not a mean of per-example terms over the batch: on the "
        f"first {ev.data.name} examples it gives {whole:.6g}, while its first third and "
        f"the rest, weighted by their sizes, give {mean:.6g}.{looks} The LCA loss is the "
        "mean over the set: use a mean loss (reduction='mean', torch's default), or pass "
        "batch_loss=f returning (mean loss, weight) over fixed LCA batches, which keeps "
        "each batch whole (per-class LCA then masks the other classes' targets with -100)")
