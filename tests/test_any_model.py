"""LCATracker on models and loops it was not designed around: a GPT-2 built from
a config, a Transformer LM with dropout, tied embeddings and padded labels, dict /
BatchEncoding / nested / TensorDataset batches, DataLoaders, optimizer hooks,
autocast and GradScaler.  References are direct autograd computations."""
import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lca_ext

# -- a GPT-2 from a config (no download), dict batches, token-weighted loss ----------

VOCAB, SEQ = 128, 16


def gpt2(dtype=torch.float64):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                  n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)     # dropout 0.1 everywhere


def token_batches(n_batches, seed, per_batch=4):
    """Dict batches of padded sequences: labels -100 on the padding."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, VOCAB, (per_batch, SEQ), generator=gen)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (per_batch,), generator=gen)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        labels = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
        out.append({"input_ids": ids * mask, "attention_mask": mask, "labels": labels})
    return out


def lm_loss(model, batch):
    out = model(**batch)
    return out.loss, (batch["labels"][:, 1:] != -100).sum()   # tokens the mean is over


def whole_set_grad(model, point, batches):
    """Reference: the token-weighted whole-set mean loss and its gradient at
    `point`, by autograd on an eval-mode float64 copy."""
    m = copy.deepcopy(model).eval()
    params = [p for p in m.parameters()]
    with torch.no_grad():
        for p, v in zip(params, point):
            p.copy_(v)
    total, tokens = 0.0, 0
    m.zero_grad()
    for b in batches:
        loss, n = lm_loss(m, b)
        (loss * n).backward()
        total += float(loss.detach()) * int(n)
        tokens += int(n)
    return total / tokens, [p.grad / tokens for p in params]


def direct_simpson_lca(model, before, after, batches, n):
    """Per-tensor LCA by the rule the tracker recorded, directly: n = 1 the
    trapezoid, n >= 2 composite Simpson over n intervals."""
    weights = [0.5, 0.5] if n == 1 else \
        [(1 if j in (0, n) else (4 if j % 2 else 2)) / (3 * n) for j in range(n + 1)]
    avg = [torch.zeros_like(b) for b in before]
    for j, w in enumerate(weights):
        point = [b + (a - b) * (j / n) for b, a in zip(before, after)]
        _, g = whole_set_grad(model, point, batches)
        for s, gk in zip(avg, g):
            s += w * gk
    return np.array([float(((a - b) * g).sum()) for b, a, g in zip(before, after, avg)])


def test_gpt2_attach_dict_batches_equal_direct_reference():
    model = gpt2()
    lca = token_batches(3, seed=1)
    # (a uniform rule: the direct reference below is uniform composite Simpson)
    tracker = lca_ext.LCATracker(model, lca_data=lca, batch_loss=lm_loss, method="simpson")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    handle = tracker.attach(opt)
    steps = []
    for b in token_batches(3, seed=2):
        opt.zero_grad()
        model(**b).loss.backward()            # training: dropout on
        before = [p.detach().clone() for p in model.parameters()]
        opt.step()                            # the hooks track it
        steps.append((before, [p.detach().clone() for p in model.parameters()]))
    handle.remove()
    opt.step()                                # detached: not tracked
    run = tracker.result()
    assert len(run) == 3 and not tracker.ungrounded_steps
    delta = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(delta)).all()
    for t, (before, after) in enumerate(steps):
        want = direct_simpson_lca(model, before, after, lca, int(run.splits[t]))
        got = run.tensor_sums[t]
        # tied embeddings: the tracker's wte holds both uses (reference: the same)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).sum())
        loss_t, _ = whole_set_grad(model, before, lca)
        assert run.loss_before[t] == pytest.approx(loss_t, rel=1e-6)   # HF: fp32 loss


# -- a Transformer LM with dropout, tied embeddings, padding, a DataLoader ----------

class TinyLM(nn.Module):
    def __init__(self, vocab=VOCAB, d=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        layer = nn.TransformerEncoderLayer(d, nhead=4, dim_feedforward=64, dropout=0.1,
                                           batch_first=True)
        self.enc = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight                    # tied

    def forward(self, ids):
        causal = nn.Transformer.generate_square_subsequent_mask(ids.shape[1])
        return self.head(self.enc(self.emb(ids), mask=causal, is_causal=True))


def tinylm_loss(model, batch):
    ids, labels = batch
    logits = model(ids)[:, :-1]
    target = labels[:, 1:]
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-100)
    return loss, (target != -100).sum()


def lm_dataset(n, seed):
    batches = token_batches(n // 4, seed)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    return TensorDataset(ids, labels)


def train_tinylm(tracked: bool, num_workers: int):
    torch.manual_seed(3)
    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    train = DataLoader(lm_dataset(32, seed=4), batch_size=4, shuffle=True)  # global RNG
    tracker = None
    if tracked:
        lca = DataLoader(lm_dataset(16, seed=5), batch_size=4, num_workers=num_workers)
        tracker = lca_ext.LCATracker(model, lca_data=lca, batch_loss=tinylm_loss)
        tracker.attach(opt)
    for i, batch in enumerate(train):                         # 8 batches, 4 steps
        (tinylm_loss(model, batch)[0] / 2).backward()         # accumulation over 2
        if i % 2 == 1:
            nn.utils.clip_grad_norm_(model.parameters(), 0.5)
            opt.step()
            sched.step()
            opt.zero_grad()
    return model, tracker, torch.rand(3)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_transformer_lm_dataloader_training_unchanged_and_grounded(num_workers):
    plain, _, probe_plain = train_tinylm(False, num_workers)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                        # no max_splits warning
        model, tracker, probe = train_tinylm(True, num_workers)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(probe, probe_plain)                    # RNG stream untouched
    run = tracker.result()
    assert len(run) == 4 and not tracker.ungrounded_steps
    assert (run.splits < tracker.max_splits).all()
    delta = run.loss_after - run.loss_before
    # certified: the total within 1% of max(|ΔL|, 1% of the gross movement)
    gross = np.abs(run.tensor_sums).sum(1)
    assert run.grounded().all()
    assert (run.error <= 0.01 * np.maximum(np.abs(delta), 0.01 * gross) + 1e-5).all()


# -- data forms: the same set as pairs, dicts, BatchEncoding, nested, a Dataset ------

def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def xy():
    g = torch.Generator().manual_seed(1)
    return torch.randn(30, 5, generator=g), torch.randint(0, 3, (30,), generator=g)


def one_step_lca(tracker, model):
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x, y = xy()
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    with tracker.step():
        opt.step()
    return tracker.result()


def test_every_data_form_gives_the_same_lca():
    x, y = xy()
    xent = nn.functional.cross_entropy
    forms = {
        "pair": dict(loss_fn=xent, lca_data=(x, y), batch_size=8),
        "dataset": dict(loss_fn=xent, lca_data=TensorDataset(x, y), batch_size=8),
        "loader": dict(loss_fn=xent, lca_data=DataLoader(TensorDataset(x, y), batch_size=8)),
        "dicts": dict(batch_loss=lambda m, b: xent(m(b["x"]), b["y"]),
                      lca_data=[{"x": x[i:i + 8], "y": y[i:i + 8]} for i in range(0, 30, 8)]),
        "nested": dict(batch_loss=lambda m, b: xent(m(b[0]["x"]), b[1][0]),
                       lca_data=[({"x": x[i:i + 8]}, [y[i:i + 8]]) for i in range(0, 30, 8)]),
    }
    try:
        from transformers import BatchEncoding
        forms["batch_encoding"] = dict(
            batch_loss=lambda m, b: xent(m(b["x"]), b["y"]),
            lca_data=[BatchEncoding({"x": x[i:i + 8], "y": y[i:i + 8]})
                      for i in range(0, 30, 8)])
    except ImportError:
        pass
    runs = {}
    for name, kw in forms.items():
        model = mlp()
        runs[name] = one_step_lca(lca_ext.LCATracker(model, **kw), model)
    ref = runs.pop("pair")
    for name, run in runs.items():
        # a last batch of 6 weighs 6/30, not 1/4, in every form
        np.testing.assert_allclose(run.tensor_sums, ref.tensor_sums, rtol=1e-6, err_msg=name)
        assert run.loss_before[0] == pytest.approx(ref.loss_before[0], rel=1e-6), name


def test_weighted_batches_give_the_exact_weighted_mean():
    """(mean, weight) batches: the set's loss is Σ w·mean / Σ w, not the mean of means."""
    x, y = xy()
    model = mlp()
    w = [3, 1, 7, 2]
    data = [(x[i:i + 8], y[i:i + 8], w[k]) for k, i in enumerate(range(0, 30, 8))]
    tracker = lca_ext.LCATracker(model, lca_data=data, batch_loss=lambda m, b: (
        nn.functional.cross_entropy(m(b[0]), b[1]), b[2]))
    run = one_step_lca(tracker, model)
    m = mlp()
    with torch.no_grad():
        want = sum(wk * float(nn.functional.cross_entropy(m(a), b)) for a, b, wk in data) / sum(w)
    assert run.loss_before[0] == pytest.approx(want, rel=1e-6)


