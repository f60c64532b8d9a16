"""The tool gateway on the ECS target, against the moto server (tasks/targets/ecs/gateway.py, issue #25): the
Fargate service, its target group and listener, its security group and the load balancer's rules, its roles and
the tenants secret have the right shapes; a redeploy creates nothing; a failure in the gateway step rolls back to
nothing (a new stack) or to the stack without the gateway (an update); teardown leaves nothing; a gateway the
stack cannot have is refused before any resource.

moto runs no containers, so the vLLM wait always times out: the shape tests keep the failed stack (keep_failed),
the rollback tests use the timeout or an injected error as the failure."""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager

import pytest
from botocore.exceptions import ClientError
from prefect import flow
from test_capacity import SMOLLM2_135M, SMOLLM2_BYTES
from test_ecs_target import nothing_left, recorded, run_deploy, run_teardown, stage_fake

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.tool_gateway import ToolGateway
from flows.deploy import _remove_ecs_gateway
from tasks.core.aws import Aws, aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.naming import TAG_STACK, resource_name
from tasks.core.state import load_state, save_state
from tasks.targets.ecs.deploy import Recorder
from tasks.targets.ecs.gateway import CONTAINER_PORT
from tasks.targets.ecs.service import DeployTimeout
from tasks.teardown.sweep import scan

pytestmark = pytest.mark.integration

GW_IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/gateway@sha256:" + "cd" * 32
HEADER_SECRET = "vllm-pipeline/tools/crm"
OUTSIDE_SECRET = "crm-token"
CIDR = "10.1.0.0/16"


def toolset(secret: str = HEADER_SECRET) -> dict:
    return {"tools": [
        {"builtin": "calculate"},
        {"name": "crm_lookup", "description": "Look a customer up.",
         "parameters": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]},
         "implementation": {"type": "webhook", "url": "https://crm.example.com/lookup",
                            "headers": {"Authorization": {"secret": secret, "key": "token", "template": "Bearer {value}"}}}},
    ]}


def block(**kw) -> ToolGateway:
    return ToolGateway(tenants={"acme": {"model": "smol", "toolset": kw.pop("toolset", toolset())},
                                "globex": {"model": "smol", "toolset": {"tools": [{"builtin": "current_time"}]}}},
                       image_uri=GW_IMAGE, checks=False, **kw)


@pytest.fixture()
def store(bucket):
    return ModelStore(bucket_name=bucket)


@pytest.fixture()
def small_model(bucket):
    return stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])


@pytest.fixture()
def header_secret(local_aws):
    """The webhook's header secret, under vllm-pipeline/ (and one outside it, which the refusal test names)."""
    sm = aws_client("secretsmanager")
    for name in (OUTSIDE_SECRET, HEADER_SECRET):
        try:
            arn = sm.describe_secret(SecretId=name)["ARN"]
        except ClientError:
            arn = sm.create_secret(Name=name, SecretString=json.dumps({"token": "crm-token-value"}))["ARN"]
    return arn


def deploy_with_gateway(stack, store, model, gateway=None, capacity=None, **kw):
    return run_deploy(stack, store, model, capacity or EcsGpuCapacity(ingress_cidrs=[CIDR]), gateway=gateway or block(), **kw)


def rules(group: dict) -> set[tuple[int, str]]:
    """(port, source) of every ingress rule: a CIDR or a security group id."""
    return {(p["FromPort"], r.get("CidrIp") or r.get("GroupId"))
            for p in group["IpPermissions"] for r in p.get("IpRanges", []) + p.get("UserIdGroupPairs", [])}


def groups(stack: str) -> dict[str, dict]:
    ec2 = aws_client("ec2")
    found = ec2.describe_security_groups(Filters=[{"Name": f"tag:{TAG_STACK}", "Values": [stack]}])["SecurityGroups"]
    return {g["GroupName"]: g for g in found}


