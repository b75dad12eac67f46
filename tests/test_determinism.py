"""Bit-identical results across repeated runs and thread counts."""
import pytest
import torch

import lca_ext
from conftest import DEVICES, require_kernel
from helpers import make_step

CHUNK = lca_ext.build_info()["chunk_size"]
SHAPES = [(300, 1001), (CHUNK * 3 + 17,), (5, 7), ()] + [(64, 33)] * 40


def run_all(b, a, g, class_g):
    edges = lca_ext.signed_log_edges(1e-8, 1e-1, 10, device=b[0].device)
    cum = [torch.zeros_like(x, dtype=torch.float32) for x in b]
    res = lca_ext.allocate(b, a, g, row_sums=True, bin_edges=edges, cum_lca=cum)
    cls = lca_ext.allocate_classes(b, a, class_g)
    acc = [torch.zeros_like(x, dtype=torch.float32) for x in b]
    lca_ext.accumulate_(acc, g, 1 / 6)
    lca_ext.accumulate_(acc, g, 4 / 6)
    return [res.sums, res.counts, res.row_sums, res.histogram, cls.sums, cls.counts] + cum + acc


@pytest.mark.parametrize("device", DEVICES)
def test_repeat_and_thread_counts_bit_identical(device):
    require_kernel("allocate", device)
    b, a, g = make_step(SHAPES, device=device, seed=21)
    class_g = [torch.stack([x, -0.5 * x, 2 * x]) for x in g]
    old = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 1, 2):
            torch.set_num_threads(threads)
            outs.append(run_all(b, a, g, class_g))
    finally:
        torch.set_num_threads(old)
    first = outs[0]
    for other in outs[1:]:
        for x, y in zip(first, other):
            # torch.equal treats NaN as unequal; there are none here
            assert torch.equal(x, y)
