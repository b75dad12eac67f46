"""The rule lab: record reference steps once, replay any rule over them in seconds.

A rule (lca_ext.quadrature, lca_ext.uniform_rules) is a function of a *path*
(lca_ext.path: the loss and per-tensor samples at a fraction f of the step, and
linear combinations of gradient buffers).  Here a step is recorded once, in
float64 and independent of lca_ext's evaluator, as dense samples on a uniform
grid of ``grid + 1`` points: per point, per *group* of LCA-set examples
(examples i ≡ g mod ``groups`` within each LCA batch, selected by masking the
other targets, so BatchNorm still sees the whole batch) and per tensor,

    phi[s, g, k] = Δθ_k · ∇_k (group g's share of the set's mean loss) at f = s/grid

and the groups' shares of the loss, ``loss[s, g]``.  Groups add up to the
whole set.  :class:`RecordedPath` serves those samples through the path
interface, so ``lca_ext.rules.RULES[m](RecordedPath(step), opts)`` runs the
real rule code; :func:`replay` scores it against the dense grid's composite
Simpson (the truth, up to ``Recorded.convergence``): passes, per-tensor error
over the tensors carrying >= 1% of a step, and how often ``tensor_error`` covers.

    python benchmarks/rule_lab.py record mlp cnn_bn vit gpt2   # ~minutes, once
    LAB_STEPS=0-29 python benchmarks/rule_lab.py extend cnn_bn # add the steps missing
    python benchmarks/rule_lab.py replay                       # seconds

``record`` takes LAB_STEPS (default: the 8 steps below, which over-weight the
curved first ones); ``extend`` records the LAB_STEPS a recording lacks and
merges them in, so a family can hold every step of its first 30, whose
from-step-5 figures are then a percentile over 25 steps instead of 4.

Recordings go to benchmarks/results/lab/<family>.npz (not in git: rerun
``record``).  benchmarks/test_bench_rule_lab.py drives both for the benchmark.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
import fidelity  # noqa: E402  (the families and the float64 model copy)

LAB_DIR = os.path.join(os.path.dirname(__file__), "results", "lab")
LAB_STEPS = (0, 1, 2, 3, 5, 9, 17, 25)
GRID, GROUPS = 64, 8


@dataclasses.dataclass
class Recorded:
    """One recorded step: dense per-group samples of the path."""
    family: str
    step: int
    phi: np.ndarray            # [S, G, K] float64
    loss: np.ndarray           # [S, G] each group's share of the mean loss
    names: List[str]

    @property
    def grid(self) -> int:
        return self.phi.shape[0] - 1

    def truth(self) -> np.ndarray:
        """[K] per-tensor sums by composite Simpson on the whole grid."""
        return np.tensordot(fidelity.simpson_weights(self.grid), self.phi.sum(1), axes=(0, 0))

    @property
    def convergence(self) -> float:
        """max relative difference grid vs grid/2 over the >= 1% tensors."""
        full, half = self.truth(), fidelity.simpson_level(self.phi.sum(1), self.grid // 2)
        sig = fidelity.significant(full)
        return float((np.abs(full - half) / np.abs(full))[sig].max())


def record(family: fidelity.Family, steps: Sequence[int] = LAB_STEPS, grid: int = GRID,
           groups: int = GROUPS) -> List[Recorded]:
    """Train ``family`` (float32, as fidelity.measure does) and record ``steps``."""
    model = family.make_model()
    opt, sched = family.make_optimizer(model, max(steps) + 1)
    out = []
    batches = family.train_batches(max(steps) + 1)
    for t in range(max(steps) + 1):
        batch = next(batches)
        opt.zero_grad()
        loss, _ = family.batch_loss(model, batch)
        loss.backward()
        before = [p.detach().clone() for _, p in fidelity.trainable(model)]
        opt.step()
        if sched is not None:
            sched.step()
        if t in steps:
            after = [p.detach().clone() for _, p in fidelity.trainable(model)]
            out.append(_record_step(family, model, before, after, t, grid, groups))
    return out


def _record_step(family, model, before, after, step, grid, groups) -> Recorded:
    m = fidelity._float64_copy(model)
    named = fidelity.trainable(m)
    params = [p for _, p in named]
    a = [t.double() for t in before]
    d = [t1.double() - t0 for t1, t0 in zip(after, a)]
    batches = [fidelity._float64(b) for b in family.lca_batches()]
    K = len(params)
    phi = np.zeros((grid + 1, groups, K))
    loss = np.zeros((grid + 1, groups))
    weight = 0.0
    for s in range(grid + 1):
        with torch.no_grad():
            for p, a_k, d_k in zip(params, a, d):
                p.copy_(a_k + (s / grid) * d_k)
        for x, y in batches:
            rows = torch.arange(y.shape[0])
            for g in range(groups):
                keep = (rows % groups == g).reshape(-1, *([1] * (y.dim() - 1)))
                yg = torch.where(keep, y, torch.full_like(y, fidelity.IGNORE))
                mean, w = family.batch_loss(m, (x, yg))
                w = float(w)
                if w == 0:
                    continue
                total = mean * w
                grads = torch.autograd.grad(total, params, allow_unused=True)
                loss[s, g] += float(total.detach())
                phi[s, g] += [0.0 if gk is None else float((gk * d_k).sum())
                              for gk, d_k in zip(grads, d)]
                if s == 0:
                    weight += w
    return Recorded(family.name, step, phi / weight, loss / weight,
                    [n for n, _ in named])


def save(recs: List[Recorded], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez_compressed(path, steps=[r.step for r in recs], names=np.array(recs[0].names),
                        family=recs[0].family, **{f"phi{i}": r.phi for i, r in enumerate(recs)},
                        **{f"loss{i}": r.loss for i, r in enumerate(recs)})


def load(path: str) -> List[Recorded]:
    z = np.load(path)
    names = [str(n) for n in z["names"]]
    return [Recorded(str(z["family"]), int(s), z[f"phi{i}"], z[f"loss{i}"], names)
            for i, s in enumerate(z["steps"])]


# -- the path interface over a recording ------------------------------------------------

class RecordedPath:
    """lca_ext.path.StepPath's interface over a Recorded step.  A buffer is a
    dict {f: weight} (a linear combination of the points' gradients); a point
    must lie on the recorded grid.  ``unit_roundoff`` sets the noise floor the
    rules see (float64 samples: 2^-53)."""

    def __init__(self, rec: Recorded, unit_roundoff: float = 2.0 ** -53,
                 known_start: bool = False):
        self.rec = rec
        # the groups' gradients at θ_t held (the tracker's steps after the first
        # while 2·G buffers fit path_memory_budget): the two-pass stage
        self.group_start_known = known_start
        self.name, self.step = rec.family, rec.step
        self.g_start = {0.0: 1.0}
        self.loss_start = float(rec.loss[0].sum())
        self.class_loss_start = None
        self.num_classes = 0
        self.one_buffer = 1
        self.passes = 0
        self._u = unit_roundoff
        self.last_class_losses = None
        self.groups = rec.phi.shape[1]

    def _index(self, f: float) -> int:
        s = f * self.rec.grid
        if abs(s - round(s)) > 1e-9:
            raise ValueError(f"RecordedPath: f={f} is not on the recorded grid of "
                             f"{self.rec.grid} intervals")
        return int(round(s))

    def buffer(self):
        return {}

    def release(self, buf) -> None:
        pass

    def accumulate(self, dst, src, weight: float) -> None:
        for f, w in src.items():
            dst[f] = dst.get(f, 0.0) + weight * w

    def scale(self, buf, factor: float) -> None:
        for f in buf:
            buf[f] *= factor

    def zero(self, buf) -> None:
        buf.clear()

    def grad(self, f: float, out, weight: float = 1.0, at=None) -> float:
        s = self._index(f)
        if out is not None:
            out[f] = out.get(f, 0.0) + weight
            self.passes += 1
        return float(self.rec.loss[s].sum())

    def dots(self, buf) -> np.ndarray:
        return self._buffer_groups(buf).sum(0, keepdims=True)

    def _buffer_groups(self, buf) -> np.ndarray:
        """[G, K] the groups' samples of a buffer (a key f: the whole set's
        gradient at f; a key ("g", g, f): group g's alone)."""
        out = np.zeros(self.rec.phi.shape[1:])
        for f, w in buf.items():
            if isinstance(f, tuple):
                _, g, at = f
                out[g] += w * self._at(g, at)
            else:
                out += w * self.rec.phi[self._index(f)]
        return out

    def _at(self, g: int, u: float) -> np.ndarray:
        """Group g's samples at u (between grid points: linear interpolation,
        which the grid's spacing makes a small smoothing of any jump)."""
        S = self.rec.grid
        x = u * S
        i = min(int(x), S - 1)
        w = x - i
        return (1 - w) * self.rec.phi[i, g] + w * self.rec.phi[i + 1, g]

    def group_dots(self, f: float) -> np.ndarray:
        """[G, K] the groups' samples at a grid point."""
        return self.rec.phi[self._index(f)].copy()

    def group_losses(self, f: float) -> Optional[np.ndarray]:
        """[G] the groups' shares of the loss at θ_t (where held) or θ_{t+1}."""
        if f == 1.0 or (f == 0.0 and self.group_start_known):
            return self.rec.loss[self._index(f)].copy()
        return None

    def mixed(self, points: np.ndarray, out=None, weights=None) -> np.ndarray:
        """Group g at points[g]; ``out``: a buffer the pass's gradient is added
        to, group g's x weights[g]."""
        self.passes += 1
        for g, u in enumerate(points):
            if out is not None:
                key = ("g", g, float(u))
                out[key] = out.get(key, 0.0) + (1.0 if weights is None else float(weights[g]))
        return np.stack([self._at(g, float(u)) for g, u in enumerate(points)])

    def group_correction(self, out, points: np.ndarray, weights: np.ndarray) -> None:
        for g, (u, w) in enumerate(zip(points, weights)):
            for key, c in ((("g", g, 0.0), 0.5 - w * (1.0 - u)), (("g", g, 1.0), 0.5 - w * u)):
                out[key] = out.get(key, 0.0) + float(c)

    def class_loss(self):
        return None

    def unit_roundoff(self) -> float:
        return self._u

    def close(self) -> None:
        pass


@dataclasses.dataclass
class Score:
    family: str
    rule: str
    steps: int
    passes: float                 # mean passes a step (the end point's included)
    max_passes: int
    rel_p50: float                # per-tensor |error| / |truth|, >= 1% tensors
    rel_p95: float
    rel_max: float
    coverage: float               # share of those pairs with tensor_error >= |error|
    bar_p50: float                # median tensor_error / |truth|
    worst_convergence: float      # the recordings' own uncertainty (max over steps)
    sum_rel_p95: float = float("nan")   # sums over the steps, per tensor (>= 1%)
    sum_coverage: float = float("nan")  # share of those sums whose sum_error holds
    sum_bar_p50: float = float("nan")   # median sum_error / |summed truth|


def replay(rule, opts, recs: Sequence[Recorded], label: str = "",
           since: int = 0, seeds: int = 1, known_start: bool = True) -> Score:
    """Run ``rule(path, opts)`` on every recorded step (step >= since), with
    ``seeds`` different seeds of the bars' random points, and score it.
    ``known_start``: the groups' gradients at θ_t are held, as the tracker
    holds them from its second step on (False: as at a run's first step, or
    past path_memory_budget)."""
    from lca_ext import bars as lca_bars
    rels, cover, bar_rel, passes = [], [], [], []
    conv = 0.0
    per_seed = {}                 # seed -> [(value, truth, bar, bias, sd, dof)] over steps
    for rec, seed in [(r, s) for r in recs for s in range(seeds)]:
        if rec.step < since:
            continue
        path = RecordedPath(rec, known_start=known_start)
        res = rule(path, dataclasses.replace(opts, seed=seed))
        sums = path.dots(res.avg)[0]
        truth = rec.truth()
        sig = fidelity.significant(truth)
        err = np.abs(sums - truth)
        rels += list((err / np.abs(truth))[sig])
        cover += list((np.asarray(res.tensor_error) >= err)[sig])
        bar_rel += list((np.asarray(res.tensor_error) / np.abs(truth))[sig])
        passes.append(path.passes)
        conv = max(conv, rec.convergence)
        per_seed.setdefault(seed, []).append((sums, truth, res))
    s_rel, s_cov, s_bar = [], [], []
    for rows in per_seed.values():
        value = sum(r[0] for r in rows)
        truth = sum(r[1] for r in rows)
        results = [r[2] for r in rows]
        if all(r.bar_dof > 0 for r in results):
            bar = lca_bars.sum_error(np.array([r.tensor_bias for r in results]),
                                     np.array([r.tensor_sd for r in results]),
                                     np.array([r.bar_dof for r in results]))
        else:
            bar = np.sum([r.tensor_error for r in results], 0)
        sig = fidelity.significant(truth)
        err = np.abs(value - truth)
        s_rel += list((err / np.abs(truth))[sig])
        s_cov += list((bar >= err)[sig])
        s_bar += list((bar / np.abs(truth))[sig])
    rels = np.array(rels)
    return Score(recs[0].family, label, len(passes), float(np.mean(passes)), int(max(passes)),
                 float(np.percentile(rels, 50)), float(np.percentile(rels, 95)),
                 float(rels.max()), float(np.mean(cover)), float(np.median(bar_rel)), conv,
                 float(np.percentile(s_rel, 95)), float(np.mean(s_cov)),
                 float(np.median(s_bar)))


def oracle(recs: Sequence[Recorded], tol: float = 0.01) -> np.ndarray:
    """Per recorded step, the passes of the cheapest uniform composite-Simpson
    level that gets every tensor carrying >= 1% of the step within ``tol`` of
    the truth (fidelity.oracle_passes on the recorded grid: level n, n passes)."""
    out = []
    for rec in recs:
        truth, whole = rec.truth(), rec.phi.sum(1)
        sig = fidelity.significant(truth)
        n = 2
        while n < rec.grid and not (np.abs(fidelity.simpson_level(whole, n) - truth)[sig]
                                    <= tol * np.abs(truth)[sig]).all():
            n *= 2
        out.append(n)
    return np.asarray(out)


def parse_steps(text: str) -> tuple:
    """LAB_STEPS: "0,2,5,17" or ranges "0-29" (inclusive), comma-separated."""
    out = []
    for part in (p.strip() for p in text.split(",")):
        if "-" in part:
            lo, hi = part.split("-")
            out += range(int(lo), int(hi) + 1)
        elif part:
            out.append(int(part))
    return tuple(sorted(set(out)))


def extend(name: str, steps: Sequence[int], grid: Optional[int] = None) -> List[Recorded]:
    """Record the ``steps`` that benchmarks/results/lab/<name>.npz lacks (the
    family retrained from its seed: the same trajectory) and merge them in, on
    the recording's own grid (``grid``: only for a family not yet recorded)."""
    path = os.path.join(LAB_DIR, f"{name}.npz")
    held = load(path) if os.path.exists(path) else []
    if held and grid is not None and held[0].grid != grid:
        raise ValueError(f"{path} is on a grid of {held[0].grid}; LAB_GRID={grid}")
    grid = held[0].grid if held else (grid or GRID)
    missing = sorted(set(steps) - {r.step for r in held})
    if missing:
        held += record(fidelity.FAMILIES[name](), steps=missing, grid=grid)
        held.sort(key=lambda r: r.step)
        save(held, path)
    return held


def _main(argv):
    import lca_ext
    from lca_ext.rules import RULES
    if argv and argv[0] == "extend":
        grid = int(os.environ["LAB_GRID"]) if "LAB_GRID" in os.environ else None
        steps = parse_steps(os.environ.get("LAB_STEPS", "0-29"))
        for name in argv[1:]:
            recs = extend(name, steps, grid)
            print(name, "holds", [r.step for r in recs], flush=True)
        return
    if argv and argv[0] == "record":
        # LAB_GRID, LAB_STEPS (e.g. "0,2,5,17") shorten a slow family's recording
        grid = int(os.environ.get("LAB_GRID", GRID))
        steps = parse_steps(os.environ.get("LAB_STEPS", "")) or LAB_STEPS
        for name in argv[1:]:
            try:
                recs = record(fidelity.FAMILIES[name](), steps=steps, grid=grid)
            except fidelity.FamilyUnavailable as e:
                print(f"{name}: skipped ({e})")
                continue
            save(recs, os.path.join(LAB_DIR, f"{name}.npz"))
            print(name, "recorded", [r.step for r in recs],
                  "convergence", max(r.convergence for r in recs))
        return
    rows = []
    for fn in sorted(os.listdir(LAB_DIR)):
        recs = load(os.path.join(LAB_DIR, fn))
        for method in ("budget", "certified", "adaptive"):
            opts = lca_ext.RuleOptions(method=method)
            rows.append(replay(RULES[method], opts, recs, method,
                               seeds=20 if method == "budget" else 1))
    for r in rows:
        print(r)


if __name__ == "__main__":
    _main(sys.argv[1:])
