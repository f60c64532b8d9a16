"""The tool gateway on ECS: a Fargate service in the stack's cluster, behind the stack's load balancer.

What a deploy with a gateway adds to the stack (each get-or-create, recorded the moment it exists, tagged):
- a target group `<stack>-gw` (target type `ip`: Fargate tasks are `awsvpc`, each with its own interface;
  health check `GET /health`, which answers once the gateway loaded its tenants) and a listener on
  `ToolGateway.listener_port` of the stack's load balancer forwarding to it, with one rule: `/metrics` answers
  404 (the gateway's Prometheus metrics are unauthenticated);
- a security group `vllm-<stack>-gateway` for the tasks: ingress only from the load balancer's group, only on
  the gateway's port; and two rules on the load balancer's group, each recorded (`ingress-rule`): the
  gateway's listener port from `ingress_cidrs` (the clients), and the vLLM listener's port from the gateway's
  group (the gateway's own calls upstream, whatever `ingress_cidrs` says);
- a log group `/vllm-pipeline/<stack>/gateway`;
- an execution role `vllm-<stack>-gateway-execution` (pull the gateway image, write its log group, read the
  stack's API key for the container's `secrets`) and a task role `vllm-<stack>-gateway-task` that reads only
  the tenants' tool set objects, the tenants secret and the secrets the tool sets' webhook headers name; both
  with the stack's permissions boundary, like every stack role (iam.py);
- a task definition `vllm-<stack>-gateway` (FARGATE, awsvpc, the block's cpu/memory) and a service
  `vllm-<stack>-gateway` (one task, the deployment circuit breaker with rollback).

The upstream is the load balancer's vLLM listener (`http://<its DNS name>/v1`), not service discovery: the
vLLM tasks run in bridge mode on the GPU hosts, so Cloud Map could only publish SRV records of host ports
(another namespace, service and IAM surface), while the load balancer already balances over the replicas
(least outstanding requests), drops unhealthy ones, and is what every other client uses. The cost is one hop
inside the VPC. This is why two shapes are refused before any resource: an `internet-facing` load balancer
(its DNS name resolves to public addresses, so the gateway's calls would arrive from the task's public IP,
not from its security group) and a `certificate_arn` (the vLLM listener then speaks HTTPS with a certificate
for the user's domain, which the load balancer's own DNS name does not match).

The upstream key is the stack's API key secret, given to the container as `GATEWAY_UPSTREAM_API_KEY` by
the ECS agent (the execution role reads it): the task role never holds it. The tenants' keys are in the
tenants secret only (tasks/gateway/config.py writes it); nothing here logs them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.tool_gateway import ToolGateway
from gateway.toolset import SecretHeader, ToolSet, WebhookImpl
from tasks.core.aws import Aws, unless_gone
from tasks.core.errors import PipelineInputError
from tasks.core.naming import resource_name, short_name, tag_list
from tasks.core.state import Resource, StackState
from tasks.gateway.config import resolve_gateway
from tasks.targets.ecs.service import get_or_create_target_group

KIND = "gateway"  # resource_name(stack, KIND): the service, the task family and the security group
CONTAINER = "gateway"
CONTAINER_PORT = 8001  # the image's GATEWAY_PORT (images/gateway/Dockerfile)
SECRET_PREFIX = "vllm-pipeline/"  # the stack roles' boundary lets them read only these secrets


class GatewaySpec(BaseModel):
    """A gateway to deploy, checked: the block, each tenant's tool set document (tasks/gateway/config.py's
    resolve_gateway), the image."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    block: ToolGateway
    docs: dict[str, dict[str, Any]]
    image_uri: str

    @property
    def digest(self) -> str:
        """What the gateway reads at start besides its settings: the tenants' models and tool sets (not their keys,
        which a redeploy keeps)."""
        b = self.block
        what = {"docs": self.docs, "models": {n: t.model for n, t in b.tenants.items()},
                "checks": [b.checks, b.checks_model]}
        return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()

    @property
    def header_secrets(self) -> list[str]:
        return header_secrets([ToolSet.model_validate(d) for d in self.docs.values()])


class GatewayDeployError(RuntimeError):
    """The gateway service never became ready; the message says what ECS and the load balancer said."""


def log_group(stack: str) -> str:
    return f"/vllm-pipeline/{stack}/gateway"


def family(stack: str) -> str:
    return resource_name(stack, KIND)


