"""Bad input: every case gives an error naming the argument, index and expectation,
from the Python wrapper and from torch.ops.lca_ext.* directly (the C++ checks)."""
import pytest
import torch

import lca_ext


def ok_inputs(n=2):
    b = [torch.zeros(4, 3), torch.zeros(5)][:n]
    a = [torch.ones(4, 3), torch.ones(5)][:n]
    g = [torch.ones(4, 3), torch.ones(5)][:n]
    return b, a, g


def raw_allocate(b, a, g, edges=None, cum=(), helped=(), out=(), check=False):
    return torch.ops.lca_ext.allocate(b, a, g, edges, True, list(cum), list(helped),
                                      list(out), check)


# (description, callable, regex the message must match)
CASES = [
    ("empty lists", lambda: lca_ext.allocate([], [], []),
     r"before is an empty list; expected at least one tensor"),
    ("length mismatch", lambda: lca_ext.allocate(*ok_inputs()[:2], ok_inputs(1)[2]),
     r"avg_grad has 1 tensors but before has 2"),
    ("shape mismatch",
     lambda: lca_ext.allocate(ok_inputs()[0], [torch.ones(4, 3), torch.ones(6)], ok_inputs()[2]),
     r"after\[1\] has shape \[6\]; expected \[5\]"),
    ("dtype int", lambda: lca_ext.allocate([torch.zeros(3, dtype=torch.int64)],
                                           [torch.zeros(3, dtype=torch.int64)], [torch.zeros(3)]),
     r"before\[0\] has dtype Long; expected float16, bfloat16, float32 or float64"),
    ("before/after dtype differ",
     lambda: lca_ext.allocate([torch.zeros(3)], [torch.zeros(3, dtype=torch.float64)],
                              [torch.zeros(3)]),
     r"after\[0\] has dtype Double but before\[0\] has dtype Float"),
    ("mixed devices",
     lambda: raw_allocate([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(3, device="meta")]),
     r"avg_grad\[0\] is on meta; expected every tensor on cpu"),
    ("edges not increasing",
     lambda: lca_ext.allocate(*ok_inputs(), bin_edges=torch.tensor([0.0, 1.0, 1.0])),
     r"bin_edges\[2\] = 1 is not greater than bin_edges\[1\] = 1"),
    ("edges NaN",
     lambda: lca_ext.allocate(*ok_inputs(), bin_edges=torch.tensor([0.0, float("nan")])),
     r"bin_edges\[1\] is nan; expected finite edges"),
    ("edges on another device",
     lambda: lca_ext.allocate(*ok_inputs(), bin_edges=torch.empty(3, device="meta")),
     r"bin_edges is on meta; expected the CPU or cpu"),
    ("edges too short",
     lambda: lca_ext.allocate(*ok_inputs(), bin_edges=torch.tensor([0.0])),
     r"bin_edges has shape \[1\]; expected a 1-D tensor of at least 2 edges"),
    ("cum_lca wrong dtype",
     lambda: lca_ext.allocate(*ok_inputs(), cum_lca=[torch.zeros(4, 3, dtype=torch.float16),
                                                     torch.zeros(5)]),
     r"cum_lca\[0\] has dtype Half; expected Float or Double"),
    ("helped_steps wrong dtype",
     lambda: lca_ext.allocate(*ok_inputs(), helped_steps=[torch.zeros(4, 3), torch.zeros(5)]),
     r"helped_steps\[0\] has dtype Float; expected Int"),
    ("lca_out wrong shape",
     lambda: lca_ext.allocate(*ok_inputs(), lca_out=[torch.zeros(4, 3), torch.zeros(4)]),
     r"lca_out\[1\] has shape \[4\]; expected \[5\]"),
    ("state wrong length",
     lambda: lca_ext.allocate(*ok_inputs(), cum_lca=[torch.zeros(4, 3)]),
     r"cum_lca has 1 tensors but before has 2"),
    ("nan with check_finite",
     lambda: lca_ext.allocate(*ok_inputs()[:2], [torch.ones(4, 3), torch.full((5,), float("nan"))],
                              check_finite=True),
     r"avg_grad\[1\] contains NaN or Inf"),
    ("single tensor not list", lambda: lca_ext.allocate(torch.zeros(3), [torch.zeros(3)],
                                                        [torch.zeros(3)]),
     r"before must be a list of tensors .* got a single Tensor"),
    ("non-tensor element", lambda: lca_ext.allocate([torch.zeros(3)], [1.0], [torch.zeros(3)]),
     r"after\[0\] must be a Tensor, got float"),
    ("accumulate acc int",
     lambda: lca_ext.accumulate_([torch.zeros(3, dtype=torch.int32)], [torch.zeros(3)], 1.0),
     r"acc\[0\] has dtype Int; expected Float or Double"),
    ("accumulate shape",
     lambda: lca_ext.accumulate_([torch.zeros(3)], [torch.zeros(4)], 1.0),
     r"grads\[0\] has shape \[4\]; expected \[3\]"),
    ("accumulate empty", lambda: lca_ext.accumulate_([], [], 1.0),
     r"acc is an empty list"),
    ("accumulate length", lambda: lca_ext.accumulate_([torch.zeros(3)], [], 1.0),
     r"grads has 0 tensors but acc has 1"),
    ("accumulate weight nan",
     lambda: lca_ext.accumulate_([torch.zeros(3)], [torch.zeros(3)], float("nan")),
     r"weight is nan; expected a finite number"),
    ("classes no class dim",
     lambda: lca_ext.allocate_classes([torch.zeros(())], [torch.zeros(())], [torch.zeros(())]),
     r"class_grads\[0\] must have a leading class dimension"),
    ("classes shape",
     lambda: lca_ext.allocate_classes([torch.zeros(3)], [torch.zeros(3)], [torch.zeros(2, 4)]),
     r"class_grads\[0\] has shape \[2, 4\]; expected \[2, 3\]"),
    ("classes class count differs",
     lambda: lca_ext.allocate_classes([torch.zeros(3), torch.zeros(2)],
                                      [torch.zeros(3), torch.zeros(2)],
                                      [torch.zeros(2, 3), torch.zeros(5, 2)]),
     r"class_grads\[1\] has shape \[5, 2\]; expected \[2, 2\]"),
    ("edges helper", lambda: lca_ext.signed_log_edges(1.0, 0.5, 3),
     r"expected 0 < min_abs < max_abs"),
    ("split_rows", lambda: lca_ext.split_rows(torch.zeros(3), [torch.zeros(2, 2)]),
     r"row_sums has shape \(3,\); expected \[2\]"),
]