def test_gateway_shapes_secrets_idempotent_redeploy_and_teardown(store, small_model, header_secret, monkeypatch, caplog, capsys):
    stack = "gw-shapes"
    caplog.set_level(logging.INFO)  # what the flows log (botocore's DEBUG wire log shows every request body: not ours)
    with recorded(monkeypatch) as first, pytest.raises(DeployTimeout):
        deploy_with_gateway(stack, store, small_model, keep_failed=True)
    state, _ = load_state(store, stack)
    aws = Aws(region="us-east-1")
    ecs, elb, iam = aws.client("ecs"), aws.client("elbv2"), aws.client("iam")
    cluster, service = resource_name(stack, "cluster"), resource_name(stack, "gateway")

    # the tenants secret: one key per tenant, its model, its tool set in the model store; the record names it
    gw = state.gateway
    assert gw is not None and gw.tenants == ["acme", "globex"] and gw.url.endswith(":8080")
    doc = json.loads(aws_client("secretsmanager").get_secret_value(SecretId=gw.tenants_secret)["SecretString"])
    assert set(doc) == {"tenants"} and set(doc["tenants"]) == {"acme", "globex"}
    for name, spec in doc["tenants"].items():
        assert set(spec) == {"api_keys", "model", "toolset"} and spec["model"] == "smol"
        assert spec["toolset"] == gw.toolsets[name] and spec["toolset"].startswith(f"s3://{store.bucket_name}/stacks/{stack}/")
        assert len(spec["api_keys"]) == 1 and len(spec["api_keys"][0]) >= 16
    keys = [k for spec in doc["tenants"].values() for k in spec["api_keys"]]
    said = caplog.text + "".join(capsys.readouterr())
    assert not [k for k in keys if k in said], "a tenant key was logged"

    # the service: Fargate, awsvpc with its own group, behind its own target group
    svc = ecs.describe_services(cluster=cluster, services=[service], include=["TAGS"])["services"][0]
    assert svc["launchType"] == "FARGATE" and svc["desiredCount"] == 1
    net = svc["networkConfiguration"]["awsvpcConfiguration"]
    gsg = groups(stack)
    alb, gwsg = gsg[resource_name(stack, "alb")], gsg[resource_name(stack, "gateway")]
    assert net["securityGroups"] == [gwsg["GroupId"]] and net["assignPublicIp"] == "ENABLED"  # the default VPC: no NAT
    tg = elb.describe_target_groups(Names=[f"vllm-{stack}-gw"])["TargetGroups"][0]
    assert svc["loadBalancers"] == [{"targetGroupArn": tg["TargetGroupArn"], "containerName": "gateway",
                                     "containerPort": CONTAINER_PORT}]
    assert any(t["key"] == TAG_STACK and t["value"] == stack for t in svc["tags"])
    sent = next(p for p in first.params["CreateService"] if p["serviceName"] == service)
    assert sent["deploymentConfiguration"]["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    assert (tg["TargetType"], tg["Port"], tg["HealthCheckPath"]) == ("ip", CONTAINER_PORT, "/health")
    lb = elb.describe_load_balancers(Names=[f"vllm-{stack}-alb"])["LoadBalancers"][0]
    listeners = {li["Port"]: li for li in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]}
    assert sorted(listeners) == [80, 8080]
    assert listeners[8080]["DefaultActions"][0]["TargetGroupArn"] == tg["TargetGroupArn"]
    [metrics] = [r for r in elb.describe_rules(ListenerArn=listeners[8080]["ListenerArn"])["Rules"] if not r["IsDefault"]]
    assert metrics["Conditions"][0]["Values"] == ["/metrics*"]  # unauthenticated: never through the listener
    assert metrics["Actions"][0]["FixedResponseConfig"]["StatusCode"] == "404"
    assert gw.url == f"http://{lb['DNSName']}:8080"

    # security: the tasks admit only the load balancer, on their port; the load balancer admits the clients on the
    # gateway's listener and the gateway on vLLM's
    assert rules(gwsg) == {(CONTAINER_PORT, alb["GroupId"])}
    assert rules(alb) == {(80, CIDR), (8080, CIDR), (80, gwsg["GroupId"])}

    # the task definition: FARGATE, awsvpc, the block's size, the settings by name, no key in it
    td = ecs.describe_task_definition(taskDefinition=resource_name(stack, "gateway"), include=["TAGS"])
    t = td["taskDefinition"]
    assert (t["networkMode"], t["requiresCompatibilities"], t["cpu"], t["memory"]) == ("awsvpc", ["FARGATE"], "512", "1024")
    c = t["containerDefinitions"][0]
    env = {e["name"]: e["value"] for e in c["environment"]}
    assert c["image"] == GW_IMAGE and c["portMappings"][0]["containerPort"] == CONTAINER_PORT
    assert env["GATEWAY_TENANTS_SECRET"] == gw.tenants_secret and env["GATEWAY_UPSTREAM_URL"] == f"http://{lb['DNSName']}/v1"
    assert c["secrets"] == [{"name": "GATEWAY_UPSTREAM_API_KEY", "valueFrom": state.endpoint.api_key_secret}]
    assert c["logConfiguration"]["options"]["awslogs-group"] == f"/vllm-pipeline/{stack}/gateway"
    assert not [k for k in keys if k in json.dumps(td, default=str)]

    # the roles: bounded, at the stack's path; the task role reads exactly the tool sets and the secrets
    for kind in ("gateway-task", "gateway-execution"):
        role = iam.get_role(RoleName=resource_name(stack, kind))["Role"]
        assert role["Path"] == f"/vllm-pipeline/{stack}/" and "vllm-pipeline-stack-boundary" in json.dumps(role["PermissionsBoundary"])
    assert t["taskRoleArn"].endswith(resource_name(stack, "gateway-task"))
    policy = iam.get_role_policy(RoleName=resource_name(stack, "gateway-task"), PolicyName="vllm-pipeline")["PolicyDocument"]
    grants = {a: st["Resource"] for st in policy["Statement"] for a in st["Action"]}
    assert set(grants) == {"s3:GetObject", "secretsmanager:GetSecretValue"}
    assert sorted(grants["s3:GetObject"]) == sorted(f"arn:aws:s3:::{u.removeprefix('s3://')}" for u in gw.toolsets.values())
    assert sorted(grants["secretsmanager:GetSecretValue"]) == sorted(
        [gw.tenants_secret, f"arn:aws:secretsmanager:us-east-1:123456789012:secret:{HEADER_SECRET}-??????"])
    execution = json.dumps(iam.get_role_policy(RoleName=resource_name(stack, "gateway-execution"), PolicyName="vllm-pipeline"))
    assert "repository/vllm-pipeline/gateway" in execution and state.endpoint.api_key_secret in execution

    # everything recorded is found by the scan, but what goes with its parent
    found, unknown = scan(aws, stack)
    missed = {(r.kind, r.id) for r in state.resources} - {(r.kind, r.id) for r in found}
    assert {k for k, _ in missed} <= {"listener", "listener-rule", "ingress-rule", "s3-object"} and unknown == []
    assert {("service", f"{cluster}/{service}"), ("task-definition", service),
            ("log-group", f"/vllm-pipeline/{stack}/gateway")} <= {(r.kind, r.id) for r in found}

    # the same deploy again creates nothing, and keeps the keys
    with recorded(monkeypatch) as again, pytest.raises(DeployTimeout):
        deploy_with_gateway(stack, store, small_model, keep_failed=True)
    assert again.created() == []
    assert json.loads(aws_client("secretsmanager").get_secret_value(SecretId=gw.tenants_secret)["SecretString"]) == doc

    # a redeploy without the gateway removes it (what deploy_to_ecs does once the stack serves; on moto it never does)
    state, etag = load_state(store, stack)
    flow(name="t-remove")(_remove_ecs_gateway)(aws, stack, Recorder(store, state, etag, "us-east-1"))
    state, _ = load_state(store, stack)
    left = [(r.kind, r.id) for r in scan(aws, stack)[0]] + [(r.kind, r.id) for r in state.resources]
    assert state.gateway is None and not [x for x in left if "gateway" in x[1] or "-gw/" in x[1]], left
    assert set(groups(stack)) == {resource_name(stack, "alb"), resource_name(stack, "host")}
    assert rules(groups(stack)[resource_name(stack, "alb")]) == {(80, CIDR)}
    assert [li["Port"] for li in elb.describe_listeners(LoadBalancerArn=lb["LoadBalancerArn"])["Listeners"]] == [80]
    assert ecs.describe_services(cluster=cluster, services=[resource_name(stack, "service")])["services"][0]["status"] == "ACTIVE"

    run_teardown(stack, store)
    assert nothing_left(stack) and load_state(store, stack)[0] is None
    assert aws_client("s3").list_objects_v2(Bucket=store.bucket_name, Prefix=f"stacks/{stack}/")["KeyCount"] == 0