def role_kinds() -> tuple[str, str]:
    """The `kind`s of iam.ensure_role for the gateway's execution and task roles."""
    return f"{KIND}-execution", f"{KIND}-task"


# ------------------------------------------------------------------------------------ checks, before anything


def check(capacity: EcsGpuCapacity, gateway: ToolGateway) -> None:
    """What makes a gateway impossible on this stack, before any resource (module docstring)."""
    if capacity.load_balancer_scheme != "internal":
        raise PipelineInputError(
            "a tool gateway needs EcsGpuCapacity.load_balancer_scheme 'internal': on an internet-facing load balancer "
            "the gateway's calls to vLLM would arrive from its public address, which the stack does not admit "
            "(not built yet: a private path to vLLM for that case)")
    if capacity.certificate_arn:
        raise PipelineInputError(
            "a tool gateway on a stack with certificate_arn is not built yet: the gateway reaches vLLM through the load "
            "balancer's own DNS name, which the certificate does not cover")
    if gateway.deadline_s > capacity.request_timeout_s:
        raise PipelineInputError(
            f"ToolGateway.deadline_s ({gateway.deadline_s:g}) is longer than EcsGpuCapacity.request_timeout_s "
            f"({capacity.request_timeout_s}), the load balancer's idle timeout: a request that does not stream would be cut "
            "before its deadline")


def prepare(capacity: EcsGpuCapacity, gateway: ToolGateway, served_names: list[str], store: ModelStore,
            image_uri: str) -> GatewaySpec:
    """Every check of a gateway on this stack, before any resource: the stack's shape (`check`), the tenants'
    models and tool sets (tasks/gateway/config.py, the local target's checks too), the header secrets' names."""
    check(capacity, gateway)
    docs = resolve_gateway(gateway, served_names, store, capacity.region)
    spec = GatewaySpec(block=gateway, docs=docs, image_uri=image_uri)
    check_header_secrets(spec.header_secrets)
    return spec


def header_secrets(toolsets: list[ToolSet]) -> list[str]:
    """The Secrets Manager secrets (ARN or name) the tool sets' webhook headers read."""
    found = {v.secret for ts in toolsets for t in ts.tools if isinstance(t.implementation, WebhookImpl)
             for v in t.implementation.headers.values() if isinstance(v, SecretHeader)}
    return sorted(found)


def secret_resource(secret_id: str, partition: str, region: str, account: str) -> str:
    """An IAM resource for a secret given by ARN (itself) or by name (any of its ARNs: AWS adds 6 characters)."""
    if secret_id.startswith("arn:"):
        return secret_id
    return f"arn:{partition}:secretsmanager:{region}:{account}:secret:{secret_id}-??????"


def check_header_secrets(secret_ids: list[str]) -> None:
    """Only `vllm-pipeline/...` secrets: the permissions boundary of every stack role allows no other (a gateway
    that cannot read its header secrets would never start; better said now)."""
    outside = [s for s in secret_ids if not (s.split(":secret:", 1)[-1] if s.startswith("arn:") else s).startswith(SECRET_PREFIX)]
    if outside:
        raise PipelineInputError(
            f"webhook header secrets {outside} are not under {SECRET_PREFIX!r}: on ECS the gateway's task role may read only "
            f"secrets named {SECRET_PREFIX}... (images/runtime/stack-role-boundary.json); store them as e.g. "
            f"{SECRET_PREFIX}tools/<name>")


# --------------------------------------------------------------------------------------------------- IAM


def task_policy(toolset_uris: list[str], secret_resources: list[str], partition: str) -> str:
    """The gateway task role: get exactly these tool set objects, read exactly these secrets."""
    objects = sorted(f"arn:{partition}:s3:::{u.removeprefix('s3://')}" for u in toolset_uris)
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "ToolSets", "Effect": "Allow", "Action": ["s3:GetObject"], "Resource": objects},
        {"Sid": "Secrets", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": sorted(secret_resources)},
    ]}, sort_keys=True)


# ------------------------------------------------------------------------------------------- load balancer


def ensure_target_group(aws: Aws, stack: str, vpc_id: str, drain_s: int) -> tuple[str, bool]:
    """`ip` targets on the gateway's port, health check /health; the deregistration delay lets a leaving task
    finish its requests (at most the gateway's deadline)."""
    arn, created = get_or_create_target_group(aws, stack, "gw", CONTAINER_PORT, vpc_id, "ip", unhealthy_threshold=3)
    aws.client("elbv2").modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(drain_s)}])
    return arn, created


