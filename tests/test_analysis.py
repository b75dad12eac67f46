"""The paper's analyses on small hand-made runs whose answers are known by hand."""
import numpy as np
import pytest

from lca_ext import analysis
from lca_ext.tracker import Run


def make_run(tensor_sums, counts=None, shapes=None, layer_of=None, state=None, rows=None,
             loss_before=None, loss_after=None, class_sums=None, extra=None):
    tensor_sums = np.asarray(tensor_sums, dtype=np.float64)
    t, k = tensor_sums.shape
    shapes = shapes or [[2]] * k
    layer_of = layer_of if layer_of is not None else list(range(k))
    lca = tensor_sums.sum(1)
    lb = np.asarray(loss_before if loss_before is not None else 1.0 + np.r_[0, np.cumsum(lca)[:-1]])
    la = np.asarray(loss_after if loss_after is not None else lb + lca)
    arrays = {"step": np.arange(t), "train/tensor_sums": tensor_sums,
              "train/lca_sum": lca, "train/loss_before": lb, "train/loss_after": la,
              "train/error": np.abs(lca - (la - lb)),
              "train/counts": np.asarray(counts) if counts is not None
              else np.tile([[1, 1, 0, 0]], (t, k, 1)),
              "train/histogram": np.zeros((t, k, 4), dtype=np.int64)}
    if rows is not None:
        arrays["train/row_sums"] = np.asarray(rows, dtype=np.float64)
    if class_sums is not None:
        arrays["train/class_sums"] = np.asarray(class_sums, dtype=np.float64)
    arrays.update(extra or {})
    meta = dict(names=[f"t{i}" for i in range(k)], shapes=shapes,
                layer_names=[f"L{i}" for i in range(max(layer_of) + 1)], layer_of=layer_of,
                objectives=["train"], bin_edges=[-1.0, 0.0, 1.0], num_classes=None)
    return Run(meta, arrays, state or {})


def test_grounding_relative_error():
    run = make_run([[-0.5, 0.1], [-0.2, 0.0]], loss_before=[2.0, 1.5], loss_after=[1.5, 1.2])
    g = analysis.grounding(run)
    # Σ LCA = -0.6; ΔL = 1.2 - 2.0 = -0.8 → |(-0.6) - (-0.8)| / 0.8 = 0.25
    assert g["relative_error"] == pytest.approx(0.25)
    assert g["total_lca"] == pytest.approx(-0.6)


def test_helped_fraction_overall_and_per_layer():
    counts = [[[3, 1, 0, 0], [0, 2, 2, 0]]]           # one step, two tensors
    run = make_run([[-1.0, 1.0]], counts=counts, layer_of=[0, 1])
    hf = analysis.helped_fraction(run)
    assert hf["overall"].tolist() == [3 / 8]
    assert hf["per_layer"].tolist() == [[0.75, 0.0]]


def test_heroes_and_villains():
    run = make_run([[0.0]] * 4, state={"helped_steps": [np.array([0, 1, 2, 4, 0])],
                                       "cum_lca": [np.array([0.5, 1, -1, -2, 0])]})
    hv = analysis.helped_iterations_distribution(run, bins=4)
    assert hv["fraction"].tolist() == [0.0, 0.25, 0.5, 1.0, 0.0]
    assert hv["hist"].tolist() == [1, 1, 1, 1]          # the idle one left out
    assert hv["idle"] == 1


def test_layer_totals_raw_and_per_parameter():
    run = make_run([[-1.0, -2.0, 3.0], [-1.0, 0.0, 1.0]], shapes=[[2, 3], [2], [4]],
                   layer_of=[0, 0, 1])
    lt = analysis.layer_totals(run)
    assert lt["total"].tolist() == [-4.0, 4.0]
    assert lt["per_parameter"].tolist() == [-0.5, 1.0]
    assert lt["cumulative"].tolist() == [[-3.0, 3.0], [-4.0, 4.0]]


def test_oscillation():
    run = make_run([[0.0]] * 10, state={
        "direction_changes": [np.array([0, 2, 5])],
        "grad_sign_changes": [np.array([1, 1, 10])]})
    o = analysis.oscillation(run)
    assert o["steps_between_direction_changes"] == pytest.approx((10 / 2 + 10 / 5) / 2)
    assert o["steps_between_gradient_sign_changes"] == pytest.approx((10 + 10 + 1) / 3)
    assert o["direction_changers_fraction"] == pytest.approx(2 / 3)


