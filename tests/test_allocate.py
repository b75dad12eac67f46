"""allocate: the fused kernel against the per-tensor reference."""
import numpy as np
import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import DEVICES, require_kernel
from helpers import abs_scale, assert_allocation_equal, assert_sums_close, make_step

CHUNK = lca_ext.build_info()["chunk_size"]
TILE = 2048
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]

SHAPE_SETS = {
    "empty": [(0,)],
    "one": [(1,)],
    "scalar": [()],
    "odd": [(7, 13)],
    "three": [(5, 3), (5,), (2, 3, 4)],
    "zero_rows": [(4, 0), (3,)],
    "tile-1": [(TILE - 1,)],
    "tile+1": [(3, TILE + 1)],
    "chunk-1": [(CHUNK - 1,)],
    "chunk": [(CHUNK,)],
    "chunk+1": [(CHUNK + 1,)],
    # rows crossing chunk boundaries, and rows longer than a chunk
    "rows_cross": [(1001, 131)],
    "long_rows": [(3, CHUNK + 5000)],
    "many_small": [(3, 2)] * 300,
    "300_mixed": [(i % 17 + 1, i % 5 + 1) if i % 3 else (i % 23,) for i in range(300)],
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shapes", SHAPE_SETS.values(), ids=SHAPE_SETS.keys())
def test_matches_reference_all_outputs(shapes, device):
    require_kernel("allocate", device)
    b, a, g = make_step(shapes, device=device, seed=len(shapes))
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 6, device=device)
    got = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
    want = reference.allocate(b, a, g, row_sums=True, bin_edges=edges)
    assert_allocation_equal(got, want, abs_scale(b, a, g))
    assert got.sums.dtype == torch.float64 and got.counts.dtype == torch.int64
    assert got.counts.shape == (len(shapes), 4)
    assert torch.equal(got.counts.sum(1).cpu(),
                       torch.tensor([b_.numel() for b_ in b], dtype=torch.int64))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("param_dtype", FLOATS, ids=str)
@pytest.mark.parametrize("grad_dtype", FLOATS, ids=str)
def test_dtypes(param_dtype, grad_dtype, device):
    require_kernel("allocate", device)
    shapes = [(33, 65), (CHUNK + 3,), ()]
    b, a, g = make_step(shapes, param_dtype, grad_dtype, device=device, seed=3)
    edges = lca_ext.signed_log_edges(1e-5, 1.0, 5, device=device)
    got = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
    want = reference.allocate(b, a, g, row_sums=True, bin_edges=edges)
    assert_allocation_equal(got, want, abs_scale(b, a, g))


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_in_one_list(device):
    require_kernel("allocate", device)
    b1, a1, g1 = make_step([(40, 9)], torch.bfloat16, torch.float32, device=device, seed=1)
    b2, a2, g2 = make_step([(17,)], torch.float64, torch.float16, device=device, seed=2)
    b, a, g = b1 + b2, a1 + a2, g1 + g2
    got = lca_ext.allocate(b, a, g, row_sums=True)
    want = reference.allocate(b, a, g, row_sums=True)
    assert_allocation_equal(got, want, abs_scale(b, a, g))


