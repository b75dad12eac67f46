"""Input makers shared by the op tests, and the float64 path reference shared by
the accuracy tests."""
import copy

import numpy as np
import torch

from lca_ext.ops import Allocation


def strided(shape, dtype, device, gen, scale=1.0):
    """A random tensor of `shape` that is NOT contiguous (every other column of a
    wider tensor); 0-d tensors are returned contiguous (they cannot be strided)."""
    if len(shape) == 0:
        return (torch.randn(tuple(), generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)
    wide = (torch.randn((*shape[:-1], 2 * shape[-1]), generator=gen,
                        dtype=torch.float64) * scale).to(dtype).to(device)
    return wide[..., ::2]


def dense(shape, dtype, device, gen, scale=1.0):
    return (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def make_step(shapes, param_dtype=torch.float32, grad_dtype=torch.float32,
              device="cpu", seed=0, contiguous=True, step=1e-2):
    """before, after, avg_grad lists for a fake optimiser step."""
    gen = torch.Generator().manual_seed(seed)
    make = dense if contiguous else strided
    before = [make(s, param_dtype, device, gen) for s in shapes]
    # after = before + a small step, built in place so it keeps make()'s layout
    after = [make(s, param_dtype, device, gen, step).add_(b) for b, s in zip(before, shapes)]
    grads = [make(s, grad_dtype, device, gen) for s in shapes]
    return before, after, grads


def assert_sums_close(got, want, scale):
    """Float64 sums of the same per-element values in different orders."""
    tol = 1e-10 * (scale + 1e-30)
    diff = (got.double().cpu() - want.double().cpu()).abs()
    assert torch.all(diff <= tol), f"max diff {diff.max().item()} > tol {tol}"


def abs_scale(before, after, grads):
    from lca_ext.reference import lca_values
    return sum(lca_values(b, a, g).abs().double().sum().item()
               for b, a, g in zip(before, after, grads))


def assert_allocation_equal(got: Allocation, want: Allocation, scale: float):
    assert_sums_close(got.sums, want.sums, scale)
    assert torch.equal(got.counts.cpu(), want.counts.cpu())
    assert got.row_sums.shape == want.row_sums.shape
    if got.row_sums.numel():
        assert_sums_close(got.row_sums, want.row_sums, scale)
    assert torch.equal(got.histogram.cpu(), want.histogram.cpu())


class _FakeCuda(torch.Tensor):
    @property
    def is_cuda(self):
        return True


def fake_cuda_tensor(n=3):
    """A CPU tensor that says it is on CUDA: reaches the Python-side CUDA guard
    (lca_ext.ops._guard_cuda) on a machine without a GPU."""
    return torch.zeros(n).as_subclass(_FakeCuda)


def simpson_lca(model, before, after, losses_of, intervals=128, train=None):
    """The independent reference of LCA (no lca_ext code): each of the losses
    ``losses_of(m)`` integrated along θ_t → θ_{t+1} (``before``, ``after``) by
    composite Simpson over ``intervals`` intervals, in float64 by direct autograd
    on a float64 copy ``m`` of ``model`` (put in train mode if ``train``, eval
    mode if False, left as it is if None).  Returns ([S, K] each loss's
    per-tensor Δθ·ḡ, [2, S] each loss at θ_t and θ_{t+1})."""
    m = copy.deepcopy(model).double()
    if train is not None:
        m.train(train)
    params = list(m.parameters())
    b64 = [b.detach().double() for b in before]
    d = [a.detach().double() - b for a, b in zip(after, b64)]
    out = ends = None
    for j in range(intervals + 1):
        w = (1 if j in (0, intervals) else (4 if j % 2 else 2)) / (3 * intervals)
        with torch.no_grad():
            for p, b0, dd in zip(params, b64, d):
                p.copy_(b0 + (j / intervals) * dd)
        losses = list(losses_of(m))
        if out is None:
            out, ends = np.zeros((len(losses), len(params))), np.zeros((2, len(losses)))
        for s, loss in enumerate(losses):
            grads = torch.autograd.grad(loss, params, retain_graph=s + 1 < len(losses),
                                        allow_unused=True)
            out[s] += w * np.array([0.0 if g is None else float((g * dd).sum())
                                    for g, dd in zip(grads, d)])
            if j in (0, intervals):
                ends[0 if j == 0 else 1, s] = float(loss.detach())
    return out, ends


def relu_classifier(classes=4, dtype=torch.float32):
    """(x, y, model): 400 float32 examples of 12 features, ``classes`` classes,
    a ReLU MLP 12-32-16-classes in ``dtype``, seeded 0 (the curved, jumpy steps
    of the bars and pass account tests at a high learning rate)."""
    torch.manual_seed(0)
    x = torch.randn(400, 12)
    y = (x[:, :classes] + 0.3 * torch.randn(400, classes)).argmax(1)
    model = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, classes)).to(dtype)
    return x, y, model