def test_gini_and_concentration():
    assert analysis.gini(np.ones(10)) == pytest.approx(0.0)
    assert analysis.gini(np.r_[np.zeros(9), 1.0]) == pytest.approx(0.9)
    # one parameter does 9 units of learning, nine do 1/9 each: net 10
    cum = np.r_[-9.0, np.full(9, -1 / 9)]
    run = make_run([[0.0]], state={"cum_lca": [cum]})
    c = analysis.concentration(run, share=0.9)
    assert c["fraction_doing_share"] == pytest.approx(0.1)


def test_peak_moments():
    s = np.array([0, -1, 0, -3, 0, -2, 0, 5, -0.5])
    assert analysis.peak_moments(s, top_k=2).tolist() == [3, 5]
    assert analysis.peak_moments(s, top_k=10).tolist() == [1, 3, 5, 8]


def test_synchronization_finds_planted_aligned_peaks():
    rng = np.random.default_rng(0)
    t, layers = 400, 4
    series = rng.normal(0, 0.1, (t, layers))
    planted = np.arange(20, 400, 47)                   # 9 well-separated iterations
    series[planted, :] -= 5.0                          # every layer peaks together
    res = analysis.synchronization(series, top_k=10, permutations=500)
    assert res["observed"] >= 8
    assert res["p_value"] < 0.01
    assert res["null_mean"] < 1


def test_synchronization_null_is_roughly_uniform():
    p = []
    for seed in range(40):
        rng = np.random.default_rng(100 + seed)
        series = rng.normal(size=(200, 3))            # independent layers
        p.append(analysis.synchronization(series, top_k=15, permutations=200,
                                          seed=seed)["p_value"])
    p = np.array(p)
    assert (p < 0.05).mean() <= 0.15                  # few false alarms
    assert 0.3 < np.median(p) < 0.7                   # centred like a uniform
    assert 0.2 < (p < 0.5).mean() < 0.8


def test_pruning_candidates_and_overfitting():
    rows = [[-1.0, 0.5, 0.0], [-1.0, 0.5, 0.0]]
    run = make_run([[-1.0, 0.5], [-1.0, 0.5]], shapes=[[2], [1]], rows=rows,
                   state={"cum_lca": [np.array([-2.0, 0.0]), np.array([1.0])]})
    pc = analysis.pruning_candidates(run)
    assert (pc["params_hurt"], pc["params_idle"], pc["params"]) == (1, 1, 3)
    assert pc["neurons_hurt"].tolist() == [1] and pc["neurons_idle"].tolist() == [2]
    val = {"val/tensor_sums": np.array([[0.3, -0.1], [0.3, -0.1]]),
           "val/row_sums": np.array([[0.2, 0.1, 0.0], [0.1, -0.1, 0.0]])}
    run = make_run([[-1.0, 0.5], [-1.0, 0.5]], shapes=[[2], [1]], rows=rows, extra=val)
    run.meta["objectives"] = ["train", "val"]
    of = analysis.overfitting(run)
    assert of["layers"] == ["L0"]
    assert of["neurons"].tolist() == [0]


def test_lca_value_summary_mean_is_exact():
    run = make_run([[-1.0, 0.5]], counts=[[[1, 0, 0, 0], [0, 1, 0, 0]]])
    run.arrays["train/histogram"] = np.array([[[0, 1, 0, 0], [0, 0, 1, 0]]])
    s = analysis.lca_value_summary(run)
    assert s["mean"] == pytest.approx(-0.25)           # ΣLCA / count
    assert s["hist"].tolist() == [0, 1, 1, 0]


# -- the paper code's concentration and oscillation measures, against brute force ----------

