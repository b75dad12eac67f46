"""Shared set-up for the benchmarks: inputs, and a summary table printed (and
optionally saved as JSON) at the end of the run.

    .venv/bin/python -m pytest benchmarks -q            # print the table
    LCA_BENCH_OUT=benchmarks/results/cpu-<date>.json ... # also save raw numbers
"""
import datetime
import json
import os
import platform

import pytest
import torch

import lca_ext

_ROWS = []


class Recorder:
    """Collects (name, bytes moved, timing stats, baseline) for the summary."""

    def __call__(self, benchmark, name, nbytes, baseline=None, probe=False):
        st = benchmark.stats.stats
        _ROWS.append(dict(name=name, bytes=nbytes, min_s=st.min, median_s=st.median,
                          rounds=st.rounds, baseline=baseline, probe=probe))


@pytest.fixture(scope="session")
def record():
    return Recorder()


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def pytest_sessionfinish(session, exitstatus):
    if not _ROWS:
        return
    probe = next((r for r in _ROWS if r["probe"]), None)
    by_name = {r["name"]: r for r in _ROWS}
    bw_probe = probe["bytes"] / probe["min_s"] / 1e9 if probe else None
    lines = [
        "",
        f"lca_ext benchmarks: {_cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {datetime.date.today()}",
        f"{'case':44s} {'median ms':>10s} {'best GB/s':>10s} {'of probe':>9s} {'speed-up':>9s}",
    ]
    for r in _ROWS:
        gbs = r["bytes"] / r["min_s"] / 1e9
        frac = f"{gbs / bw_probe:8.0%}" if bw_probe else "     n/a"
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        speed = f"{base['median_s'] / r['median_s']:8.1f}x" if base else ""
        r.update(gb_per_s=gbs, fraction_of_probe=gbs / bw_probe if bw_probe else None,
                 speedup_vs_baseline=base["median_s"] / r["median_s"] if base else None)
        lines.append(f"{r['name']:44s} {r['median_s'] * 1e3:10.2f} {gbs:10.1f} {frac:>9s} {speed:>9s}")
    lines.append("GB/s counts bytes read + written once; 'of probe' compares with the "
                 "triad probe (torch.add(y, x, alpha=a, out=z)) measured in this run.")
    text = "\n".join(lines)
    tr = session.config.pluginmanager.get_plugin("terminalreporter")
    if tr is not None:
        tr.write_line(text)
    else:
        print(text)
    out = os.environ.get("LCA_BENCH_OUT")
    if out:
        info = lca_ext.build_info()
        info.pop("parallel_info", None)
        with open(out, "w") as f:
            json.dump(dict(date=str(datetime.date.today()), cpu=_cpu_name(),
                           threads=torch.get_num_threads(), torch=torch.__version__,
                           build=info, python=platform.python_version(),
                           rows=_ROWS), f, indent=1)