def ensure_listener(aws: Aws, stack: str, lb_arn: str, port: int, tg_arn: str) -> tuple[str, bool]:
    """The gateway's own listener (HTTP on `port`), forwarding everything to its target group. A listener on
    that port forwarding elsewhere is not ours to change: refused."""
    elb = aws.client("elbv2")
    for listener in elb.describe_listeners(LoadBalancerArn=lb_arn)["Listeners"]:
        if listener["Port"] == port:
            targets = [a.get("TargetGroupArn") for a in listener.get("DefaultActions", [])]
            if targets != [tg_arn]:
                raise PipelineInputError(f"the stack's load balancer already listens on {port} for something else "
                                         f"({targets}): pick another ToolGateway.listener_port")
            return listener["ListenerArn"], False
    arn = elb.create_listener(LoadBalancerArn=lb_arn, Protocol="HTTP", Port=port,
                              DefaultActions=[{"Type": "forward", "TargetGroupArn": tg_arn}],
                              Tags=tag_list(stack))["Listeners"][0]["ListenerArn"]
    return arn, True


METRICS_PATHS = ["/metrics*"]  # one value: the legacy `Values` form takes one; nothing else of the gateway starts so


def ensure_metrics_rule(aws: Aws, stack: str, listener_arn: str) -> tuple[str, bool]:
    """A listener rule answering 404 for the gateway's `/metrics` (Prometheus, unauthenticated: every tenant's
    name, tool names and outcomes), so clients never read it through the listener."""
    elb = aws.client("elbv2")
    for rule in elb.describe_rules(ListenerArn=listener_arn)["Rules"]:
        paths = [v for c in rule.get("Conditions", []) if c.get("Field") == "path-pattern" for v in c.get("Values", [])]
        if sorted(paths) == sorted(METRICS_PATHS):
            return rule["RuleArn"], False
    arn = elb.create_rule(
        ListenerArn=listener_arn, Priority=1, Conditions=[{"Field": "path-pattern", "Values": METRICS_PATHS}],
        Actions=[{"Type": "fixed-response", "FixedResponseConfig": {"StatusCode": "404", "ContentType": "text/plain",
                                                                     "MessageBody": "not found"}}],
        Tags=tag_list(stack))["Rules"][0]["RuleArn"]
    return arn, True


# ----------------------------------------------------------------------------------------------- network


def public_ip(aws: Aws, subnets: list[str]) -> str:
    """ENABLED when the subnets give public addresses (the default VPC's: no NAT, so a task without one could
    not pull its image or reach Secrets Manager and S3); DISABLED in private subnets (a NAT or endpoints).
    Inbound, the address admits nothing: the security group takes only the load balancer's."""
    found = aws.client("ec2").describe_subnets(SubnetIds=subnets)["Subnets"]
    return "ENABLED" if found and all(s.get("MapPublicIpOnLaunch") for s in found) else "DISABLED"


# ---------------------------------------------------------------------------------------- task definition


def environment(upstream_url: str, tenants_secret: str, gateway: ToolGateway, region: str, digest: str) -> dict[str, str]:
    """GATEWAY_<FIELD> settings (gateway/settings.py). No key here, ever: the tenants' are in the tenants secret,
    the upstream's comes as a container secret. The gateway reads its tenants and tool sets once, at start: the
    configuration's digest (GatewaySpec.digest) is in the environment too, so a changed tool set or tenant
    makes a new task definition and the service rolls to it."""
    return {
        "VLLM_PIPELINE_GATEWAY_DIGEST": digest,
        "GATEWAY_HOST": "0.0.0.0",
        "GATEWAY_PORT": str(CONTAINER_PORT),
        "GATEWAY_UPSTREAM_URL": upstream_url,
        "GATEWAY_TENANTS_SECRET": tenants_secret,
        "GATEWAY_MAX_ROUNDS": str(gateway.max_rounds),
        "GATEWAY_DEADLINE_S": f"{gateway.deadline_s:g}",
        "GATEWAY_TOOL_TIMEOUT_S": f"{gateway.tool_timeout_s:g}",
        "GATEWAY_UPSTREAM_TIMEOUT_S": f"{gateway.upstream_timeout_s:g}",
        "AWS_DEFAULT_REGION": region,
    }


