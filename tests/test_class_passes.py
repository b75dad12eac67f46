"""Per-class passes (lca_ext.classes) and the tracker's per-class mode: every
way of splitting the set by class against a direct autograd reference, the
class gradients reused across steps, and bad targets."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.evaluate import Evaluator, classic_batch_loss
from lca_ext.lca_set import LCASet
from lca_ext.params import ParameterSet

from helpers import simpson_lca

xent = nn.functional.cross_entropy
C = 3


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2 = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, C)

    def forward(self, x):
        return self.fc2(torch.tanh(self.bn(self.fc1(x))))


def data(n=37, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=gen)
    return x, y


def mlp():
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, C)).double()


def reference_class_grads(model, x, y, batch, bn_batches=False):
    """∇ of class c's share (1/N) Σ_{i: y_i = c} loss_i by autograd on a copy;
    with BatchNorm on batch statistics, each batch's forward uses its own."""
    m = copy.deepcopy(model)
    m.train(bn_batches)
    params = [p for p in m.parameters()]
    out = []
    for c in range(C):
        total = 0
        for i in range(0, x.shape[0], batch):
            xb, yb = x[i:i + batch], y[i:i + batch]
            keep = yb == c
            if keep.any():
                total = total + xent(m(xb)[keep], yb[keep], reduction="sum")
        out.append(torch.autograd.grad(total / x.shape[0], params))
    return [torch.stack([g[k] for g in out]) for k in range(len(params))]


def evaluator(model, data, batch_loss, batchnorm="batch"):
    params = ParameterSet.from_model(model)
    return Evaluator(model, batch_loss, LCASet(data, batch_size=10), params,
                     batchnorm=batchnorm, num_classes=C), params


def masked_loss(model, batch):
    x, y = batch
    return xent(model(x), y, ignore_index=-100), (y != -100).sum()


@pytest.mark.parametrize("form", ["pair (regrouped)", "batches (per batch)",
                                  "batchnorm (per batch, coupled)", "batch_loss (masked)"])
def test_every_split_matches_autograd(form):
    torch.manual_seed(0)
    x, y = data()
    model = BNNet().double() if form.startswith("batchnorm") else mlp()
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, x.shape[0], 10)]
    if form.startswith("pair"):
        ev, params = evaluator(model, (x, y), classic_batch_loss(xent))
    elif form.startswith("batch_loss"):
        ev, params = evaluator(model, batches, masked_loss)
    else:
        ev, params = evaluator(model, batches, classic_batch_loss(xent))
    point = [p.detach().clone() for p in params.params]
    grads = [torch.zeros((C, *p.shape), dtype=p.dtype) for p in point]
    loss = ev.class_grads(point, list(range(C)), grads, 1.0)
    want = reference_class_grads(model, x, y, 10, bn_batches=form.startswith("batchnorm"))
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # the class shares add up to the plain pass's loss and gradient
    g_plain = [torch.zeros_like(p) for p in point]
    assert loss == pytest.approx(ev.loss_and_grad(point, g_plain), rel=1e-12)
    for g, gp in zip(grads, g_plain):
        torch.testing.assert_close(g.sum(0), gp, rtol=1e-10, atol=1e-12)


def test_a_subset_of_classes_fills_its_slots_only():
    torch.manual_seed(1)
    x, y = data()
    model = mlp()
    ev, params = evaluator(model, (x, y), classic_batch_loss(xent))
    point = [p.detach().clone() for p in params.params]
    grads = [torch.zeros((2, *p.shape), dtype=p.dtype) for p in point]
    ev.class_grads(point, [2, 0], grads, 0.5)
    want = reference_class_grads(model, x, y, 10)
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, 0.5 * w[[2, 0]], rtol=1e-10, atol=1e-12)


def track(budget, method="adaptive", steps=4, lr=0.1):
    torch.manual_seed(2)
    model = mlp()
    x, y = data(60, seed=3)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=16, num_classes=C,
                                 class_memory_budget=budget, method=method)
    gen = torch.Generator().manual_seed(4)
    for _ in range(steps):
        idx = torch.randint(0, 60, (12,), generator=gen)
        opt.zero_grad()
        xent(model(x[idx]), y[idx]).backward()
        with tracker.step():
            opt.step()
    return tracker


