"""Smoke test of bench/load.py: one real short run (redis-server, API, one worker) against the tiny model.

Why: the benchmark is run by hand for docs/BENCHMARKS.md; this keeps its measuring and reporting code working.
"""

from __future__ import annotations

import math
import shutil

import pytest

pytest_plugins = ["service.testing"]
pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="no redis-server")


def finite_non_negative(values: list[float]) -> bool:
    return bool(values) and all(math.isfinite(v) and v >= 0 for v in values)


def test_quick_run_measures_throughput_latency_and_overhead(tiny_model_dir):
    from bench.load import BenchConfig, render, run_benchmark  # after pytest_plugins registered service.testing

    cfg = BenchConfig.quick(model=str(tiny_model_dir), steps=2, jobs=4, clients=2, probe_jobs=3, offline_batches=1,
                            command="pytest")
    result = run_benchmark(cfg)

    (load,) = result.loads
    assert load.workers == 1 and load.images == 4
    assert math.isfinite(load.images_per_s) and load.images_per_s > 0
    assert load.offline is not None and load.offline.images_per_s > 0
    assert math.isfinite(load.ratio) and load.ratio > 0
    assert load.mean_batch >= 1
    assert finite_non_negative([s.e2e_s for s in load.samples])
    assert finite_non_negative([s.service_s for s in load.samples])
    assert finite_non_negative([s.wait_s for s in load.samples])

    probe = result.probe
    assert len(probe.samples) == 3 and math.isfinite(probe.compute_s) and probe.compute_s > 0
    assert finite_non_negative(probe.dispatch_s)
    assert all(math.isfinite(v) for v in probe.overhead_s)
    # Against the worker's own timing of the job's passes (same process, same clock) the service time can only be
    # longer; against the offline run in another process it is a difference of two timings and may go negative.
    assert all(v >= 0 for v in probe.in_worker_overhead_s)
    # The worker reports its own compute per job; the service time always covers it.
    assert finite_non_negative([s.worker_compute_s for s in probe.samples])
    assert finite_non_negative(probe.in_worker_overhead_s)

    report = render(result)
    assert "| workers | clients |" in report and "\n| 1 | 2 | 4 |" in report and "`pytest`" in report
