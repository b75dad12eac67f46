"""Resuming a stored run from a training checkpoint (lca_ext.store: fingerprints,
state points, truncate_run; the Trainer and Lightning callbacks).

The reference of every case is an uninterrupted run of the same seeded training:
a run stopped after 12 committed steps and resumed from an earlier checkpoint
must end with the same step labels, the same rows (within rounding) and the
same per-parameter statistics (cum_lca within rounding) - no step counted
twice, none missed."""
import copy
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext
from lca_ext.store import META, RunStoreError

STEPS = 30


def xent(out, y):
    return nn.functional.cross_entropy(out, y)


def make():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 5, generator=gen), torch.randint(0, 3, (48,), generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.9)
    torch.manual_seed(123)        # the minibatches come from the global generator
    return model, opt, x, y


def tracker_for(model, x, y, path, **kw):
    return lca_ext.LCATracker(model, xent, (x, y), store=path, **kw)


def train(model, opt, tracker, x, y, start, stop, ckpt_every=None, ckpts=None, save=True):
    """Steps [start, stop); a checkpoint (model, optimiser, RNG) after every
    ``ckpt_every``-th, with tracker.save_state() beside it when ``save``."""
    for t in range(start, stop):
        idx = torch.randint(0, x.shape[0], (12,))
        opt.zero_grad()
        xent(model(x[idx]), y[idx]).backward()
        with tracker.step():
            opt.step()
        if ckpt_every and (t + 1) % ckpt_every == 0:
            ckpts[t + 1] = copy.deepcopy(dict(model=model.state_dict(), opt=opt.state_dict(),
                                              rng=torch.get_rng_state()))
            if save:
                tracker.save_state()


