"""accumulate_: acc[k] += w * grads[k] against the reference."""
import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import DEVICES, require_kernel
from helpers import dense, strided

CHUNK = lca_ext.build_info()["chunk_size"]
SHAPES = {
    "one": [(1,)],
    "scalar_and_empty": [(), (0,), (3, 0)],
    "odd": [(7, 13)],
    "chunk_edges": [(CHUNK - 1,), (CHUNK,), (CHUNK + 1,), (2, CHUNK + 3)],
    "many": [(i % 7 + 1, 3) for i in range(300)],
    "large": [(1000, 1001)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("acc_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("grad_dtype",
                         [torch.float32, torch.float64, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(shapes, acc_dtype, grad_dtype, device):
    require_kernel("accumulate_", device)
    gen = torch.Generator().manual_seed(1)
    acc = [dense(s, acc_dtype, device, gen) for s in shapes]
    grads = [dense(s, grad_dtype, device, gen) for s in shapes]
    want = [t.clone() for t in acc]
    for w in (1 / 6, 4 / 6, -2.5):
        lca_ext.accumulate_(acc, grads, w)
        reference.accumulate_(want, grads, w)
    for got, ref in zip(acc, want):
        torch.testing.assert_close(got, ref, rtol=1e-6 if acc_dtype == torch.float32 else 1e-14,
                                   atol=1e-6 if acc_dtype == torch.float32 else 1e-14)


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_acc_and_grads(device):
    require_kernel("accumulate_", device)
    gen = torch.Generator().manual_seed(2)
    shapes = [(40, 30), (CHUNK // 8, 9)]
    acc = [strided(s, torch.float32, device, gen) for s in shapes]
    grads = [strided(s, torch.float16, device, gen) for s in shapes]
    assert not any(t.is_contiguous() for t in acc + grads)
    base = [a._base.clone() for a in acc]  # the untouched interleaved columns must survive
    want = [a.clone() for a in acc]
    lca_ext.accumulate_(acc, grads, 0.5)
    reference.accumulate_(want, grads, 0.5)
    for got, ref, b0 in zip(acc, want, base):
        torch.testing.assert_close(got, ref)
        assert torch.equal(got._base[..., 1::2], b0[..., 1::2])


@pytest.mark.parametrize("device", DEVICES)
def test_simpson_weights_rebuild_average(device):
    """Three accumulations with Simpson weights give (g0 + 4 g1 + g2) / 6."""
    require_kernel("accumulate_", device)
    gen = torch.Generator().manual_seed(3)
    g = [[dense((64, 33), torch.float64, device, gen)] for _ in range(3)]
    acc = [torch.zeros(64, 33, dtype=torch.float64, device=device)]
    for w, gi in zip((1 / 6, 4 / 6, 1 / 6), g):
        lca_ext.accumulate_(acc, gi, w)
    torch.testing.assert_close(acc[0], (g[0][0] + 4 * g[1][0] + g[2][0]) / 6)
