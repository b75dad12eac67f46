"""allocate_classes: per-class LCA against the reference and against allocate."""
import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import DEVICES, require_kernel
from helpers import abs_scale, assert_sums_close, dense, make_step

CHUNK = lca_ext.build_info()["chunk_size"]
SHAPES = {
    "small": [(5, 3), (5,)],
    "scalar_and_empty": [(), (0,)],
    "chunk_edges": [(CHUNK - 1,), (CHUNK + 1,)],
    "many": [(3, 2)] * 300,
}


def class_grads(shapes, num_classes, dtype, device, seed, contiguous=True):
    gen = torch.Generator().manual_seed(seed)
    out = [dense((num_classes, *s), dtype, device, gen) for s in shapes]
    if not contiguous:
        out = [torch.stack([g[c] for c in range(num_classes)], dim=-1).movedim(-1, 0)
               for g in out]
    return out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("num_classes", [1, 3, 10])
def test_matches_reference(shapes, num_classes, device):
    require_kernel("allocate_classes", device)
    b, a, _ = make_step(shapes, device=device, seed=num_classes)
    g = class_grads(shapes, num_classes, torch.float32, device, seed=4)
    got = lca_ext.allocate_classes(b, a, g)
    want = reference.allocate_classes(b, a, g)
    assert got.sums.shape == (num_classes, len(shapes))
    assert got.counts.shape == (num_classes, len(shapes), 4)
    scale = max(abs_scale(b, a, [x[c] for x in g]) for c in range(num_classes))
    assert_sums_close(got.sums, want.sums, scale)
    assert torch.equal(got.counts.cpu(), want.counts.cpu())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_dtypes_and_strided(param_dtype, grad_dtype, device):
    require_kernel("allocate_classes", device)
    shapes = [(17, 9), (CHUNK + 2,)]
    b, a, _ = make_step(shapes, param_dtype, device=device, seed=9, contiguous=False)
    g = class_grads(shapes, 4, grad_dtype, device, seed=5, contiguous=False)
    assert not g[0].is_contiguous()
    got = lca_ext.allocate_classes(b, a, g)
    want = reference.allocate_classes(b, a, g)
    scale = max(abs_scale(b, a, [x[c] for x in g]) for c in range(4))
    assert_sums_close(got.sums, want.sums, scale)
    assert torch.equal(got.counts.cpu(), want.counts.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_classes_add_up_to_total(device):
    """If the class gradients add up to the full gradient, so do the class LCAs."""
    require_kernel("allocate_classes", device)
    shapes = [(30, 20), (30,)]
    b, a, _ = make_step(shapes, torch.float64, device=device, seed=6)
    g = class_grads(shapes, 5, torch.float64, device, seed=7)
    total = lca_ext.allocate(b, a, [x.sum(0) for x in g])
    per_class = lca_ext.allocate_classes(b, a, g)
    torch.testing.assert_close(per_class.sums.sum(0), total.sums, rtol=1e-12, atol=1e-12)