@contextmanager
def failing(monkeypatch, operation: str, gateway_only):
    """The first call of `operation` whose parameters are the gateway's fails with AccessDenied (not retried)."""
    with recorded(monkeypatch) as log:
        real = log.capture

        def capture(model, params, **kw):
            real(model, params, **kw)
            if model.name == operation and gateway_only(params) and not log.fail_ops.get("done"):
                log.fail_ops["done"] = []
                raise ClientError({"Error": {"Code": "AccessDenied", "Message": f"injected at the gateway's {operation}"},
                                   "ResponseMetadata": {"HTTPStatusCode": 400}}, operation)

        log.capture = capture
        yield log


GATEWAY_CALLS = {  # the gateway step's first create, one in the middle, its last
    "CreateSecret": lambda p: p.get("Name", "").endswith("/gateway-tenants"),
    "RegisterTaskDefinition": lambda p: p.get("family", "").endswith("-gateway"),
    "CreateService": lambda p: p.get("serviceName", "").endswith("-gateway"),
}


@pytest.mark.parametrize("operation", sorted(GATEWAY_CALLS))
def test_a_failure_in_the_gateway_step_rolls_a_new_stack_back_to_nothing(store, small_model, header_secret, monkeypatch,
                                                                         operation):
    stack = f"gw-fail-{operation.lower()[:10]}"
    with failing(monkeypatch, operation, GATEWAY_CALLS[operation]), \
            pytest.raises(ClientError, match=f"injected at the gateway's {operation}"):
        deploy_with_gateway(stack, store, small_model)
    assert nothing_left(stack) and load_state(store, stack)[0] is None
    assert aws_client("s3").list_objects_v2(Bucket=store.bucket_name, Prefix=f"stacks/{stack}/")["KeyCount"] == 0


