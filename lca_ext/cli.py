"""``lca-ext`` (also ``python -m lca_ext``): demo | report | compare | offline | merge |
verify-cuda.

Errors (a bad path, a corrupt, incomplete or foreign run directory, a missing
dataset or optional package, a bad option) print one line starting
"lca-ext: error:" and exit 2.  offline, merge and verify-cuda need no extra;
demo, report and compare draw and need the "demo" extra (pip install
"lca_ext[demo]"): they say so, in one line, when it is missing."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from typing import List, Optional


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise _CliError(f"{message} (see lca-ext {self.prog.split()[-1]} --help)"
                        if " " in self.prog else message)


class _CliError(Exception):
    pass


def _layer_momentum(items: List[str]):
    out = {}
    for item in items:
        layer, sep, value = item.partition("=")
        try:
            out[layer] = float(value)
        except ValueError:
            raise _CliError(f"--layer-momentum {item!r}: expected LAYER=MOMENTUM, e.g. fc1=0.5")
        if not sep or not layer:
            raise _CliError(f"--layer-momentum {item!r}: expected LAYER=MOMENTUM")
    return out


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lca-ext", description="Loss Change Allocation for PyTorch")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    d = sub.add_parser("demo", help="train the paper's MNIST network with LCA, then report")
    d.add_argument("--model", choices=["fc", "lenet"], default="fc")
    d.add_argument("--steps", type=int, default=150)
    d.add_argument("--lr", type=float, default=0.05)
    d.add_argument("--batch-size", type=int, default=100)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", default=None, help="output directory (default: a new one "
                   "under ./lca_demo_runs)")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when "
                   "available and lca_ext's CUDA kernels are verified or allowed)")
    d.add_argument("--freeze", action="append", default=[], metavar="LAYER",
                   help="keep LAYER at its initial values (repeatable)")
    d.add_argument("--layer-momentum", action="append", default=[], metavar="LAYER=M",
                   help="momentum M for LAYER's parameters (the 'delay' experiment)")
    d.add_argument("--tensorboard", default=None, metavar="DIR",
                   help="also log to TensorBoard event files in DIR")
    d.add_argument("--method", default=None,
                   choices=["budget", "certified", "adaptive", "simpson", "first_order"],
                   help="the path rule (default: budget; see the Accuracy guide)")
    d.add_argument("--max-passes", type=int, default=None, metavar="N",
                   help="the budget rule's gradient passes a step at most (default 8)")
    d.add_argument("--mean-passes", type=float, default=None, metavar="M",
                   help="hold the budget rule to M passes a step on average over the "
                   "run, plus a reserve of 4 (default: no such account; see the "
                   "Accuracy guide)")
    d.add_argument("--tensor-rtol", type=float, default=None, metavar="R",
                   help="the certified rule's per-tensor tolerance (default 0.01)")
    d.add_argument("--pass-dtype", default=None, choices=["float32", "float64"],
                   help="the precision of the LCA passes (float64 lifts float32's "
                   "rounding floor)")
    d.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="(re)build the report of a stored run")
    r.add_argument("run_dir")
    r.add_argument("--out", default=None, help="report directory (default: RUN_DIR/../report)")
    c = sub.add_parser("compare", help="runs side by side: losses and per-layer LCA")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="lca_compare")
    o = sub.add_parser("offline", help="LCA of a saved trajectory: a directory of per-step "
                       "state_dict files (step_000000.pt, step_000001.pt, ...)")
    o.add_argument("traj_dir")
    o.add_argument("--model", required=True, metavar="MODULE:FACTORY",
                   help="FACTORY() returns the nn.Module the states belong to")
    o.add_argument("--data", required=True, metavar="MODULE:FUNC",
                   help="FUNC() returns the LCA set as an (inputs, targets) tensor pair")
    o.add_argument("--out", required=True, metavar="RUN_DIR", help="the run store to write "
                   "(with --part I/N, N > 1: RUN_DIR/part-0000I)")
    o.add_argument("--loss", default="cross_entropy", metavar="cross_entropy|mse|MODULE:FUNC",
                   help="FUNC(outputs, targets) -> the mean loss of a batch")
    which = o.add_mutually_exclusive_group()
    which.add_argument("--range", default=None, metavar="START:STOP",
                       help="only steps START..STOP-1 (positions in the trajectory)")
    which.add_argument("--part", default=None, metavar="I/N",
                       help="only part I (from 0) of N contiguous ranges; merge the parts "
                       "with lca-ext merge RUN_DIR --out DIR")
    o.add_argument("--batch-size", type=int, default=None,
                   help="LCA batch size (default: at most 1024, and at least 8 batches: "
                   "the error bars' groups)")
    o.add_argument("--device", default=None, help="cpu or cuda (default as for demo)")
    o.add_argument("--key", default=None, help="each file is a checkpoint dict holding the "
                   "state dict under this key")
    o.add_argument("--resume", action="store_true", help="continue an interrupted RUN_DIR")
    m = sub.add_parser("merge", help="join the parts written by 'lca-ext offline' into one run")
    m.add_argument("part_dirs", nargs="+", metavar="PART_DIR",
                   help="part run directories, or a directory holding part-* runs")
    m.add_argument("--out", required=True)
    v = sub.add_parser("verify-cuda", help="check the CUDA kernels on this GPU against the "
                       "CPU kernels and, if they pass, enable them for this build and GPU")
    v.add_argument("--device", default="cuda", help="the CUDA device to check (default: cuda)")
    v.add_argument("--large", action="store_true", help="also a tensor of 2^31+ elements "
                   "(12 GiB of GPU memory)")
    v.add_argument("--no-record", action="store_true",
                   help="only report; do not record the result")
    return p


def _verify_cuda(args) -> int:
    from .verify import cuda_device, stamp_path, verify_cuda

    try:
        device = cuda_device(args.device)
        import torch
        print(f"checking lca_ext's CUDA kernels on {device} ({torch.cuda.get_device_name(device)})"
              " against the CPU kernels ...", flush=True)
        report = verify_cuda(device, large=args.large, record=not args.no_record,
                             progress=lambda c: print(c.format_line(), flush=True))
    except RuntimeError as err:
        raise _CliError(str(err))
    ok = report.passed_ops()
    failed = sorted({c.op for c in report if not c.ok})
    if failed:
        print(f"FAILED: {', '.join(failed)}: these ops keep refusing CUDA tensors "
              "(LCATracker uses the plain-PyTorch ops for them); please report the lines "
              "above with `python -c 'import lca_ext; print(lca_ext.build_info())'`")
    if ok and not args.no_record:
        print(f"verified and enabled on this GPU: {', '.join(ok)} (recorded in {stamp_path()})")
    return 1 if failed else 0


def _import_spec(spec: str, option: str):
    """MODULE:NAME -> the object (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise _CliError(f"{option} {spec!r}: expected MODULE:NAME, e.g. mymodels:make_model")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())    # as 'python -m' would see it
    try:
        obj = importlib.import_module(module_name)
    except ImportError as err:
        raise _CliError(f"{option}: cannot import {module_name!r}: {err}")
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise _CliError(f"{option}: {module_name!r} has no {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise _CliError(f"{option}: {spec!r} is a {type(obj).__name__}, not a function")
    return obj


def _parse_range(text: str, num_steps: int):
    start, sep, stop = text.partition(":")
    try:
        return (int(start) if start else 0, int(stop) if stop else num_steps) if sep else None
    except ValueError:
        return None


def _offline(args) -> None:
    import torch
    from torch import nn

    from . import offline

    make_model = _import_spec(args.model, "--model")
    make_data = _import_spec(args.data, "--data")
    losses = {"cross_entropy": nn.functional.cross_entropy, "mse": nn.functional.mse_loss}
    loss_fn = losses.get(args.loss) or _import_spec(args.loss, "--loss")
    if args.batch_size is not None and args.batch_size < 1:
        raise _CliError("--batch-size must be at least 1")
    device = args.device or _default_device()
    traj = offline.open_trajectory(args.traj_dir, key=args.key)
    n = traj.num_steps
    where = dict(out_dir=args.out)
    if args.range is not None:
        steps = _parse_range(args.range, n)
        if steps is None or not 0 <= steps[0] <= steps[1] <= n:
            raise _CliError(f"--range {args.range!r}: expected START:STOP with "
                            f"0 <= START <= STOP <= {n} (the trajectory's steps), e.g. 0:{n}")
        where["steps"] = steps
    elif args.part is not None:
        i, sep, parts = args.part.partition("/")
        if not (sep and i.isdigit() and parts.isdigit() and int(i) < int(parts)):
            raise _CliError(f"--part {args.part!r}: expected I/N with 0 <= I < N, e.g. 0/4")
        where.update(rank=int(i), world_size=int(parts))
    model = make_model()
    if not isinstance(model, nn.Module):
        raise _CliError(f"--model {args.model!r} returned a {type(model).__name__}; "
                        "expected an nn.Module")
    data = make_data()
    if not (isinstance(data, (tuple, list)) and len(data) == 2
            and all(isinstance(t, torch.Tensor) for t in data)):
        raise _CliError(f"--data {args.data!r} returned a {type(data).__name__}; expected "
                        "an (inputs, targets) pair of tensors")
    model.to(device)
    try:
        run = offline.compute(model, loss_fn, tuple(t.to(device) for t in data), traj,
                              batch_size=args.batch_size, resume=args.resume, **where)
    except FileExistsError:
        raise _CliError(f"{args.out!r} already holds a run; pass --resume to continue it "
                        "or choose another --out")
    out = (offline.part_path(args.out, where["rank"], where["world_size"])
           if "rank" in where else args.out)
    if len(run):
        d_loss = run.loss_after[-1] - run.loss_before[0]
        print(f"steps {run.steps[0]}..{run.steps[-1]}: {len(run)} of {n}; "
              f"ΣLCA {run.lca_sum.sum():+.6f}, ΔL {d_loss:+.6f}; run: {out}")
    else:
        print(f"no steps in this part (the trajectory has {n}); run: {out}")


def _default_device() -> str:
    import torch

    from .ops import FUSED_OPS, fused_available

    # cuda only where every op has a usable kernel there (compiled, and verified
    # by `lca-ext verify-cuda` or allowed): the same rule LCATracker follows
    ok = torch.cuda.is_available() and all(fused_available(op, "cuda") for op in FUSED_OPS)
    return "cuda" if ok else "cpu"


def _pass_dtype(name: Optional[str]):
    import torch
    return None if name is None else getattr(torch, name)


def _rule(args) -> dict:
    """The demo's RuleOptions fields from its command-line options (given ones only)."""
    rule = {}
    for opt, field in (("method", "method"), ("max_passes", "max_passes"),
                       ("mean_passes", "mean_passes"), ("tensor_rtol", "tensor_rtol")):
        if getattr(args, opt) is not None:
            rule[field] = getattr(args, opt)
    return rule


def _summary(run_dir: str, report: str, seconds: Optional[float] = None) -> str:
    from .report import headline
    from .run import load_run

    h = headline(load_run(run_dir))
    lines = [f"steps tracked: {h['steps']}" + (f" in {seconds:.0f} s" if seconds else ""),
             f"loss: {h['loss_start']:.4f} -> {h['loss_end']:.4f}; "
             f"whole-run |ΣLCA - ΔL| / |ΔL| = {h['relative_error']:.1e}; {h['doubtful']}",
             f"parameters that helped per step: {100 * h['helped_mean']:.1f}% "
             "(paper: barely over 50%)",
             "layer totals (± 95% bar): " + ", ".join(
                 f"{k} {v:+.3f} ± " + (f"{e:.1g}" if e == e else "n/a")
                 for k, (v, e) in h["layer_bars"].items())]
    if "sync_p_values" in h:
        n = sum(p < 0.01 for p in h["sync_p_values"])
        lines.append(f"classes whose layers peak together (p < 0.01): {n} of "
                     f"{len(h['sync_p_values'])}")
    lines.append(f"report: {report}")
    page = os.path.join(os.path.dirname(report), "interactive.html")
    if os.path.exists(page):
        lines.append(f"interactive (slider over steps): {page}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            raise _CliError("choose a command: demo, report, compare, offline, merge or "
                            "verify-cuda "
                            "(lca-ext --help)")
        from ._extras import MissingExtra, require
        from .demo.data import DatasetMissing
        from .store import RunStoreError
        try:
            # what a command draws or shows needs an extra; say so before any work
            if args.command == "demo":
                require("lca-ext demo", ["mlxtend", "matplotlib", "PIL"]
                        + ([] if args.no_progress else ["tqdm"])
                        + (["tensorboard"] if args.tensorboard else []))
            elif args.command in ("report", "compare"):
                require(f"lca-ext {args.command}", ["matplotlib", "PIL"])
            if args.command == "demo":
                from .demo.run import run_demo
                from .report import build_report
                if args.steps < 2:
                    raise _CliError("--steps must be at least 2")
                out = args.out or os.path.join(
                    "lca_demo_runs", f"{args.model}-seed{args.seed}-{time.strftime('%Y%m%d-%H%M%S')}")
                if os.path.exists(os.path.join(out, "run")):
                    raise _CliError(f"{out!r} already holds a run; choose another --out")
                start = time.time()
                run_dir = run_demo(out, model=args.model, steps=args.steps, lr=args.lr,
                                   batch_size=args.batch_size, seed=args.seed,
                                   device=args.device or _default_device(),
                                   freeze=args.freeze,
                                   layer_momentum=_layer_momentum(args.layer_momentum),
                                   progress=not args.no_progress,
                                   tensorboard=args.tensorboard, rule=_rule(args),
                                   pass_dtype=_pass_dtype(args.pass_dtype))
                report = build_report(run_dir, os.path.join(out, "report"))
                if args.tensorboard:
                    from .tensorboard import add_figures
                    add_figures(args.tensorboard, report)
                print(_summary(run_dir, report, time.time() - start))
            elif args.command == "report":
                out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.run_dir)),
                                               "report")
                from .report import build_report
                report = build_report(args.run_dir, out)
                print(_summary(args.run_dir, report))
            elif args.command == "offline":
                _offline(args)
            elif args.command == "verify-cuda":
                return _verify_cuda(args)
            elif args.command == "merge":
                from .offline import merge_runs
                run = merge_runs(args.part_dirs, args.out)
                print(f"merged: {len(run)} steps ({run.steps[0]}..{run.steps[-1]}); "
                      f"run: {args.out}")
            else:
                from .report import build_comparison
                print(f"comparison: {build_comparison(args.run_dirs, args.out)}")
        except (RunStoreError, DatasetMissing, MissingExtra, ValueError, FileExistsError,
                FileNotFoundError, KeyError) as err:
            raise _CliError(str(err).removeprefix("lca_ext: "))
    except _CliError as err:
        print(f"lca-ext: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