@pytest.mark.parametrize("lr", [0.5, 1.0], ids=["trapezoid+simpson", "composite"])
def test_per_class_mode_spends_only_the_rule_s_passes_and_matches_recomputing(lr):
    one_class = sum(p.numel() * 8 for p in mlp().parameters())
    mode = track(2 << 30, lr=lr, steps=6)                     # per-class mode
    # just too small for per-class mode: class gradients recomputed at the points
    recompute = track(3 * C * one_class - 1, lr=lr, steps=6)
    assert mode.objectives[0].classes and not recompute.objectives[0].classes
    a, b = mode.result(), recompute.result()
    # the same steps, the same rule
    np.testing.assert_array_equal(a.splits, b.splits)
    np.testing.assert_array_equal(a.grad_passes, b.grad_passes - (b.splits + 1))
    if lr == 0.5:
        assert (a.splits == 1).any() and (a.splits == 2).any()
        # per-class mode: class passes only, the start reused: one per point
        # of the rule past θ_t (trapezoid 1, Simpson 2), the first start once more
        want = np.where(a.splits == 1, 1, 2) + (np.arange(len(a)) == 0)
        np.testing.assert_array_equal(a.grad_passes, want)
    else:
        assert (a.splits >= 4).any()
    scale = np.abs(b.class_sums).max()
    np.testing.assert_allclose(a.class_sums, b.class_sums, rtol=0, atol=1e-11 * scale)
    np.testing.assert_allclose(a.tensor_sums, b.tensor_sums, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(a.class_sums.sum(1), a.tensor_sums, rtol=1e-10, atol=1e-14)


def test_per_class_mode_trapezoid_step_matches_the_end_point_reference():
    """A trapezoid step's class LCA is Δθ·(g_c(θ_t) + g_c(θ_t+1))/2, g_c by autograd."""
    torch.manual_seed(5)
    model = mlp()
    x, y = data(40, seed=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=40, num_classes=C,
                                 method="adaptive")
    before = copy.deepcopy(model)
    opt.zero_grad()
    xent(model(x[:10]), y[:10]).backward()
    with tracker.step():
        opt.step()
    run = tracker.result()
    assert run.splits[0] == 1
    g0 = reference_class_grads(before, x, y, 40)
    g1 = reference_class_grads(model, x, y, 40)
    for c in range(C):
        want = [float(((p1 - p0) * (a[c] + b[c]) / 2).sum().detach()) for p0, p1, a, b in
                zip(before.parameters(), model.parameters(), g0, g1)]
        np.testing.assert_allclose(run.class_sums[0, c], want, rtol=1e-9, atol=1e-14)


@pytest.mark.parametrize("method", ["simpson", "first_order"])
def test_per_class_mode_other_rules_add_up(method):
    run = track(2 << 30, method=method, steps=3).result()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-10,
                               atol=1e-14)


@pytest.mark.parametrize("form", ["pair", "batches"])
def test_targets_outside_the_classes_are_refused(form):
    x, y = data()
    y = y.clone()
    y[5] = C                                   # one target past num_classes
    model = mlp()
    batches = [(x[i:i + 10], y[i:i + 10]) for i in range(0, x.shape[0], 10)]
    ev, params = evaluator(model, (x, y) if form == "pair" else batches,
                           classic_batch_loss(lambda out, t: xent(out, t.clamp(max=C - 1))))
    point = [p.detach().clone() for p in params.params]
    grads = [torch.zeros((C, *p.shape), dtype=p.dtype) for p in point]
    with pytest.raises(ValueError, match=r"0\.\.2 \(num_classes=3\)"):
        ev.class_grads(point, list(range(C)), grads, 1.0)


