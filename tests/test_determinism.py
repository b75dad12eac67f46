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


_SCRIPT = r"""
import torch, lca_ext
torch.manual_seed(3)
shapes = [(700, 301), (129,), (5, 3)]
b = [torch.randn(s) for s in shapes]
a = [x + 0.01 * torch.randn_like(x) for x in b]
g = [torch.randn(s) for s in shapes]
r = lca_ext.allocate(b, a, g, row_sums=True)
print(lca_ext.build_info()["cpu_float32_kernel"])
print(" ".join(float(v).hex() for v in r.sums.tolist() + r.row_sums.tolist()))
print(r.counts.tolist())
"""


def test_simd_paths_bit_identical():
    """The AVX2, SSE2 inner loops assign lanes identically: same bits."""
    import os
    import subprocess
    import sys

    def run(env_extra):
        env = dict(os.environ, **env_extra)
        out = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, check=True,
                             capture_output=True, text=True).stdout.splitlines()
        return out[0], out[1:]

    path_default, res_default = run({})
    path_forced, res_forced = run({"LCA_EXT_DISABLE_AVX2": "1"})
    assert path_forced in ("sse2", "portable")
    if path_default == path_forced:
        pytest.skip(f"only the {path_default} path exists on this CPU")
    assert res_default == res_forced
