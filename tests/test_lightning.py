"""LCACallback (PyTorch Lightning) gives what a hand-written LCATracker loop
gives for the same training, and leaves that training bitwise unchanged."""
import csv
import importlib
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

pytest.importorskip("lightning", reason="needs lightning (the lightning extra)")
import lightning.pytorch as pl  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from lightning.pytorch.plugins.precision import Precision  # noqa: E402

import lca_ext  # noqa: E402
from lca_ext.integrations.lightning import LCACallback  # noqa: E402

# Lightning's advice (num_workers, training_step returning None) is expected
# here, and so is its pytree deprecation notice under new torch
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")]

D, C, N, BATCH = 6, 3, 64, 8          # 8 batches an epoch
xent = nn.functional.cross_entropy


def dataset(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    y = (x[:, :C] + 0.3 * torch.randn(N, C, generator=g)).argmax(1)
    return x, y


TRAIN, VAL = dataset(0), dataset(1)


class MLP(pl.LightningModule):
    def __init__(self, dropout=0.0, none_at=()):
        super().__init__()
        torch.manual_seed(0)          # the same initial θ every time
        self.net = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Dropout(dropout),
                                 nn.Linear(16, C))
        self.none_at = set(none_at)   # batches whose training_step returns None

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if batch_idx in self.none_at:
            return None
        x, y = batch
        return xent(self(x), y)

    def configure_optimizers(self):
        return make_opt(self)


def make_opt(module):
    return torch.optim.SGD(module.parameters(), lr=0.2, momentum=0.9)


class SkipStepAt(Precision):
    """As GradScaler does on inf/NaN gradients: the closure and the hooks run,
    the optimiser's step does not."""

    def __init__(self, call):
        super().__init__()
        self.call, self.calls = call, 0

    def optimizer_step(self, optimizer, model, closure, **kwargs):
        self.calls += 1
        if self.calls - 1 == self.call:
            return self._wrap_closure(model, optimizer, closure)
        return super().optimizer_step(optimizer, model, closure, **kwargs)


def fit(module, callbacks=(), logger=False, **kwargs):
    loader = DataLoader(TensorDataset(*TRAIN), batch_size=BATCH, shuffle=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=logger,
                         callbacks=list(callbacks), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **kwargs)
    trainer.fit(module, loader)
    return trainer


def replay(steps, accumulate=1, none_at=(), skip_call=None, **tracker_kwargs):
    """The same training as ``fit`` by hand (Lightning's order: zero_grad at
    the start of an accumulation window, loss / accumulate, step at its end),
    tracked by a plain LCATracker."""
    module = MLP()
    opt = make_opt(module)
    tracker = lca_ext.LCATracker(module, xent, TRAIN, **tracker_kwargs)
    batches = [(TRAIN[0][i:i + BATCH], TRAIN[1][i:i + BATCH]) for i in range(0, N, BATCH)]
    calls = 0
    while calls < steps:
        for i, (x, y) in enumerate(batches):
            if i % accumulate == 0:
                opt.zero_grad()
            if i not in none_at:
                (xent(module(x), y) / accumulate).backward()
            if (i + 1) % accumulate:
                continue
            if i not in none_at and calls != skip_call:
                with tracker.step():
                    opt.step()
            calls += 1
            if calls == steps:
                break
    return module, tracker.result()


def assert_same_run(a, b):
    assert sorted(a.arrays) == sorted(b.arrays)
    for key in a.arrays:
        np.testing.assert_allclose(a.arrays[key], b.arrays[key], rtol=1e-6, atol=1e-12,
                                   err_msg=key)
    for key in a.state:
        for s, t in zip(a.state[key], b.state[key]):
            np.testing.assert_allclose(s, t, rtol=1e-6, atol=1e-12, err_msg=key)


