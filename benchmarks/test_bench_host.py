"""Host time per call: the fixed cost of one op call on a long list of tiny
tensors, where the arithmetic is negligible, against torch._foreach_add_ on the
same list (pytest-benchmark).  The GPU issue's target is a host path at most
torch._foreach_add_'s; on the CPU this measures the Python wrapper and the C++
glue (validation, the chunk table) that every device shares.

500 float32 tensors of 4 elements, one thread; the cases run one after another
in one session (medians; compare them within a run):

    .venv/bin/python -m pytest benchmarks/test_bench_host.py -q
"""
import pytest
import torch

import lca_ext

K = 500
ROUNDS = dict(rounds=200, iterations=5, warmup_rounds=20)


@pytest.fixture(scope="module")
def lists():
    gen = torch.Generator().manual_seed(0)
    before = [torch.randn(4, generator=gen) for _ in range(K)]
    after = [b + 0.01 for b in before]
    grads = [torch.randn(4, generator=gen) for _ in range(K)]
    acc = [torch.zeros(4) for _ in range(K)]
    return before, after, grads, acc


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("case", ["lca_ext.allocate", "torch.ops.lca_ext.allocate (no wrapper)",
                                  "lca_ext.accumulate_", "torch._foreach_add_"])
def test_host_per_call(benchmark, lists, case):
    before, after, grads, acc = lists
    fn = {
        "lca_ext.allocate": lambda: lca_ext.allocate(before, after, grads),
        "torch.ops.lca_ext.allocate (no wrapper)": lambda: torch.ops.lca_ext.allocate(
            before, after, grads, None, False, [], [], [], False),
        "lca_ext.accumulate_": lambda: lca_ext.accumulate_(acc, grads, 0.5),
        "torch._foreach_add_": lambda: torch._foreach_add_(acc, grads, alpha=0.5),
    }[case]
    benchmark.extra_info.update(tensors=K, case=case)
    benchmark.pedantic(fn, **ROUNDS)