def task_definition(stack: str, gateway: ToolGateway, image_uri: str, execution_role: str, task_role: str,
                    env: dict[str, str], api_key_secret: str, region: str) -> dict:
    """register_task_definition's arguments: FARGATE, awsvpc, the block's size; stopTimeout gives requests in
    flight their deadline (Fargate allows at most 120 s)."""
    return {
        "family": family(stack),
        "taskRoleArn": task_role,
        "executionRoleArn": execution_role,
        "networkMode": "awsvpc",
        "requiresCompatibilities": ["FARGATE"],
        "runtimePlatform": {"cpuArchitecture": "X86_64", "operatingSystemFamily": "LINUX"},
        "cpu": str(gateway.cpu),
        "memory": str(gateway.memory_mib),
        "containerDefinitions": [{
            "name": CONTAINER,
            "image": image_uri,
            "essential": True,
            "portMappings": [{"containerPort": CONTAINER_PORT, "protocol": "tcp"}],
            "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "secrets": [{"name": "GATEWAY_UPSTREAM_API_KEY", "valueFrom": api_key_secret}],
            "stopTimeout": int(min(120, max(2, gateway.deadline_s))),
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": log_group(stack), "awslogs-region": region, "awslogs-stream-prefix": "gateway"}},
        }],
        "tags": tag_list(stack, "key", "value"),
    }


# --------------------------------------------------------------------------------------------------- service


def ensure_service(aws: Aws, stack: str, cluster: str, task_def: str, tg_arn: str, group: str, subnets: list[str],
                   assign_public_ip: str) -> tuple[str, bool]:
    """One Fargate task behind the gateway's target group; an update rolls to a new task definition (a new
    task starts before the old one stops: Fargate needs no spare host)."""
    ecs = aws.client("ecs")
    name = resource_name(stack, KIND)
    found = [s for s in ecs.describe_services(cluster=cluster, services=[name])["services"] if s["status"] == "ACTIVE"]
    network = {"awsvpcConfiguration": {"subnets": subnets, "securityGroups": [group], "assignPublicIp": assign_public_ip}}
    deployment = {"deploymentCircuitBreaker": {"enable": True, "rollback": True}, "maximumPercent": 200,
                  "minimumHealthyPercent": 100}
    if found:
        if found[0]["taskDefinition"] != task_def or found[0]["desiredCount"] != 1:
            ecs.update_service(cluster=cluster, service=name, taskDefinition=task_def, desiredCount=1,
                               networkConfiguration=network, deploymentConfiguration=deployment)
        return found[0]["serviceArn"], False
    arn = ecs.create_service(
        cluster=cluster, serviceName=name, taskDefinition=task_def, desiredCount=1, launchType="FARGATE",
        platformVersion="LATEST", networkConfiguration=network, deploymentConfiguration=deployment,
        loadBalancers=[{"targetGroupArn": tg_arn, "containerName": CONTAINER, "containerPort": CONTAINER_PORT}],
        healthCheckGracePeriodSeconds=60, schedulingStrategy="REPLICA",
        tags=tag_list(stack, "key", "value"), propagateTags="SERVICE", enableECSManagedTags=True,
    )["service"]["serviceArn"]
    return arn, True


class GatewayReadiness(BaseModel):
    service_stable: bool = False
    targets_healthy: bool = False
    health_answers: bool = False
    detail: str = ""


def readiness(aws: Aws, cluster: str, service: str, tg_arn: str, url: str) -> GatewayReadiness:
    ecs = aws.client("ecs")
    r = GatewayReadiness()
    svc = ecs.describe_services(cluster=cluster, services=[service])["services"][0]
    deployments = svc.get("deployments", [])
    if failed := [d for d in deployments if d.get("rolloutState") == "FAILED"]:
        raise GatewayDeployError(f"the ECS deployment circuit breaker failed the gateway's rollout: "
                                 f"{failed[0].get('rolloutStateReason')}")
    r.service_stable = (len(deployments) == 1 and svc["runningCount"] == svc["desiredCount"] > 0
                        and deployments[0].get("rolloutState", "COMPLETED") == "COMPLETED")
    health = aws.client("elbv2").describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
    r.targets_healthy = bool(health) and all(h["TargetHealth"]["State"] == "healthy" for h in health)
    r.detail = f"gateway running {svc['runningCount']}/{svc['desiredCount']}, targets " + (
        ", ".join(h["TargetHealth"]["State"] for h in health) or "none registered")
    if r.service_stable and r.targets_healthy:
        try:
            resp = httpx.get(f"{url}/health", timeout=10)
            r.health_answers = resp.status_code == 200
            if not r.health_answers:
                r.detail += f"; /health answered {resp.status_code}"
        except httpx.HTTPError as exc:
            r.detail += f"; /health: {type(exc).__name__}"
    return r


