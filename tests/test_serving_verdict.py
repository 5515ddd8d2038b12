"""benchmarks/serving.py's verdict: from interleaved rounds of the in-process limit and the served
rate, the medians and their spread, served over the machine limit and ``cpu_ratio`` (server over
in-process CPU ms per text), with the targets they are held to (pure, table tests); and
the process-tree memory sum serving_memory.py samples, on real processes."""

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


def _served(tps: float, server_cpu: float, errors: int = 0, p99_over_p50: float = 2.0) -> dict:
    return {"concurrency": 32, "texts_per_s": tps, "loadgen_cores": 0.5, "server_cores": 1.4,
            "mean_batch": 12.0, "server_cpu_ms_per_text": server_cpu,
            "loadgen_cpu_ms_per_text": 1.0, "server_errors": errors,
            "p99_over_p50": p99_over_p50}


def _report(rounds: list[tuple[float, float, float, float]], errors: int = 0) -> dict:
    """``rounds``: (limit texts/s, limit CPU ms/text, served texts/s, server CPU ms/text)."""
    side = [{"limit": {"texts_per_s": lt, "cpu_ms_per_text": lc}, "served": _served(st, sc)}
            for lt, lc, st, sc in rounds]
    return {"side_by_side": side, "served": [_served(300.0, 5.0, errors)],
            "machine": {"cpus": 2}, "pipeline_recorded": {"texts_per_s": 410.0}}


@pytest.mark.parametrize("served, server_cpu, ratio, ok_ratio, ok_served", [
    (360.0, 5.0, 1.0, True, True),
    (360.0, 6.25, 1.25, True, True),
    (300.0, 7.0, 1.4, False, False),
    (320.0, 4.0, 0.8, True, True),
])
def test_verdict_states_served_over_limit_and_cpu_ratio(served, server_cpu, ratio, ok_ratio,
                                                        ok_served):
    v = _serving().verdict(_report([(400.0, 5.0, served, server_cpu)] * 3))
    assert v["served_over_machine_limit"] == round(served / 400.0, 3)
    assert v["cpu_ratio"] == ratio
    assert v["targets"]["cpu_ratio <= 1.25"] is ok_ratio
    assert v["targets"]["served >= 0.8 x machine limit at c=32"] is ok_served
    assert v["pipeline_recorded_texts_per_s"] == 410.0


def test_verdict_takes_medians_of_interleaved_rounds_and_states_their_spread():
    """One outlying round moves neither median; each round's own ratio is kept."""
    v = _serving().verdict(_report([(400.0, 5.0, 320.0, 6.0), (300.0, 9.0, 100.0, 20.0),
                                    (420.0, 4.0, 340.0, 5.0)]))
    assert v["machine_limit_texts_per_s"]["median"] == 400.0
    assert (v["machine_limit_texts_per_s"]["min"], v["machine_limit_texts_per_s"]["max"]) == \
        (300.0, 420.0)
    assert v["served_texts_per_s"]["median"] == 320.0
    assert v["served_over_machine_limit"] == 0.8
    assert v["served_over_machine_limit_rounds"] == [0.8, 0.333, 0.81]
    assert v["cpu_ratio"] == round(6.0 / 5.0, 3)
    assert v["rounds"] == 3


def test_a_5xx_anywhere_fails_the_zero_5xx_target():
    ok = _serving().verdict(_report([(400.0, 5.0, 360.0, 5.0)] * 3))
    bad = _serving().verdict(_report([(400.0, 5.0, 360.0, 5.0)] * 3, errors=1))
    assert ok["targets"]["zero 5xx"] is True and bad["targets"]["zero 5xx"] is False


def test_serving_memory_counts_the_whole_process_tree():
    """serving_drive.tree_memory (what serving_memory.py samples) sums RSS/PSS/USS over a
    process and its children: a child holding 64 MiB shows up in the tree's total and in its
    own per-process entry."""
    import subprocess
    import sys

    spec = importlib.util.spec_from_file_location("serving_drive",
                                                  REPO / "benchmarks" / "serving_drive.py")
    mem = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mem)
    hold = "b = bytearray(64 * 1024 * 1024); import sys; sys.stdout.write('ready\\n'); " \
           "sys.stdout.flush(); sys.stdin.read()"
    parent = subprocess.Popen([sys.executable, "-c", "import subprocess, sys; "
                               f"p = subprocess.Popen([sys.executable, '-c', {hold!r}], "
                               "stdin=sys.stdin, stdout=sys.stdout); p.wait()"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ready"
        tree = mem.tree_memory(parent.pid)
        assert len(tree["processes"]) == 2
        assert max(tree["processes"]) >= 64 and tree["rss"] >= 64 + min(tree["processes"])
        assert tree["rss"] >= tree["pss"] >= tree["uss"] >= 64
    finally:
        parent.stdin.close()
        parent.wait(timeout=30)
