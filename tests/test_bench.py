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
