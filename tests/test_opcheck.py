"""torch.library.opcheck on sample inputs of every op, and torch.compile."""
import pytest
import torch

import lca_ext
from conftest import DEVICES, require_kernel
from helpers import make_step


def samples(device):
    b, a, g = make_step([(6, 5), (7,), ()], device=device, seed=1)
    edges = lca_ext.signed_log_edges(1e-4, 1.0, 3, device=device)
    state = lambda dt: [torch.zeros_like(x, dtype=dt) for x in b]  # noqa: E731
    return {
        "accumulate_": [
            ([state(torch.float32), g, 0.5], {}),
            ([state(torch.float64), [x.half() for x in g], 1 / 6], {}),
        ],
        "allocate": [
            ([b, a, g, None, False, [], [], [], False], {}),
            ([b, a, g, edges, True, state(torch.float32), state(torch.int32),
              state(torch.float64), True], {}),
        ],
        "allocate_classes": [
            ([b, a, [torch.stack([x, 2 * x]) for x in g], False], {}),
        ],
    }


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["accumulate_", "allocate", "allocate_classes"])
def test_opcheck(op, device):
    require_kernel(op, device)
    for args, kwargs in samples(device)[op]:
        torch.library.opcheck(getattr(torch.ops.lca_ext, op).default, args, kwargs)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    require_kernel("allocate", device)
    b, a, g = make_step([(16, 8), (8,)], device=device, seed=2)

    def step(b, a, g):
        acc = [torch.zeros_like(x) for x in g]
        lca_ext.accumulate_(acc, g, 1.0)
        res = lca_ext.allocate(b, a, acc, row_sums=True)
        return res.sums, res.counts, res.row_sums

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    for x, y in zip(compiled(b, a, g), step(b, a, g)):
        assert torch.equal(x, y)
