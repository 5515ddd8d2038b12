"""benchmarks/serving.py's verdict: served over the machine limit and ``cpu_ratio`` (server over
in-process CPU-ms per text), with the targets they are held to (pure, table tests)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _serving():
    spec = importlib.util.spec_from_file_location("serving_bench",
                                                  REPO / "benchmarks" / "serving.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report(served_tps: float, server_cpu: float, limit_cpu: float, errors: int = 0) -> dict:
    row = {"concurrency": 32, "texts_per_s": served_tps, "loadgen_cores": 0.5,
           "server_cores": 1.4, "mean_batch": 12.0, "server_cpu_ms_per_text": server_cpu,
           "loadgen_cpu_ms_per_text": 1.0, "server_errors": errors, "p99_over_p50": 2.0}
    return {"machine_limit": {"texts_per_s": 400.0, "by_batch": [
                {"texts_per_s": 380.0, "cpu_ms_per_text": limit_cpu + 1},
                {"texts_per_s": 400.0, "cpu_ms_per_text": limit_cpu}]},
            "served": [row], "machine": {"cpus": 2}}


@pytest.mark.parametrize("served, server_cpu, limit_cpu, ratio, ok_ratio, ok_served", [
    (360.0, 5.0, 5.0, 1.0, True, True),
    (360.0, 6.25, 5.0, 1.25, True, True),
    (300.0, 7.0, 5.0, 1.4, False, False),
    (320.0, 4.0, 5.0, 0.8, True, True),
])
def test_verdict_states_served_over_limit_and_cpu_ratio(served, server_cpu, limit_cpu, ratio,
                                                        ok_ratio, ok_served):
    v = _serving().verdict(_report(served, server_cpu, limit_cpu))
    assert v["served_over_machine_limit"] == round(served / 400.0, 3)
    assert v["limit_cpu_ms_per_text"] == limit_cpu  # the fastest batch's CPU per text
    assert v["cpu_ratio"] == ratio
    assert v["targets"]["cpu_ratio <= 1.25"] is ok_ratio
    assert v["targets"]["served >= 0.8 x machine limit at c=32"] is ok_served