def test_masked_class_with_no_loss_term_in_a_batch_is_skipped():
    """A causal-LM-like batch_loss (targets shifted: the first position is never
    a loss term): a class present only at position 0 of a batch has weight 0
    there, and is skipped, not a 0/0 NaN."""
    torch.manual_seed(3)
    emb = nn.Sequential(nn.Embedding(C, 4), nn.Linear(4, C)).double()
    tokens = torch.tensor([[2, 0, 1, 0], [0, 1, 1, 0], [1, 0, 0, 1]])   # class 2: only at [0, 0]

    def shifted(model, batch):
        logits = model(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = xent(logits.reshape(-1, C), labels.reshape(-1), ignore_index=-100)
        return loss, (labels != -100).sum()

    batches = [{"input_ids": tokens[i:i + 1], "labels": tokens[i:i + 1]} for i in range(3)]
    ev, params = evaluator(emb, batches, shifted)
    point = [p.detach().clone() for p in params.params]
    grads = [torch.zeros((C, *p.shape), dtype=p.dtype) for p in point]
    loss = ev.class_grads(point, list(range(C)), grads, 1.0)
    assert all(torch.isfinite(g).all() for g in grads)
    assert all((g[2] == 0).all() for g in grads)         # no loss term of class 2
    g_plain = [torch.zeros_like(p) for p in point]
    assert loss == pytest.approx(ev.loss_and_grad(point, g_plain), rel=1e-12)
    for g, gp in zip(grads, g_plain):
        torch.testing.assert_close(g.sum(0), gp, rtol=1e-10, atol=1e-12)


def test_tracked_steps_with_a_zero_weight_class_part_after_the_last_unit():
    """The same masked split in the tracker's mixed pass (each unit at its own
    point): a zero-weight part after the last unit (class 2 only at the first
    position of the last row) is dropped, not given a point of its own (it
    raised "more batches now" before); the class shares add up to the tensors."""
    torch.manual_seed(3)
    emb = nn.Sequential(nn.Embedding(C, 4), nn.Linear(4, C)).double()
    rows = [[0, 1, 1, 0], [1, 0, 0, 1], [0, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 1],
            [1, 0, 1, 0], [0, 1, 1, 1], [2, 0, 1, 0]]
    tokens = torch.tensor(rows)

    def shifted(model, batch):
        logits = model(batch["input_ids"])[:, :-1]
        labels = batch["labels"][:, 1:]
        loss = xent(logits.reshape(-1, C), labels.reshape(-1), ignore_index=-100)
        return loss, (labels != -100).sum()

    batches = [{"input_ids": tokens[i:i + 1], "labels": tokens[i:i + 1]} for i in range(8)]
    tracker = lca_ext.LCATracker(emb, lca_data=batches, batch_loss=shifted, num_classes=C)
    opt = torch.optim.SGD(emb.parameters(), lr=0.5)
    for t in range(3):
        opt.zero_grad()
        shifted(emb, batches[t])[0].backward()
        with tracker.step():
            opt.step()
    run = tracker.result()
    assert len(tracker.objectives[0].evaluator.class_unit_slots) == 15
    # every step ends at the two-pass stage, whose spread pools within each class
    # and about the units' trapezoid errors (lca_ext.bars.spread): 15 units of
    # classes 0 and 1, 15 - 2 - 1 degrees of freedom
    assert (run.grad_passes[1:] == 2).all() and (run.bar_dof == 12).all()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-9, atol=1e-13)


def test_a_rank_without_examples_contributes_nothing():
    """Under DDP a rank may hold no example of a small set: its class pass (like
    its plain pass) adds nothing, rather than failing on an empty set."""
    x, y = torch.randn(1, 5, dtype=torch.float64), torch.tensor([1])
    model = mlp()
    ev, params = evaluator(model, (x, y), classic_batch_loss(xent))
    ev.data = LCASet((x, y), batch_size=4, rank=1, world=2)   # rank 1 of 2: empty
    ev.count = 1.0                                             # the all-reduced weight
    point = [p.detach().clone() for p in params.params]
    grads = [torch.zeros((C, *p.shape), dtype=p.dtype) for p in point]
    from lca_ext import classes
    total, wsum = classes.class_pass(ev, point, range(C), grads, 1.0)
    assert float(total.sum()) == 0 and float(wsum) == 0
    assert all((g == 0).all() for g in grads)


