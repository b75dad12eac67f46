"""A tracked run as plain data (:class:`Run`) and the reader of a run
directory (:func:`load_run`).

This is the store's side of lca_ext: the report, the analyses and the offline
merge read runs through here and need neither the tracker nor a model.  The
tracker builds :class:`Run` objects too (``LCATracker.result()``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import numpy as np

from . import store as run_store

__all__ = ["Run", "load_run"]


@dataclass
class Run:
    """A tracked run as plain data: what ``LCATracker.result()`` and
    ``lca_ext.load_run(path)`` return.

    ``arrays`` maps "<objective>/<field>" to numpy arrays indexed by tracked
    step (and "step" to the step indices).  Objectives: "train" (the LCA set)
    and each named eval set.  Fields per tracked step:
      loss_before, loss_after  whole-set loss at θ_t and θ_{t+1}
      lca_sum                  Σ LCA over parameters (≈ loss_after − loss_before)
      error                    |lca_sum − (loss_after − loss_before)| (exact)
      grounded                 the step met every criterion of its rule (bool)
      noise_limited            refinement stopped at the passes' rounding (bool)
      budget_limited           the default rule stopped at its pass budget (bool):
                               max_passes, or what the run's pass account held
      pass_credit              the pass account's balance after the step (NaN
                               without one: RuleOptions.mean_passes, lca_ext.pass_account)
      splits                   intervals of the rule (1 = trapezoid or first order,
                               2 = Simpson, n = composite; certified: local ones)
      grad_passes              whole-set gradient passes spent on the step
      tensor_sums [T, K]       LCA per parameter tensor
      tensor_error [T, K]      the error bar of each tensor_sums value.  With
                               bars (bar_dof [T] > 0: the default and certified
                               rules, any rule given RuleOptions(bars=True)): the
                               half-width of a 95% interval for its error, from
                               randomised group samples (lca_ext.bars).  Without
                               (the total-only rules' and first order's default,
                               bars=False, one group, the low-memory mode): the
                               rule's own embedded estimate (lca_ext.quadrature),
                               an estimate, not an interval (NaN for first order
                               in the low-memory mode: none)
      tensor_bias, tensor_sd [T, K]   the bars' signed error estimate Ê and its
                               standard error √V̂ (NaN without bars; widened where
                               strata leave it fewer degrees of freedom than
                               bar_dof, lca_ext.bars.spread): sum_error()
      counts [T, K, 4]         helped / hurt / zero / nonfinite per tensor
      row_sums [T, R]          LCA per neuron (rows of dim 0), tensors concatenated
      histogram [T, K, B + 2]  LCA value counts over ``bin_edges`` (+ under/overflow)
      class_sums [T, C, K], class_counts [T, C, K, 4]   with num_classes ("train")
      class_loss_before, class_loss_after [T, C]   each class's share of the LCA
                               loss at θ_t and θ_{t+1} (summing to loss_before /
                               loss_after): :meth:`class_error` is exact
    ``state``: per-parameter arrays (lists over tensors): cum_lca, helped_steps,
    direction_changes, grad_sign_changes (oscillation counters).  ``frames``:
    raw per-element LCA of chosen tensors, ``"<k>" [F, *shape]``, with "step" [F].
    Attribute access ``run.lca_sum`` reads the "train" objective.
    """

    meta: dict
    arrays: Dict[str, np.ndarray]
    state: Dict[str, List[np.ndarray]] = field(default_factory=dict, repr=False)
    frames: Dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def names(self) -> List[str]:
        return list(self.meta["names"])

    @property
    def layer_names(self) -> List[str]:
        return list(self.meta["layer_names"])

    @property
    def layer_of(self) -> List[int]:
        return list(self.meta["layer_of"])

    @property
    def objectives(self) -> List[str]:
        return list(self.meta["objectives"])

    @property
    def bin_edges(self) -> np.ndarray:
        return np.asarray(self.meta["bin_edges"], dtype=np.float64)

    @property
    def steps(self) -> np.ndarray:
        return self.arrays.get("step", np.zeros(0, dtype=np.int64))

    def __len__(self) -> int:
        return len(self.steps)

    def get(self, name: str, objective: str = "train") -> np.ndarray:
        key = f"{objective}/{name}"
        if key not in self.arrays:
            raise KeyError(f"lca_ext: this run has no {key!r}; it has "
                           f"{sorted(self.arrays)}")
        return self.arrays[key]

    def __getattr__(self, name: str):
        arrays = self.__dict__.get("arrays", {})
        if f"train/{name}" in arrays:
            return arrays[f"train/{name}"]
        if name in self.__dict__.get("state", {}):
            return self.__dict__["state"][name]
        raise AttributeError(name)

    def __dir__(self):
        fields = [k[len("train/"):] for k in self.__dict__.get("arrays", {})
                  if k.startswith("train/")]
        return sorted(set(super().__dir__()) | set(fields)
                      | set(self.__dict__.get("state", {})))

    def sum_error(self, steps=None, objective: str = "train") -> np.ndarray:
        """[K]: the 95% half-width of the error of ``tensor_sums[steps].sum(0)``
        (steps: None for all, or an index / mask into the run's tracked steps).

        Steps with bars (``bar_dof`` > 0: the default and certified rules, any
        rule given ``bars=True``; lca_ext.bars): the
        signed estimates Ê of independent steps add, so do their variances:
        |Σ Ê| + t·√(Σ V̂), t from the Welch–Satterthwaite degrees of freedom,
        far tighter than adding the steps' bars.  Steps without bars (see
        ``tensor_error``) add their ``tensor_error``
        linearly (a bound only where each of those is).  NaN for a run
        stored without errors."""
        from . import bars
        if f"{objective}/tensor_error" not in self.arrays:   # a run stored without errors
            return np.full(len(self.names), np.nan)
        idx = np.arange(len(self)) if steps is None else np.arange(len(self))[steps]
        idx = np.atleast_1d(idx)
        err = self.get("tensor_error", objective)[idx]
        key = f"{objective}/bar_dof"
        dof = self.arrays[key][idx] if key in self.arrays else np.zeros(len(idx), np.int64)
        with_bars = dof > 0
        out = err[~with_bars].sum(0) if (~with_bars).any() else np.zeros(err.shape[1])
        if with_bars.any():
            out = out + bars.sum_error(self.get("tensor_bias", objective)[idx][with_bars],
                                       self.get("tensor_sd", objective)[idx][with_bars],
                                       dof[with_bars])
        return out

    def grounded(self, objective: str = "train") -> np.ndarray:
        """[T] bool: the step met every criterion of its rule (certified: the
        total, every tensor's estimated error and every class total within
        tolerance; total-only rules: the total).  False flags a step that reached
        max_splits or the rounding floor (``noise_limited``) without meeting
        them.  Runs written before these flags: |ΣLCA − ΔL| <= atol + rtol·|ΔL|."""
        if f"{objective}/grounded" in self.arrays:
            return self.arrays[f"{objective}/grounded"].astype(bool)
        if not len(self):
            return np.zeros(0, dtype=bool)
        cfg = self.meta["config"]
        d = self.get("loss_after", objective) - self.get("loss_before", objective)
        return self.get("error", objective) <= cfg["atol"] + cfg["rtol"] * np.abs(d)

    def class_error(self) -> np.ndarray:
        """[T, C]: each class total's exact error, |Σ_k class_sums − ΔL_c| with
        ΔL_c = class_loss_after − class_loss_before."""
        d = self.get("class_loss_after") - self.get("class_loss_before")
        return np.abs(self.get("class_sums").sum(-1) - d)

    def tensor_rel_error(self, objective: str = "train") -> np.ndarray:
        """[T, K]: tensor_error / |tensor_sums| (inf where a sum is 0)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            return self.get("tensor_error", objective) / np.abs(
                self.get("tensor_sums", objective))

    def layer_sums(self, objective: str = "train") -> np.ndarray:
        """[T, num_layers]: LCA per layer (a module's parameters together)."""
        return _layer_reduce(self.get("tensor_sums", objective), self.layer_of,
                             len(self.layer_names))

    def layer_counts(self, objective: str = "train") -> np.ndarray:
        """[T, num_layers, 4]: helped / hurt / zero / nonfinite counts per layer."""
        counts = np.moveaxis(self.get("counts", objective), -1, -2)   # [T, 4, K]
        return np.moveaxis(_layer_reduce(counts, self.layer_of, len(self.layer_names)),
                           -1, -2).astype(np.int64)

    def class_layer_sums(self) -> np.ndarray:
        """[T, num_classes, num_layers]: the per-class LCA per layer."""
        return _layer_reduce(self.get("class_sums"), self.layer_of, len(self.layer_names))


def _layer_reduce(tensor_axis_last: np.ndarray, layer_of: List[int], num_layers: int):
    out = np.zeros((*tensor_axis_last.shape[:-1], num_layers))
    for k, layer in enumerate(layer_of):
        out[..., layer] += tensor_axis_last[..., k]
    return out


def load_run(path: str) -> Run:
    """Open a run directory written by ``LCATracker(store=path)`` (complete,
    still being written, or cut off by a crash): every committed step.

    The directory is checked against its metadata: a committed step whose rows,
    per-parameter state or frames are missing or unreadable raises
    :class:`lca_ext.store.RunStoreError` naming what is missing; a run is never
    returned shorter than its commit record says."""
    meta = run_store.read_meta(path)
    return Run(meta, run_store.read_arrays(path, meta),
               run_store.read_state(path, meta) or {},
               run_store.read_frames(path, meta))
