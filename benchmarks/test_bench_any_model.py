"""A tracked step of a tiny GPT-2 (dict batches, token-weighted batch_loss,
tracker.attach) against its gradient passes + the plain step (pytest-benchmark).

GPT-2 from ``GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128)`` (no
download), AdamW, training batches of 8 × 32 tokens; LCA set: 16 or 64
sequences of 32 tokens with padding (labels -100), in dict batches of 4.  The plain step runs on
a twin model, so the tracked model's θ moves only in tracked steps.  Rounds of
(one pass, plain step, tracked step) are interleaved; the ratio is the median
tracked step over (passes × median pass + median plain step).
"""
import copy
import time

import pytest
import torch

import lca_ext

transformers = pytest.importorskip("transformers")

SEQ, VOCAB = 32, 128


def batches(n, per_batch, seed):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, VOCAB, (per_batch, SEQ), generator=gen)
        lengths = torch.randint(SEQ // 2, SEQ + 1, (per_batch,), generator=gen)
        mask = (torch.arange(SEQ)[None] < lengths[:, None]).long()
        out.append({"input_ids": ids * mask, "attention_mask": mask,
                    "labels": torch.where(mask.bool(), ids, torch.full_like(ids, -100))})
    return out


def lm_loss(model, batch):
    return model(**batch).loss, (batch["labels"][:, 1:] != -100).sum()


@pytest.mark.parametrize("lca_batches", [4, 16], ids=["512-tokens", "2048-tokens"])
@pytest.mark.parametrize("method", ["budget", "certified", "adaptive", "simpson"])
def test_tiny_gpt2_tracked_step(benchmark, method, lca_batches):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB,
                                  n_positions=SEQ, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg)
    twin = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    tracker = lca_ext.LCATracker(model, lca_data=batches(lca_batches, 4, seed=1),
                                 batch_loss=lm_loss, method=method)
    tracker.attach(opt)
    train = iter(batches(200, 8, seed=2))
    ev = tracker.objectives[0].evaluator
    point = [p.detach() for p in tracker.params.params]
    bufs = [torch.zeros_like(p) for p in point]

    def one_pass():
        ev.loss_and_grad(point, bufs)

    def step_of(m, o):
        def step():
            b = next(train)
            o.zero_grad()
            m(**b).loss.backward()
            o.step()              # tracked through the hooks when o is attached
        return step

    tracked, plain = step_of(model, opt), step_of(twin, twin_opt)
    tracked()   # warm-up: the first step computes its start gradient
    plain()
    t_pass, t_plain, t_step, passes = [], [], [], []
    for _ in range(8):
        for fn, ts in ((one_pass, t_pass), (plain, t_plain), (tracked, t_step)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
        passes.append(int(tracker.last["train/grad_passes"]))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    ratios = sorted(t / (p * med(t_pass) + med(t_plain)) for t, p in zip(t_step, passes))
    ratio = ratios[len(ratios) // 2]
    print(f"\ntiny GPT-2 ({sum(p.numel() for p in point) / 1e6:.2f}M parameters, {method}, "
          f"LCA set {lca_batches * 4 * SEQ} tokens): "
          f"tracked step "
          f"{med(t_step) * 1e3:.1f} ms = {ratio:.3f} x (passes {passes} x one pass "
          f"{med(t_pass) * 1e3:.1f} ms + plain step {med(t_plain) * 1e3:.1f} ms)")
    benchmark.extra_info.update(ratio=ratio, passes=passes)
    benchmark.pedantic(tracked, rounds=3, iterations=1)