@pytest.mark.parametrize("call,pattern", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_message(call, pattern):
    with pytest.raises((RuntimeError, TypeError, ValueError), match=pattern):
        call()


def test_cpp_checks_without_python_wrapper():
    """Tool authors calling torch.ops directly get the same C++ messages."""
    b, a, g = ok_inputs()
    with pytest.raises(RuntimeError, match=r"lca_ext.allocate: after\[1\] has shape \[6\]"):
        raw_allocate(b, [a[0], torch.ones(6)], g)
    # with no tensor at all the dispatcher itself refuses, naming the cause
    with pytest.raises(RuntimeError, match=r"empty list of Tensors"):
        raw_allocate([], [], [])
    with pytest.raises(RuntimeError, match=r"lca_ext.accumulate_: grads\[0\] has dtype Long"):
        torch.ops.lca_ext.accumulate_([torch.zeros(2)], [torch.zeros(2, dtype=torch.long)], 1.0)


def test_zero_size_tensors_are_fine():
    b = [torch.zeros(0), torch.zeros(3, 0), torch.zeros(2)]
    a = [torch.zeros(0), torch.zeros(3, 0), torch.ones(2)]
    g = [torch.zeros(0), torch.zeros(3, 0), torch.ones(2)]
    res = lca_ext.allocate(b, a, g, row_sums=True)
    assert res.sums.tolist() == [0.0, 0.0, 2.0]
    assert res.counts.tolist() == [[0, 0, 0, 0], [0, 0, 0, 0], [0, 2, 0, 0]]
    assert res.row_sums.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]


def test_import_error_says_how_to_build(monkeypatch):
    import importlib

    from lca_ext import _loader

    def fail(name):
        raise ImportError("libfoo.so: cannot open shared object file")

    monkeypatch.setattr(importlib, "import_module", fail)
    with pytest.raises(ImportError, match=r"pip install --no-build-isolation -e \."):
        _loader.load_library()


