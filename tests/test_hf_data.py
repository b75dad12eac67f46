"""The Hugging Face Trainer's data forms, label weighting and the errors that
name their cause (lca_ext.integrations.transformers, lca_ext.evaluate).

Every reference is computed directly with torch in float64 over the whole set,
independently of the tracker: the label-weighted mean cross entropy, each
class's share of it, the token-weighted mean of a causal LM."""
import copy
import types

import numpy as np
import pytest
import torch
from torch import nn

import lca_ext

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from lca_ext.integrations.transformers import (LCACallback, hf_batch_loss,  # noqa: E402
                                               trainer_loader)

transformers.logging.set_verbosity_error()
VOCAB, SEQ, LABELS = 24, 8, 4


def bert(num_labels=LABELS):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=32,
                                  max_position_embeddings=SEQ, num_labels=num_labels)
    return transformers.BertForSequenceClassification(cfg).double()   # dropout 0.1


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=VOCAB,
                                  n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).double()                 # dropout 0.1


def class_examples(n, seed, ignored=()):
    """Example dicts as Trainer(train_dataset=...) takes them: 1-d input_ids, an
    int label (-100 at the indices in ``ignored``), and a text column the model
    does not take (the Trainer drops it)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=gen)
        label = -100 if i in ignored else int(torch.randint(0, LABELS, (), generator=gen))
        out.append({"input_ids": ids, "attention_mask": torch.ones(SEQ, dtype=torch.long),
                    "labels": label, "text": f"example {i}"})
    return out


def token_examples(n, seed):
    """Causal-LM example dicts: 1-d input_ids and labels (-100 on the padding)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (SEQ,), generator=gen)
        length = int(torch.randint(SEQ // 2, SEQ + 1, (), generator=gen))
        mask = (torch.arange(SEQ) < length).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.where(mask.bool(), ids, -100)})
    return out


def stacked(examples, *keys):
    return [torch.stack([torch.as_tensor(e[k]) for e in examples]) for k in keys]


def class_reference(model, examples):
    """(label-weighted mean CE, each class's share [C]) over the whole set, float64,
    on an eval-mode copy: Σ_{labelled i} CE_i / #labelled, and per class the
    class's part of that sum / #labelled."""
    m = copy.deepcopy(model).double().eval()
    ids, mask, labels = stacked(examples, "input_ids", "attention_mask", "labels")
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits
    kept = labels != -100
    ce = nn.functional.cross_entropy(logits[kept], labels[kept], reduction="none")
    count = int(kept.sum())
    shares = np.array([float(ce[labels[kept] == c].sum()) / count for c in range(LABELS)])
    return float(ce.sum()) / count, shares


def lm_reference(model, examples):
    """The token-weighted mean of the shifted next-token CE over the set, float64."""
    m = copy.deepcopy(model).double().eval()
    ids, mask, labels = stacked(examples, "input_ids", "attention_mask", "labels")
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    kept = target != -100
    return float(nn.functional.cross_entropy(logits[kept], target[kept], reduction="sum")) / \
        int(kept.sum())