def assert_same_params(a, b):
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_callback_equals_a_plain_tracker_loop():
    cb = LCACallback(xent, TRAIN, eval_sets={"val": VAL})
    module = MLP()
    trainer = fit(module, [cb], max_steps=6)
    run = cb.result()
    assert len(run) == trainer.global_step == 6
    assert run.objectives == ["train", "val"]
    ref_module, ref = replay(6, eval_sets={"val": VAL})
    assert_same_params(module, ref_module)   # the replay is the same training
    assert_same_run(run, ref)
    d_loss = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * abs(d_loss)).all()
    assert cb.trainer_steps == list(range(6))


def test_training_is_bitwise_unchanged():
    # dropout on: the masks come from the global RNG, which tracking must not touch
    plain = MLP(dropout=0.3)
    fit(plain, max_steps=5)
    watched = MLP(dropout=0.3)
    cb = LCACallback(xent, TRAIN)
    fit(watched, [cb], max_steps=5)
    assert len(cb.result()) == 5
    assert_same_params(plain, watched)
    assert not torch.equal(plain.net[0].weight, MLP().net[0].weight)   # it trained


def test_gradient_accumulation_tracks_optimizer_steps_only():
    cb = LCACallback(xent, TRAIN)
    module = MLP()
    trainer = fit(module, [cb], max_steps=5, accumulate_grad_batches=2)
    run = cb.result()
    assert trainer.global_step == 5 and len(run) == 5     # 10 batches, 5 steps
    ref_module, ref = replay(5, accumulate=2)
    assert_same_params(module, ref_module)
    assert_same_run(run, ref)


def test_step_without_gradients_is_not_tracked():
    # training_step returns None: Lightning skips backward but still "steps"
    cb = LCACallback(xent, TRAIN)
    module = MLP(none_at={2})
    trainer = fit(module, [cb], max_steps=6)
    run = cb.result()
    assert trainer.global_step == 6 and len(run) == 5
    assert cb.trainer_steps == [0, 1, 3, 4, 5]
    ref_module, ref = replay(6, none_at={2})
    assert_same_params(module, ref_module)
    assert_same_run(run, ref)


def test_skipped_optimizer_step_records_nothing():
    cb = LCACallback(xent, TRAIN)
    module = MLP()
    trainer = fit(module, [cb], max_steps=6, plugins=[SkipStepAt(3)])
    run = cb.result()
    assert trainer.global_step == 6 and len(run) == 5
    assert cb.trainer_steps == [0, 1, 2, 4, 5]
    assert cb._step_cm is None and not cb.tracker.step_open
    ref_module, ref = replay(6, skip_call=3)
    assert_same_params(module, ref_module)
    assert_same_run(run, ref)   # incl. grad_passes: g(θ_t) survived the skipped step