def test_unverified_cuda_ops_refuse_without_opt_in(monkeypatch):
    """A CUDA tensor reaching an op whose kernel has never run on a GPU raises,
    unless LCA_EXT_ALLOW_UNVERIFIED_CUDA=1 (checked before any device work).
    Today every kernel has run on a GPU (the set is empty: CUDA tensors pass);
    the gate stays for kernels added later, so it is tested with every op in it."""
    from lca_ext import cuda_gate, ops

    from helpers import fake_cuda_tensor
    t = fake_cuda_tensor()
    monkeypatch.delenv("LCA_EXT_ALLOW_UNVERIFIED_CUDA", raising=False)
    ops._guard_cuda("allocate", [t])   # verified by the project: accepted
    monkeypatch.setattr(cuda_gate, "UNVERIFIED_CUDA_OPS", frozenset(cuda_gate.FUSED_OPS))
    monkeypatch.setattr(cuda_gate, "verified_ops", lambda device: frozenset())
    with pytest.raises(NotImplementedError, match="run `lca-ext verify-cuda` once"):
        ops._guard_cuda("allocate", [t])
    with pytest.raises(NotImplementedError, match="accumulate_"):
        ops._guard_cuda("accumulate_", [t])
    ops._guard_cuda("allocate", [torch.zeros(3)])  # CPU tensors pass through
    monkeypatch.setenv("LCA_EXT_ALLOW_UNVERIFIED_CUDA", "1")
    ops._guard_cuda("allocate", [t])


def _overlapping_pair(shape=(4, 3)):
    """Two tensors of `shape` that share all but one element of memory."""
    n = torch.Size(shape).numel()
    buf = torch.randn(n + 1)
    return buf[:n].view(shape), buf[1:].view(shape)


def test_outputs_sharing_memory_with_inputs_are_refused():
    b, a, g = ok_inputs()
    x, y = _overlapping_pair()
    with pytest.raises(RuntimeError, match=r"lca_out\[0\] and avg_grad\[0\] share memory|"
                                           r"avg_grad\[0\] and lca_out\[0\] share memory"):
        lca_ext.allocate(b, a, [y, g[1]], lca_out=[x, torch.empty(5)])
    # the very same memory, but as the input of another index
    b2 = [torch.zeros(5), torch.zeros(5)]
    g2 = [torch.ones(5), torch.ones(5)]
    with pytest.raises(RuntimeError, match="share memory"):
        lca_ext.allocate(b2, [x + 1 for x in b2], g2, cum_lca=[g2[1], torch.zeros(5)])
    # two outputs on the same memory
    cum = [torch.zeros(4, 3), torch.zeros(5)]
    with pytest.raises(RuntimeError, match=r"cum_lca\[\d\] and lca_out\[\d\]|lca_out\[\d\] and cum_lca\[\d\]"):
        lca_ext.allocate(b, a, g, cum_lca=cum, lca_out=cum)
    x, y = _overlapping_pair((5,))
    with pytest.raises(RuntimeError, match=r"accumulate_: .*share memory"):
        lca_ext.accumulate_([x], [y], 0.5)


def test_output_may_be_its_own_input():
    """lca_out[k] = avg_grad[k] (same memory) is allowed: each element is read
    before it is written; the result equals a separate output's."""
    b, a, g = ok_inputs()
    g = [torch.randn(4, 3), torch.randn(5)]
    want_out = [torch.empty(4, 3), torch.empty(5)]
    want = lca_ext.allocate(b, a, g, lca_out=want_out)
    inplace = [x.clone() for x in g]
    got = lca_ext.allocate(b, a, inplace, lca_out=inplace)
    assert torch.equal(got.sums, want.sums)
    for x, y in zip(inplace, want_out):
        assert torch.equal(x, y)
    acc = [torch.ones(5)]
    lca_ext.accumulate_(acc, acc, 0.5)
    assert torch.equal(acc[0], torch.full((5,), 1.5))


