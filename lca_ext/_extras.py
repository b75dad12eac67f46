"""The optional dependencies (pip extras) and a one-line error for a missing one.

A minimal install (torch, numpy, zarr) runs the ops, the tracker, the run store,
the analyses, offline LCA and every command that neither draws nor shows
progress; drawing, the demo's data, progress bars, TensorBoard, the interactive page
(plotly) and the framework integrations need an extra."""
from __future__ import annotations

import importlib.util
from typing import Iterable

# importable module -> (pip distribution, lca_ext extra that installs it)
OPTIONAL = {
    "matplotlib": ("matplotlib", "demo"),
    "PIL": ("pillow", "demo"),
    "mlxtend": ("mlxtend", "demo"),
    "tqdm": ("tqdm", "demo"),
    "tensorboard": ("tensorboard", "demo"),
    "plotly": ("plotly", "demo"),
    "lightning": ("lightning", "lightning"),
    "transformers": ("transformers", "transformers"),
}


class MissingExtra(ImportError):
    """An optional package that a command or function needs is not installed."""


def missing(modules: Iterable[str]) -> list:
    return [m for m in modules if importlib.util.find_spec(m) is None]


def require(what: str, modules: Iterable[str]) -> None:
    """Raise MissingExtra, one line naming the packages and the extra(s) to
    install, if any of ``modules`` is not importable."""
    absent = missing(modules)
    if not absent:
        return
    dists = ", ".join(OPTIONAL.get(m, (m, None))[0] for m in absent)
    extras = sorted({OPTIONAL[m][1] for m in absent if m in OPTIONAL})
    how = " and ".join(f'pip install "lca_ext[{e}]"' for e in extras) or f"pip install {dists}"
    raise MissingExtra(f"{what} needs {dists}, which {'is' if len(absent) == 1 else 'are'} "
                       f"not installed: {how}")
