"""The committed tool-calling adapter is reproducible: retrain it (minutes of CPU) and reach its figures again.

Slow-marked, outside the default run: `.venv/bin/python -m pytest -m slow tests/test_lora_training.py`."""

from __future__ import annotations

import json
import subprocess

import pytest

from embedded.model_kit import REPO_ROOT, vllm_python

pytestmark = pytest.mark.slow
COMMITTED = REPO_ROOT / "embedded" / "adapters" / "smollm2-tool-calling"


def test_retraining_reaches_the_committed_figures(tmp_path):
    out = subprocess.run([str(vllm_python()), str(REPO_ROOT / "scripts" / "train_tool_adapter.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=3600)
    assert out.returncode == 0, out.stderr[-3000:]
    want = json.loads((COMMITTED / "figures.json").read_text())
    got = json.loads((tmp_path / "figures.json").read_text())
    assert got["examples"] == want["examples"] and got["steps"] == want["steps"]  # the same data, the same schedule
    assert got["train_loss_last10"] == pytest.approx(want["train_loss_last10"], rel=0.15)
    assert got["held_out_adapter"]["all"] >= want["held_out_adapter"]["all"] - 0.1
    assert got["held_out_base"]["all"] == pytest.approx(want["held_out_base"]["all"], abs=0.1)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and config["r"] == 8
