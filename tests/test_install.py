"""What a user installing lca_ext meets: the source archive's contents and
metadata, the torch-version check at import, and a minimal install (no extras)."""
import glob
import os
import re
import subprocess
import sys
import tarfile
import textwrap

import pytest
import torch

import lca_ext
from lca_ext import _loader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXTRAS = ["matplotlib", "PIL", "tqdm", "tensorboard", "mlxtend", "plotly", "lightning",
          "transformers"]


def run_python(code: str, cwd: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# -- the source archive --------------------------------------------------------

@pytest.fixture(scope="module")
def sdist(tmp_path_factory):
    if not os.path.exists(os.path.join(ROOT, "lca_ext", "_version.py")):
        pytest.skip("needs the source checkout (CI runs this file also against an installed "
                    "lca_ext, beside a copy of the tests without the package sources)")
    out = tmp_path_factory.mktemp("sdist")
    proc = subprocess.run([sys.executable, "setup.py", "-q", "sdist", "-d", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    [archive] = glob.glob(str(out / "*.tar.gz"))
    with tarfile.open(archive) as tar:
        names = [m.name for m in tar.getmembers() if m.isfile()]
        top = names[0].split("/")[0]
        pkg_info = tar.extractfile(f"{top}/PKG-INFO").read().decode()
    return top, [n[len(top) + 1:] for n in names if "/" in n], pkg_info


def test_sdist_holds_every_native_source_and_nothing_else(sdist):
    top, names, _ = sdist
    assert top == f"lca_ext-{lca_ext.__version__}"
    files = set(names)
    on_disk = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "**"),
                                                           recursive=True)
               if os.path.isfile(p) and not p.endswith((".o", ".so"))}
    assert on_disk and {f for f in files if f.startswith("csrc/")} == on_disk
    for ext in (".h", ".cuh", ".cu", ".cpp"):
        assert any(f.endswith(ext) for f in on_disk), ext   # the check is not vacuous
    py = {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "lca_ext", "**", "*.py"),
                                                      recursive=True)}
    assert py <= files, sorted(py - files)
    assert {"setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in"} <= files
    stray = [f for f in files if f.split("/")[0] in ("tests", "benchmarks", "docs", "examples",
                                                      "scripts", ".ci", "build")
             or f.endswith((".so", ".o", ".pyc"))]
    assert not stray, stray


def test_sdist_metadata(sdist):
    _, _, info = sdist
    fields = {}
    for line in info.split("\n\n")[0].splitlines():
        key, _, value = line.partition(": ")
        fields.setdefault(key, []).append(value)
    assert fields["Version"] == [lca_ext.__version__]
    assert fields["License"] == ["MIT"]
    assert any(c.startswith("Programming Language :: Python :: 3") for c in fields["Classifier"])
    assert fields["Project-URL"]
    assert {"demo", "lightning", "transformers"} <= set(fields["Provides-Extra"])
    reqs = fields["Requires-Dist"]
    core = [r for r in reqs if "extra ==" not in r]
    assert sorted(re.split(r"[<>=;\s]", r)[0] for r in core) == ["numpy", "torch", "zarr"]
    readme = open(os.path.join(ROOT, "README.md")).read()
    for extra in ("demo", "lightning", "transformers"):    # as a checkout installs them
        assert f'pip install --no-build-isolation ".[{extra}]"' in readme, extra


# -- the torch the library was built against ----------------------------------

def test_build_info_records_the_torch_it_was_built_against():
    info = lca_ext.build_info()
    # the independent reference: torch's own version header, read as text
    inc = os.path.join(os.path.dirname(torch.__file__), "include")
    text = ""
    for rel in ("torch/headeronly/version.h", "torch/csrc/api/include/torch/version.h"):
        if os.path.exists(os.path.join(inc, rel)):
            text += open(os.path.join(inc, rel)).read()
    nums = [re.search(rf"#define TORCH_VERSION_{k} (\d+)", text).group(1)
            for k in ("MAJOR", "MINOR", "PATCH")]
    assert info["torch_version"] == ".".join(nums)
    assert info["torch_build"] == torch.__version__   # built here, against this torch
    assert _loader.release(torch.__version__) == info["torch_version"]


@pytest.mark.parametrize("installed,ok", [("1.2.3+cpu", False), ("{}+cu999", True),
                                          ("{}.post1", True), ("99.0.0", False)])
