"""LCA of data-parallel training: DDP or FSDP2, one process per GPU (or CPU).

    # one machine, 2 processes on the CPU (gloo)
    torchrun --standalone --nproc_per_node=2 examples/distributed.py --out runs/ddp
    # 8 GPUs, FSDP2
    torchrun --standalone --nproc_per_node=8 examples/distributed.py --fsdp --out runs/fsdp
    # 2 nodes x 8 GPUs: run on every node (same --rdzv-endpoint)
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 examples/distributed.py --out /shared/runs/x

Every rank builds the same LCATracker on the whole LCA set; the tracker takes
this rank's share of it, sums each gradient pass over ranks, and rank 0 writes
the run directory (``lca-ext report RUN_DIR`` afterwards).
"""
import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import lca_ext


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--fsdp", action="store_true", help="FSDP2 (fully_shard) instead of DDP")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--out", default=None, help="run directory (rank 0 writes it)")
    args = p.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if use_cuda \
        else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)                                   # same init on every rank
    x = torch.randn(4096, 32)
    y = (x[:, :4] + 0.3 * torch.randn(4096, 4)).argmax(1)  # 4 classes
    model = nn.Sequential(nn.Linear(32, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(),
                          nn.Linear(64, 4)).to(device)
    if args.fsdp:
        from torch.distributed.fsdp import fully_shard
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        model = fully_shard(model)
    else:
        model = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loss_fn = nn.functional.cross_entropy

    # the whole LCA set on every rank (here the first 2048 examples)
    tracker = lca_ext.LCATracker(model, loss_fn, (x[:2048].to(device), y[:2048].to(device)),
                                 store=args.out)
    gen = torch.Generator().manual_seed(1 + rank)          # each rank its own minibatches
    for step in range(args.steps):
        idx = torch.randint(0, 4096, (64,), generator=gen)
        opt.zero_grad()
        loss_fn(model(x[idx].to(device)), y[idx].to(device)).backward()
        with tracker.step():
            opt.step()
        if rank == 0 and step % 5 == 0:
            r = tracker.last
            print(f"step {step}: ΔL {r['train/loss_after'] - r['train/loss_before']:+.5f} "
                  f"ΣLCA {r['train/lca_sum']:+.5f}  ({world} ranks)", flush=True)
    run = tracker.result()          # every rank calls it (FSDP2 gathers state)
    if rank == 0:
        per_layer = run.layer_sums().sum(0)
        print("per-layer LCA over the run:",
              {name: round(float(v), 5) for name, v in zip(run.layer_names, per_layer)})
    # every rank reaches teardown together: a rank that destroys its gloo group
    # while another is still finishing can abort at exit
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # gloo's threads can abort the interpreter's exit ("terminate called without
    # an active exception", SIGABRT) after everything is written: end the process
    # here, its output flushed, rather than report a finished run as failed
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
