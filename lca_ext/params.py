"""Which parameters LCA tracks, and how they group into layers and neurons.

Trainable parameters only (frozen ones are skipped), each tensor once (a tied /
shared parameter is one tensor, reported under its first name), named by module
path.  A *layer* is a module's own parameters together (a Linear's weight and
bias); a *neuron* is a row of dim 0 of a tensor (an output unit / channel).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Dict, List

import torch
from torch import nn
from torch.func import functional_call


@dataclass
class ParameterSet:
    names: List[str]                 # one per tracked tensor, in model order
    params: List[torch.Tensor]       # the live parameters (never modified here)
    layer_names: List[str]           # module paths, in order of first appearance
    layer_of: List[int]              # tensor k -> index into layer_names
    aliases: Dict[str, str] = field(default_factory=dict)  # tied name -> tracked name

    @classmethod
    def from_model(cls, model: nn.Module) -> "ParameterSet":
        names, params, aliases = [], [], {}
        first_name: Dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) in first_name:
                aliases[name] = first_name[id(p)]
                continue
            first_name[id(p)] = name
            if p.requires_grad:
                names.append(name)
                params.append(p)
        if not params:
            raise ValueError("lca_ext: the model has no trainable parameters to track")
        layer_names: List[str] = []
        layer_of: List[int] = []
        for name in names:
            layer = name.rsplit(".", 1)[0] if "." in name else "<root>"
            if layer not in layer_names:
                layer_names.append(layer)
            layer_of.append(layer_names.index(layer))
        return cls(names, params, layer_names, layer_of, aliases)

    def __len__(self) -> int:
        return len(self.params)

    @property
    def numel(self) -> int:
        return sum(p.numel() for p in self.params)

    def layer_matrix(self) -> torch.Tensor:
        """float64 [num_layers, num_tensors] 0/1 matrix: per-tensor -> per-layer sums."""
        m = torch.zeros(len(self.layer_names), len(self.params), dtype=torch.float64)
        for k, layer in enumerate(self.layer_of):
            m[layer, k] = 1.0
        return m


def layout(model: nn.Module) -> List[tuple]:
    """(name, tensor id, requires_grad) of every parameter slot of ``model``."""
    return [(n, id(p), p.requires_grad)
            for n, p in model.named_parameters(remove_duplicate=False)]


def check_layout(model: nn.Module, built: List[tuple], tracked_ids: frozenset) -> List[tuple]:
    """Raise if ``model``'s parameters changed since the tracker was built in a
    way LCA cannot follow: trainable tensors outside the tracked set (a module
    added, a frozen tensor unfrozen: their updates would be in ΔL with no LCA
    for them), or slots that now hold other tensors (weights re-tied or
    replaced: the passes would run at the wrong values).  A tracked tensor
    frozen later is fine (it stays tracked, its Δθ is 0).  Returns the current
    layout (one traversal of the parameters a step)."""
    now = layout(model)
    if now == built:
        return now
    new = [n for n, i, grad in now if grad and i not in tracked_ids]
    before = {n: i for n, i, _ in built}
    moved = [n for n, i, _ in now if before.get(n, i) != i] + \
        [n for n in before if n not in {m for m, _, _ in now}]
    for names, what in (
            (new, "has trainable parameters the tracker was not built with: {} (added, or "
                  "unfrozen, after LCATracker(...)). Their updates would change the loss "
                  "with no LCA to account for them. Build a new LCATracker for the changed "
                  "model (or keep those parameters frozen)"),
            (moved, "has parameter slots that hold other tensors than when the tracker was "
                    "built: {} (weights re-tied, replaced or removed after LCATracker(...)). "
                    "The passes would run at the wrong values. Build a new LCATracker after "
                    "changing the model")):
        if names:
            listed = ", ".join(repr(n) for n in names[:6]) + (" …" if len(names) > 6 else "")
            raise RuntimeError("lca_ext.LCATracker: the model " + what.format(listed))
    return now


def tied_slots(module: nn.Module) -> Dict[str, List[str]]:
    """{first name: the other names of the same tensor} over the parameters and
    buffers of ``module``, one name per distinct (owning module, attribute).

    functional_call(tie_weights=True) swaps a tensor in once per *name*: for a
    module registered at two paths (``nn.Sequential(lin, act, lin)``) the second
    swap undoes the first, so the pass ran at the live θ and the model kept the
    point's tensor afterwards.  :func:`call_at` sets each slot exactly once."""
    names: Dict[int, List[str]] = {}
    seen = set()
    for name, t in itertools.chain(module.named_parameters(remove_duplicate=False),
                                   module.named_buffers(remove_duplicate=False)):
        owner, _, attr = name.rpartition(".")
        slot = (id(module.get_submodule(owner)), attr)
        if slot not in seen:
            seen.add(slot)
            names.setdefault(id(t), []).append(name)
    return {n[0]: n[1:] for n in names.values() if len(n) > 1}


def call_at(module: nn.Module, ties: Dict[str, List[str]], tensors: Dict[str, torch.Tensor],
            args: tuple):
    """``module(*args)`` with ``tensors`` ({first name: tensor}) in place of its
    own, every tied slot included (``ties``: :func:`tied_slots`)."""
    full = dict(tensors)
    for name, value in tensors.items():
        for other in ties.get(name, ()):
            full.setdefault(other, value)
    return functional_call(module, full, args, tie_weights=False)