def test_a_loss_that_is_not_a_sum_of_per_example_terms_is_refused():
    """A class-weighted cross-entropy is not a mean of per-example terms: its class
    shares do not add up to the loss. Refused (both modes) with what to do, not
    reported as class sums that silently miss the total: when the tracker is
    built (its first batch against its halves), and, where that check cannot
    see it (batches whose halves weigh alike), at the first class pass."""
    weighted_sets = lca_ext.LCATracker
    with pytest.raises(ValueError, match="mean of per-example terms"):
        torch.manual_seed(0)
        x, y = data(40)
        weighted_sets(mlp(), lambda out, t: xent(out, t, weight=torch.tensor(
            [1.0, 3.0, 0.5], dtype=out.dtype)), (x, y), batch_size=16, num_classes=C)
    weighted = lambda out, t: xent(out, t, weight=torch.tensor([1.0, 3.0, 0.5],  # noqa: E731
                                                               dtype=out.dtype))
    for budget in (2 << 30, 1):
        torch.manual_seed(0)
        model = mlp()
        x, y = data(40)
        # (as batch_loss, which the construction check does not read)
        tracker = lca_ext.LCATracker(
            model, lca_data=[(x[i:i + 16], y[i:i + 16]) for i in range(0, 40, 16)],
            batch_loss=lambda m, b: (weighted(m(b[0]), b[1]), (b[1] != -100).sum()),
            num_classes=C, class_memory_budget=budget)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        opt.zero_grad()
        weighted(model(x[:8]), y[:8]).backward()
        with pytest.raises(ValueError, match="per-class LCA: the .* adds up to"):
            with tracker.step():
                opt.step()


def test_bfloat16_parameters_in_per_class_mode_match_recomputing():
    """Class-pure batches round a bf16 loss differently from mixed ones: within the
    split check's 16-bit tolerance, and the two modes agree."""
    def run(budget):
        torch.manual_seed(2)
        model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, C)).bfloat16()
        gen = torch.Generator().manual_seed(3)
        x = torch.randn(70, 5, generator=gen).bfloat16()
        y = torch.randint(0, C, (70,), generator=gen)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=16, num_classes=C,
                                     class_memory_budget=budget)
        for i in range(2):
            opt.zero_grad()
            xent(model(x[i * 12:(i + 1) * 12]), y[i * 12:(i + 1) * 12]).backward()
            with tracker.step():
                opt.step()
        return tracker
    mode, recompute = run(2 << 30), run(1)
    assert mode.objectives[0].classes and not recompute.objectives[0].classes
    a, b = mode.result(), recompute.result()
    np.testing.assert_allclose(a.class_sums.sum(1), a.tensor_sums, rtol=1e-5, atol=1e-9)
    scale = np.abs(b.class_sums).max()
    np.testing.assert_allclose(a.class_sums, b.class_sums, rtol=0, atol=2e-2 * scale)


@pytest.mark.parametrize("form", ["pair", "batches"])
def test_a_full_graph_network_keeps_its_batch_whole(form):
    """A graph network over the whole LCA set (a fixed N x N adjacency: nodes
    interact) failed inside its forward with a shape error: per-class LCA
    regrouped its nodes into class-pure batches (and the default cut the set
    into groups for the bars).  Now the interaction is detected when the
    tracker is built, the set stays whole, per-class passes run the whole
    graph once per batch, and the class LCA adds up to the total, which
    matches the same tracker without classes.  As a list of batches (one batch,
    the whole graph) the first batch is checked the same way (it failed in the
    model's forward too: per-batch class passes ran each class's nodes alone)."""
    torch.manual_seed(0)
    n = 120
    adj = (torch.rand(n, n) < 0.05).float()
    adj = adj + adj.T + torch.eye(n)
    adj = adj / adj.sum(1, keepdim=True)

    class GCN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.l2 = torch.nn.Linear(6, 16), torch.nn.Linear(16, C)
            self.register_buffer("adj", adj)

        def forward(self, x):
            return self.adj @ self.l2(torch.tanh(self.adj @ self.l1(x)))

    x, y = torch.randn(n, 6), torch.randint(0, C, (n,))
    model = GCN()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    lca_data = (x, y) if form == "pair" else [(x, y)]
    per_class = lca_ext.LCATracker(model, xent, lca_data, num_classes=C)
    plain = lca_ext.LCATracker(model, xent, lca_data)
    assert per_class.objectives[0].evaluator.examples_interact
    for _ in range(2):
        opt.zero_grad()
        xent(model(x), y).backward()
        with per_class.step(), plain.step():
            opt.step()
    a, b = per_class.result(), plain.result()
    assert a.grounded().all() and b.grounded().all()
    np.testing.assert_allclose(a.class_sums.sum(1), a.tensor_sums, rtol=1e-6, atol=1e-10)
    # (each within its rule's estimate: no groups, so the estimate is the bar)
    assert (np.abs(a.tensor_sums - b.tensor_sums)
            <= a.tensor_error + b.tensor_error + 1e-9).all()
    np.testing.assert_allclose(a.class_error(), 0, atol=1e-4)
    assert (b.bar_dof == 0).all()            # no independent groups: documented


