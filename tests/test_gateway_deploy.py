"""The ToolGateway block and the deploy's gateway checks (tasks/gateway/config.py): every bad input is a clear
error before any resource exists; the tool sets and the tenants secret are written as the gateway reads them.
No model runs here (tests/test_gateway_e2e.py runs the gateway beside a real server)."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from blocks.model_store import ModelStore
from blocks.tool_gateway import GatewayTenant, ToolGateway
from gateway.check_tools import pickup_code, seed_of
from gateway.tenants import TenantRegistry
from tasks.core.aws import aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.secrets import read_secret
from tasks.core.state import delete_state, gateway_prefix
from tasks.gateway.config import checks_model, publish_gateway, resolve_gateway

pytestmark = pytest.mark.integration  # the deploy-side checks read S3 and Secrets Manager on the moto server
CALC = {"tools": [{"builtin": "calculate"}]}
SERVED = ["base-model", "tools-adapter"]


def _gateway(**tenants: GatewayTenant) -> ToolGateway:
    return ToolGateway(tenants=tenants or {"acme": GatewayTenant(model="tools-adapter", toolset=CALC)})


# ------------------------------------------------------------------------------------------ the block alone


@pytest.mark.parametrize("bad, says", [
    ({"tenants": {}}, "at least 1"),
    ({"tenants": {"Acme": {"model": "m", "toolset": CALC}}}, "tenant names"),
    ({"tenants": {"acme": {"model": "bad model name", "toolset": CALC}}}, "served model name"),
    ({"tenants": {"acme": {"model": "m", "toolset": {"tools": [{"builtin": "nope"}]}}}}, "no built-in tool"),
    ({"tenants": {"acme": {"model": "m", "toolset": {"tools": [{"name": "a b", "implementation": {"type": "python",
                                                                                                  "entry_point": "x:y"}}]}}}},
     "tool name"),
    ({"tenants": {"acme": {"model": "m", "toolset": "  "}}}, "toolset is empty"),
    ({"tenants": {"acme": {"model": "m", "toolset": CALC}}, "cpu": 300}, "not a Fargate size"),
    ({"tenants": {"acme": {"model": "m", "toolset": CALC}}, "cpu": 256, "memory_mib": 4096}, "512, 1024, 2048"),
    ({"tenants": {"acme": {"model": "m", "toolset": CALC}}, "listener_port": 80}, "vLLM listener"),
    ({"tenants": {"acme": {"model": "m", "toolset": CALC}}, "max_rounds": 0}, "max_rounds"),
])
def test_the_block_refuses_bad_values(bad, says):
    with pytest.raises(ValidationError, match=says):
        ToolGateway.model_validate(bad)


def test_block_defaults_are_a_valid_fargate_size_and_a_free_listener():
    g = _gateway()
    assert (g.cpu, g.memory_mib, g.listener_port, g.port, g.checks) == (512, 1024, 8080, 8001, True)


# ------------------------------------------------------------------------- against the stack, before any resource


def _nothing_written(store: ModelStore, stack: str) -> None:
    objects = aws_client("s3").list_objects_v2(Bucket=store.bucket_name, Prefix=f"stacks/{stack}/").get("KeyCount")
    assert objects == 0
    with pytest.raises(Exception, match="ResourceNotFound"):
        read_secret(f"vllm-pipeline/{stack}/gateway-tenants")


@pytest.mark.parametrize("gateway, says", [
    (lambda: _gateway(acme=GatewayTenant(model="other-model", toolset=CALC)), "name models the stack does not serve"),
    (lambda: _gateway(acme=GatewayTenant(model="base-model", toolset="no/such/tools.yaml")), "cannot be read"),
    (lambda: _gateway(acme=GatewayTenant(model="base-model", toolset="s3://vllm-pipeline-models/none.yaml")), "cannot be read"),
    (lambda: _gateway(acme=GatewayTenant(model="base-model", toolset={"tools": [{"name": "t", "implementation": {
        "type": "python", "entry_point": "no_such_module:run"}}]})), "does not import"),
    (lambda: _gateway(acme=GatewayTenant(model="base-model", toolset={"tools": [{"name": "t", "implementation": {
        "type": "webhook", "url": "https://example.com/x", "headers": {"Authorization": {"secret": "no-such-secret"}}}}]})),
     "cannot be read"),
    (lambda: _gateway(**{"validate-a": GatewayTenant(model="base-model", toolset=CALC)}), "validate's own"),
    (lambda: ToolGateway(tenants={"acme": GatewayTenant(model="base-model", toolset=CALC)}, checks_model="nope"),
     "checks_model 'nope' is not served"),
])
def test_the_deploy_refuses_a_gateway_the_stack_cannot_run(local_aws, gateway, says):
    store = ModelStore()
    with pytest.raises(PipelineInputError, match=says):
        resolve_gateway(gateway(), SERVED, store)
    _nothing_written(store, "gw-refused")


def test_a_local_deploy_with_a_bad_gateway_makes_nothing(local_aws):
    """The flow's own path: the check runs before the state record, the API key or the server."""
    from prefect import flow

    from blocks.vllm_server import VllmServerSettings
    from flows.deploy import deploy
    from tasks.core.state import ModelRef, load_state

    store, stack = ModelStore(), "gw-bad-deploy"
    model = ModelRef(repo_id="acme/m", sha="0" * 40, s3_uri=f"s3://{store.bucket_name}/models/acme/m/{'0' * 40}")
    bad = _gateway(acme=GatewayTenant(model="not-served", toolset=CALC))
    with pytest.raises(PipelineInputError, match="does not serve"):
        flow(lambda: deploy(stack, store, VllmServerSettings(), model, gateway=bad))()
    assert load_state(store, stack) == (None, None)
    with pytest.raises(Exception, match="ResourceNotFound"):
        read_secret(f"vllm-pipeline/{stack}/api-key")