def test_bad_data_and_losses_get_clear_errors():
    x, y = xy()
    xent = nn.functional.cross_entropy
    model = mlp()
    with pytest.raises(ValueError, match="shuffles"):
        lca_ext.LCATracker(model, xent, DataLoader(TensorDataset(x, y), shuffle=True))
    with pytest.raises(ValueError, match="one-shot iterator"):
        lca_ext.LCATracker(model, xent, ((x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)))
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        lca_ext.LCATracker(model, xent, (x, y), batch_loss=lambda m, b: 0)
    with pytest.raises(ValueError, match="exactly one of loss_fn"):
        lca_ext.LCATracker(model, lca_data=(x, y))
    tracker = lca_ext.LCATracker(model, xent, [{"x": x, "y": y}])
    with pytest.raises(ValueError, match=r"\(inputs, targets\) pair"):
        tracker.begin()
    with pytest.raises(ValueError, match="autocast"):
        lca_ext.LCATracker(model, xent, (x, y), autocast="bf16")
    # token targets [N, T] with num_classes: refused, not silently T times the sum
    tokens = torch.randint(0, 3, (30, 4))
    seq = nn.Sequential(nn.Linear(5, 12), nn.Unflatten(1, (4, 3)))
    tracker = lca_ext.LCATracker(seq, lambda o, t: xent(o.flatten(0, 1), t.flatten()),
                                 (x, tokens), num_classes=3)
    opt = torch.optim.SGD(seq.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="one class index per example"):
        with tracker.step():
            opt.step()