def test_an_update_that_adds_a_gateway_and_fails_leaves_the_stack_as_it_was(store, small_model, header_secret, monkeypatch):
    stack = "gw-update"
    with pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, keep_failed=True)
    state, etag = load_state(store, stack)
    state.status = "running"  # as if the first deploy had become healthy
    save_state(store, state, etag)
    before_rules = rules(groups(stack)[resource_name(stack, "alb")])
    before = sorted((r.kind, r.id) for r in state.resources)
    with pytest.raises(DeployTimeout):  # the update's wait fails: what it added goes
        deploy_with_gateway(stack, store, small_model)
    state, _ = load_state(store, stack)
    assert state.status == "running" and state.gateway is None and sorted((r.kind, r.id) for r in state.resources) == before
    assert set(groups(stack)) == {resource_name(stack, "alb"), resource_name(stack, "host")}
    assert rules(groups(stack)[resource_name(stack, "alb")]) == before_rules
    aws = Aws(region="us-east-1")
    assert aws.client("ecs").describe_services(cluster=resource_name(stack, "cluster"),
                                               services=[resource_name(stack, "gateway")])["services"][0]["status"] == "INACTIVE"
    assert not [r for r in scan(aws, stack)[0] if "gateway" in r.id or r.id.endswith("-gw")]
    run_teardown(stack, store)
    assert nothing_left(stack)


@pytest.mark.parametrize("capacity, gateway, why", [
    (EcsGpuCapacity(load_balancer_scheme="internet-facing"), None, "load_balancer_scheme 'internal'"),
    (EcsGpuCapacity(certificate_arn="arn:aws:acm:us-east-1:123456789012:certificate/abc"), None, "certificate_arn"),
    (EcsGpuCapacity(request_timeout_s=60), dict(deadline_s=300), "longer than EcsGpuCapacity.request_timeout_s"),
    (None, dict(toolset=toolset(OUTSIDE_SECRET)), "not under 'vllm-pipeline/'"),
    (None, dict(toolset=toolset("vllm-pipeline/tools/missing")), "cannot be read"),
], ids=["internet-facing", "certificate", "deadline", "header-secret-outside", "header-secret-missing"])
def test_a_gateway_the_stack_cannot_have_is_refused_before_any_resource(store, small_model, header_secret, monkeypatch,
                                                                         capacity, gateway, why):
    stack = "gw-refused"
    with recorded(monkeypatch) as log, pytest.raises(PipelineInputError, match=why):
        deploy_with_gateway(stack, store, small_model, block(**(gateway or {})), capacity)
    assert log.created() == [] and not [c for c in log.calls if not c.startswith(("Get", "List", "Head", "Describe"))]
    assert load_state(store, stack)[0] is None and nothing_left(stack)


def test_a_failed_update_of_the_gateway_puts_its_service_back(store, small_model, header_secret):
    """A changed tool set makes a new task definition revision (the gateway reads tool sets at start); when the
    update fails, the gateway's service goes back to the revision it ran and the new one is deregistered."""
    stack = "gw-change"
    with pytest.raises(DeployTimeout):
        deploy_with_gateway(stack, store, small_model, keep_failed=True)
    state, etag = load_state(store, stack)
    state.status = "running"
    save_state(store, state, etag)
    ecs = Aws(region="us-east-1").client("ecs")
    cluster, service = resource_name(stack, "cluster"), resource_name(stack, "gateway")
    first = ecs.describe_services(cluster=cluster, services=[service])["services"][0]["taskDefinition"]
    with pytest.raises(DeployTimeout):
        deploy_with_gateway(stack, store, small_model, block(toolset={"tools": [{"builtin": "calculate"}]}))
    assert ecs.describe_services(cluster=cluster, services=[service])["services"][0]["taskDefinition"] == first
    assert ecs.describe_task_definition(taskDefinition=first.replace(":1", ":2"))["taskDefinition"]["status"] == "INACTIVE"
    state, _ = load_state(store, stack)
    assert state.status == "running" and state.gateway is not None and "update rolled back" in state.history[-1]
    run_teardown(stack, store)
    assert nothing_left(stack)
