"""Property tests (hypothesis): identities that hold for any input."""
import torch
from hypothesis import given, settings, strategies as st

import lca_ext

CHUNK = lca_ext.build_info()["chunk_size"]

shape = st.one_of(
    st.just(()),
    st.tuples(st.integers(0, 300)),
    st.tuples(st.integers(1, 40), st.integers(0, 70)),
    st.tuples(st.integers(1, 3), st.integers(CHUNK // 2, CHUNK + 100)),  # rows across chunks
)
shapes = st.lists(shape, min_size=1, max_size=5)
dtypes = st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16])


def inputs(shapes, dtype, seed, zero_frac=0.0):
    gen = torch.Generator().manual_seed(seed)
    b = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    steps = [torch.randn(s, generator=gen) * 0.1 for s in shapes]
    if zero_frac:
        steps = [d * (torch.rand(s, generator=gen) > zero_frac) for d, s in zip(steps, shapes)]
    a = [(x.double() + d).to(dtype) for x, d in zip(b, steps)]
    g = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    return b, a, g


settings.register_profile("lca", max_examples=40, deadline=None)
settings.load_profile("lca")


@given(shapes, dtypes, st.integers(0, 2**31 - 1))
def test_row_sums_add_up_to_tensor_sums(shapes, dtype, seed):
    b, a, g = inputs(shapes, dtype, seed)
    res = lca_ext.allocate(b, a, g, row_sums=True)
    for k, rows in enumerate(lca_ext.split_rows(res.row_sums, b)):
        scale = rows.abs().sum().item() + 1e-300
        assert abs(rows.sum().item() - res.sums[k].item()) <= 1e-12 * scale


@given(shapes, dtypes, st.integers(0, 2**31 - 1))
def test_zero_step_gives_zero_lca(shapes, dtype, seed):
    b, _, g = inputs(shapes, dtype, seed)
    edges = lca_ext.signed_log_edges(1e-3, 1.0, 3)
    res = lca_ext.allocate(b, [x.clone() for x in b], g, row_sums=True, bin_edges=edges)
    assert torch.all(res.sums == 0)
    assert torch.all(res.row_sums == 0)
    assert torch.equal(res.zero, torch.tensor([x.numel() for x in b]))
    assert torch.all(res.helped == 0) and torch.all(res.hurt == 0)
    # every zero lands in the middle bin [-1e-3, 1e-3)
    assert torch.equal(res.histogram[:, 4], res.zero)


@given(shapes, dtypes, st.floats(0.0, 0.9), st.integers(0, 2**31 - 1))
def test_counts_add_up(shapes, dtype, zero_frac, seed):
    b, a, g = inputs(shapes, dtype, seed, zero_frac)
    edges = lca_ext.signed_log_edges(1e-4, 1e-1, 5)
    res = lca_ext.allocate(b, a, g, bin_edges=edges)
    numel = torch.tensor([x.numel() for x in b])
    assert torch.equal(res.counts.sum(1), numel)
    assert torch.equal(res.histogram.sum(1), numel - res.nonfinite)


@given(shapes, st.floats(-4, 4), st.floats(-4, 4), st.integers(0, 2**31 - 1))
def test_linear_in_avg_grad(shapes, alpha, beta, seed):
    b, a, g1 = inputs(shapes, torch.float64, seed)
    _, _, g2 = inputs(shapes, torch.float64, seed + 1)
    mixed = [alpha * x + beta * y for x, y in zip(g1, g2)]
    s1 = lca_ext.allocate(b, a, g1).sums
    s2 = lca_ext.allocate(b, a, g2).sums
    s = lca_ext.allocate(b, a, mixed).sums
    scale = sum(((y - x) * (abs(alpha) * p.abs() + abs(beta) * q.abs())).abs().sum().item()
                for x, y, p, q in zip(b, a, g1, g2)) + 1e-300
    assert torch.all((s - (alpha * s1 + beta * s2)).abs() <= 1e-12 * scale)


@given(shapes, dtypes, st.integers(1, 4), st.integers(0, 2**31 - 1))
def test_class_counts_add_up(shapes, dtype, num_classes, seed):
    b, a, _ = inputs(shapes, dtype, seed)
    gen = torch.Generator().manual_seed(seed)
    g = [torch.randn((num_classes, *x.shape), generator=gen).to(dtype) for x in b]
    res = lca_ext.allocate_classes(b, a, g)
    numel = torch.tensor([x.numel() for x in b])
    assert torch.equal(res.counts.sum(-1), numel.expand(num_classes, -1))