def args(tmp_path, name, **kw):
    base = dict(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4,
                per_device_eval_batch_size=3, learning_rate=1e-2, logging_steps=1,
                save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
                dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class FirstPoint(transformers.TrainerCallback):
    """θ right before the first optimizer step (the tracker's first θ_t)."""

    def __init__(self):
        self.before = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
        if self.before is None:
            self.before = copy.deepcopy(model)


def train(tmp_path, name, model, train_data, lca=None, **kw):
    first = FirstPoint()
    trainer = transformers.Trainer(model=model, args=args(tmp_path, name, **kw),
                                   train_dataset=train_data,
                                   callbacks=[first] + ([lca] if lca else []))
    trainer.train()
    return trainer, first.before


# -- the weighting of hf_batch_loss ----------------------------------------------------

def test_hf_batch_loss_weighs_classification_by_its_labelled_examples():
    """A classification LCA set with some -100 labels: the LCA loss is the mean
    over the labelled examples (the old weight, the batch size, is off by
    about 1e-4 here; the tolerance is 1e-12)."""
    model = bert()
    examples = class_examples(10, seed=1, ignored=(0, 4, 5))
    loader = trainer_loader(examples, types.SimpleNamespace(per_device_eval_batch_size=4,
                                                            remove_unused_columns=True,
                                                            label_names=None), model)
    tracker = lca_ext.LCATracker(model, lca_data=loader, batch_loss=hf_batch_loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    want, _ = class_reference(model, examples)
    b = next(iter(loader))
    opt.zero_grad()
    model(**b).loss.backward()
    with tracker.step():
        opt.step()
    run = tracker.result()
    assert run.loss_before[0] == pytest.approx(want, rel=1e-12)
    assert run.loss_after[0] == pytest.approx(class_reference(model, examples)[0], rel=1e-12)


def test_hf_batch_loss_weighs_an_encoder_decoder_by_every_label_token():
    """Bart scores every label position (no shift): batches whose targets have
    1 and 5 tokens weigh 1 and 5 (the shift a causal LM needs gave 0 and 4),
    so the LCA loss is the token mean over the set (float64 reference)."""
    config = transformers.BartConfig(vocab_size=50, d_model=16, encoder_layers=1,
                                     decoder_layers=1, encoder_attention_heads=2,
                                     decoder_attention_heads=2, encoder_ffn_dim=32,
                                     decoder_ffn_dim=32, max_position_embeddings=32,
                                     dropout=0.0, attention_dropout=0.0,
                                     activation_dropout=0.0)
    torch.manual_seed(0)
    model = transformers.BartForConditionalGeneration(config).double()
    g = torch.Generator().manual_seed(3)
    batches = []
    for n_tgt in (1, 5):
        labels = torch.randint(3, 50, (2, 5), generator=g)
        labels[:, n_tgt:] = -100
        labels[1, :] = -100 if n_tgt == 1 else labels[1, :]
        batches.append({"input_ids": torch.randint(3, 50, (2, 6), generator=g),
                        "labels": labels})
    assert [int(hf_batch_loss(model, b)[1]) for b in batches] == \
        [int((b["labels"] != -100).sum()) for b in batches]
    with torch.no_grad():           # the token mean over the whole set, directly
        total = count = 0.0
        for b in batches:
            logits = model(input_ids=b["input_ids"], labels=b["labels"]).logits
            keep = b["labels"] != -100
            total += float(torch.nn.functional.cross_entropy(
                logits[keep], b["labels"][keep], reduction="sum"))
            count += int(keep.sum())
    tracker = lca_ext.LCATracker(model, lca_data=batches, batch_loss=hf_batch_loss)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.zero_grad()
    model(**batches[1]).loss.backward()
    with tracker.step():
        opt.step()
    assert tracker.result().loss_before[0] == pytest.approx(total / count, rel=1e-6)


# -- the loader: the Trainer's eval loader ---------------------------------------------

def test_trainer_loader_batches_like_the_trainer_in_order_and_drops_unused_columns():
    model = bert()
    examples = class_examples(8, seed=2, ignored=(3,))
    ns = types.SimpleNamespace(per_device_eval_batch_size=3, remove_unused_columns=True,
                               label_names=None)
    state = torch.get_rng_state()
    loader = trainer_loader(examples, ns, model)
    assert torch.equal(torch.get_rng_state(), state)      # building drew nothing
    batches = list(lca_ext.lca_set.LCASet(loader).batches())
    assert [b["input_ids"].shape[0] for b in batches] == [3, 3, 2]   # the last one kept
    assert set(batches[0]) == {"input_ids", "attention_mask", "labels"}   # no "text"
    labels = torch.cat([b["labels"] for b in batches])
    assert labels.tolist() == [e["labels"] for e in examples]          # in order
    # the columns stay when the Trainer keeps them
    kept = trainer_loader(examples, types.SimpleNamespace(
        per_device_eval_batch_size=3, remove_unused_columns=False, label_names=None), model,
        collator=lambda f: {"text": [e["text"] for e in f]})
    assert next(iter(kept))["text"] == ["example 0", "example 1", "example 2"]
    # ready batches (2-d input_ids, a DataLoader) are read as they are
    ready = [{"input_ids": torch.ones(2, SEQ, dtype=torch.long), "labels": torch.zeros(2)}]
    assert trainer_loader(ready, ns, model) is ready
    assert trainer_loader(loader, ns, model) is loader


def test_trainer_per_class_bert_from_a_list_of_example_dicts(tmp_path):
    """The issue's case: BertForSequenceClassification, lca_data a plain list of
    example dicts (with -100 labels and a text column), num_classes=num_labels
    through the callback: works first try; the loss is the label-weighted mean,
    the class shares are each class's part of it, per-class sums add up."""
    model = bert()
    lca_examples = class_examples(10, seed=3, ignored=(2, 7))
    lca = LCACallback(lca_data=lca_examples, num_classes=LABELS)
    _, before = train(tmp_path, "bert", model, class_examples(8, seed=4), lca)
    run = lca.result()
    assert len(run) == 2
    want, shares = class_reference(before, lca_examples)
    assert run.loss_before[0] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(run.class_loss_before[0], shares, rtol=1e-10, atol=1e-14)
    scale = np.abs(run.tensor_sums).sum()
    np.testing.assert_allclose(run.class_sums.sum(1), run.tensor_sums, rtol=0,
                               atol=1e-9 * scale)
    assert run.meta["config"]["lca_set_size"] == 8   # the labelled examples weigh the set
    delta = run.loss_after - run.loss_before
    assert (run.error <= 1e-4 + 1e-3 * np.abs(delta)).all()


def test_trainer_per_class_bert_from_a_datasets_dataset(tmp_path):
    datasets = pytest.importorskip("datasets")
    model = bert()
    lca_examples = class_examples(9, seed=5, ignored=(4,))
    rows = {k: [e[k].tolist() if torch.is_tensor(e[k]) else e[k] for e in lca_examples]
            for k in lca_examples[0]}
    lca = LCACallback(lca_data=datasets.Dataset.from_dict(rows), num_classes=LABELS)
    _, before = train(tmp_path, "bert_ds", model, class_examples(8, seed=4), lca)
    run = lca.result()
    want, shares = class_reference(before, lca_examples)
    assert run.loss_before[0] == pytest.approx(want, rel=1e-12)
    np.testing.assert_allclose(run.class_loss_before[0], shares, rtol=1e-10, atol=1e-14)


class Losses(transformers.TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def test_trainer_gpt2_list_of_example_dicts_bit_identical_training(tmp_path):
    """A GPT-2 (dropout on) with lists of 1-d example dicts for training and LCA:
    tracked, its training losses and final weights are bit-identical to an
    untracked run, and the LCA loss is the token-weighted mean of the set."""
    lca_examples = token_examples(7, seed=6)
    runs = []
    for with_lca in (True, False):
        model = gpt2()
        losses = Losses()
        lca = LCACallback(lca_data=lca_examples) if with_lca else None
        first = FirstPoint()
        trainer = transformers.Trainer(
            model=model, args=args(tmp_path, f"gpt2_{with_lca}", max_steps=3),
            train_dataset=token_examples(12, seed=7),
            callbacks=[first, losses] + ([lca] if lca else []))
        trainer.train()
        runs.append((model, losses.losses, lca, first.before))
    (tracked, losses, lca, before), (plain, plain_losses, _, _) = runs
    assert len(losses) == 3 and losses == plain_losses
    for a, b in zip(tracked.parameters(), plain.parameters()):
        assert torch.equal(a, b)
    run = lca.result()
    assert len(run) == 3
    # (transformers' causal-LM loss casts the logits to float32: 1e-6, not 1e-12;
    # weighting the batches by their size instead of their tokens is off by 1e-3)
    assert run.loss_before[0] == pytest.approx(lm_reference(before, lca_examples), rel=1e-6)
    assert run.loss_after[-1] == pytest.approx(lm_reference(tracked, lca_examples), rel=1e-6)


# -- errors that name the cause ---------------------------------------------------------

def test_trainer_label_outside_num_labels_names_the_set_and_value(tmp_path):
    lca_examples = class_examples(6, seed=8)
    lca_examples[4]["labels"] = 7
    lca = LCACallback(lca_data=lca_examples)
    with pytest.raises(ValueError, match=r"lca_data batch 1 has label 7, outside 0\.\.3 "
                                         r"\(model\.config\.num_labels: 4\)"):
        train(tmp_path, "bad_label", bert(), class_examples(8, seed=4), lca, max_steps=1)


def test_num_classes_target_outside_range_is_refused_before_a_pass():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    y[7] = 5              # a valid index for the 6 outputs: the loss alone would not fail
    tracker = lca_ext.LCATracker(model, nn.functional.cross_entropy, (x, y), num_classes=3,
                                 batch_size=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match=r"lca_data batch 1 has class target 5, outside "
                                         r"0\.\.2 \(num_classes=3\)"):
        with tracker.step():
            opt.step()


def test_unbatched_examples_given_to_the_tracker_say_what_to_pass():
    """Refused when the tracker is built (a list's first batch is checked there;
    a new user's list of example dicts used to pass until the first step)."""
    model = gpt2()
    with pytest.raises(ValueError, match=r"lca_data batch 0 is a single example \('input_ids' "
                                         r"of shape \(8,\)\).*LCACallback\(lca_data=examples\)"
                                         r".*DataLoader"):
        lca_ext.LCATracker(model, lca_data=token_examples(3, seed=9), batch_loss=hf_batch_loss)
    # (x, y) example pairs with loss_fn
    lin = nn.Linear(3, 2)
    pairs = [(torch.randn(3), torch.tensor(1)) for _ in range(4)]
    with pytest.raises(ValueError, match=r"lca_data batch 0 is a single example \(a 0-d target\)"):
        lca_ext.LCATracker(lin, nn.functional.cross_entropy, pairs)


def test_a_batch_with_no_counted_label_is_refused():
    model = bert()
    examples = class_examples(6, seed=10, ignored=(3, 4, 5))
    loader = trainer_loader(examples, types.SimpleNamespace(per_device_eval_batch_size=3,
                                                            remove_unused_columns=True,
                                                            label_names=None), model)
    tracker = lca_ext.LCATracker(model, lca_data=loader, batch_loss=hf_batch_loss)
    with pytest.raises(ValueError, match=r"lca_data batch 1 has no label the loss counts"):
        with tracker.step():
            torch.optim.SGD(model.parameters(), lr=0.1).step()


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 3)
        self.b.weight = self.a.weight
        self.c = nn.Linear(3, 2)
        self.c.bias.requires_grad_(False)

    def forward(self, x):
        return self.c(self.b(self.a(x)))


def test_frames_name_a_tied_alias_or_a_frozen_parameter():
    model = Tied()
    data = (torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    loss = nn.functional.cross_entropy
    with pytest.raises(ValueError, match=r"'b\.weight', an alias of the tracked parameter "
                                         r"'a\.weight'.*use 'a\.weight'"):
        lca_ext.LCATracker(model, loss, data, frames=["b.weight"])
    with pytest.raises(ValueError, match=r"'c\.bias', which is frozen"):
        lca_ext.LCATracker(model, loss, data, frames=["c.bias"])
    with pytest.raises(ValueError, match=r"'d\.weight', which is not a parameter"):
        lca_ext.LCATracker(model, loss, data, frames=["d.weight"])
    assert lca_ext.LCATracker(model, loss, data, frames=["a.weight"]).stats.frame_tensors == [0]
