"""Shared set-up for the benchmarks: inputs, and a summary table printed (and
optionally saved as JSON) at the end of the run.

    .venv/bin/python -m pytest benchmarks -q            # print the table
    LCA_BENCH_OUT=benchmarks/results/cpu-<date>.json ... # also save raw numbers
"""
import datetime
import json
import os
import platform
import time

import pytest
import torch

import lca_ext

_ROWS = []


class TriadProbe:
    """The bandwidth probe, z = y + a*x through torch on `numel` float32 values.

    Passed as pytest-benchmark's `setup`, it runs (and times itself) right before
    every timed round of an op, so op and probe are measured interleaved, under
    the same load: their ratio is robust even where absolute speed drifts."""

    def __init__(self, numel):
        self.x, self.y, self.z = torch.randn(numel), torch.randn(numel), torch.empty(numel)
        self.bytes = 3 * 4 * numel  # counted as read x, y + write z
        self.times = []
        # read after the probe (untimed): evicts the probe's dirty cache lines so
        # their write-back does not land inside the op's timed round
        self.sweep = torch.ones(16 * 2**20)

    def __call__(self):
        t = time.perf_counter()
        torch.add(self.y, self.x, alpha=0.5, out=self.z)
        self.times.append(time.perf_counter() - t)
        self.sweep.sum()

    @property
    def gb_per_s(self):
        return self.bytes / min(self.times) / 1e9


class Recorder:
    """Collects (name, bytes moved, timing stats, probe, baseline) for the summary."""

    def __call__(self, benchmark, name, nbytes, probe=None, baseline=None):
        st = benchmark.stats.stats
        row = dict(name=name, bytes=nbytes, min_s=st.min, median_s=st.median,
                   rounds=st.rounds, baseline=baseline, probe_gb_per_s=None,
                   fraction_of_probe=None)
        if probe:
            # pair each timed round with the probe run just before it; the median
            # of the paired ratios cancels the drift of a shared machine
            op_times = list(st.data)
            probe_times = probe.times[-len(op_times):]
            ratios = sorted((nbytes / t_op) / (probe.bytes / t_pr)
                            for t_op, t_pr in zip(op_times, probe_times))
            row["fraction_of_probe"] = ratios[len(ratios) // 2]
            row["probe_gb_per_s"] = probe.bytes / sorted(probe_times)[len(probe_times) // 2] / 1e9
        _ROWS.append(row)


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
    by_name = {r["name"]: r for r in _ROWS}
    lines = [
        "",
        f"lca_ext benchmarks: {_cpu_name()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, {datetime.date.today()}",
        f"{'case':46s} {'median ms':>9s} {'GB/s':>6s} {'probe GB/s':>10s} "
        f"{'of probe':>8s} {'speed-up':>8s}",
    ]
    for r in _ROWS:
        gbs = r["bytes"] / r["median_s"] / 1e9
        base = by_name.get(r["baseline"]) if r["baseline"] else None
        r.update(gb_per_s=gbs,
                 speedup_vs_baseline=base["median_s"] / r["median_s"] if base else None)
        lines.append(
            f"{r['name']:46s} {r['median_s'] * 1e3:9.2f} {gbs:6.1f} "
            + (f"{r['probe_gb_per_s']:10.1f} {r['fraction_of_probe']:8.0%}"
               if r["fraction_of_probe"] else f"{'':10s} {'':8s}")
            + (f" {r['speedup_vs_baseline']:7.1f}x" if base else ""))
    lines.append("GB/s: bytes read + written once / median time. probe: the triad "
                 "z = y + a*x (torch, same size) run before every round of the op; "
                 "'of probe' is the median of the per-round ratios.")
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