def supcon(z, y, tau=0.5):
    """A supervised contrastive loss (a loss over pairs of a batch's examples):
    each anchor with a label >= 0 and at least one positive scores its
    positives against every other example of the batch.  Returns (mean over
    those anchors, their number): other classes' targets set to -100 change no
    anchor's term, so the classes' shares add up to the batch's loss."""
    z = nn.functional.normalize(z, dim=1)
    n = y.shape[0]
    eye = torch.eye(n, dtype=torch.bool)
    sim = (z @ z.T / tau).masked_fill(eye, float("-inf"))
    logprob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    pos = (y[:, None] == y[None, :]) & ~eye & (y[:, None] >= 0)
    anchors = pos.any(1)
    per_anchor = -(logprob.masked_fill(~pos, 0.0).sum(1) / pos.sum(1).clamp(min=1))
    count = anchors.sum()
    return per_anchor[anchors].sum() / count.clamp(min=1), count


def _contrastive_reference(model, theta_t, theta_next, batches, intervals=64):
    """[C, K] per-class, per-tensor LCA of the contrastive loss by composite
    Simpson on float64 autograd (class c's share: its anchors' terms over the
    set's anchor count, every batch whole)."""
    m0 = copy.deepcopy(model).double()          # (the anchor count needs labels only)
    weight = sum(float(supcon(m0(x.double()), y)[1]) for x, y in batches)

    def shares(m):
        out = []
        for c in range(C):
            total = 0.0
            for x, y in batches:
                loss, cnt = supcon(m(x.double()), torch.where(y == c, y, -100))
                total = total + loss * cnt
            out.append(total / weight)
        return out
    return simpson_lca(model, theta_t, theta_next, shares, intervals)[0]


def test_a_contrastive_loss_is_refused_as_loss_fn_and_works_per_class_as_batch_loss():
    """A loss over pairs of a batch's examples is not a mean of per-example
    terms: as loss_fn it is refused when the tracker is built, naming
    contrastive losses and batch_loss.  As batch_loss (mean, anchor count) with
    num_classes, per-class LCA keeps every batch whole (other classes' targets
    masked, never regrouped) and each class's LCA per tensor matches a float64
    reference of its share of the loss."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 12), nn.Tanh(), nn.Linear(12, 4))
    x, y = data(48)
    x = x.float()
    with pytest.raises(ValueError, match=r"not a mean of per-example terms.*pairs.*"
                                         r"batch_loss"):
        lca_ext.LCATracker(model, lambda out, t: supcon(out, t)[0], (x, y))
    batches = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 48, 16)]
    tracker = lca_ext.LCATracker(model, lca_data=batches, num_classes=C,
                                 batch_loss=lambda m, b: supcon(m(b[0]), b[1]))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    theta = [[p.detach().double().clone() for p in model.parameters()]]
    for t in range(2):
        opt.zero_grad()
        supcon(model(x[t::2]), y[t::2])[0].backward()
        with tracker.step():
            opt.step()
        theta.append([p.detach().double().clone() for p in model.parameters()])
    run = tracker.result()
    assert run.grounded().all()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-6, atol=1e-10)
    for t in range(2):
        ref = _contrastive_reference(model, theta[t], theta[t + 1], batches)
        scale = np.abs(ref).sum()
        np.testing.assert_allclose(run.class_sums[t], ref, rtol=0, atol=2e-3 * scale)
        np.testing.assert_allclose(run.tensor_sums[t], ref.sum(0), rtol=0,
                                   atol=2e-3 * scale)