def brute_gini(x):
    """Mean absolute difference over twice the mean: Σ_i Σ_j |x_i − x_j| / (2 n² x̄)."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0 or x.sum() == 0:
        return 0.0
    return float(np.abs(x[:, None] - x[None, :]).sum() / (2 * x.size ** 2 * x.mean()))


def random_totals(seed, n=200):
    rng = np.random.default_rng(seed)
    v = rng.standard_t(2, n) * 1e-3 - 2e-4                 # heavy tails, both signs
    v[rng.random(n) < 0.05] = 0.0                          # some idle parameters
    return v


def test_helped_and_hurt_gini_exact_example():
    g = analysis.helped_hurt_gini(np.array([-9.0, -1.0, -1.0, 2.0, 0.0, 3.0]))
    # helped |v| = {9, 1, 1}: Σ|xi − xj| = 2·(8 + 8 + 0) = 32 → 32 / (2·9·11/3) = 16/33
    assert g["helped"] == pytest.approx(16 / 33)
    # hurt {2, 3}: 2·1 / (2·4·2.5) = 0.1
    assert g["hurt"] == pytest.approx(0.1)
    assert g["hurt_fraction"] == pytest.approx(2 / 6)


@pytest.mark.parametrize("seed", range(5))
def test_helped_and_hurt_gini_match_brute_force(seed):
    v = random_totals(seed)
    g = analysis.helped_hurt_gini(v)
    assert g["helped"] == pytest.approx(brute_gini(-v[v < 0]), rel=1e-10)
    assert g["hurt"] == pytest.approx(brute_gini(v[v > 0]), rel=1e-10)


def brute_top_share(v, top):
    helped = [-x for x in v if x < 0]
    k = -(-int(round(top * len(helped) * 1e9)) // 10 ** 9)   # ceil without floats' noise
    # the k largest by rank: an element is in when fewer than k are larger
    chosen = [h for h in helped if sum(o > h for o in helped) < k]
    return sum(chosen) / sum(helped)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("top", [0.01, 0.1, 0.5, 1.0])
def test_top_helpers_share_matches_brute_force(seed, top):
    v = random_totals(seed)
    assert analysis.top_helpers_share(v, top) == pytest.approx(brute_top_share(v, top), rel=1e-10)


def test_top_helpers_share_exact_and_errors():
    v = np.array([-9.0, -1.0, -1.0, 2.0, 0.0, 3.0])
    assert analysis.top_helpers_share(v, 0.01) == pytest.approx(9 / 11)   # ceil(0.03) = 1
    assert analysis.top_helpers_share(v, 0.5) == pytest.approx(10 / 11)   # ceil(1.5) = 2
    assert np.isnan(analysis.top_helpers_share(np.array([1.0, 0.0]), 0.01))
    with pytest.raises(ValueError, match="top"):
        analysis.top_helpers_share(v, 0.0)


def brute_helpers_needed(v, share):
    helped = sorted((-x for x in v if x < 0), reverse=True)
    total = sum(helped)
    running = 0.0
    for k, h in enumerate(helped, 1):
        running += h
        if running >= share * total * (1 - 1e-12):
            return k, k / len(helped), k / len(v)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("share", [0.5, 0.9, 1.0])
def test_helpers_needed_matches_brute_force(seed, share):
    v = random_totals(seed)
    got = analysis.helpers_needed(v, share)
    k, of_helping, of_all = brute_helpers_needed(v, share)
    assert (got["count"], got["of_helping"], got["of_all"]) == (k, pytest.approx(of_helping),
                                                                pytest.approx(of_all))


def test_helpers_needed_exact_beside_net_learning():
    # helped {9, 1, 1} (total 11): 9 + 1 = 10 >= 9.9 → 2 helpers of 3, 2 of 6
    v = np.array([-9.0, -1.0, -1.0, 2.0, 0.0, 3.0])
    got = analysis.helpers_needed(v, 0.9)
    assert got["of_helping"] == pytest.approx(2 / 3) and got["of_all"] == pytest.approx(2 / 6)
    # net learning 11 − 5 = 6: the largest alone (9) already exceeds 0.9·6
    run = make_run([[0.0]], shapes=[[6]], state={"cum_lca": [v]})
    assert analysis.concentration(run)["fraction_doing_share"] == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="share"):
        analysis.helpers_needed(v, 1.5)


def test_helped_concentration_per_layer():
    rng = np.random.default_rng(3)
    cum = [rng.normal(0, 1, (4, 3)), rng.normal(0, 1, 4), rng.normal(0, 1, 5)]
    run = make_run([[0.0, 0.0, 0.0]], shapes=[[4, 3], [4], [5]], layer_of=[0, 0, 1],
                   state={"cum_lca": cum})
    hc = analysis.helped_concentration(run)
    layer0 = np.r_[cum[0].ravel(), cum[1]]
    per = hc["per_layer"]
    assert per["helped_gini"][0] == pytest.approx(brute_gini(-layer0[layer0 < 0]))
    assert per["hurt_gini"][1] == pytest.approx(brute_gini(cum[2][cum[2] > 0]))
    assert per["top_share"][1] == pytest.approx(brute_top_share(cum[2], 0.01))
    everything = np.r_[layer0, cum[2]]
    assert hc["helped"] == pytest.approx(brute_gini(-everything[everything < 0]))


def brute_sign_flips(series):
    return sum(1 for a, b in zip(series[:-1], series[1:]) if a * b < 0)


def test_turns_from_state_and_frames():
    assert brute_sign_flips([-1, 2, -3, 0, 1]) == 2          # the reference itself
    rng = np.random.default_rng(7)
    frames = rng.normal(size=(6, 2, 3))
    frames[2, 0, 0] = 0.0                                    # a zero breaks a pair
    run = make_run([[0.0]] * 12, shapes=[[2, 3]], state={
        "grad_sign_changes": [np.array([[1, 0, 4], [2, 2, 0]])],
        "direction_changes": [np.array([[0, 0, 3], [1, 0, 0]])]})
    run.frames.update({"0": frames, "step": np.arange(0, 12, 2)})
    t = analysis.turns(run)
    assert t["gradient_sign_changes_mean"] == pytest.approx(9 / 6)
    assert t["direction_changes_total"] == 4
    flips = [brute_sign_flips(frames[:, i, j].tolist()) for i in range(2) for j in range(3)]
    extrema = [brute_sign_flips(np.diff(frames[:, i, j]).tolist())
               for i in range(2) for j in range(3)]
    assert t["lca_sign_changes_total"] == sum(flips)
    assert t["lca_turns_mean"] == pytest.approx(np.mean(extrema))
    assert (t["frames"], t["frame_stride"], t["frame_tensors"]) == (6, 2, ["t0"])
    exact = make_run([[0.0]] * 5, shapes=[[1]])
    exact.frames.update({"0": np.array([[-1.0], [2.0], [-3.0], [0.0], [1.0]]),
                         "step": np.arange(5)})
    t = analysis.turns(exact)
    # LCA −1, 2, −3, 0, 1: flips at (−1, 2), (2, −3); differences 3, −5, 3, 1: two turns
    assert (t["lca_sign_changes_total"], t["lca_turns_total"]) == (2, 2)
    assert "gradient_sign_changes_mean" not in t           # no state: key left out


def test_layer_groups():
    gpt = (["transformer.wte", "transformer.wpe"]
           + [f"transformer.h.{i}.{p}" for i in range(12) for p in ("ln_1", "attn", "ln_2", "mlp")]
           + ["transformer.ln_f"])
    g = analysis.layer_groups(gpt)
    assert len(g["names"]) <= 12
    assert g["names"][:3] == ["transformer.wte", "transformer.wpe", "transformer.h.0–1"]
    assert g["names"][-1] == "transformer.ln_f"
    # every layer of block h.3 sits in the group that names it
    assert {g["names"][g["of"][i]] for i, n in enumerate(gpt) if n.startswith("transformer.h.3.")} \
        == {"transformer.h.2–3"}
    six = [f"transformer.h.{i}.{p}" for i in range(6) for p in ("attn", "mlp", "ln")]
    assert analysis.layer_groups(six)["names"] == [f"transformer.h.{i}" for i in range(6)]
    seq = analysis.layer_groups([str(i) for i in range(60)])
    assert seq["names"][0] == "0–4" and len(seq["names"]) == 12
    assert np.all(np.diff(seq["of"]) >= 0)                 # contiguous, in model order
    plain = analysis.layer_groups([f"layer{i}" for i in range(30)], max_groups=10)
    assert len(plain["names"]) == 10 and plain["names"][0] == "layer0 … layer2"
    assert analysis.layer_groups(["a", "b"])["names"] == ["a", "b"]
    summed = analysis.group_sum(np.arange(60.0), seq)
    assert summed[0] == 0 + 1 + 2 + 3 + 4 and summed.sum() == np.arange(60.0).sum()
    with pytest.raises(ValueError, match="max_groups"):
        analysis.layer_groups(["a"], max_groups=0)


def test_cumulative_layer_error_adds_steps_and_tensors_by_hand():
    """Steps without bars (bar_dof 0) add their tensor_error linearly, and a
    layer's bar is its tensors' sum: through step 0, 1, 2 by hand; the last
    equals layer_totals' error."""
    err = np.array([[0.1, 0.2, 0.4], [0.01, 0.02, 0.04], [1.0, 2.0, 4.0]])
    run = make_run(np.ones((3, 3)), layer_of=[0, 0, 1],
                   extra={"train/tensor_error": err, "train/bar_dof": np.zeros(3, np.int64)})
    got = analysis.cumulative_layer_error(run, np.array([0, 1, 2]))
    np.testing.assert_allclose(got, [[0.3, 0.4], [0.33, 0.44], [3.33, 4.44]])
    np.testing.assert_allclose(got[-1], analysis.layer_totals(run)["error"])
