"""Smoke test of an installed lca_ext, run from outside the source tree (CI runs it
in a venv made from the sdist and in one made from the wheel).

    python scripts/smoke_install.py [--minimal]

Checks: lca_ext is the installed copy (not a checkout); every op once against
lca_ext.reference; a 3-step tracked run with a run store, reloaded; `lca-ext
offline` on a tiny saved trajectory.  --minimal also checks that no extra
(matplotlib, pillow, tqdm, tensorboard, mlxtend, lightning, transformers) is
installed and that `lca-ext report` then says which extra to install (exit 2).
Exits non-zero at the first failure."""
import argparse
import os
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import torch

EXTRAS = ["matplotlib", "PIL", "tqdm", "tensorboard", "mlxtend", "plotly", "lightning",
          "transformers"]


def check(cond, what):
    if not cond:
        raise SystemExit(f"smoke: FAILED: {what}")
    print(f"smoke: ok: {what}", flush=True)


def close(a, b, tol=1e-9):
    a, b = torch.as_tensor(a).double().cpu(), torch.as_tensor(b).double().cpu()
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=tol, atol=tol))


def ops(lca_ext, ref):
    g = torch.Generator().manual_seed(0)
    shapes = [(7, 5), (300,), (3, 4, 6)]
    before = [torch.randn(s, generator=g) for s in shapes]
    after = [b + 0.01 * torch.randn(b.shape, generator=g) for b in before]
    grads = [torch.randn(s, generator=g) for s in shapes]

    acc, acc_ref = [torch.zeros(s) for s in shapes], [torch.zeros(s) for s in shapes]
    lca_ext.accumulate_(acc, grads, 4 / 6)
    ref.accumulate_(acc_ref, grads, 4 / 6)
    check(all(torch.equal(a, r) for a, r in zip(acc, acc_ref)), "accumulate_ == reference")

    edges = lca_ext.signed_log_edges(1e-8, 1.0, 6)
    cum = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    cum_ref = [torch.zeros(s, dtype=torch.float64) for s in shapes]
    helped = [torch.zeros(s, dtype=torch.int32) for s in shapes]
    helped_ref = [torch.zeros(s, dtype=torch.int32) for s in shapes]
    res = lca_ext.allocate(before, after, grads, row_sums=True, bin_edges=edges,
                           cum_lca=cum, helped_steps=helped)
    exp = ref.allocate(before, after, grads, row_sums=True, bin_edges=edges,
                       cum_lca=cum_ref, helped_steps=helped_ref)
    check(close(res.sums, exp.sums) and torch.equal(res.counts, exp.counts)
          and close(res.row_sums, exp.row_sums) and torch.equal(res.histogram, exp.histogram)
          and all(close(a, b) for a, b in zip(cum, cum_ref))
          and all(torch.equal(a, b) for a, b in zip(helped, helped_ref)),
          "allocate (sums, counts, rows, histogram, state) == reference")

    class_grads = [torch.randn((3, *s), generator=g) for s in shapes]
    res = lca_ext.allocate_classes(before, after, class_grads)
    exp = ref.allocate_classes(before, after, class_grads)
    check(close(res.sums, exp.sums) and torch.equal(res.counts, exp.counts),
          "allocate_classes == reference")

    last = [torch.zeros(s, dtype=torch.int8) for s in shapes]
    changes = [torch.zeros(s, dtype=torch.int32) for s in shapes]
    last_ref = [t.clone() for t in last]
    changes_ref = [t.clone() for t in changes]
    for x in (grads, [-t for t in grads], after):
        lca_ext.sign_changes_(last, changes, x, before)
        ref.sign_changes_(last_ref, changes_ref, x, before)
    check(all(torch.equal(a, b) for a, b in zip(changes, changes_ref))
          and all(torch.equal(a, b) for a, b in zip(last, last_ref)),
          "sign_changes_ == reference")