def test_a_loss_that_sums_is_refused_when_the_tracker_is_built():
    """reduction='sum' was accepted silently (a loss of 265 where the mean is
    1.14, every step called grounded); now the tracker refuses it at once, naming
    the cause and what to use, also with BatchNorm (checked in eval mode); a
    mean loss and a model whose batch cannot be halved are accepted."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    x, y = torch.randn(64, 5), torch.randint(0, 3, (64,))
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8),
                                torch.nn.ReLU(), torch.nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"not a mean.*reduction='sum'.*batch_loss"):
        lca_ext.LCATracker(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"), (x, y))
    lca_ext.LCATracker(model, F.cross_entropy, (x, y))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert model.training          # the check restored the module's mode

    class WholeBatch(torch.nn.Module):     # needs exactly 64 examples (a fixed graph)
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(5, 3)
            self.mix = torch.randn(64, 64)

        def forward(self, inp):
            return self.mix @ self.lin(inp)
    lca_ext.LCATracker(WholeBatch(), F.cross_entropy, (x, y), batch_size=64)


TRACKER_MISTAKES = [
    # (what a new user passed, LCATracker keywords, the message's pattern)
    ("schedule=0", dict(schedule=0), r"schedule=0; expected None .* an int k >= 1"),
    ("schedule=-2", dict(schedule=-2), r"schedule=-2; expected"),
    ("a negative step index", dict(schedule=[0, -1]), r"schedule holds \[-1\]; step indices"),
    ("a float step index", dict(schedule=[0.5]), r"schedule holds \[0.5\]"),
    ("batch_size=0", dict(batch_size=0), r"batch_size=0; expected None .* an int >= 1"),
    ("a tensor schedule", dict(schedule="tensor"), r"schedule is a tensor; .*tolist\(\)"),
    ("num_classes=0", dict(num_classes=0), r"num_classes=0; expected an int >= 1"),
    ("the loss class, not an instance", dict(loss_fn=torch.nn.CrossEntropyLoss),
     r"loss_fn=CrossEntropyLoss is a class; pass an instance \(loss_fn=CrossEntropyLoss\(\)\)"),
    ("the optimizer as the loss", dict(loss_fn="optimizer"),
     r"loss_fn is an optimizer \(SGD\); pass the loss"),
    ("model.parameters() as the model", dict(model="parameters"),
     r"model must be a torch.nn.Module; got a generator .*pass the model itself"),
    ("a tuple of one tensor as the set", dict(lca_data="one tensor"),
     r"got a Tensor \(lca_data given as a tuple .* exactly \(inputs, targets\)"),
    ("bars in the low-memory mode", dict(rule=dict(bars=True), reuse_gradients=False),
     r"bars=True with reuse_gradients=False: the low-memory mode has no error bars"),
    ("bars not a bool", dict(rule=dict(bars="yes")), r"bars='yes'; expected None"),
]


@pytest.mark.parametrize("what,kw,pattern", TRACKER_MISTAKES, ids=[c[0] for c in TRACKER_MISTAKES])
def test_tracker_mistakes_are_refused_with_the_argument_named(what, kw, pattern):
    """A new user's mistakes (found by a trial on models the tests never used):
    each used to crash at the first step from deep inside torch (schedule=0:
    ZeroDivisionError; batch_size=0: range(); a loss class: 'Boolean value of
    Tensor ...') or was silently accepted (schedule=-2 tracked steps 0 and 2)."""
    import torch.nn.functional as F
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    kw = dict(kw)
    args = dict(model=model, loss_fn=F.cross_entropy, lca_data=(x, y))
    if kw.get("loss_fn") == "optimizer":
        kw["loss_fn"] = torch.optim.SGD(model.parameters(), lr=0.1)
    if kw.get("model") == "parameters":
        kw["model"] = model.parameters()
    if kw.get("lca_data") == "one tensor":
        kw["lca_data"] = (x,)
    if kw.get("schedule") == "tensor":          # (it used to track no step at all)
        kw["schedule"] = torch.tensor([0, 3])
    args.update(kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises((ValueError, TypeError), match=pattern):
        tracker = lca_ext.LCATracker(args.pop("model"), args.pop("loss_fn"),
                                     args.pop("lca_data"), **args)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with tracker.step():
            opt.step()


def test_numpy_integers_are_accepted_where_ints_are():
    import numpy as np
    import torch.nn.functional as F
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    tracker = lca_ext.LCATracker(model, F.cross_entropy, (x, y), num_classes=np.int64(3),
                                 schedule=np.int64(2), batch_size=np.int64(8))
    assert tracker.num_classes == 3 and type(tracker.num_classes) is int
    assert tracker.schedule == 2 and type(tracker.schedule) is int


def test_a_schedule_iterator_is_read_once_and_kept():
    import torch.nn.functional as F
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    x, y = torch.randn(32, 4), torch.randint(0, 3, (32,))
    tracker = lca_ext.LCATracker(model, F.cross_entropy, (x, y), schedule=iter([0, 2]))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with tracker.step():
            opt.step()
    assert tracker.result().steps.tolist() == [0, 2]
