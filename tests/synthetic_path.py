"""A synthetic path for rule-level tests: analytic per-group integrands with
ReLU-like jumps and an exact integral, served through the path interface the
rules use (lca_ext.path), so the rule code runs unchanged in milliseconds."""
import numpy as np


class SyntheticPath:
    """The path interface over analytic per-group integrands: group g, tensor k,
    φ_gk(s) = a_gk + b_gk·s + c_gk·s² + d_gk·s³ + Σ_j J_gkj·[s > p_gkj] (ReLU-like
    jumps in the gradient at random places), with the exact integral."""

    def __init__(self, rng, groups=8, tensors=6, jumps=40, jump=0.05, curve=1.0,
                 known_start=False, strata=None, class_curve=0.0, group_curve=0.0):
        G, K = groups, tensors
        self.group_start_known = known_start     # the two-pass stage (budget_rule)
        self.groups = G
        self.coef = rng.normal(size=(4, G, K)) * np.array([1.0, 0.5, curve, curve])[:, None, None]
        self.coef[0] += 3.0 * rng.choice([-1, 1], size=K)       # every tensor's own sign
        # per-class mode's units: groups of one stratum (class) share its own
        # curvature, which differs from class to class by ``class_curve``
        self.group_strata = None if strata is None else np.asarray(strata)
        if strata is not None:
            self.coef[2] += class_curve * rng.normal(size=(max(strata) + 1, K))[strata]
        # groups that curve more than others in every tensor (the examples each holds)
        self.coef[2] += group_curve * np.outer(rng.normal(size=G), 1.0 + rng.uniform(size=K))
        self.pos = rng.uniform(size=(G, K, jumps))
        self.size = rng.normal(size=(G, K, jumps)) * jump
        self.name, self.step = "synthetic", int(rng.integers(1 << 30))
        self.g_start, self.loss_start = {0.0: 1.0}, 0.0
        self.class_loss_start, self.num_classes, self.one_buffer = None, 0, 1
        self.last_class_losses, self.passes = None, 0

    def phi(self, s):                                            # [G, K]
        a, b, c, d = self.coef
        return a + b * s + c * s ** 2 + d * s ** 3 + (self.size * (s > self.pos)).sum(-1)

    def truth(self):                                            # [K]
        a, b, c, d = self.coef
        return (a + b / 2 + c / 3 + d / 4 + (self.size * (1 - self.pos)).sum(-1)).sum(0)

    def loss(self, s):
        return float(self.losses_at(s).sum())

    def losses_at(self, s):                                    # [G]
        a, b, c, d = self.coef
        smooth = a * s + b * s ** 2 / 2 + c * s ** 3 / 3 + d * s ** 4 / 4
        return (smooth + (self.size * np.clip(s - self.pos, 0, None)).sum(-1)).sum(-1)

    def group_losses(self, f):
        return self.losses_at(f) if f == 1.0 or (f == 0.0 and self.group_start_known) \
            else None

    # the path interface (a buffer is {f: weight})
    def buffer(self):
        return {}

    def release(self, buf):
        pass

    def accumulate(self, dst, src, w):
        for f, v in src.items():
            dst[f] = dst.get(f, 0.0) + w * v

    def scale(self, buf, x):
        for f in buf:
            buf[f] *= x

    def zero(self, buf):
        buf.clear()

    def grad(self, f, out, weight=1.0, at=None):
        if out is not None:
            out[f] = out.get(f, 0.0) + weight
            self.passes += 1
        return self.loss(f)

    def dots(self, buf):
        # a key f: the whole set at f; ("g", g, f): group g alone at f
        out = np.zeros(self.coef.shape[2])
        for f, w in buf.items():
            out += w * (self.phi(f[2])[f[1]] if isinstance(f, tuple) else self.phi(f).sum(0))
        return out[None]

    def group_dots(self, f):
        return self.phi(f)

    def mixed(self, points, out=None, weights=None):
        self.passes += 1
        for g, u in enumerate(points):
            if out is not None:
                w = 1.0 if weights is None else float(weights[g])
                out[("g", g, float(u))] = out.get(("g", g, float(u)), 0.0) + w
        return np.stack([self.phi(u)[g] for g, u in enumerate(points)])

    def group_correction(self, out, points, weights):
        for g, (u, w) in enumerate(zip(points, weights)):
            for key, c in ((("g", g, 0.0), 0.5 - w * (1 - u)), (("g", g, 1.0), 0.5 - w * u)):
                out[key] = out.get(key, 0.0) + c

    def class_loss(self):
        return None

    def unit_roundoff(self):
        return 2.0 ** -53
