"""The stage bench runs end to end on a small payload and prints both ratios (its numbers are not judged here)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def test_stage_bench_reports_both_ratios(tmp_path):
    out = subprocess.run(
        [sys.executable, "bench/stage.py", "--mb", "24", "--repeat", "1", "--shards", "2", "--tmpdir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert re.search(r"^ours/a time:\s+\d+\.\d\d\s+\(target <= 0\.70\)\s+(PASS|MISS)$", out.stdout, re.M), out.stdout
    assert re.search(r"^ours/b throughput:\s+\d+\.\d\d\s+\(target >= 0\.85\)\s+(PASS|MISS)$", out.stdout, re.M), out.stdout
    assert "S3 client of (a): the project client" in out.stdout
    assert list(tmp_path.iterdir()) == []  # payload, downloads and hub log removed


def _gateway_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_gateway", ROOT / "bench" / "gateway.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_gateway_bench_arithmetic_and_report(capsys):
    """bench/gateway.py's figures from made-up runs (no vLLM here): percentiles, overhead per round from the response
    metadata, the share of rounds under 5 ms from the gateway's own histogram, ratios, and the PASS/MISS lines."""
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from gateway.metrics import OVERHEAD_BUCKETS

    bench = _gateway_bench()
    assert bench.percentile(list(range(1, 101)), 50) == 50.5
    assert round(bench.percentile(list(range(1, 101)), 95), 2) == 95.05
    assert bench.percentile([7.0], 95) == 7.0
    assert bench.overhead_per_round({"rounds": [{}, {}], "overhead_ms": 3.0}) == 1.5
    with pytest.raises(ValueError):
        bench.overhead_per_round({"rounds": [], "overhead_ms": 1.0})

    # The share under the bound, between two snapshots of the gateway's own histogram (its buckets, its name).
    assert bench.HISTOGRAM_BOUND_S in OVERHEAD_BUCKETS
    registry = CollectorRegistry()
    hist = Histogram("gateway_round_overhead_seconds", "x", buckets=OVERHEAD_BUCKETS, registry=registry)
    hist.observe(0.2)  # before the level: not counted
    before = bench.histogram(generate_latest(registry).decode(), "gateway_round_overhead_seconds")
    for v in [0.0004] * 6 + [0.003] * 2 + [0.007, 0.03]:
        hist.observe(v)
    after = bench.histogram(generate_latest(registry).decode(), "gateway_round_overhead_seconds")
    assert bench.share_at_or_under(before, after, bench.HISTOGRAM_BOUND_S) == (0.8, 10)

    def run(approach, c, seconds, latencies, rounds, overhead=(), rss=None, under=None):
        r = bench.Run(approach, c, seconds, list(latencies), list(rounds), [n - 1 for n in rounds], list(overhead), under, rss)
        r.rss_how = "VmHWM, reset before the level"
        return r

    runs = {
        (8, "gateway"): run("gateway", 8, 10.0, [100.0] * 19 + [300.0], [2] * 20, [0.5] * 19 + [0.9], 50.0, (1.0, 40)),
        (8, "direct"): run("direct", 8, 8.0, [90.0] * 20, [2] * 20),
        (64, "gateway"): run("gateway", 64, 4.0, [400.0] * 20, [2] * 20, [1.0] * 18 + [9.0, 12.0], 56.0, (0.9, 40)),
        (64, "direct"): run("direct", 64, 4.0, [380.0] * 20, [2] * 20),
    }
    assert runs[(8, "gateway")].rps == 2.0 and runs[(8, "gateway")].rounds_per_request == 2
    bench.report(runs, [8, 64], {"model": "tools", "max_tokens": 48, "max_num_seqs": 64, "tool_choice": "required"}, [])
    out = capsys.readouterr().out
    assert "gateway/direct      req/s  0.80x   p50 latency  1.11x" in out, out
    assert "(p50 gateway - p50 direct) / rounds = +5.0 ms" in out, out
    # C=8: p95 of 19 x 0.5 and one 0.9 is 0.52 -> PASS; C=64: two of twenty over 5 ms -> p95 9.15 -> MISS
    assert re.search(r"p50 0\.50 ms  p95 0\.52 ms  max 0\.90 ms  \(target p95 < 5 ms\)  PASS", out), out
    assert re.search(r"p50 1\.00 ms  p95 9\.15 ms  max 12\.00 ms  \(target p95 < 5 ms\)  MISS", out), out
    assert "rounds at or under 5 ms (gateway_round_overhead_seconds): 100.0 % of 40  (target >= 95 %)  PASS" in out
    assert "90.0 % of 40  (target >= 95 %)  MISS" in out
    assert "worst 9.15 ms (C=64)  MISS" in out
    assert re.search(r"peak RSS at C=8/64: 50\.0 / 56\.0 MB, \+12\.0 %; target within 10 %\)  MISS", out), out
    runs[(64, "gateway")].rss_peak_mb = 52.0
    assert bench.rss_verdict([runs[(8, "gateway")], runs[(64, "gateway")]]) == ("PASS", pytest.approx(0.04))


def _cold_start_bench():
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_cold_start", ROOT / "bench" / "cold_start.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cold_start_bench_ratios_are_medians_over_cold():
    """bench/cold_start.py's verdicts (no vLLM): median of each mode over cold's median, against its target."""
    bench = _cold_start_bench()
    lines = bench.ratios({"cold": [100.0, 80.0, 120.0], "warm": [40.0, 60.0, 45.0], "streamer": [90.0]})
    assert lines == ["warm/cold      0.45 (target <= 0.50)  PASS", "streamer/cold  0.90 (target <= 0.80)  MISS"]
    assert bench.ratios({"cold": [100.0], "warm": [50.0], "streamer": [80.0]})[0].endswith("PASS")  # on the target passes
    lines = bench.ratios({"cold": [100.0], "warm": [30.0], "streamer": []}, {"streamer": "RuntimeError: no S3"})
    assert lines[1] == "streamer/cold  n/a  (target <= 0.80)  RuntimeError: no S3"
    assert all("no cold time: boom" in x for x in bench.ratios({"cold": [], "warm": [1.0]}, {"cold": "boom"}))
