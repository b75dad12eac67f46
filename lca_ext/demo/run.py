"""``lca-ext demo``: train the paper's MNIST network with LCA tracked, then report."""
from __future__ import annotations

import os
import time
from typing import Dict, Optional, Sequence

import torch
from torch import nn

from ..tracker import LCATracker
from .data import load_mnist_5k, train_val_split
from .models import MODELS


def build_optimizer(model: nn.Module, lr: float, momentum: float,
                    layer_momentum: Dict[str, float]) -> torch.optim.Optimizer:
    """SGD; each layer named in ``layer_momentum`` gets its own momentum (the
    paper's "delay" experiment)."""
    modules = dict(model.named_modules())
    for layer in layer_momentum:
        if layer not in modules or layer == "":
            raise ValueError(f"--layer-momentum: no layer {layer!r}; layers: "
                             f"{[n for n, m in modules.items() if n and list(m.parameters(recurse=False))]}")
    groups: Dict[float, list] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = name.rsplit(".", 1)[0]
        groups.setdefault(layer_momentum.get(layer, momentum), []).append(p)
    return torch.optim.SGD([dict(params=ps, momentum=m) for m, ps in groups.items()], lr=lr)


def run_demo(out: str, *, model: str = "fc", steps: int = 300, lr: float = 0.05,
             batch_size: int = 100, seed: int = 0, device: str = "cpu",
             freeze: Sequence[str] = (), layer_momentum: Optional[Dict[str, float]] = None,
             progress: bool = True, tensorboard: Optional[str] = None,
             frame_every: int = 10, rule: Optional[dict] = None,
             pass_dtype="auto") -> str:
    """Trains, tracking LCA into ``out/run``; returns the run directory.
    ``rule``: RuleOptions fields (lca_ext.RuleOptions); ``pass_dtype``: the
    tracker's (None: "auto")."""
    torch.manual_seed(seed)
    x, y = load_mnist_5k()
    xtr, ytr, xv, yv = [t.to(device) for t in train_val_split(x, y, seed=seed)]
    net = MODELS[model]().to(device)
    modules = dict(net.named_modules())
    for layer in freeze:
        if layer not in modules or not list(modules[layer].parameters(recurse=False)):
            raise ValueError(f"--freeze: no layer {layer!r}")
        modules[layer].requires_grad_(False)   # kept at its initial values
    opt = build_optimizer(net, lr, 0.9, layer_momentum or {})
    loss_fn = nn.functional.cross_entropy
    first = next(n for n, p in net.named_parameters() if p.requires_grad and p.dim() > 1)
    run_dir = os.path.join(out, "run")
    tracker = LCATracker(net, loss_fn, (xtr, ytr), eval_sets={"val": (xv, yv)},
                         num_classes=10, store=run_dir, rule=rule or None,
                         pass_dtype="auto" if pass_dtype is None else pass_dtype,
                         frames=[first], frame_every=frame_every,
                         # the per-parameter state every 10 steps and at the end (a
                         # state write costs about as much as a step's passes here)
                         state_every=10)
    logger = None
    if tensorboard:
        from ..tensorboard import TensorBoardLogger
        logger = TensorBoardLogger(tensorboard, tracker)
    bar = None
    if progress:
        try:
            from tqdm import tqdm
            bar = tqdm(total=steps, desc="lca-ext demo", unit="step")
        except ImportError:
            bar = None
    gen = torch.Generator().manual_seed(seed)
    start = time.time()
    for step in range(steps):
        idx = torch.randint(0, xtr.shape[0], (batch_size,), generator=gen).to(device)
        opt.zero_grad()
        loss = loss_fn(net(xtr[idx]), ytr[idx])
        loss.backward()
        with tracker.step():
            opt.step()
        rec = tracker.last
        if logger is not None:
            logger.log_step(rec)
        if bar is not None:
            counts = rec["train/counts"]
            bar.set_postfix(loss=f"{rec['train/loss_after']:.3f}",
                            err=f"{rec['train/error']:.1e}",
                            helped=f"{counts[:, 0].sum() / counts.sum():.0%}")
            bar.update(1)
    tracker.result()   # stores the final per-parameter state
    if bar is not None:
        bar.close()
    if logger is not None:
        logger.close()
    with open(os.path.join(out, "demo_args.txt"), "w") as f:
        f.write(f"model={model} steps={steps} lr={lr} batch_size={batch_size} seed={seed} "
                f"freeze={list(freeze)} layer_momentum={layer_momentum or {}} "
                f"seconds={time.time() - start:.1f}\n")
    return run_dir
