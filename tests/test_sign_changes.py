"""sign_changes_: the fused oscillation counters against the reference."""
import pytest
import torch

import lca_ext
from lca_ext import reference
from conftest import DEVICES, require_kernel

CHUNK = lca_ext.build_info()["chunk_size"]
FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("with_base", [True, False], ids=["base", "no-base"])
def test_matches_reference_over_steps(dtype, with_base, device):
    require_kernel("sign_changes_", device)
    gen = torch.Generator().manual_seed(0)
    shapes = [(CHUNK + 3,), (7, 9), (), (0,)]
    got_last = [torch.zeros(s, dtype=torch.int8, device=device) for s in shapes]
    got_ch = [torch.zeros(s, dtype=torch.int32, device=device) for s in shapes]
    want_last = [t.clone() for t in got_last]
    want_ch = [t.clone() for t in got_ch]
    xs = [torch.zeros(s, dtype=dtype, device=device) for s in shapes]
    for step in range(5):
        new = [(x.double().cpu() + torch.randn(s, generator=gen, dtype=torch.float64)
                * (torch.rand(s, generator=gen) > 0.2)).to(dtype).to(device)
               for x, s in zip(xs, shapes)]
        if step == 3:
            new[1][0, 0] = float("nan")
        base = xs if with_base else None
        lca_ext.sign_changes_(got_last, got_ch, new, base)
        reference.sign_changes_(want_last, want_ch, new, base)
        xs = new
    for a, b in zip(got_last + got_ch, want_last + want_ch):
        assert torch.equal(a, b)
    assert sum(int(c.sum()) for c in got_ch) > 0


def test_strided_state_and_errors():
    x = [torch.randn(4, 6)[:, ::2]]
    last = [torch.zeros(4, 6, dtype=torch.int8)[:, ::2]]
    ch = [torch.zeros(4, 6, dtype=torch.int32)[:, ::2]]
    lca_ext.sign_changes_(last, ch, x)
    assert torch.equal(last[0], torch.sign(x[0]).to(torch.int8))
    with pytest.raises(RuntimeError, match=r"last_sign\[0\] has dtype Int; expected Char"):
        lca_ext.sign_changes_([torch.zeros(3, dtype=torch.int32)],
                              [torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)])
    with pytest.raises(RuntimeError, match=r"base\[0\] has shape \[2\]; expected \[3\]"):
        lca_ext.sign_changes_([torch.zeros(3, dtype=torch.int8)],
                              [torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)],
                              [torch.zeros(2)])
    with pytest.raises(ValueError, match="x is an empty list"):
        lca_ext.sign_changes_([], [], [])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    require_kernel("sign_changes_", device)
    x = [torch.randn(5, 3, device=device), torch.randn(4, device=device)]
    last = [torch.zeros_like(t, dtype=torch.int8) for t in x]
    ch = [torch.zeros_like(t, dtype=torch.int32) for t in x]
    torch.library.opcheck(torch.ops.lca_ext.sign_changes_.default, (last, ch, x, []))
    torch.library.opcheck(torch.ops.lca_ext.sign_changes_.default,
                          (last, ch, x, [t + 1 for t in x]))
