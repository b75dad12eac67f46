"""The tracker's cost: extra memory per parameter, and wall time of a tracked step
against its gradient passes plus the plain training step (pytest-benchmark)."""
import copy
import json
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from torch import nn

import lca_ext

# -- memory: peak RSS of a training run with / without tracking (subprocesses) --

MEM_CHILD = textwrap.dedent("""
    import json, resource, sys, torch
    from torch import nn
    import lca_ext
    mode = sys.argv[1]
    torch.manual_seed(0)
    width = 2048                                 # 6 x 2048^2 ≈ 25M parameters
    model = nn.Sequential(*[nn.Linear(width, width) for _ in range(6)])
    x, y = torch.randn(8, width), torch.randn(8, width)
    loss_fn = lambda o, t: ((o - t) ** 2).mean()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)   # no optimiser state
    tracker = None
    if mode != "plain":
        tracker = lca_ext.LCATracker(model, loss_fn, (x, y), atol=1e9, oscillation=False,
                                     row_sums=False,
                                     reuse_gradients=(mode == "simpson"))
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        if tracker is None:
            opt.step()
        else:
            with tracker.step():
                opt.step()
    numel = sum(p.numel() for p in model.parameters())
    print(json.dumps({"maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "numel": numel}))
""")


def peak(mode):
    out = subprocess.run([sys.executable, "-c", MEM_CHILD, mode], check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out.splitlines()[-1])


def test_tracker_extra_memory(record_property):
    plain = peak("plain")
    rows = {}
    for mode in ("simpson", "recompute"):
        r = peak(mode)
        extra = (r["maxrss_kb"] - plain["maxrss_kb"]) * 1024 / (4 * r["numel"])
        rows[mode] = extra
    # cum_lca (fp32) and helped_steps (int32) are 2 of these; oscillation was off
    print(f"\ntracker extra peak memory, fp32 values per parameter "
          f"({plain['numel'] / 1e6:.1f}M parameters, SGD without momentum): "
          f"simpson with reuse {rows['simpson']:.2f}, recompute {rows['recompute']:.2f} "
          f"(each includes cum_lca + helped_steps = 2)")
    for k, v in rows.items():
        record_property(f"extra_fp32_per_param_{k}", v)


# -- speed: a tracked step vs its gradient passes + the plain step ------------

@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                          nn.Linear(512, 10))
    x, y = torch.randn(4096, 256), torch.randint(0, 10, (4096,))
    loss_fn = nn.functional.cross_entropy
    return model, x, y, loss_fn


def test_tracked_step_overhead(setup, benchmark):
    model, x, y, loss_fn = setup
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), batch_size=1024, atol=1e9)
    ev = tracker.objectives[0].evaluator
    params = [p.detach() for p in tracker.params.params]
    bufs = [torch.zeros_like(p) for p in params]

    def one_pass():
        ev.loss_and_grad(params, bufs)

    # the plain step runs on a twin, so the tracked model's θ moves only inside
    # tracker.step() and each tracked step reuses its start gradient
    twin = copy.deepcopy(model)
    twin_opt = torch.optim.SGD(twin.parameters(), lr=1e-2, momentum=0.9)

    def plain_step():
        twin_opt.zero_grad()
        loss_fn(twin(x[:128]), y[:128]).backward()
        twin_opt.step()

    def tracked_step():
        opt.zero_grad()
        loss_fn(model(x[:128]), y[:128]).backward()
        with tracker.step():
            opt.step()

    tracked_step()  # warm-up (computes the first start gradient)
    t_pass, t_plain, t_tracked = [], [], []
    for _ in range(8):  # interleaved, as in the op benchmarks
        for fn, ts in ((one_pass, t_pass), (plain_step, t_plain), (tracked_step, t_tracked)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    passes = int(tracker.result().grad_passes[-1])
    budget = passes * med(t_pass) + med(t_plain)
    ratio = med(t_tracked) / budget
    print(f"\ntracked step {med(t_tracked) * 1e3:.1f} ms = {ratio:.3f} x "
          f"({passes} passes x {med(t_pass) * 1e3:.1f} ms + plain step "
          f"{med(t_plain) * 1e3:.1f} ms); "
          f"{sum(p.numel() for p in params) / 1e6:.2f}M parameters, 4096-example LCA set")
    benchmark.extra_info.update(ratio=ratio, passes=passes)
    benchmark.pedantic(tracked_step, rounds=3, iterations=1)