def test_import_refuses_another_torch_release(tmp_path, installed, ok):
    built = lca_ext.build_info()["torch_version"]
    installed = installed.format(built)
    code = textwrap.dedent(f"""
        import torch
        torch.__version__ = {installed!r}
        try:
            import lca_ext
        except ImportError as err:
            print("REFUSED", err)
        else:
            print("LOADED", lca_ext.build_info()["torch_version"])
    """)
    proc = run_python(code, str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    if ok:
        assert proc.stdout.startswith(f"LOADED {built}"), proc.stdout
    else:
        assert proc.stdout.startswith("REFUSED"), proc.stdout
        assert f"built against torch {lca_ext.build_info()['torch_build']}" in proc.stdout
        assert f"torch {installed} is installed" in proc.stdout
        assert f"torch=={built}" in proc.stdout


def test_release_parsing():
    assert _loader.release("2.14.1+cu130") == "2.14.1"
    assert _loader.release("2.13.0") == "2.13.0"
    assert _loader.release("2.15.0.dev20260101+cpu") == "2.15.0"
    with pytest.raises(ImportError, match=r"built against torch 2.13.0\+cpu.*torch 2.14.1"):
        _loader.check_torch({"torch_version": "2.13.0", "torch_build": "2.13.0+cpu"}, "2.14.1")
    _loader.check_torch({"torch_version": "2.13.0"}, "2.13.0+cu130")


# -- a minimal install: no extras ---------------------------------------------

MINIMAL = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}
    for name in BLOCKED:          # as if not installed: import fails, find_spec is None
        sys.modules[name] = None
    import contextlib, io, os
    import numpy as np, torch
    from torch import nn
    import lca_ext
    from lca_ext import analysis, cli, offline
    from lca_ext._extras import MissingExtra

    torch.manual_seed(0)
    x = torch.randn(96, 5); y = (x[:, :3]).argmax(1)
    xv = torch.randn(32, 5); yv = (xv[:, :3]).argmax(1)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    loss_fn = nn.functional.cross_entropy
    opt = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
    os.makedirs("traj")
    torch.save(model.state_dict(), "traj/step_000000.pt")
    tracker = lca_ext.LCATracker(model, loss_fn, (x, y), eval_sets={{"val": (xv, yv)}},
                                 num_classes=3, frames=["0.weight"], store="run")
    for t in range(4):
        opt.zero_grad(); loss_fn(model(x[t::4]), y[t::4]).backward()
        with tracker.step():
            opt.step()
        torch.save(model.state_dict(), f"traj/step_{{t + 1:06d}}.pt")
    mem = tracker.result()
    run = lca_ext.load_run("run")
    assert len(run) == 4 and sorted(run.arrays) == sorted(mem.arrays)
    assert all(np.array_equal(run.arrays[k], mem.arrays[k], equal_nan=True) for k in mem.arrays)
    g = analysis.grounding(run)
    assert abs(g["total_lca"] - g["total_loss_change"]) < 1e-3, g
    analysis.helped_fraction(run); analysis.layer_totals(run); analysis.concentration(run)
    analysis.oscillation(run); analysis.class_synchronization(run, permutations=20)

    with open("mini.py", "w") as f:
        f.write("import torch\\nfrom torch import nn\\n"
                "def make():\\n    torch.manual_seed(0)\\n"
                "    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))\\n"
                "def data():\\n    torch.manual_seed(0)\\n"
                "    x = torch.randn(96, 5)\\n    return x, (x[:, :3]).argmax(1)\\n")
    sys.path.insert(0, os.getcwd())
    for part in ("0/2", "1/2"):
        assert cli.main(["offline", "traj", "--model", "mini:make", "--data", "mini:data",
                         "--out", "parts", "--part", part, "--batch-size", "12"]) == 0
    assert cli.main(["merge", "parts", "--out", "merged"]) == 0
    merged = lca_ext.load_run("merged")
    # the same steps and set (the live run per class, offline not: other groups
    # for the bars, so other refinement): the same ΔL, ΣLCA within tolerance
    assert np.allclose(merged.loss_after - merged.loss_before,
                       run.loss_after - run.loss_before, rtol=1e-6, atol=1e-6)
    assert np.allclose(merged.lca_sum, run.lca_sum, rtol=2e-3, atol=1e-4)

    for argv in (["demo", "--steps", "2", "--out", "d"], ["report", "run"],
                 ["compare", "run", "run"], ["demo", "--no-progress", "--out", "d"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(argv)
        lines = err.getvalue().strip().splitlines()
        assert rc == 2 and len(lines) == 1, (argv, rc, lines)
        assert 'pip install "lca_ext[demo]"' in lines[0], lines
        print("CLI", argv[0], "->", lines[0])
    try:
        import lca_ext.plots
    except MissingExtra as err:
        assert "matplotlib" in str(err) and "lca_ext[demo]" in str(err), err
    else:
        raise AssertionError("lca_ext.plots imported without matplotlib")
    print("MINIMAL OK")
""")


def test_minimal_install_runs_every_path_that_does_not_draw(tmp_path):
    """The library, the run store, the analyses, offline LCA and the CLI's
    offline/merge work with every extra made unimportable; demo/report/compare
    say in one line which extra to install (exit 2)."""
    proc = run_python(MINIMAL.format(blocked=EXTRAS), str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "MINIMAL OK" in proc.stdout
    assert proc.stdout.count("CLI ") == 4


def test_missing_extra_message_names_the_extra(monkeypatch):
    from lca_ext import _extras

    real = _extras.importlib.util.find_spec
    monkeypatch.setattr(_extras.importlib.util, "find_spec",
                        lambda name, *a: None if name in ("tqdm", "lightning") else real(name, *a))
    with pytest.raises(_extras.MissingExtra) as err:
        _extras.require("X", ["numpy", "tqdm", "lightning"])
    msg = str(err.value)
    assert msg == ('X needs tqdm, lightning, which are not installed: '
                   'pip install "lca_ext[demo]" and pip install "lca_ext[lightning]"')
    _extras.require("X", ["numpy"])   # present: no error
