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
