"""lca_ext.verify (`lca-ext verify-cuda`): the checks a user runs on their GPU
before the CUDA kernels are enabled there.

Without a GPU the checks run against (1) the emulated CUDA kernels (the real
csrc/cuda sources on the CPU: every check must pass), and (2) the CPU kernels
with one planted fault each (a wrong sum, an off-by-one count past a chunk, a
shifted histogram slot, sums that change between calls, a missed write-back to
a misaligned view, an FMA in accumulate_, a wrong second class group, a kernel
error): every fault must fail the checks of its op, and only those.  The stamp
that enables the kernels is tested on its own (its key, a rebuild, a corrupt
file), and so is the guard that reads it."""
import json
import types

import pytest
import torch

import lca_ext
from lca_ext import ops, verify

CHUNK = lca_ext.build_info()["chunk_size"]
CPU = torch.ops.lca_ext


def cpu_ops(**overrides):
    """The CPU kernels under the raw schemas, with some replaced."""
    base = dict(allocate=CPU.allocate, allocate_classes=CPU.allocate_classes,
                accumulate_=CPU.accumulate_, sign_changes_=CPU.sign_changes_)
    base.update(overrides)
    return types.SimpleNamespace(**base)


def failing_ops(report):
    return sorted({c.op for c in report if not c.ok})


def test_every_check_passes_on_the_emulated_cuda_kernels():
    import cuda_emulator
    emu = cuda_emulator.load()
    report = verify.run_checks(emu, "cpu")
    assert report.ok, report.format()
    assert report.passed_ops() == list(verify.CUDA_OPS)
    assert len(report) >= 11


def test_every_check_passes_on_the_cpu_kernels():
    report = verify.run_checks(cpu_ops(), "cpu")
    assert report.ok, report.format()


def _allocate_with(fault):
    def allocate(before, after, grad, *rest):
        return fault(list(CPU.allocate(before, after, grad, *rest)), before)
    return allocate


def _sums_off(res, before):
    res[0] = res[0] * (1 + 1e-6)
    return tuple(res)


def _count_off_past_a_chunk(res, before):
    for k, b in enumerate(before):
        if b.numel() > CHUNK:
            res[1][k, 0] += 1
            res[1][k, 1] -= 1
    return tuple(res)


def _histogram_slot_shifted(res, before):
    if res[3].numel() and res[3].shape[1] > 3:
        res[3][:, 1] += res[3][:, 2]
        res[3][:, 2] = 0
    return tuple(res)


_calls = {"n": 0}


def _sums_not_repeatable(res, before):
    # a float-atomic style reordering: the last bits differ between calls
    _calls["n"] += 1
    res[0] = res[0] + res[0].abs() * 1e-15 * (_calls["n"] % 3)
    return tuple(res)


def _allocate_misses_misaligned_state(before, after, grad, edges, rows, cum, hs, out, chk):
    # as a kernel that wrote a dense copy of a misaligned state tensor and lost it
    def keep(ts):
        return [t.clone() if t.storage_offset() % 4 else t for t in ts]
    return CPU.allocate(before, after, grad, edges, rows, keep(cum), keep(hs), keep(out), chk)


def _accumulate_with_fma(acc, grads, weight):
    for a, g in zip(acc, grads):  # one rounding instead of two
        a.copy_((a.double() + g.double() * weight).to(a.dtype))


def _classes_second_group_wrong(before, after, grads, chk):
    sums, counts = CPU.allocate_classes(before, after, grads, chk)
    if counts.shape[0] > 8:
        counts[8:, :, 0] += 1
        counts[8:, :, 2] -= 1
    return sums, counts


def _sign_changes_misses_misaligned(last, changes, x, base):
    keep = [t.clone() if t.storage_offset() % 4 else t for t in last]
    CPU.sign_changes_(keep, changes, x, base)


def _illegal_access(*args):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


FAULTS = {
    "allocate sums": (dict(allocate=_allocate_with(_sums_off)), "allocate"),
    "allocate count past a chunk": (dict(allocate=_allocate_with(_count_off_past_a_chunk)),
                                    "allocate"),
    "allocate histogram": (dict(allocate=_allocate_with(_histogram_slot_shifted)), "allocate"),
    "allocate not repeatable": (dict(allocate=_allocate_with(_sums_not_repeatable)),
                                "allocate"),
    "allocate misaligned state": (dict(allocate=_allocate_misses_misaligned_state), "allocate"),
    "accumulate_ fma": (dict(accumulate_=_accumulate_with_fma), "accumulate_"),
    "classes second group": (dict(allocate_classes=_classes_second_group_wrong),
                             "allocate_classes"),
    "sign_changes_ misaligned": (dict(sign_changes_=_sign_changes_misses_misaligned),
                                 "sign_changes_"),
    "kernel error": (dict(sign_changes_=_illegal_access), "sign_changes_"),
}


@pytest.mark.parametrize("fault", FAULTS.keys())
def test_a_planted_fault_fails_its_op_only(fault):
    overrides, op = FAULTS[fault]
    report = verify.run_checks(cpu_ops(**overrides), "cpu")
    assert failing_ops(report) == [op], report.format()
    assert op not in report.passed_ops()
    assert len(report.passed_ops()) == len(verify.CUDA_OPS) - 1
    if fault == "kernel error":
        assert "illegal memory access" in report.format()
    if fault == "allocate not repeatable":  # within tolerance, so only that check fails
        assert [c.name for c in report if not c.ok] == ["the same call twice: same bits"]