def wait_until_ready(aws: Aws, stack: str, cluster: str, tg_arn: str, url: str, timeout_s: float,
                     progress: Callable[[str], None], poll_s: float = 15) -> None:
    """A stable service, healthy targets and /health through the gateway's listener; or GatewayDeployError
    with the service's events and its stopped tasks' reasons (a tool set that fails its load-time checks, an
    unreadable secret: the task stops, and says why in its log group)."""
    service = resource_name(stack, KIND)
    deadline, last = time.monotonic() + timeout_s, ""
    while True:
        r = readiness(aws, cluster, service, tg_arn, url)
        if r.health_answers:
            return
        if r.detail != last:
            progress(r.detail)
            last = r.detail
        if time.monotonic() >= deadline:
            ecs = aws.client("ecs")
            svc = ecs.describe_services(cluster=cluster, services=[service])["services"]
            causes = [f"service event: {e['message']}" for e in (svc[0].get("events", [])[:5] if svc else [])]
            stopped = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus="STOPPED").get("taskArns", [])[:3]
            for t in ecs.describe_tasks(cluster=cluster, tasks=stopped).get("tasks", []) if stopped else []:
                causes.append("stopped task: " + "; ".join(filter(None, [t.get("stoppedReason")] +
                                                                   [c.get("reason") for c in t.get("containers", [])])))
            raise GatewayDeployError(f"stack {stack!r}: the gateway is not ready after {timeout_s:.0f}s ({r.detail}); "
                                     + (" | ".join(causes) if causes else f"see the log group {log_group(stack)}"))
        time.sleep(min(poll_s, max(0.5, deadline - time.monotonic())))


# ---------------------------------------------------------------------------------------------- removal


def recorded_resources(aws: Aws, stack: str, state: StackState) -> list[Resource]:
    """The gateway's resources among the stack's recorded ones, for a redeploy without a gateway to remove (the
    rest of the stack stays): found by their names, and the listener and rules by what they point at."""
    if state.gateway is None:
        return []
    names = {("service", resource_name(stack, KIND)), ("task-definition", family(stack)), ("log-group", log_group(stack)),
             *(("iam-role", resource_name(stack, k)) for k in role_kinds()), ("secret", state.gateway.tenants_secret),
             *(("s3-object", u) for u in state.gateway.toolsets.values())}
    tg_marker = f":targetgroup/{short_name(stack, 'gw')}/"
    mine = [r for r in state.resources
            if (r.kind, r.id.rsplit("/", 1)[-1] if r.kind == "service" else r.id) in names
            or (r.kind == "target-group" and tg_marker in r.id)]
    tgs = {r.id for r in mine if r.kind == "target-group"}
    elb, ec2 = aws.client("elbv2"), aws.client("ec2")
    for r in state.resources:
        if r.kind == "listener":
            found = unless_gone(lambda: elb.describe_listeners(ListenerArns=[r.id]), "ListenerNotFound")
            actions = [a.get("TargetGroupArn") for li in (found or {}).get("Listeners", []) for a in li.get("DefaultActions", [])]
            if tgs & set(actions):
                mine.append(r)
                mine += [x for x in state.resources if x.kind == "listener-rule"
                         and x.id.replace(":listener-rule/", ":listener/").rsplit("/", 1)[0] == r.id]
    groups = [r.id for r in state.resources if r.kind == "security-group"]
    found = unless_gone(lambda: ec2.describe_security_groups(GroupIds=groups), "InvalidGroup.NotFound") if groups else None
    gw_groups = {g["GroupId"] for g in (found or {}).get("SecurityGroups", []) if g["GroupName"] == resource_name(stack, KIND)}
    port = urlsplit(state.gateway.url).port
    for r in state.resources:
        if r.kind == "security-group" and r.id in gw_groups:
            mine.append(r)
        elif r.kind == "ingress-rule":
            group, rule_port, source = r.id.split(":", 2)
            if group in gw_groups or source in gw_groups or int(rule_port) == port:
                mine.append(r)
    return mine