MODEL_MODULE = textwrap.dedent("""
    import torch
    from torch import nn

    def make_model():
        torch.manual_seed(1)
        return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))

    def lca_set():
        g = torch.Generator().manual_seed(2)
        x = torch.randn(64, 6, generator=g)
        return x, (x[:, :3]).argmax(1)
""")


def tracked_and_offline(lca_ext, work):
    sys.path.insert(0, work)
    with open(os.path.join(work, "smoke_model.py"), "w") as f:
        f.write(MODEL_MODULE)
    import smoke_model

    model = smoke_model.make_model()
    x, y = smoke_model.lca_set()
    loss_fn = torch.nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    store = os.path.join(work, "run")
    traj = os.path.join(work, "traj")
    os.makedirs(traj)
    torch.save(model.state_dict(), os.path.join(traj, "step_000000.pt"))
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), store=store)
    for t in range(3):
        opt.zero_grad()
        loss_fn(model(x[t * 16:(t + 1) * 16]), y[t * 16:(t + 1) * 16]).backward()
        with tracker.step():
            opt.step()
        torch.save(model.state_dict(), os.path.join(traj, f"step_{t + 1:06d}.pt"))
    run = tracker.result()
    loaded = lca_ext.load_run(store)
    d_loss = run.loss_after - run.loss_before
    check(len(run) == 3 and len(loaded) == 3
          and bool(((run.lca_sum - d_loss).__abs__() <= 1e-4 + 1e-3 * abs(d_loss)).all())
          and all(np.array_equal(loaded.arrays[k], v, equal_nan=True)
                  for k, v in run.arrays.items()),
          "3-step tracked run: grounded, stored and reloaded")

    lca_cli = os.path.join(os.path.dirname(sys.executable), "lca-ext")
    out = os.path.join(work, "offline_run")
    proc = subprocess.run([lca_cli, "offline", traj, "--model", "smoke_model:make_model",
                           "--data", "smoke_model:lca_set", "--out", out, "--batch-size", "8"],
                          cwd=work, capture_output=True, text=True)
    print(proc.stdout.strip())
    check(proc.returncode == 0, f"lca-ext offline exits 0 (stderr: {proc.stderr.strip()!r})")
    off = lca_ext.load_run(out)
    check(len(off) == 3 and close(off.lca_sum, run.lca_sum, 1e-6)
          and close(off.loss_after, run.loss_after, 1e-6),
          "lca-ext offline on the saved trajectory == the tracked run")
    return lca_cli, store


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minimal", action="store_true",
                    help="also check that no extra is installed and the CLI names the extra")
    args = ap.parse_args()
    import lca_ext
    from lca_ext import reference

    where = os.path.realpath(lca_ext.__file__)
    print(f"smoke: lca_ext {lca_ext.__version__} from {where}; torch {torch.__version__}; "
          f"build_info torch {lca_ext.build_info()['torch_build']}")
    check("site-packages" in where, "lca_ext is the installed copy, not a source checkout")
    check(os.path.isfile(os.path.join(os.path.dirname(where), "_version.py")), "package files")
    ops(lca_ext, reference)
    with tempfile.TemporaryDirectory() as work:
        lca_cli, store = tracked_and_offline(lca_ext, work)
        if args.minimal:
            import importlib.util
            present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
            check(not present, f"minimal install: no extra installed ({present})")
            proc = subprocess.run([lca_cli, "report", store], capture_output=True, text=True)
            lines = proc.stderr.strip().splitlines()
            check(proc.returncode == 2 and len(lines) == 1 and 'lca_ext[demo]' in lines[0],
                  f"lca-ext report without matplotlib: one line naming the extra, exit 2 "
                  f"({proc.returncode}, {proc.stderr.strip()!r})")
            mods = [m for m in EXTRAS if m in sys.modules]
            check(not mods, f"nothing above imported an extra ({mods})")
    print("smoke: all passed")


if __name__ == "__main__":
    main()
