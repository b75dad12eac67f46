"""LCA by hand with the fused ops: a small MLP on a synthetic task.

Each training step θ_t -> θ_{t+1} (SGD with momentum on minibatches) is followed by
the Simpson path integral of the *whole-set* gradient along the straight line:
    ḡ = 1/6 g(θ_t) + 4/6 g(θ_mid) + 1/6 g(θ_{t+1})        (lca_ext.accumulate_)
    LCA_i = (θ_{t+1} - θ_t)_i * ḡ_i                          (lca_ext.allocate)
and the sum of LCA is compared with the real change of the whole-set loss.
Gradients at path points are taken with torch.func.functional_call on copies of
the parameters, so the training itself is never touched.

    python examples/quickstart.py [--steps 30]
"""
import argparse

import torch
from torch import nn
from torch.func import functional_call

import lca_ext


def whole_set_loss_and_grad(model, params, x, y):
    p = {k: v.detach().requires_grad_(True) for k, v in params.items()}
    loss = nn.functional.cross_entropy(functional_call(model, p, (x,)), y)
    grads = torch.autograd.grad(loss, list(p.values()))
    return loss.item(), list(grads)


def lca_steps(steps=30, lr=0.1, seed=0):
    """Train for `steps` steps; yield one record per step (plain Python data)."""
    torch.manual_seed(seed)
    n, d, classes = 2048, 20, 4
    x = torch.randn(n, d)
    y = (x[:, :classes] + 0.5 * torch.randn(n, classes)).argmax(1)
    model = nn.Sequential(nn.Linear(d, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(),
                          nn.Linear(32, classes))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    names = [k for k, _ in model.named_parameters()]
    edges = lca_ext.signed_log_edges(1e-10, 1e-1, 9)
    for t in range(steps):
        idx = torch.randint(0, n, (128,))
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        after = {k: v.detach().clone() for k, v in model.named_parameters()}

        avg = [torch.zeros_like(v) for v in before.values()]
        mid = {k: (before[k] + after[k]) / 2 for k in names}
        losses = []
        for point, w in ((before, 1 / 6), (mid, 4 / 6), (after, 1 / 6)):
            loss, grads = whole_set_loss_and_grad(model, point, x, y)
            losses.append(loss)
            lca_ext.accumulate_(avg, grads, w)
        res = lca_ext.allocate(list(before.values()), list(after.values()), avg,
                               row_sums=True, bin_edges=edges)
        yield dict(step=t, names=names, loss_before=losses[0], loss_after=losses[2],
                   sums=res.sums.tolist(), helped=res.helped.sum().item(),
                   numel=res.counts.sum().item(), histogram=res.histogram.sum(0).tolist())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=0.1)
    args = ap.parse_args(argv)

    print(f"build: {lca_ext.build_info()['simd']}, {torch.get_num_threads()} threads")
    print(f"{'step':>4s} {'ΔL':>10s} {'ΣLCA':>10s} {'rel err':>8s} {'helped':>7s}"
          "  LCA per layer (weight + bias)")
    total = None
    for r in lca_steps(args.steps, args.lr):
        d_loss = r["loss_after"] - r["loss_before"]
        s = sum(r["sums"])
        layers = [w + b for w, b in zip(r["sums"][::2], r["sums"][1::2])]
        total = r["sums"] if total is None else [a + b for a, b in zip(total, r["sums"])]
        print(f"{r['step']:4d} {d_loss:+10.2e} {s:+10.2e} "
              f"{abs(s - d_loss) / abs(d_loss):8.1e} {r['helped'] / r['numel']:7.1%}  "
              + " ".join(f"{v:+.1e}" for v in layers))
    print("\ntotal LCA per parameter tensor (negative = helped):")
    for name, v in zip(r["names"], total):
        print(f"  {name:10s} {v:+.4f}")


if __name__ == "__main__":
    main()
