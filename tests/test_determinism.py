"""Bit-identical results across repeated runs and thread counts."""
import warnings

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


def test_a_dataloader_lca_set_leaves_the_training_random_stream_alone():
    """A transformer with attention dropout, per-class LCA on a DataLoader LCA
    set, AdamW: the training (parameters and the next draw of torch's generator)
    is bit-identical with and without the tracker.  (Building the tracker read
    the DataLoader's first batch for the example check, and a DataLoader draws
    its base seed from torch's generator: the training's dropout masks moved.)"""
    from torch.utils.data import DataLoader, TensorDataset
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 20, (256, 6), generator=gen)
    y = x[:, 0] % 4

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 16)
            self.enc = torch.nn.TransformerEncoder(torch.nn.TransformerEncoderLayer(
                16, 2, 32, dropout=0.1, batch_first=True), 1)
            self.head = torch.nn.Linear(16, 4)

        def forward(self, t):
            return self.head(self.enc(self.emb(t)).mean(1))

    def train(track):
        torch.manual_seed(1)
        model = Net()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        tracker = lca_ext.LCATracker(
            model, torch.nn.functional.cross_entropy,
            DataLoader(TensorDataset(x[:160], y[:160]), batch_size=20),
            num_classes=4) if track else None
        for _ in range(4):
            idx = torch.randint(0, 256, (32,))
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            if tracker is None:
                opt.step()
            else:
                with tracker.step():
                    opt.step()
        return [p.detach().clone() for p in model.parameters()], torch.rand(3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tracked, plain = train(True), train(False)
    assert all(torch.equal(a, b) for a, b in zip(tracked[0], plain[0]))
    assert torch.equal(tracked[1], plain[1])
