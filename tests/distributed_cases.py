"""Worker processes for tests/test_distributed.py (spawned, gloo on CPU).

Each case trains a small float64 network for a few steps on 2 ranks, with or
without an LCATracker, and saves what the test compares: the trajectory (whole
parameters after every step, from rank 0) and each rank's tracker results."""
from __future__ import annotations

import datetime
import os
import socket
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

import lca_ext

STEPS = 4
LCA_EXAMPLES = 203        # odd: the two ranks' shares differ (102 / 101)
LCA_BATCH = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_model() -> nn.Module:
    # rows 9 / 5 / 1: uneven FSDP shards, and one rank with an empty shard
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 9), nn.Tanh(), nn.Dropout(0.2), nn.Linear(9, 5),
                         nn.Tanh(), nn.Linear(5, 1)).double()


def lca_set():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(LCA_EXAMPLES, 6, generator=g, dtype=torch.float64)
    y = (x[:, :1] * 0.7 - x[:, 1:2] ** 2 + 0.1 * torch.randn(LCA_EXAMPLES, 1, generator=g,
                                                              dtype=torch.float64))
    return x, y


def val_set():
    x, y = lca_set()
    return x[:50] * 1.5, y[:50]


def train_batch(step: int, rank: int):
    g = torch.Generator().manual_seed(100 + 10 * step + rank)
    x = torch.randn(8, 6, generator=g, dtype=torch.float64)
    return x, x[:, :1] * 0.7 - x[:, 1:2] ** 2


def loss_fn(out, y):
    return nn.functional.mse_loss(out, y)


def _init(rank: int, world: int, port: int) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    # (a collective one rank never reaches fails in 2 minutes, not gloo's 30)
    dist.init_process_group("gloo", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))


def _exit_now() -> None:
    """End a finished worker without interpreter finalisation: gloo's threads can
    abort the process there ('terminate called without an active exception',
    SIGABRT) after every result is saved, which mp.spawn reports as a failure."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _full_params(model) -> dict:
    out = {}
    for name, p in model.named_parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[name] = full.detach().clone()
    return out


def _train_and_save(model, opt, tracker, rank, steps, loss, path):
    """Train ``steps`` steps on this rank's batches (``loss(x, y)`` the training
    loss), tracked unless ``tracker`` is None; save the run's arrays ("a/...")
    and the trajectory ("theta/<t>/<name>", full parameters) to ``path``."""
    trajectory = [_full_params(model)]
    for step in range(steps):
        x, y = train_batch(step, rank)
        opt.zero_grad()
        loss(x, y).backward()
        if tracker is None:
            opt.step()
        else:
            with tracker.step():
                opt.step()
        trajectory.append(_full_params(model))
    arrays = {} if tracker is None else {f"a/{k}": v for k, v in tracker.result().arrays.items()}
    for t, params in enumerate(trajectory):
        arrays.update({f"theta/{t}/{n}": v.numpy() for n, v in params.items()})
    np.savez(path, **arrays)


def run(rank: int, world: int, port: int, out_dir: str, kind: str, tracked: bool,
        default_rule: bool = False) -> None:
    """kind: "ddp" or "fsdp"; trains STEPS steps, saves trajectory + results
    (Simpson without bars, or ``default_rule``)."""
    rule = None if default_rule else dict(bars=False)
    _init(rank, world, port)
    try:
        model = make_model()
        if kind == "ddp":
            from torch.nn.parallel import DistributedDataParallel
            wrapped = DistributedDataParallel(model)
        else:
            from torch.distributed.fsdp import fully_shard
            for i in (0, 3, 5):
                fully_shard(model[i], reshard_after_forward=(i != 3))
            wrapped = fully_shard(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.05, momentum=0.9)
        tracker = None
        if tracked:
            tracker = lca_ext.LCATracker(
                wrapped, loss_fn, lca_set(), eval_sets={"val": val_set()},
                batch_size=LCA_BATCH, store=os.path.join(out_dir, f"run_{kind}"),
                frames=["0.weight"], num_classes=None,
                # Simpson, deterministic: the reference below runs one process on
                # the whole set, whose batches are not the ranks' (DDP's bars and
                # two-pass stage: test_ddp_error_bars_...)
                rule=rule)
        trajectory = [_full_params(model)]
        torch.manual_seed(1234 + rank)          # dropout masks differ per rank
        for step in range(STEPS):
            x, y = train_batch(step, rank)
            opt.zero_grad()
            loss_fn(wrapped(x), y).backward()
            if tracker is None:
                opt.step()
            else:
                with tracker.step():
                    opt.step()
            trajectory.append(_full_params(model))
        # the next draw of the training RNG: tracking must not have consumed any
        rng_probe = torch.rand(3)
        arrays = {}
        if tracker is not None:
            result = tracker.result()          # collective under FSDP
            arrays = {f"a/{k}": v for k, v in result.arrays.items()}
            arrays.update({f"s/{name}/{k}": a for name, lst in result.state.items()
                           for k, a in enumerate(lst)})
            arrays["lca_set_size"] = np.int64(result.meta["config"]["lca_set_size"])
            # a resumed tracker gets back this rank's part of every state tensor
            again = lca_ext.LCATracker(
                wrapped, loss_fn, lca_set(), eval_sets={"val": val_set()},
                batch_size=LCA_BATCH, store=os.path.join(out_dir, f"run_{kind}"),
                frames=["0.weight"], resume=True, rule=rule)
            arrays["resume_ok"] = np.int64(again.next_step == STEPS and all(
                torch.equal(a, b) for name in tracker.state
                for a, b in zip(tracker.state[name], again.state[name])))
        if rank == 0:
            for t, params in enumerate(trajectory):
                arrays.update({f"theta/{t}/{n}": v.numpy() for n, v in params.items()})
        arrays["rng_probe"] = rng_probe.numpy()
        np.savez(os.path.join(out_dir, f"{kind}_{int(tracked)}_rank{rank}.npz"), **arrays)
        dist.barrier()   # no rank tears gloo down while another still uses it
    finally:
        dist.destroy_process_group()
    _exit_now()


def run_classes(rank: int, world: int, port: int, out_dir: str, bars: bool = False) -> None:
    """DDP with per-class LCA (3 classes): saves the trajectory and the records.
    Without ``bars``: Simpson on a tensor pair (the reference is one process on
    the whole set); with them: the default rule on a list of 8 batches (the
    reference is one process on the same batches in the ranks' order)."""
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
        x, _ = lca_set()
        y = x[:, :3].argmax(1)
        if bars:
            data = [(x[i:i + 25], y[i:i + 25]) for i in range(0, 200, 25)]
            tracker = lca_ext.LCATracker(wrapped, nn.functional.cross_entropy, data,
                                         num_classes=3)
        else:
            tracker = lca_ext.LCATracker(wrapped, nn.functional.cross_entropy, (x, y),
                                         batch_size=LCA_BATCH, num_classes=3,
                                         rule=dict(bars=False))
        _train_and_save(model, opt, tracker, rank, 3,
                        lambda x, y: nn.functional.cross_entropy(wrapped(x), x[:, :3].argmax(1)),
                        os.path.join(out_dir, f"classes_{int(bars)}_rank{rank}.npz"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_now()


def run_bad_target(rank: int, world: int, port: int, out_dir: str) -> None:
    """A class target out of range in one example that only rank 1's share holds
    (example 1: rank i mod world): every rank must raise the set's error, none
    may wait in a collective.  Writes what each rank raised."""
    _init(rank, world, port)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
        x, _ = lca_set()
        y = x[:, :3].argmax(1)
        y[1] = 7
        tracker = lca_ext.LCATracker(wrapped, nn.functional.cross_entropy, (x, y),
                                     batch_size=LCA_BATCH, num_classes=3)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.2)
        xb, _ = train_batch(0, rank)
        opt.zero_grad()
        nn.functional.cross_entropy(wrapped(xb), xb[:, :3].argmax(1)).backward()
        message = "no error"
        try:
            with tracker.step():
                opt.step()
        except ValueError as err:
            message = str(err)
        with open(os.path.join(out_dir, f"bad_target_rank{rank}.txt"), "w") as f:
            f.write(message)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_now()


def bars_model() -> nn.Module:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 1)).double()