class TwoOptimizers(MLP):
    """Manual optimisation, two optimiser steps per batch (one per layer)."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(xent(self(x), y))
            opt.step()

    def configure_optimizers(self):
        return two_opts(self)


def two_opts(module):
    return [torch.optim.SGD(module.net[k].parameters(), lr=0.2) for k in (0, 3)]


def test_manual_optimization_tracks_each_step():
    cb = LCACallback(xent, TRAIN)
    module = TwoOptimizers()
    fit(module, [cb], max_epochs=1, limit_train_batches=3)
    run = cb.result()
    assert len(run) == 6
    ref_module = TwoOptimizers()
    tracker = lca_ext.LCATracker(ref_module, xent, TRAIN)
    opts = two_opts(ref_module)
    for i in range(3):
        x, y = TRAIN[0][i * BATCH:(i + 1) * BATCH], TRAIN[1][i * BATCH:(i + 1) * BATCH]
        for opt in opts:
            opt.zero_grad()
            xent(ref_module(x), y).backward()
            with tracker.step():
                opt.step()
    assert_same_params(module, ref_module)
    assert_same_run(run, tracker.result())


def test_metrics_reach_the_logger(tmp_path):
    # every tracked step is logged, whatever log_every_n_steps says
    cb = LCACallback(xent, TRAIN, schedule=2)
    fit(MLP(), [cb], logger=CSVLogger(tmp_path, name="lca"), max_steps=6,
        log_every_n_steps=50)
    run = cb.result()
    assert list(run.steps) == cb.trainer_steps == [0, 2, 4]
    with open(tmp_path / "lca" / "version_0" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("lca/train/lca_sum")]
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    logged = lambda k: np.array([float(r[k]) for r in rows])  # noqa: E731
    np.testing.assert_allclose(logged("lca/train/lca_sum"), run.lca_sum, rtol=1e-12)
    np.testing.assert_allclose(logged("lca/train/loss_after"), run.loss_after, rtol=1e-12)
    np.testing.assert_allclose(logged("lca/train/error"), run.error, rtol=1e-12)
    layers = logged("lca/train/layer/net.0") + logged("lca/train/layer/net.3")
    np.testing.assert_allclose(layers, run.lca_sum, rtol=1e-5, atol=1e-9)
    counts = run.counts.sum(1)
    np.testing.assert_allclose(logged("lca/train/helped_fraction"),
                               counts[:, 0] / counts[:, :3].sum(1), rtol=1e-12)


def test_misspelt_tracker_option_fails_early():
    with pytest.raises(TypeError, match="schedul"):
        LCACallback(xent, TRAIN, schedul=2)


def test_result_before_fit_says_so():
    with pytest.raises(RuntimeError, match="no fit has started"):
        LCACallback(xent, TRAIN).result()


def test_is_a_lightning_callback():
    assert issubclass(LCACallback, pl.Callback)


def _block(monkeypatch, *names):
    """Import ``lca_ext.integrations.lightning`` afresh as if ``names`` were not
    installed (a None entry in sys.modules makes ``import`` fail)."""
    for name in names:
        monkeypatch.setitem(sys.modules, name, None)
    # the fresh import rebinds lca_ext.integrations; put the old one back after
    monkeypatch.setattr(lca_ext, "integrations", sys.modules["lca_ext.integrations"])
    monkeypatch.delitem(sys.modules, "lca_ext.integrations.lightning")
    monkeypatch.delitem(sys.modules, "lca_ext.integrations")
    return lambda: importlib.import_module("lca_ext.integrations.lightning")


def test_missing_lightning_names_the_package(monkeypatch):
    load = _block(monkeypatch, "lightning", "lightning.pytorch", "pytorch_lightning")
    importlib.import_module("lca_ext.integrations")   # needs no Lightning itself
    with pytest.raises(ImportError, match=r"pip install lightning") as err:
        load()
    assert "lca_ext[lightning]" in str(err.value)


def test_falls_back_to_pytorch_lightning(monkeypatch):
    ptl = pytest.importorskip("pytorch_lightning")
    load = _block(monkeypatch, "lightning", "lightning.pytorch")
    assert issubclass(load().LCACallback, ptl.Callback)


def test_end_of_fit_line_names_the_doubtful_steps(caplog):
    """At the end of fit the callback gives one line: a warning naming the
    steps that are not fully certified (here a pass budget of 3 stops every
    refinement the bars' target asks for), or an info line saying every step is
    grounded."""
    cb = LCACallback(xent, TRAIN, rule=dict(max_passes=3, bar_rtol=1e-9, refine_level=1.0))
    with pytest.warns(RuntimeWarning, match=r"lca_ext: of 4 tracked steps") as caught:
        fit(MLP(), [cb], max_steps=4)
    run = cb.result()
    budget = [int(s) for s in run.steps[run.get("budget_limited")]]
    assert len(budget) >= 2
    line = next(str(w.message) for w in caught if "of 4 tracked steps" in str(w.message))
    assert "stopped at the pass budget (bars above target): " + \
        ", ".join(map(str, budget)) + " (" in line
    cb = LCACallback(xent, TRAIN)
    with caplog.at_level("INFO", logger="lca_ext"):
        fit(MLP(), [cb], max_steps=3)
    assert "lca_ext: every one of the 3 tracked steps is grounded" in caplog.text