def restore(ckpt):
    model, opt, x, y = make()
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    torch.set_rng_state(ckpt["rng"])
    return model, opt, x, y


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted runs, by tracker options."""
    cache = {}

    def get(**kw):
        key = json.dumps(kw, sort_keys=True)
        if key not in cache:
            path = str(tmp_path_factory.mktemp("ref") / "run")
            model, opt, x, y = make()
            tracker = tracker_for(model, x, y, path, **kw)
            train(model, opt, tracker, x, y, 0, STEPS)
            cache[key] = tracker.result()
        return cache[key]
    return get


def assert_same_run(run, ref, resumed_at=None):
    """Same labels, rows within rounding, per-parameter state within rounding.
    The one difference allowed: the first resumed step (row ``resumed_at``)
    computes g(θ_t) afresh, one gradient pass more than the reference, which
    reused it from the step before."""
    assert run.steps.tolist() == ref.steps.tolist()          # identical step labels
    assert sorted(run.arrays) == sorted(ref.arrays)
    for key, want in ref.arrays.items():
        got = run.arrays[key]
        if key.endswith("grad_passes") and resumed_at is not None:
            assert got[resumed_at] - want[resumed_at] in (0, 1), key
            got, want = np.delete(got, resumed_at), np.delete(want, resumed_at)
        if np.issubdtype(want.dtype, np.floating):
            np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12, err_msg=key)
        else:
            assert np.array_equal(got, want), key
    assert sorted(run.state) == sorted(ref.state)
    for key in ref.state:
        for got, want in zip(run.state[key], ref.state[key]):
            if np.issubdtype(want.dtype, np.floating):
                np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9, err_msg=key)
            else:
                assert np.array_equal(got, want), key


def test_resume_from_an_older_checkpoint_is_refused_then_truncated(tmp_path, reference):
    """The issue's case: checkpoints every 5 steps, stopped after 12 committed
    steps, restarted from the step-10 checkpoint."""
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    tracker = tracker_for(model, x, y, path)
    ckpts = {}
    train(model, opt, tracker, x, y, 0, 12, ckpt_every=5, ckpts=ckpts)
    del tracker                                     # "killed": 12 steps committed
    assert lca_ext.load_run(path).steps.tolist() == list(range(12))

    model, opt, x, y = restore(ckpts[10])
    with pytest.raises(RunStoreError) as err:       # steps 10-11 would count twice
        tracker_for(model, x, y, path, resume=True)
    msg = str(err.value)
    assert "12 committed steps" in msg and "state at 10 committed steps" in msg
    assert f"lca_ext.truncate_run({path!r}, 10)" in msg
    assert len(lca_ext.load_run(path)) == 12         # the refusal changed nothing

    lca_ext.truncate_run(path, 10)
    cut = lca_ext.load_run(path)
    assert cut.steps.tolist() == list(range(10))
    tracker = tracker_for(model, x, y, path, resume=True)
    train(model, opt, tracker, x, y, 10, STEPS)
    run = tracker.result()
    assert_same_run(run, reference(), resumed_at=10)
    assert_same_run(lca_ext.load_run(path), reference(), resumed_at=10)


def test_kill_between_the_commit_and_the_checkpoint(tmp_path, reference):
    """A checkpoint after every step, without save_state(): the store commits
    inside optimizer.step(), so a kill before the save leaves the checkpoint one
    commit behind.  The store keeps the previous state, so the run can be cut
    back by one."""
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    tracker = tracker_for(model, x, y, path)
    ckpts = {}
    train(model, opt, tracker, x, y, 0, 12, ckpt_every=1, ckpts=ckpts, save=False)
    model, opt, x, y = restore(ckpts[11])            # the save of step 12 never happened
    with pytest.raises(RunStoreError, match=r"truncate_run\(.*, 11\)"):
        tracker_for(model, x, y, path, resume=True)
    lca_ext.truncate_run(path, 11)
    tracker = tracker_for(model, x, y, path, resume=True)
    train(model, opt, tracker, x, y, 11, STEPS)
    assert_same_run(tracker.result(), reference(), resumed_at=11)


def test_resume_with_a_schedule_continues_the_labels(tmp_path, reference):
    """schedule=2 (even steps tracked), checkpoints every 5 steps: the step-10
    checkpoint comes after an untracked step; its saved state records the next
    label, so the resumed run labels its steps as the uninterrupted one."""
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    tracker = tracker_for(model, x, y, path, schedule=2)
    ckpts = {}
    train(model, opt, tracker, x, y, 0, 14, ckpt_every=5, ckpts=ckpts)
    assert lca_ext.load_run(path).steps.tolist() == list(range(0, 14, 2))
    model, opt, x, y = restore(ckpts[10])
    with pytest.raises(RunStoreError, match=r"truncate_run\(.*, 5\)"):
        tracker_for(model, x, y, path, resume=True, schedule=2)
    lca_ext.truncate_run(path, 5)
    tracker = tracker_for(model, x, y, path, resume=True, schedule=2)
    assert tracker.next_step == 10
    train(model, opt, tracker, x, y, 10, STEPS)
    assert_same_run(tracker.result(), reference(schedule=2), resumed_at=5)


def test_a_model_that_matches_no_step_is_refused(tmp_path):
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    train(model, opt, tracker_for(model, x, y, path), x, y, 0, 4)
    other, _, _, _ = make()                          # θ_0: no commit is after it
    with pytest.raises(RunStoreError, match=r"nor those after any of its committed steps.*"
                       r"start a new store"):
        tracker_for(other, x, y, path, resume=True)
    # the model of the last commit resumes (labels continue at 4)
    assert tracker_for(model, x, y, path, resume=True).next_step == 4


def test_truncate_run_errors_name_the_argument_and_the_steps_it_can_cut_to(tmp_path):
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    tracker = tracker_for(model, x, y, path)
    train(model, opt, tracker, x, y, 0, 8, ckpt_every=3, ckpts={})   # pinned at 3 and 6
    for bad in (-1, 9, "3", 2.0, True):
        with pytest.raises(ValueError, match=r"truncate_run: steps=.*8 committed steps.*0 to 8"):
            lca_ext.truncate_run(path, bad)
    with pytest.raises(RunStoreError, match=r"no per-parameter state at 4 committed steps.*"
                       r"nearest steps with a saved state: 3 .*, 6 "):
        lca_ext.truncate_run(path, 4)
    assert len(lca_ext.load_run(path)) == 8          # nothing cut
    kept = sorted(p["steps"] for p in json.load(open(os.path.join(path, META)))["states"])
    assert kept == [3, 6, 7, 8]                      # pinned 3, 6 and the latest two
    lca_ext.truncate_run(path, 6)
    meta = json.load(open(os.path.join(path, META)))
    assert sorted(p["steps"] for p in meta["states"]) == [3, 6]
    assert sorted(d for d in os.listdir(path) if d.startswith("state.")) == \
        sorted(f"state.{p['version']}.zarr" for p in meta["states"])
    lca_ext.truncate_run(path, 0)
    assert len(lca_ext.load_run(path)) == 0
    with pytest.raises(lca_ext.store.RunStoreError, match="not a directory"):
        lca_ext.truncate_run(str(tmp_path / "missing"), 0)


def test_save_state_keep_drops_older_checkpoints_states(tmp_path):
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    tracker = tracker_for(model, x, y, path, state_every=4)
    for stop in (3, 6, 9):
        train(model, opt, tracker, x, y, stop - 3, stop)
        tracker.save_state(keep=2)                      # pinned at 3, 6, 9: 3 dropped
    meta = json.load(open(os.path.join(path, META)))
    assert sorted(p["steps"] for p in meta["states"] if p.get("pinned")) == [6, 9]
    assert sorted(d for d in os.listdir(path) if d.startswith("state.")) == \
        sorted(f"state.{p['version']}.zarr" for p in meta["states"])   # 3's files deleted
    with pytest.raises(RunStoreError, match=r"no per-parameter state at 3 committed steps"):
        lca_ext.truncate_run(path, 3)
    lca_ext.truncate_run(path, 6)                       # a kept one still cuts back
    assert len(lca_ext.load_run(path)) == 6
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"save_state: keep="):
            tracker.save_state(keep=bad)


def test_save_state_needs_a_store():
    model, opt, x, y = make()
    with pytest.raises(ValueError, match="save_state: this tracker has no store"):
        lca_ext.LCATracker(model, xent, (x, y)).save_state()


def test_fingerprint_is_exact_and_tells_steps_apart():
    from lca_ext.store import fingerprint

    torch.manual_seed(0)
    a = [torch.randn(300, 7), torch.randn(5).to(torch.bfloat16), torch.randn(3, dtype=torch.float64)]
    fa = fingerprint(a)
    assert fa.shape == (3, 2) and fa.dtype == np.int64
    assert np.array_equal(fa, fingerprint([t.clone() for t in a]))
    b = [t.clone() for t in a]
    b[0][123, 4] = torch.nextafter(b[0][123, 4], torch.tensor(10.0))   # one ulp
    fb = fingerprint(b)
    assert not np.array_equal(fa[0], fb[0]) and np.array_equal(fa[1:], fb[1:])
    c = [a[0].flip(0)] + a[1:]                       # the same values, permuted
    assert not np.array_equal(fingerprint(c)[0], fa[0])
    # a shard at its offset sums to the whole tensor's fingerprint
    lo, hi = a[0][:100], a[0][100:]
    parts = fingerprint([lo]) + fingerprint([hi], offsets=[100 * 7])
    assert np.array_equal(parts[0], fa[0])


# -- the Hugging Face Trainer: on_save keeps the state, resume_from_checkpoint cuts ------

class _Stop(Exception):
    """Stands in for a crash of the training process."""


def hf_run(tmp_path, name, store, max_steps=16, stop_at=None, resume_from=None,
           save_total_limit=None):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lca_ext.integrations.transformers import LCACallback

    vocab, seq = 32, 8

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, n, seed):
            g = torch.Generator().manual_seed(seed)
            self.ids = torch.randint(0, vocab, (n, seq), generator=g)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    class StopAt(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == stop_at:
                raise _Stop()

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=vocab,
                                  n_positions=seq, resid_pdrop=0.0, embd_pdrop=0.0,
                                  attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / name), max_steps=max_steps, per_device_train_batch_size=4,
        per_device_eval_batch_size=8, learning_rate=3e-3, save_strategy="steps", save_steps=5,
        logging_steps=100, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0, save_total_limit=save_total_limit)
    lca = LCACallback(lca_data=Tokens(16, seed=1), store=store)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=Tokens(24, seed=2),
                                   callbacks=[lca, StopAt()])
    if stop_at is not None:
        with pytest.raises(_Stop):
            trainer.train(resume_from_checkpoint=resume_from)
    else:
        trainer.train(resume_from_checkpoint=resume_from)
    return lca


def test_trainer_resume_from_checkpoint_cuts_the_store_back(tmp_path):
    ref = hf_run(tmp_path, "ref", str(tmp_path / "ref_run")).result()
    assert ref.steps.tolist() == list(range(16))
    store = str(tmp_path / "run")
    hf_run(tmp_path, "out", store, stop_at=12)                   # "killed" at step 12
    assert len(lca_ext.load_run(store)) == 12
    ckpt = str(tmp_path / "out" / "checkpoint-10")
    with pytest.warns(UserWarning, match=r"cut back from 12 to 10 steps"):
        lca = hf_run(tmp_path, "out", store, resume_from=ckpt, save_total_limit=2)
    assert_same_run(lca.result(), ref, resumed_at=10)
    assert_same_run(lca_ext.load_run(store), ref, resumed_at=10)
    # the states of the checkpoints the trainer keeps (save_total_limit=2), no others
    assert sorted(d for d in os.listdir(tmp_path / "out") if d.startswith("checkpoint-")) \
        == ["checkpoint-15", "checkpoint-16"]
    meta = json.load(open(os.path.join(store, META)))
    assert {p["tag"] for p in meta["states"] if p["pinned"]} == {"checkpoint-15",
                                                                 "checkpoint-16"}
    assert len([d for d in os.listdir(store) if d.startswith("state.")]) == len(meta["states"])


def test_trainer_refuses_a_checkpoint_the_store_has_no_state_for(tmp_path):
    store = str(tmp_path / "run")
    hf_run(tmp_path, "out", store, stop_at=12)
    other = str(tmp_path / "other_run")              # a store that never saw these checkpoints
    hf_run(tmp_path, "other", other, stop_at=3)
    with pytest.raises(RunStoreError, match="cannot resume"):
        hf_run(tmp_path, "out", other, resume_from=str(tmp_path / "out" / "checkpoint-10"))


def test_trainer_resume_with_a_new_store_labels_from_the_checkpoint(tmp_path):
    """A new, empty store given on resume_from_checkpoint: the run's steps are
    labelled from the checkpoint's (10..15, as in the uninterrupted run), with
    a warning that the statistics start from zero (before: 0..5, silently)."""
    ref = hf_run(tmp_path, "ref", str(tmp_path / "ref_run")).result()
    hf_run(tmp_path, "out", str(tmp_path / "run"), stop_at=12)
    new = str(tmp_path / "new_run")
    with pytest.warns(UserWarning, match=r"resumed at global step 10 with a new, empty store"):
        lca = hf_run(tmp_path, "out", new, resume_from=str(tmp_path / "out" / "checkpoint-10"))
    run = lca_ext.load_run(new)
    assert run.steps.tolist() == list(range(10, 16)) == ref.steps.tolist()[10:]
    np.testing.assert_allclose(run.loss_before, ref.loss_before[10:], rtol=1e-9)


# -- Lightning: on_save_checkpoint keeps the state, ckpt_path= cuts -----------------------

def pl_run(tmp_path, store, stop_at=None, ckpt_path=None, **callback_kw):
    pl = pytest.importorskip("lightning.pytorch")
    from torch.utils.data import DataLoader, TensorDataset
    from lca_ext.integrations.lightning import LCACallback

    class MLP(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            return xent(self(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.3, momentum=0.9)

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step == stop_at:
                raise _Stop()

    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(40, 5, generator=gen), torch.randint(0, 3, (40,), generator=gen)
    # full-batch steps: Lightning itself does not resume a plain DataLoader at the
    # batch it stopped at (mid-epoch it replays from the epoch's start; from an
    # epoch-end checkpoint it ran one batch more, measured), so with one batch
    # an epoch the uninterrupted run is the reference of a resumed one
    loader = DataLoader(TensorDataset(x, y), batch_size=40, shuffle=False)
    lca = LCACallback(xent, (x, y), store=store, log=False, **callback_kw)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=str(tmp_path / "ckpt"), every_n_train_steps=5,
                                        save_top_k=-1, filename="{step}")
    trainer = pl.Trainer(accelerator="cpu", devices=1, logger=False, max_steps=16,
                         callbacks=[lca, StopAt(), ckpt], enable_progress_bar=False,
                         enable_model_summary=False)
    if stop_at is not None:
        with pytest.raises(_Stop):
            trainer.fit(MLP(), loader, ckpt_path=ckpt_path)
    else:
        trainer.fit(MLP(), loader, ckpt_path=ckpt_path)
    return lca


def test_lightning_keep_states_bounds_the_checkpoint_states(tmp_path):
    store = str(tmp_path / "run")
    pl_run(tmp_path, store, keep_states=2)          # checkpoints at 5, 10, 15
    meta = json.load(open(os.path.join(store, META)))
    assert sorted(p["tag"] for p in meta["states"] if p.get("pinned")) == \
        ["lightning-step-10", "lightning-step-15"]
    assert len([d for d in os.listdir(store) if d.startswith("state.")]) == len(meta["states"])
    with pytest.raises(ValueError, match="keep_states=0"):
        pl_run(tmp_path, str(tmp_path / "other"), keep_states=0)


def test_lightning_resume_from_ckpt_path_cuts_the_store_back(tmp_path):
    ref = pl_run(tmp_path / "a", str(tmp_path / "ref_run")).result()
    assert ref.steps.tolist() == list(range(16))
    store = str(tmp_path / "run")
    pl_run(tmp_path / "b", store, stop_at=12)
    assert len(lca_ext.load_run(store)) == 12
    with pytest.warns(UserWarning, match=r"cut back from 12 to 10 steps"):
        lca = pl_run(tmp_path / "b", store, ckpt_path=str(tmp_path / "b" / "ckpt" / "step=10.ckpt"))
    assert_same_run(lca.result(), ref, resumed_at=10)
    meta = json.load(open(os.path.join(store, META)))
    assert {p["tag"] for p in meta["states"] if p["pinned"]} == \
        {"lightning-step-5", "lightning-step-10", "lightning-step-15"}


def test_runs_written_before_fingerprints_resume_with_a_warning(tmp_path):
    """Metadata and state without fingerprints (an older writer): a resume at
    the state's step is allowed, unchecked, with a warning; one past it
    (state_every > 1) is refused, naming the cut that would make it valid."""
    path = str(tmp_path / "run")
    model, opt, x, y = make()
    train(model, opt, tracker_for(model, x, y, path, state_every=3), x, y, 0, 4)
    meta_path = os.path.join(path, META)
    meta = json.load(open(meta_path))
    meta.pop("row_fingerprints")
    for p in meta["states"]:
        p.update(fingerprint=False, next_step=None)
    json.dump(meta, open(meta_path, "w"))
    with pytest.raises(RunStoreError, match=r"state is as of 3 committed steps and its rows go "
                       r"on to 4.*truncate_run\(.*, 3\)"):
        tracker_for(model, x, y, path, resume=True, state_every=3)
    lca_ext.truncate_run(path, 3)
    with pytest.warns(RuntimeWarning, match="before runs recorded parameter fingerprints"):
        resumed = tracker_for(model, x, y, path, resume=True, state_every=3)
    assert resumed.next_step == 3
