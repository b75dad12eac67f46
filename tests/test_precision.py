"""16-bit models: the passes' precision (lca_ext.evaluate) and the rule's
rounding floor (lca_ext.quadrature): float32 passes by default, losses summed in
float64, noise-limited steps flagged and explained, and no silent autocast
inside a framework's wrapper (Trainer(bf16=True))."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext

xent = nn.functional.cross_entropy


def data(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    return x, (x[:, :5] + 0.5 * torch.randn(n, 5, generator=g)).argmax(1)


def train16(dtype, steps=20, **kw):
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).to(dtype)
    xs = x.to(dtype)
    tracker = lca_ext.LCATracker(model, xent, (xs, y), batch_size=100, **kw)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(1)
    states = []
    for _ in range(steps):
        idx = torch.randint(0, len(y), (32,), generator=g)
        opt.zero_grad()
        xent(model(xs[idx]), y[idx]).backward()
        states.append(copy.deepcopy(model.state_dict()))
        with tracker.step():
            opt.step()
    return tracker, model, (x, y), states


def loss64(model, state, x, y):
    """The loss at the stored 16-bit values, evaluated in float64 (independent)."""
    m = copy.deepcopy(model).double()
    m.load_state_dict({k: v.double() for k, v in state.items()})
    with torch.no_grad():
        return float(xent(m(x.double()), y))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16bit_parameters_get_float32_passes_by_default(dtype):
    tracker, model, (x, y), states = train16(dtype)
    run = tracker.result()
    assert run.meta["config"]["pass_dtype"] == "torch.float32"
    # the loss is the float32 pass's of the bf16 values: float64 agrees to 1e-3
    want = np.array([loss64(model, s, x.to(dtype).float(), y) for s in states])
    np.testing.assert_allclose(run.loss_before, want, rtol=1e-3)
    assert run.grad_passes.mean() <= 4
    assert run.grounded().all() and not run.get("noise_limited").any()


def test_16bit_passes_stop_at_the_rounding_floor_and_say_why():
    with pytest.warns(RuntimeWarning, match="rounding.*16-bit or TF32 arithmetic"):
        tracker, model, (x, y), states = train16(torch.bfloat16, steps=8, pass_dtype=None)
    run = tracker.result()
    assert run.meta["config"]["pass_dtype"] == "torch.bfloat16"
    noisy = run.get("noise_limited")
    assert noisy.any() and not run.grounded()[noisy].any()
    # stopped within two rounds past the last improvement: never near max_splits
    assert (run.splits < tracker.max_splits).all()
    assert run.grad_passes.mean() <= 12


def test_16bit_losses_add_up_in_float64():
    """Each bf16 batch loss is taken exactly (as float32, then float64): the
    set's loss is their exact weighted mean, not a bf16 sum."""
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5)).bfloat16()
    xs = x.bfloat16()
    tracker = lca_ext.LCATracker(model, xent, (xs, y), batch_size=60, pass_dtype=None)
    got = tracker.objectives[0].evaluator.loss_and_grad(
        [p.detach() for p in model.parameters()])
    with torch.no_grad():
        parts = [(float(xent(model(xs[i:i + 60]), y[i:i + 60])), len(y[i:i + 60]))
                 for i in range(0, len(y), 60)]
    want = sum(v * n for v, n in parts) / len(y)
    assert got == pytest.approx(want, rel=1e-12)


def test_autocast_switched_on_inside_the_model_is_refused():
    class SelfCasting(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 5)

        def forward(self, x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return self.fc(x).float()

    x, y = data()
    model = SelfCasting()
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=100)
    with pytest.raises(RuntimeError, match="autocast.*autocast=torch.bfloat16"):
        with tracker.step():
            pass
    # asked for, it runs
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=100, autocast=torch.bfloat16)
    with tracker.step():
        pass


def test_trainer_bf16_passes_run_in_float32(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lca_ext.integrations.transformers import LCACallback
    from test_any_model import TokenDataset, gpt2

    model = gpt2()
    seen = []      # (training mode, autocast on) of every forward of the first block

    def spy(module, args):
        seen.append((module.training, torch.is_autocast_enabled("cpu")))

    model.transformer.h[0].register_forward_pre_hook(spy)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
        per_device_eval_batch_size=4, learning_rate=1e-3, bf16=True, use_cpu=True,
        save_strategy="no", report_to=[], seed=0, disable_tqdm=True)
    lca = LCACallback(lca_data=TokenDataset(2, seed=1))
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(4, 2),
                                   data_collator=transformers.default_data_collator,
                                   callbacks=[lca])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()
    train_fw = [a for t, a in seen if t]
    lca_fw = [a for t, a in seen if not t]
    assert train_fw and all(train_fw)            # the training ran under bf16 autocast
    assert lca_fw and not any(lca_fw)            # the LCA passes did not
    run = lca.result()
    assert len(run) == 3 and run.grounded().all()


def test_float64_passes_on_a_float32_model():
    """pass_dtype casts parameters, buffers and floating inputs up: the loss is
    the float64 loss at the float32 values."""
    x, y = data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 5))
    tracker = lca_ext.LCATracker(model, xent, (x, y), batch_size=100, pass_dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    with tracker.step():
        pass
    run = tracker.result()
    assert run.meta["config"]["pass_dtype"] == "torch.float64"
    assert run.loss_before[0] == pytest.approx(loss64(model, state, x, y), rel=1e-12)
    assert len(lca_ext.LCATracker(model, xent, (x, y)).result().grounded()) == 0


def test_a_kinked_float32_step_is_curvature_not_rounding():
    """Adam's first step on a small CNN (ReLU, max-pool): float32 and float64
    passes miss by the same error, far above float32's noise floor: both are
    refined to max_splits and warn about the curvature, neither is blamed on
    rounding."""
    import torch.nn.functional as F
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 1, 14, 14, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    x += 0.8 * F.one_hot(y, 10).float().repeat_interleave(2, 1)[:, None, :14, None]
    errors = []
    for dt in (torch.float32, torch.float64):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                              nn.Flatten(), nn.Dropout(0.3), nn.Linear(32, 10)).to(dt)
        opt = torch.optim.Adam(model.parameters(), lr=0.05)
        tracker = lca_ext.LCATracker(model, xent, (x.to(dt), y), num_classes=10,
                                     method="certified", batch_size=256)
        default = lca_ext.LCATracker(model, xent, (x.to(dt), y), num_classes=10,
                                     batch_size=256)
        torch.manual_seed(123)
        idx = torch.randint(0, 256, (32,))
        opt.zero_grad()
        xent(model(x[idx].to(dt)), y[idx]).backward()
        with pytest.warns(RuntimeWarning, match="finest interval"):
            with tracker.step(), default.step():
                opt.step()
        run = tracker.result()
        assert not run.get("noise_limited")[0] and not run.grounded()[0]
        errors.append(run.error[0])
        # the default rule stops at its budget, flagged as such, not as rounding
        with pytest.warns(RuntimeWarning, match="pass budget"):
            capped = default.result()
        assert capped.get("budget_limited")[0] and not capped.get("noise_limited")[0]
        assert capped.grad_passes[0] <= 1 + 8
    assert errors[0] == pytest.approx(errors[1], rel=0.05)