def bar_batches(n: int = 8):
    """The LCA set as a list of n batches (batch i goes to rank i mod world)."""
    x, y = lca_set()
    size = 200 // n
    return [(x[i:i + size], y[i:i + size]) for i in range(0, n * size, size)]


# "uneven": 9 batches (5 on rank 0, 4 on rank 1) and a path_memory_budget of 10
# gradient buffers with refinement forced: each rank's rule must count the groups'
# buffers alike (it counted its own, and the ranks' recomputed passes diverged)
# FSDP2 with bars: groups are rounds (every rank's r-th batch); no group gradients
# held anywhere (the one-process reference would hold them), so Simpson + bars
FSDP_BARS_RULE = dict(path_memory_budget=0)
FSDP_BARS_BATCH = 16


def run_fsdp_bars(rank: int, world: int, port: int, out_dir: str, tracked: bool = True) -> None:
    """FSDP2 with the default rule's error bars on a tensor pair: saves the
    trajectory and each rank's records (``tracked`` False: the same training
    untracked, its trajectory only)."""
    _init(rank, world, port)
    try:
        model = bars_model()
        from torch.distributed.fsdp import fully_shard
        fully_shard(model[0])
        wrapped = fully_shard(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.03)
        tracker = lca_ext.LCATracker(wrapped, loss_fn, lca_set(), batch_size=FSDP_BARS_BATCH,
                                     rule=FSDP_BARS_RULE) if tracked else None
        _train_and_save(model, opt, tracker, rank, STEPS,
                        lambda x, y: loss_fn(wrapped(x), y),
                        os.path.join(out_dir, f"fsdp_bars_{int(tracked)}_rank{rank}.npz"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_now()


UNEVEN_RULE = dict(path_memory_budget=10 * 8 * (6 * 12 + 12 + 12 + 1), bar_rtol=1e-6,
                   refine_level=1.0)


def run_bars(rank: int, world: int, port: int, out_dir: str, form: str = "pair") -> None:
    """DDP with the default rule (error bars, two-pass stage), the LCA set a
    tensor pair or a list of batches: saves the trajectory and each rank's
    records."""
    _init(rank, world, port)
    try:
        model = bars_model()
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.03)
        data = lca_set() if form == "pair" else bar_batches(9 if form == "uneven" else 8)
        tracker = lca_ext.LCATracker(wrapped, loss_fn, data, batch_size=LCA_BATCH,
                                     rule=UNEVEN_RULE if form == "uneven" else None)
        _train_and_save(model, opt, tracker, rank, STEPS,
                        lambda x, y: loss_fn(wrapped(x), y),
                        os.path.join(out_dir, f"bars_{form}_rank{rank}.npz"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    _exit_now()