@pytest.mark.parametrize("device", DEVICES)
def test_large_tensor(device):
    require_kernel("allocate", device)
    shapes = [(1000, 1003), (1000,)]  # >= 1e6 elements, 16 chunks
    b, a, g = make_step(shapes, device=device, seed=7)
    got = lca_ext.allocate(b, a, g, row_sums=True)
    want = reference.allocate(b, a, g, row_sums=True)
    assert_allocation_equal(got, want, abs_scale(b, a, g))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    require_kernel("allocate", device)
    shapes = [(50, 31), (CHUNK // 16, 17), (9,)]
    b, a, g = make_step(shapes, device=device, seed=5, contiguous=False)
    assert not any(t.is_contiguous() for t in b + a + g)
    edges = lca_ext.signed_log_edges(1e-6, 1e-1, 4, device=device)
    got = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges)
    want = reference.allocate(b, a, g, row_sums=True, bin_edges=edges)
    assert_allocation_equal(got, want, abs_scale(b, a, g))
    # a transposed view: rows are rows of the *view*
    bt, at_, gt = [b[0].t()], [a[0].t()], [g[0].t()]
    got = lca_ext.allocate(bt, at_, gt, row_sums=True)
    want = reference.allocate(bt, at_, gt, row_sums=True)
    assert_allocation_equal(got, want, abs_scale(bt, at_, gt))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cum_dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("contiguous_state", [True, False], ids=["dense", "strided"])
def test_state_updates(cum_dtype, contiguous_state, device):
    require_kernel("allocate", device)
    shapes = [(20, 7), (CHUNK + 11,), ()]
    b, a, g = make_step(shapes, device=device, seed=11)

    def state(dtype, fill):
        out = []
        for s in shapes:
            if contiguous_state or len(s) == 0:
                out.append(torch.full(s, fill, dtype=dtype, device=device))
            else:
                out.append(torch.full((*s[:-1], 2 * s[-1]), fill, dtype=dtype,
                                      device=device)[..., ::2])
        return out

    cum_k, cum_r = state(cum_dtype, 0.25), state(cum_dtype, 0.25)
    hs_k, hs_r = state(torch.int32, 3), state(torch.int32, 3)
    out_k, out_r = state(cum_dtype, 0.0), state(cum_dtype, 0.0)
    for _ in range(2):  # two steps: the state accumulates
        lca_ext.allocate(b, a, g, cum_lca=cum_k, helped_steps=hs_k, lca_out=out_k)
        reference.allocate(b, a, g, cum_lca=cum_r, helped_steps=hs_r, lca_out=out_r)
    for k in range(len(shapes)):
        assert torch.equal(cum_k[k], cum_r[k])
        assert torch.equal(hs_k[k], hs_r[k])
        assert torch.equal(out_k[k], out_r[k])
    # and the state agrees with the returned counts
    res = lca_ext.allocate(b, a, g)
    assert torch.equal(torch.stack([(h - 3).sum() // 2 for h in hs_k]).cpu(),
                       res.helped.cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_numpy_reference(device):
    require_kernel("allocate", device)
    shapes = [(30, 40), (CHUNK + 7,), (5,), ()]
    b, a, g = make_step(shapes, torch.float64, torch.float64, device=device, seed=13)
    edges = lca_ext.signed_log_edges(1e-7, 1e-1, 8)
    got = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges.to(device))
    want = reference.allocate_numpy([t.cpu().numpy() for t in b],
                                    [t.cpu().numpy() for t in a],
                                    [t.cpu().numpy() for t in g],
                                    row_sums=True, bin_edges=edges.numpy())
    scale = abs_scale(b, a, g)
    assert_sums_close(got.sums, torch.from_numpy(want["sums"]), scale)
    assert_sums_close(got.row_sums, torch.from_numpy(want["row_sums"]), scale)
    np.testing.assert_array_equal(got.counts.cpu().numpy(), want["counts"])
    np.testing.assert_array_equal(got.histogram.cpu().numpy(), want["histogram"])


@pytest.mark.parametrize("device", DEVICES)
def test_histogram_edges_inclusive_like_numpy(device):
    require_kernel("allocate", device)
    # lca values chosen to hit edges exactly: delta = 1, grad = value
    vals = torch.tensor([-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 2.5, 3.0], dtype=torch.float64,
                        device=device)
    b = [torch.zeros_like(vals)]
    a = [torch.ones_like(vals)]
    edges = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64, device=device)
    got = lca_ext.allocate(b, a, [vals], bin_edges=edges).histogram.cpu()
    # under: -3 | [-2, 0): -2, -1 | [0, 2]: 0, 1, 2 | over: 2.5, 3
    assert got.tolist() == [[1, 2, 3, 2]]


@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_counted_and_propagated(device):
    require_kernel("allocate", device)
    b = [torch.zeros(6, device=device), torch.zeros(3, device=device)]
    a = [torch.ones(6, device=device), torch.ones(3, device=device)]
    g = [torch.tensor([1.0, -1.0, 0.0, float("nan"), float("inf"), -float("inf")],
                      device=device), torch.tensor([1.0, 2.0, -1.0], device=device)]
    edges = torch.tensor([-10.0, 0.0, 10.0], device=device)
    cum = [torch.zeros(6, device=device), torch.zeros(3, device=device)]
    helped = [torch.zeros(6, dtype=torch.int32, device=device),
              torch.zeros(3, dtype=torch.int32, device=device)]
    res = lca_ext.allocate(b, a, g, bin_edges=edges, cum_lca=cum, helped_steps=helped)
    assert res.counts.cpu().tolist() == [[1, 1, 1, 3], [1, 2, 0, 0]]
    assert torch.isnan(res.sums[0]) and res.sums[1].item() == 2.0
    assert res.histogram.cpu().tolist() == [[0, 1, 2, 0], [0, 1, 2, 0]]
    assert helped[0].cpu().tolist() == [0, 1, 0, 0, 0, 0]
    assert torch.isnan(cum[0][3]) and cum[0][4].item() == float("inf")


@pytest.mark.parametrize("device", DEVICES)
def test_check_finite_raises_before_writing(device):
    require_kernel("allocate", device)
    b, a, g = make_step([(4, 4), (8,)], device=device)
    a[1][3] = float("nan")
    cum = [torch.zeros(4, 4, device=device), torch.zeros(8, device=device)]
    with pytest.raises(RuntimeError, match=r"after\[1\] contains NaN or Inf"):
        lca_ext.allocate(b, a, g, cum_lca=cum, check_finite=True)
    assert all(torch.count_nonzero(c) == 0 for c in cum)
    g[0][0, 0] = float("inf")
    with pytest.raises(RuntimeError, match=r"avg_grad\[0\] contains NaN or Inf"):
        lca_ext.allocate(b, [x.nan_to_num() for x in a], g, check_finite=True)


@pytest.mark.parametrize("device", DEVICES)
def test_row_sums_split(device):
    require_kernel("allocate", device)
    shapes = [(6, 5), (6,), (), (2, 3, 4)]
    b, a, g = make_step(shapes, torch.float64, torch.float64, device=device)
    res = lca_ext.allocate(b, a, g, row_sums=True)
    parts = lca_ext.split_rows(res.row_sums, b)
    assert [p.shape[0] for p in parts] == [6, 6, 1, 2]
    lca = [reference.lca_values(*x) for x in zip(b, a, g)]
    torch.testing.assert_close(parts[0], lca[0].sum(1))
    torch.testing.assert_close(parts[1], lca[1])
    torch.testing.assert_close(parts[3], lca[3].sum((1, 2)))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edges", [
    torch.tensor([-1.0, -0.0, 0.5]),                      # a zero edge (given as -0.0)
    torch.linspace(-1, 1, 301),                           # dense: many edges per binade
    lca_ext.signed_log_edges(1e-30, 1e30, 200),           # wide and fine log bins
    torch.tensor([-1e-300, 1e-300], dtype=torch.float64),  # tiny edges around zero
], ids=["zero-edge", "dense-linear", "wide-log", "tiny"])
def test_histogram_edge_layouts(edges, device):
    require_kernel("allocate", device)
    gen = torch.Generator().manual_seed(17)
    vals = torch.randn(5000, generator=gen, dtype=torch.float64)
    vals = vals * torch.exp(4 * torch.randn(5000, generator=gen, dtype=torch.float64))
    vals[:50] = 0.0
    vals[50:100] = -1.0                                   # exactly on an edge
    b = [torch.ones_like(vals)]
    a = [torch.full_like(vals, 2.0)]
    a[0][100:150] = 1.0                                   # delta 0 ...
    vals[100:150] = -3.0                                  # ... times negative: -0.0
    g = [vals.to(device)]
    b, a = [b[0].to(device)], [a[0].to(device)]
    e = edges.to(device)
    got = lca_ext.allocate(b, a, g, bin_edges=e).histogram
    want = reference.allocate(b, a, g, bin_edges=e).histogram
    assert torch.equal(got.cpu(), want.cpu())
    assert got.sum().item() == vals.numel()