def test_a_random_loss_at_fixed_theta_is_a_clear_error():
    class AlwaysDrop(nn.Module):
        def forward(self, x):
            return nn.functional.dropout(x, 0.3, training=True)   # ignores .training

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), AlwaysDrop(), nn.Linear(8, 3))
    x, y = xy()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    with pytest.raises(RuntimeError, match="random at a fixed θ"):
        tracker.begin()


def test_passes_run_outside_the_callers_autocast():
    x, y = xy()
    model = mlp()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
        before = [p.detach().clone() for p in model.parameters()]
        with tracker.step():
            opt.step()
    m = mlp()
    with torch.no_grad():
        for p, v in zip(m.parameters(), before):
            p.copy_(v)
        want = float(nn.functional.cross_entropy(m(x), y))     # float32, no autocast
    run = tracker.result()
    assert run.loss_before[0] == pytest.approx(want, rel=1e-6)
    assert run.error[0] <= 1e-4 + 1e-3 * abs(run.loss_after[0] - run.loss_before[0])


def test_gradscaler_skipped_steps_record_nothing():
    x, y = xy()
    model = mlp()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    for step in range(4):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x[:8]), y[:8])
        if step == 1:
            loss = loss * float("inf")               # inf gradients: the scaler skips
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    run = tracker.result()
    assert run.steps.tolist() == [0, 1, 2]           # 3 optimizer steps ran
    assert run.grounded().all()
    delta = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(delta)).all()


def test_attach_survives_a_step_that_raised():
    x, y = xy()
    model = mlp()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    tracker.attach(opt)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x[:8]), y[:8]).backward()
    with pytest.raises(ZeroDivisionError):
        opt.step(lambda: 1 / 0)          # raises inside step(): between the hooks
    opt.step()                           # tracked normally
    run = tracker.result()
    assert len(run) == 1
    assert run.error[0] <= 1e-4 + 1e-3 * abs(run.loss_after[0] - run.loss_before[0])


