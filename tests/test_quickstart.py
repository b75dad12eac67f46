"""The quickstart example end to end: LCA from the fused ops is grounded in the
real change of the whole-set loss (an independent measurement)."""
import importlib.util
import pathlib

import pytest

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.fixture(scope="module")
def quickstart():
    if not EXAMPLE.exists():
        pytest.skip("examples/ not present (installed package only)")
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_simpson_lca_matches_loss_change(quickstart):
    records = list(quickstart.lca_steps(steps=4, lr=0.1))
    assert len(records) == 4
    for r in records:
        d_loss = r["loss_after"] - r["loss_before"]
        assert d_loss != 0
        # Simpson on a smooth path: within 1% of the measured loss change
        assert abs(sum(r["sums"]) - d_loss) <= 1e-2 * abs(d_loss)
        assert 0 < r["helped"] < r["numel"]
        assert sum(r["histogram"]) <= r["numel"]


def test_main_prints_table(quickstart, capsys):
    quickstart.main(["--steps", "2"])
    out = capsys.readouterr().out
    assert "ΣLCA" in out and "total LCA per parameter tensor" in out
