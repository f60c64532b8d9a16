"""The default model's gate holds on any x86-64 CPU, and keeps its teeth.

Greedy outputs of a 135M model flip with the CPU's kernels: a machine with avx512_bf16 and
one without it choose different tools for the same question. One machine can produce the
other numeric paths: oneDNN capped at AVX2 (`ONEDNN_MAX_CPU_ISA`, what a CPU without
AVX-512 runs) and float32 weights instead of bf16. Each path is served exactly as the local
target serves the model (the deploy flow, eager, `--tool-strict-level parameter`): the
default gate must pass. The same path without the strict level (tool calls not held to their
schemas: a broken server) must fail it: its simple cases under `required` (a third of the
suite's cost) already fail the gate's simple x required cell. The native path is the same check in
tests/test_local_target_e2e.py (strict_stack passes the gate, loose_stack fails it).
"""

from __future__ import annotations

import pytest
from test_local_target_e2e import _deploy, _teardown

from blocks.vllm_server import VllmServerSettings
from flows.validate import validate
from tasks.core.endpoint import Endpoint
from tasks.core.secrets import read_secret
from tasks.validation.suite import gate_failures, load_gate, load_suite, run_suite

# Four vLLM servers and two full validations: ~12 minutes on 2 cores, so outside the default run
# (`.venv/bin/python -m pytest -m slow tests/test_gate_numerics_e2e.py`).
pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PATHS = {
    "onednn-avx2": ({"ONEDNN_MAX_CPU_ISA": "AVX2"}, {}),
    "float32": ({}, {"dtype": "float32"}),
}


@pytest.mark.parametrize("path", sorted(PATHS))
def test_default_gate_passes_on_each_numeric_path_and_a_loose_server_fails_it(path, staged_default, monkeypatch):
    env, fields = PATHS[path]
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the local target's server inherits the flow's environment
    stack = f"e2e-num-{path}"
    _deploy(stack, staged_default, VllmServerSettings(enforce_eager=True, **fields))
    try:
        report = validate(stack=stack, warmup_requests=2, modes=["required", "named", "none"])
        assert report.passed, report.matrix
    finally:
        _teardown(stack)
    stack = f"e2e-num-{path}-loose"
    loose = _deploy(stack, staged_default, VllmServerSettings(enforce_eager=True, tool_strict_level=None, **fields))
    try:  # the simple cases under `required` are enough to show the gate's teeth, and cheap
        suite = load_suite(modes=["required"])
        suite = suite.model_copy(update={"cases": [c for c in suite.cases if c.category == "simple"]})
        key = read_secret(loose.endpoint.api_key_secret).get_secret_value()
        with Endpoint(loose.endpoint.url, key, loose.endpoint.served_model_name, timeout=120) as ep:
            results = run_suite(ep, suite, "semantic")
        failures = gate_failures(results, load_gate(loose.endpoint.served_model_name))
        assert any(f.startswith("simple x required") for f in failures), [r.reason for r in results]
    finally:
        _teardown(stack)
