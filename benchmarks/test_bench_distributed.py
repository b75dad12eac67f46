"""LCA under DDP: what a tracked step costs on 2 ranks (gloo, CPU), against its
gradient passes + the plain DDP step, and the share of the gradient all-reduce.

Each rank runs one thread; timings are interleaved round by round (as in the
other benchmarks) and rank 0's medians are reported."""
import copy
import json
import os
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import lca_ext

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import distributed_cases as cases  # noqa: E402  (free_port)

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def _worker(rank, world, port, out):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                              nn.Linear(512, 10))
        x, y = torch.randn(4096, 256), torch.randint(0, 10, (4096,))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=1e-2, momentum=0.9)
        loss_fn = nn.functional.cross_entropy
        tracker = lca_ext.LCATracker(ddp, loss_fn, (x, y), batch_size=1024, atol=1e9)
        ev = tracker.objectives[0].evaluator
        params = [p.detach() for p in tracker.params.params]
        bufs = [torch.zeros_like(p) for p in params]
        xb, yb = x[rank * 64:(rank + 1) * 64], y[rank * 64:(rank + 1) * 64]

        def one_pass():
            ev.loss_and_grad(params, bufs)

        def all_reduce():
            tracker.ctx.replicated_grads_(bufs, before=False)

        # the plain step runs on a twin, so the tracked model's θ moves only
        # inside tracker.step() and each tracked step reuses its start gradient
        twin = nn.parallel.DistributedDataParallel(copy.deepcopy(model))
        twin_opt = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9)

        def plain_step():
            twin_opt.zero_grad()
            loss_fn(twin(xb), yb).backward()
            twin_opt.step()

        def tracked_step():
            opt.zero_grad()
            loss_fn(ddp(xb), yb).backward()
            with tracker.step():
                opt.step()

        tracked_step()
        times = {f.__name__: [] for f in (one_pass, all_reduce, plain_step, tracked_step)}
        for _ in range(8):
            for fn in (one_pass, all_reduce, plain_step, tracked_step):
                dist.barrier()
                t = time.perf_counter()
                fn()
                times[fn.__name__].append(time.perf_counter() - t)
        if rank == 0:
            med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
            med["passes"] = int(tracker.result().grad_passes[-1])
            med["numel"] = sum(p.numel() for p in params)
            with open(out, "w") as f:
                json.dump(med, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    cases._exit_now()   # skip interpreter finalisation (a gloo abort there fails mp.spawn)


def test_ddp_tracked_step_overhead(benchmark, tmp_path):
    out = str(tmp_path / "ddp.json")
    benchmark.pedantic(lambda: mp.spawn(_worker, args=(2, cases.free_port(), out), nprocs=2),
                       rounds=1, iterations=1)
    m = json.load(open(out))
    budget = m["passes"] * m["one_pass"] + m["plain_step"]
    ratio = m["tracked_step"] / budget
    print(f"\nDDP, 2 ranks x 1 thread: tracked step {m['tracked_step'] * 1e3:.1f} ms = "
          f"{ratio:.3f} x ({m['passes']} passes x {m['one_pass'] * 1e3:.1f} ms + plain DDP "
          f"step {m['plain_step'] * 1e3:.1f} ms); gradient all-reduce "
          f"{m['all_reduce'] * 1e3:.2f} ms = {m['all_reduce'] / m['one_pass']:.1%} of a pass; "
          f"{m['numel'] / 1e6:.2f}M parameters, 4096-example LCA set (2048 per rank)")
    benchmark.extra_info.update(ratio=ratio, **m)
