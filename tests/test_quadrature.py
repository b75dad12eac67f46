"""The adaptive path integral (lca_ext.quadrature): the trapezoid first, then
Simpson, then composite Simpson, each stopping at the right stage with the right
number of gradient passes; checked against direct computations."""
import numpy as np
import pytest
import torch
from torch import nn

import lca_ext


class Poly(nn.Module):
    """One weight vector; the loss is a polynomial (or not) in it."""

    def __init__(self, kind):
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(4, dtype=torch.float64) * 0.3)
        self.kind = kind

    def forward(self, x):
        z = x @ self.w
        return {"quadratic": z, "cubic": z ** 3 / 3, "smooth": torch.sin(3 * z)}[self.kind]


def loss_fn(out, y):
    return ((out - y) ** 2).mean() if out.dim() and y is not None else out.mean()


def data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g, dtype=torch.float64)
    return x, x[:, 0] * 0.5


def run_steps(kind, lr, steps=3, rtol=1e-9, method="adaptive", **kw):
    model = Poly(kind)
    x, y = data()
    lf = (lambda o, t: ((o - t) ** 2).mean()) if kind == "quadratic" else \
        (lambda o, t: o.mean())
    tracker = lca_ext.LCATracker(model, lf, (x, y), batch_size=16, atol=0, rtol=rtol,
                                 oscillation=False, method=method, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    path = []
    for i in range(steps):
        opt.zero_grad()
        lf(model(x[i::3]), y[i::3]).backward()
        before = model.w.detach().clone()
        with tracker.step():
            opt.step()
        path.append((before, model.w.detach().clone()))
    return tracker.result(), path, model, lf, (x, y)


def grad_at(model, lf, xy, w):
    m = Poly(model.kind)
    with torch.no_grad():
        m.w.copy_(w)
    x, y = xy
    loss = lf(m(x), y)
    (g,) = torch.autograd.grad(loss, [m.w])
    return g


def test_quadratic_loss_needs_only_the_trapezoid():
    run, path, model, lf, xy = run_steps("quadratic", lr=0.3)
    assert run.splits.tolist() == [1, 1, 1]
    assert run.grad_passes.tolist() == [2, 1, 1]      # start + end, then end only
    for t, (w0, w1) in enumerate(path):
        want = float(((w1 - w0) * (grad_at(model, lf, xy, w0) + grad_at(model, lf, xy, w1)) / 2
                      ).sum())
        assert run.tensor_sums[t, 0] == pytest.approx(want, rel=1e-12)
        assert run.error[t] <= 1e-9 * abs(run.loss_after[t] - run.loss_before[t]) + 1e-15


def test_cubic_path_needs_the_midpoint():
    run, path, model, lf, xy = run_steps("cubic", lr=0.5)
    assert run.splits.tolist() == [2, 2, 2]
    assert run.grad_passes.tolist() == [3, 2, 2]      # (start,) end, midpoint
    for t, (w0, w1) in enumerate(path):
        g = [grad_at(model, lf, xy, w0 + (w1 - w0) * f) for f in (0.0, 0.5, 1.0)]
        want = float(((w1 - w0) * (g[0] + 4 * g[1] + g[2]) / 6).sum())
        assert run.tensor_sums[t, 0] == pytest.approx(want, rel=1e-10)


def test_a_curved_step_goes_on_to_composite_simpson_like_plain_simpson():
    adaptive, _, _, _, _ = run_steps("smooth", lr=0.6, steps=2, max_splits=64, rtol=1e-4)
    simpson, _, _, _, _ = run_steps("smooth", lr=0.6, steps=2, max_splits=64, rtol=1e-4,
                                    method="simpson")
    assert (adaptive.splits > 2).all()
    assert adaptive.splits.tolist() == simpson.splits.tolist()
    # composite: end, midpoint, g_0 once more, then the new midpoints; the
    # refined step lends g_1's buffer to its points: the next one recomputes g_0
    n = adaptive.splits
    assert adaptive.grad_passes[0] == 1 + 1 + 1 + 1 + (n[0] - 2)
    assert adaptive.grad_passes[1] == 1 + 1 + 1 + 1 + (n[1] - 2)
    # the same gradients at the same points, the midpoint taken back out of a
    # sum: equal to rounding
    np.testing.assert_allclose(adaptive.tensor_sums, simpson.tensor_sums, rtol=1e-9)
    assert (adaptive.error <= 1e-4 * np.abs(adaptive.loss_after - adaptive.loss_before)).all()


def test_per_class_follows_the_rule_of_the_total():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, _ = data()
    y = x[:, :3].argmax(1)
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), num_classes=3,
                                 method="adaptive")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for i in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[i::3]), y[i::3]).backward()
        with tracker.step():
            opt.step()
    run = tracker.result()
    assert (run.splits == 1).any()                   # small steps: trapezoid
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=1e-10,
                               atol=1e-14)