def test_attach_refuses_a_with_block_too():
    """Attached, the optimizer's hooks track every step: a `with tracker.step()`
    around opt.step() would begin twice; it is refused, saying why, until the
    handle is removed."""
    x, y = xy()
    model = mlp()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    handle = tracker.attach(opt)
    with pytest.raises(RuntimeError, match="attached to an optimizer"):
        with tracker.step():
            opt.step()
    handle.remove()
    with tracker.step():
        opt.step()
    assert len(tracker.result()) == 1


# -- the Hugging Face Trainer with LCACallback ----------------------------------------

class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n_batches, seed):
        self.rows = [dict(zip(b, vals)) for b in token_batches(n_batches, seed)
                     for vals in zip(*b.values())]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


def trainer_run(tmp_path, with_lca: bool):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from lca_ext.integrations.transformers import LCACallback

    class Snapshots(transformers.TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            self.before = [p.detach().clone() for p in model.parameters()]

        def on_optimizer_step(self, args, state, control, model=None, **kw):
            self.steps.append((self.before, [p.detach().clone() for p in model.parameters()]))

    model = gpt2()
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / ("lca" if with_lca else "plain")), max_steps=3,
        per_device_train_batch_size=4, per_device_eval_batch_size=4,
        gradient_accumulation_steps=2, learning_rate=1e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        dataloader_num_workers=0)
    snaps = Snapshots()
    callbacks = [snaps]
    lca = None
    if with_lca:
        # (a uniform rule: the direct reference below is uniform composite Simpson)
        lca = LCACallback(lca_data=TokenDataset(3, seed=1), method="simpson")
        callbacks.append(lca)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenDataset(6, 2),
                                   data_collator=transformers.default_data_collator,
                                   callbacks=callbacks)
    trainer.train()
    return model, lca, snaps, trainer


def test_trainer_callback_tracks_every_step_exactly(tmp_path, caplog):
    with caplog.at_level("INFO", logger="lca_ext"):
        model, lca, snaps, trainer = trainer_run(tmp_path, True)
    # the end-of-run line (a warning instead if a step were doubtful)
    assert "lca_ext: every one of the 3 tracked steps is grounded" in caplog.text
    plain, _, _, _ = trainer_run(tmp_path, False)
    for a, b in zip(model.parameters(), plain.parameters()):
        assert torch.equal(a, b)                   # bit-identical training
    run = lca.result()
    assert len(run) == 3 == len(snaps.steps)
    delta = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(delta)).all()
    lca_batches = [dict(zip(b, [v for v in b.values()])) for b in token_batches(3, seed=1)]
    for t, (before, after) in enumerate(snaps.steps):
        want = direct_simpson_lca(model, before, after, lca_batches, int(run.splits[t]))
        np.testing.assert_allclose(run.tensor_sums[t], want, rtol=1e-6,
                                   atol=1e-6 * np.abs(want).sum())
    logged = [h for h in trainer.state.log_history if "lca/train/lca_sum" in h]
    assert [h["lca/step"] for h in logged] == [0, 1, 2]
    assert logged[-1]["lca/train/lca_sum"] == pytest.approx(float(run.lca_sum[-1]))


# -- per-class LCA beyond one class per example ------------------------------------