def test_publish_writes_what_the_gateway_loads_and_keeps_keys(local_aws, tmp_path):
    store, stack = ModelStore(), "gw-publish"
    (tmp_path / "tools.yaml").write_text("tools:\n  - builtin: current_time\n")
    gw = _gateway(acme=GatewayTenant(model="tools-adapter", toolset=CALC),
                  beta=GatewayTenant(model="base-model", toolset=str(tmp_path / "tools.yaml")))
    recorded = []
    docs = resolve_gateway(gw, SERVED, store)
    cfg = publish_gateway(stack, gw, docs, store, "base-model", record=lambda kind, id: recorded.append((kind, id)))
    try:
        assert cfg.tenants == ["acme", "beta", "validate-a", "validate-b"]
        assert {k for k, _ in recorded} == {"s3-object", "secret"} and ("secret", cfg.tenants_secret) in recorded
        doc = json.loads(read_secret(cfg.tenants_secret).get_secret_value())
        assert {n: t["model"] for n, t in doc["tenants"].items()} == {
            "acme": "tools-adapter", "beta": "base-model", "validate-a": "tools-adapter", "validate-b": "tools-adapter"}
        registry = TenantRegistry.from_document(doc)  # what the gateway itself does with it (tool sets read from S3)
        acme_key = doc["tenants"]["acme"]["api_keys"][0]
        assert registry.authenticate(acme_key).name == "acme"
        assert sorted(registry.tenants["beta"].tools) == ["current_time"]
        seed = _seed(store, stack)  # random per stack, bound by the check tool set, never the model's to set
        assert len(seed) == 32 and "seed" not in json.dumps(registry.tenants["validate-a"].openai_tools)
        assert pickup_code(seed) != pickup_code(seed + "x")
        assert checks_model(gw, "base-model") == "tools-adapter"  # the first tenant's

        # a redeploy without beta: its tool set goes, the remaining keys and the check seed stay
        gw2 = _gateway(acme=GatewayTenant(model="tools-adapter", toolset=CALC))
        cfg2 = publish_gateway(stack, gw2, resolve_gateway(gw2, SERVED, store), store, "base-model")
        doc2 = json.loads(read_secret(cfg2.tenants_secret).get_secret_value())
        assert sorted(doc2["tenants"]) == ["acme", "validate-a", "validate-b"]
        assert doc2["tenants"]["acme"]["api_keys"] == [acme_key] and _seed(store, stack) == seed
        keys = [o["Key"] for o in aws_client("s3").list_objects_v2(Bucket=store.bucket_name,
                                                                       Prefix=gateway_prefix(stack)).get("Contents", [])]
        assert sorted(k.rsplit("/", 1)[1] for k in keys) == ["acme.json", "validate-a.json", "validate-b.json"]
    finally:
        delete_state(store, stack)
        aws_client("secretsmanager").delete_secret(SecretId=cfg.tenants_secret, ForceDeleteWithoutRecovery=True)
    assert aws_client("s3").list_objects_v2(Bucket=store.bucket_name, Prefix=gateway_prefix(stack)).get("KeyCount") == 0


def _seed(store: ModelStore, stack: str) -> str:
    body = aws_client("s3").get_object(Bucket=store.bucket_name, Key=f"{gateway_prefix(stack)}validate-a.json")["Body"].read()
    return seed_of(json.loads(body))