def test_large_tensor_check_is_exact():
    verify._large_check(CPU, "cpu", n=3 * CHUNK + 1000)
    wrong = cpu_ops(allocate=_allocate_with(_count_off_past_a_chunk))
    with pytest.raises(AssertionError, match="counts"):
        verify._large_check(wrong, "cpu", n=3 * CHUNK + 1000)


# ---------------------------------------------------------------------------
# the stamp


IDENTITY = {"lca_ext": "0.1.0", "library_sha256": "ab" * 32, "torch": "2.14.1",
            "torch_cuda": "13.0", "gpu": "NVIDIA H100 80GB HBM3", "capability": "9.0"}


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LCA_EXT_CACHE_DIR", str(tmp_path))
    verify.forget_verified()
    yield tmp_path
    verify.forget_verified()


def test_stamp_is_keyed_by_build_torch_and_gpu(cache_dir):
    assert verify.stamped_ops(IDENTITY) == frozenset()
    path = verify.record_stamp(IDENTITY, ["allocate", "sign_changes_"])
    assert path == str(cache_dir / "cuda-verified.json")
    assert verify.stamped_ops(dict(IDENTITY)) == {"allocate", "sign_changes_"}
    for key, other in (("library_sha256", "cd" * 32), ("torch", "2.15.0"),
                       ("gpu", "NVIDIA A100-SXM4-80GB"), ("capability", "8.0")):
        assert verify.stamped_ops({**IDENTITY, key: other}) == frozenset(), key
    # another GPU's entry is added beside it; a new run for the same one replaces it
    verify.record_stamp({**IDENTITY, "gpu": "other"}, ["accumulate_"])
    verify.record_stamp(IDENTITY, ["allocate"])
    assert verify.stamped_ops(IDENTITY) == {"allocate"}
    assert verify.stamped_ops({**IDENTITY, "gpu": "other"}) == {"accumulate_"}
    assert len(json.loads((cache_dir / "cuda-verified.json").read_text())["verified"]) == 2


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"verified": 3}',
                                     '{"verified": [1, {"identity": 2}]}'])
def test_a_corrupt_stamp_file_verifies_nothing_and_is_rewritten(cache_dir, content):
    (cache_dir / "cuda-verified.json").write_text(content)
    assert verify.stamped_ops(IDENTITY) == frozenset()
    verify.record_stamp(IDENTITY, ["allocate", "no_such_op"])
    assert verify.stamped_ops(IDENTITY) == {"allocate"}


def test_library_digest_is_the_compiled_library():
    import hashlib
    from lca_ext._loader import _C
    with open(_C.__file__, "rb") as f:
        assert verify.library_sha256() == hashlib.sha256(f.read()).hexdigest()


def test_guard_accepts_exactly_the_stamped_ops(monkeypatch):
    """For ops the project has not run on a GPU (none today: the gate is for
    kernels added later), the guard accepts exactly the stamped ones."""
    from lca_ext import cuda_gate
    from helpers import fake_cuda_tensor
    t = fake_cuda_tensor()
    monkeypatch.delenv("LCA_EXT_ALLOW_UNVERIFIED_CUDA", raising=False)
    monkeypatch.setattr(cuda_gate, "UNVERIFIED_CUDA_OPS", frozenset(cuda_gate.FUSED_OPS))
    monkeypatch.setattr(cuda_gate, "verified_ops", lambda device: frozenset({"allocate"}))
    ops._guard_cuda("allocate", [t])
    with pytest.raises(NotImplementedError, match="lca-ext verify-cuda"):
        ops._guard_cuda("accumulate_", [t])


def test_no_gpu_means_nothing_verified_and_a_clear_error(cache_dir):
    assert verify.verified_ops("cpu") == frozenset()
    if not torch.cuda.is_available():
        assert verify.verified_ops("cuda") == frozenset()
        with pytest.raises(RuntimeError, match="not an available CUDA device"):
            verify.verify_cuda("cuda")
    with pytest.raises(RuntimeError, match="'cpu' is not an available CUDA device"):
        verify.verify_cuda("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cli_without_a_gpu_exits_2(capsys):
    from lca_ext.cli import main
    assert main(["verify-cuda"]) == 2
    assert "not an available CUDA device" in capsys.readouterr().err


@pytest.mark.cuda
def test_verify_cuda_on_this_gpu_enables_the_ops(cache_dir, monkeypatch):
    """On a GPU: every check passes, the stamp names every op, and the guard
    then accepts CUDA tensors without LCA_EXT_ALLOW_UNVERIFIED_CUDA."""
    from conftest import HAVE_GPU
    if not HAVE_GPU:
        pytest.skip("needs a GPU and lca_ext built with CUDA")
    report = verify.verify_cuda("cuda")
    assert report.ok, report.format()
    monkeypatch.delenv("LCA_EXT_ALLOW_UNVERIFIED_CUDA", raising=False)
    assert verify.verified_ops("cuda") == set(verify.CUDA_OPS)
    for op in verify.CUDA_OPS:
        assert ops.fused_available(op, "cuda")
    lca_ext.allocate([torch.zeros(3, device="cuda")], [torch.ones(3, device="cuda")],
                     [torch.ones(3, device="cuda")])