def test_token_level_classes_add_up_and_match_a_direct_share():
    """Token targets with batch_loss: class c's share is the loss over the tokens
    whose label is c (the others -100), weighted by their count; the shares add
    up to the whole LCA and class 3's equals a direct computation."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    vocab = 12
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=vocab,
                                  n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).double()
    gen = torch.Generator().manual_seed(3)
    lca = []
    for _ in range(2):
        ids = torch.randint(0, vocab, (3, SEQ), generator=gen)
        lca.append({"input_ids": ids, "labels": torch.where(ids % 5 == 0, -100, ids)})
    tracker = lca_ext.LCATracker(model, lca_data=lca, batch_loss=lm_loss, num_classes=vocab,
                                 method="adaptive")   # uniform points: checked below
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    b = lca[0]
    opt.zero_grad()
    model(**b).loss.backward()
    before = [p.detach().clone() for p in model.parameters()]
    with tracker.step():
        opt.step()
    after = [p.detach().clone() for p in model.parameters()]
    run = tracker.result()
    scale = np.abs(run.tensor_sums).sum()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=0, atol=1e-9 * scale)
    # class 3 directly: Simpson with the run's splits on the class-3 share of the loss
    n = int(run.splits[0])
    total_tokens = sum(int((x["labels"][:, 1:] != -100).sum()) for x in lca)
    only3 = [dict(x, labels=torch.where(x["labels"] == 3, x["labels"], -100)) for x in lca]
    want = np.zeros(len(before))
    for j in range(n + 1):
        w = 0.5 if n == 1 else (1 if j in (0, n) else (4 if j % 2 else 2)) / (3 * n)
        point = [p0 + (p1 - p0) * (j / n) for p0, p1 in zip(before, after)]
        m = copy.deepcopy(model).eval()
        with torch.no_grad():
            for p, v in zip(m.parameters(), point):
                p.copy_(v)
        share = sum(loss * n for loss, n in (lm_loss(m, x) for x in only3
                                             if (x["labels"][:, 1:] != -100).any())) / total_tokens
        grads = torch.autograd.grad(share, list(m.parameters()))
        want += w * np.array([float(((p1 - p0) * g).sum())
                              for p0, p1, g in zip(before, after, grads)])
    np.testing.assert_allclose(run.class_sums[0, 3], want, rtol=1e-6, atol=1e-9 * scale)


def test_custom_targets_group_examples_for_per_class_lca():
    """targets=f: per-class LCA of a regression, examples grouped by f(batch)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))
    x, _ = xy()
    y = x[:, :1] * 0.5 - x[:, 1:2]
    groups = lambda batch: (batch[0][:, 0] > 0).long()          # noqa: E731
    mse = nn.functional.mse_loss
    tracker = lca_ext.LCATracker(model, mse, (x, y), batch_size=8, num_classes=2,
                                 targets=groups)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    mse(model(x[:8]), y[:8]).backward()
    with tracker.step():
        opt.step()
    run = tracker.result()
    scale = np.abs(run.tensor_sums).sum()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=0, atol=1e-6 * scale)
    assert (np.abs(run.class_sums).sum(2) > 0).all()          # both groups present


def test_cache_reads_the_set_once_and_gives_the_same_lca():
    class Counting:
        """A re-iterable that counts how often it is read."""

        def __init__(self, batches):
            self.batches, self.reads = batches, 0

        def __iter__(self):
            def read():
                self.reads += 1             # counted when reading starts
                yield from self.batches
            return read()

    x, y = xy()
    runs = {}
    for cache in (False, True):
        data = Counting([(x[i:i + 8], y[i:i + 8]) for i in range(0, 30, 8)])
        model = mlp()
        tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, data, cache=cache)
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for i in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i::3]), y[i::3]).backward()
            with tracker.step():
                opt.step()
        runs[cache] = (tracker.result(), data.reads)
    (plain, reads_plain), (cached, reads_cached) = runs[False], runs[True]
    assert reads_cached == 1 and reads_plain > 3
    np.testing.assert_array_equal(cached.tensor_sums, plain.tensor_sums)


def test_a_step_past_max_splits_warns_once_and_is_flagged_in_the_run():
    """A step too curved for max_splits: one warning, listed by the tracker and
    flagged by run.grounded() (the stored run says so too)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    x, y = xy()
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), max_splits=2,
                                 atol=0, rtol=1e-9)
    opt = torch.optim.SGD(model.parameters(), lr=3.0)
    with pytest.warns(RuntimeWarning, match="not grounded") as record:
        for i in range(3):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[i::3]), y[i::3]).backward()
            with tracker.step():
                opt.step()
    assert len([w for w in record if "not grounded" in str(w.message)]) == 1
    run = tracker.result()
    flagged = [s for s, ok in zip(run.steps.tolist(), run.grounded()) if not ok]
    assert flagged == [s for _, s in tracker.ungrounded_steps] and flagged
