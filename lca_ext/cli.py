"""``lca-ext`` (also ``python -m lca_ext``): demo | report | compare.

Errors (a bad path, a corrupt or foreign run directory, a missing dataset
package, a bad option) print one line starting "lca-ext: error:" and exit 2."""
from __future__ import annotations

import argparse
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
    d.add_argument("--no-progress", action="store_true")
    r = sub.add_parser("report", help="(re)build the report of a stored run")
    r.add_argument("run_dir")
    r.add_argument("--out", default=None, help="report directory (default: RUN_DIR/../report)")
    c = sub.add_parser("compare", help="runs side by side: losses and per-layer LCA")
    c.add_argument("run_dirs", nargs="+")
    c.add_argument("--out", default="lca_compare")
    return p


def _default_device() -> str:
    import torch

    import lca_ext

    from .ops import UNVERIFIED_CUDA_OPS

    ok = torch.cuda.is_available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        "lca_ext::allocate", "CUDA")
    verified = not UNVERIFIED_CUDA_OPS or os.environ.get("LCA_EXT_ALLOW_UNVERIFIED_CUDA") == "1"
    return "cuda" if ok and verified and lca_ext.build_info()["cuda"] else "cpu"


def _summary(run_dir: str, report: str, seconds: Optional[float] = None) -> str:
    from .report import headline
    from .tracker import load_run

    h = headline(load_run(run_dir))
    lines = [f"steps tracked: {h['steps']}" + (f" in {seconds:.0f} s" if seconds else ""),
             f"loss: {h['loss_start']:.4f} -> {h['loss_end']:.4f}; "
             f"whole-run |ΣLCA - ΔL| / |ΔL| = {h['relative_error']:.1e}",
             f"parameters that helped per step: {100 * h['helped_mean']:.1f}% "
             "(paper: barely over 50%)",
             "layer totals: " + ", ".join(f"{k} {v:+.3f}" for k, v in h["layer_totals"].items())]
    if "sync_p_values" in h:
        n = sum(p < 0.01 for p in h["sync_p_values"])
        lines.append(f"classes whose layers peak together (p < 0.01): {n} of "
                     f"{len(h['sync_p_values'])}")
    lines.append(f"report: {report}")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = _parser().parse_args(argv)
        if args.command is None:
            raise _CliError("choose a command: demo, report or compare (lca-ext --help)")
        from .demo.data import DatasetMissing
        from .report import build_comparison, build_report
        from .store import RunStoreError
        try:
            if args.command == "demo":
                from .demo.run import run_demo
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
                                   tensorboard=args.tensorboard)
                report = build_report(run_dir, os.path.join(out, "report"))
                if args.tensorboard:
                    from .tensorboard import add_figures
                    add_figures(args.tensorboard, report)
                print(_summary(run_dir, report, time.time() - start))
            elif args.command == "report":
                out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.run_dir)),
                                               "report")
                report = build_report(args.run_dir, out)
                print(_summary(args.run_dir, report))
            else:
                print(f"comparison: {build_comparison(args.run_dirs, args.out)}")
        except (RunStoreError, DatasetMissing, ValueError, FileExistsError,
                FileNotFoundError, KeyError) as err:
            raise _CliError(str(err).removeprefix("lca_ext: "))
    except _CliError as err:
        print(f"lca-ext: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
