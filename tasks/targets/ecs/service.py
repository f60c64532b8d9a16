"""The vLLM service on ECS: log group, task definition, load balancer, service, and the wait.

Networking is `bridge` with the container port mapped to the same host port: one vLLM task per
GPU host (it holds the host's GPUs anyway), reached by an `instance` target group, and the host
security group admits only the load balancer's group on that port. Not `awsvpc`: a task ENI on
EC2 never gets a public IP, so in the default VPC (public subnets, no NAT) the task could not
reach S3 or ECR; in bridge mode it uses the host's network. The target group's health check is
vLLM's `/health`, with a deregistration delay suited to long generations. The service runs with
the deployment circuit breaker and rollback on, so a bad revision rolls back by itself.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
from botocore.exceptions import ClientError
from pydantic import BaseModel

from blocks.catalogue import gpu_instances
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.vllm_server import VllmServerSettings
from tasks.core.aws import Aws, error_code, unless_gone
from tasks.core.naming import log_group_name, resource_name, short_name, tag_list
from tasks.targets.ecs.gpu_hosts import CONTAINER_MODEL_DIR, model_cache_mount

CONTAINER = "vllm"
HEALTH_COMMAND = ("python3 -c \"import urllib.request; "
                  "urllib.request.urlopen('http://127.0.0.1:{port}/health', timeout=4)\" || exit 1")


class DeployTimeout(RuntimeError):
    """The service never became healthy; the message carries what ECS, the ALB and the logs said."""


# ----------------------------------------------------------------------------------------------- logs


def ensure_log_group(aws: Aws, stack: str, retention_days: int, name: str | None = None) -> tuple[str, bool]:
    """The stack's log group (the server's, unless `name` names another of the stack's), tagged, with its retention."""
    logs = aws.client("logs")
    name = name or log_group_name(stack)

    def find() -> dict | None:
        return next((g for g in logs.describe_log_groups(logGroupNamePrefix=name)["logGroups"] if g["logGroupName"] == name), None)

    group, created = find(), False
    if group is None:
        try:
            logs.create_log_group(logGroupName=name, tags=dict((t["Key"], t["Value"]) for t in tag_list(stack)))
            created = True
        except ClientError as exc:
            if error_code(exc) != "ResourceAlreadyExistsException":  # a concurrent retry made it
                raise
        group = find()
    if group.get("retentionInDays") != retention_days:
        logs.put_retention_policy(logGroupName=name, retentionInDays=retention_days)
    return group["arn"], created


def delete_log_group(aws: Aws, name: str) -> bool:
    return unless_gone(lambda: aws.client("logs").delete_log_group(logGroupName=name), "ResourceNotFoundException") is not None


def last_log_lines(aws: Aws, stack: str, lines: int = 20) -> list[str]:
    logs = aws.client("logs")
    try:
        streams = logs.describe_log_streams(logGroupName=log_group_name(stack), orderBy="LastEventTime",
                                            descending=True, limit=1)["logStreams"]
        if not streams:
            return []
        events = logs.get_log_events(logGroupName=log_group_name(stack), logStreamName=streams[0]["logStreamName"],
                                     limit=lines, startFromHead=False)["events"]
    except ClientError:
        return []
    return [e["message"].rstrip() for e in events]


# ----------------------------------------------------------------------------------- task definition


def container_environment(settings: VllmServerSettings, model_uri: str, port: int,
                          adapters: dict[str, str] | None = None, adapter_index_uri: str | None = None) -> dict[str, str]:
    """What the image's entrypoint reads (images/vllm/entrypoint.py). No secrets here, ever."""
    return {
        "MODEL_URI": model_uri,
        "MODEL_CACHE_DIR": CONTAINER_MODEL_DIR,
        # only when not the default: a stack deployed before the option existed keeps its task definition
        **({"MODEL_LOAD_FORMAT": settings.load_format} if settings.load_format != "auto" else {}),
        "VLLM_ARGS": json.dumps(settings.server_args(host="0.0.0.0", port=port)),
        "LORA_ADAPTERS": json.dumps(adapters or {}),
        **({"LORA_INDEX_URI": adapter_index_uri} if adapter_index_uri else {}),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true" if settings.enable_lora else "false",
        "HEALTH_PORT": str(port),
    }


def host_share(instance_types: list[str], gpus: int) -> tuple[int, int]:
    """(CPU units, memory MiB) a task using `gpus` of a host's GPUs reserves, on the smallest of
    `instance_types`: its GPUs' share of the host, after 256 CPU units and 10% of the memory are left
    to the ECS agent and the OS. The service and the offline batch task both reserve this way, so
    on a host with GPUs to spare (service TP 1 of 4 GPUs, say) the batch task fits beside the
    service: shares of GPUs that add up to at most the host's add up to at most its CPU and memory."""
    cpu = min((gpu_instances()[t].vcpus * 1024 - 256) * gpus // gpu_instances()[t].gpus for t in instance_types)
    memory = min(int(gpu_instances()[t].memory_gib * 1024 * 0.9) * gpus // gpu_instances()[t].gpus for t in instance_types)
    return max(256, cpu), memory


def task_definition(stack: str, settings: VllmServerSettings, capacity: EcsGpuCapacity, instance_type: str,
                    image_uri: str, model_uri: str, execution_role: str, task_role: str, secrets: dict[str, str],
                    adapters: dict[str, str] | None = None, adapter_index_uri: str | None = None,
                    sidecars: list[dict] | None = None) -> dict:
    """register_task_definition's arguments. CPU and memory leave room for the ECS agent and the OS
    on the smallest instance the Auto Scaling group may launch; GPUs = tensor parallel size. The host's
    model cache is mounted at MODEL_CACHE_DIR (gpu_hosts.model_cache_mount): a restarted or rolled task
    on a host that served the model starts from its verified copy."""
    volumes, mounts = model_cache_mount()
    inst = gpu_instances()[instance_type]
    gpus = min(settings.tensor_parallel_size, inst.gpus)
    cpu, memory = host_share([instance_type, *capacity.fallback_instance_types], gpus)
    port = capacity.container_port
    env = container_environment(settings, model_uri, port, adapters, adapter_index_uri)
    return {
        "family": resource_name(stack, "server"),
        "taskRoleArn": task_role,
        "executionRoleArn": execution_role,
        "networkMode": "bridge",
        "requiresCompatibilities": ["EC2"],
        "cpu": str(cpu),
        "memory": str(memory),
        "volumes": volumes,
        "containerDefinitions": [{
            "name": CONTAINER,
            "image": image_uri,
            "essential": True,
            "mountPoints": mounts,
            "portMappings": [{"containerPort": port, "hostPort": port, "protocol": "tcp"}],
            "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "secrets": [{"name": k, "valueFrom": v} for k, v in sorted(secrets.items())],
            "resourceRequirements": [{"type": "GPU", "value": str(gpus)}],
            "ulimits": [{"name": "memlock", "softLimit": -1, "hardLimit": -1},
                        {"name": "nofile", "softLimit": 65535, "hardLimit": 65535}],
            "linuxParameters": {"sharedMemorySize": capacity.shared_memory_mib, "initProcessEnabled": True},
            "stopTimeout": 120,
            "healthCheck": {"command": ["CMD-SHELL", HEALTH_COMMAND.format(port=port)], "interval": 30, "timeout": 5,
                            "retries": 3, "startPeriod": min(300, capacity.health_check_grace_s)},
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": log_group_name(stack), "awslogs-region": capacity.region,
                "awslogs-stream-prefix": "vllm"}},
        }, *(sidecars or [])],
        "tags": tag_list(stack, "key", "value"),
    }


def _comparable(td: dict) -> str:
    keys = ("taskRoleArn", "executionRoleArn", "networkMode", "cpu", "memory", "containerDefinitions",
            "requiresCompatibilities", "volumes")
    return json.dumps({k: td.get(k) for k in keys}, sort_keys=True, default=str)


def register_task_definition(aws: Aws, definition: dict) -> tuple[str, bool]:
    """A new revision only when something changed: a re-deploy of the same settings registers nothing."""
    ecs = aws.client("ecs")
    try:
        current = ecs.describe_task_definition(taskDefinition=definition["family"])["taskDefinition"]
    except ClientError as exc:
        if error_code(exc) != "ClientException":
            raise
        current = None
    if current is not None and current.get("status") == "ACTIVE":
        wanted = json.loads(json.dumps(definition))
        have = {k: current.get(k) for k in wanted}
        wanted_defs = [{k: c.get(k) for k in w} for c, w in zip(current["containerDefinitions"], wanted["containerDefinitions"])]
        have["containerDefinitions"] = wanted_defs
        same_containers = len(current["containerDefinitions"]) == len(wanted["containerDefinitions"])  # a sidecar added or dropped
        if same_containers and _comparable(have) == _comparable(wanted):
            return current["taskDefinitionArn"], False
    return ecs.register_task_definition(**definition)["taskDefinition"]["taskDefinitionArn"], True


def deregister_family(aws: Aws, family: str) -> list[str]:
    """Every revision: deregistered (INACTIVE) and then deleted, so no tagged revision is left."""
    ecs = aws.client("ecs")
    arns = []
    for status in ("ACTIVE", "INACTIVE"):
        for page in ecs.get_paginator("list_task_definitions").paginate(familyPrefix=family, status=status):
            arns += [a for a in page["taskDefinitionArns"] if a.rsplit("/", 1)[-1].rsplit(":", 1)[0] == family]
    for arn in arns:
        try:
            ecs.deregister_task_definition(taskDefinition=arn)
        except ClientError as exc:
            if error_code(exc) not in ("ClientException", "InvalidParameterException"):
                raise
    for i in range(0, len(arns), 10):
        try:
            ecs.delete_task_definitions(taskDefinitions=arns[i:i + 10])
        except ClientError as exc:
            if error_code(exc) not in ("ClientException", "InvalidParameterException"):
                raise
    return arns


# --------------------------------------------------------------------------------------- load balancer


def ensure_load_balancer(aws: Aws, stack: str, capacity: EcsGpuCapacity, subnets: list[str], sg: str) -> tuple[dict, bool]:
    elb = aws.client("elbv2")
    name = short_name(stack, "alb")
    # vLLM streams tokens for minutes on long generations, and a request that does not stream sends
    # nothing until it is done: the default 60 s idle timeout cuts them. request_timeout_s it is.
    wanted = [{"Key": "idle_timeout.timeout_seconds", "Value": str(capacity.request_timeout_s)},
              {"Key": "routing.http.drop_invalid_header_fields.enabled", "Value": "true"}]
    try:
        lb = elb.describe_load_balancers(Names=[name])["LoadBalancers"][0]
    except ClientError as exc:
        if error_code(exc) != "LoadBalancerNotFound":
            raise
    else:
        have = {a["Key"]: a["Value"] for a in elb.describe_load_balancer_attributes(
            LoadBalancerArn=lb["LoadBalancerArn"])["Attributes"]}
        if any(have.get(a["Key"]) != a["Value"] for a in wanted):
            elb.modify_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"], Attributes=wanted)
        return lb, False
    lb = elb.create_load_balancer(
        Name=name, Subnets=subnets, SecurityGroups=[sg], Scheme=capacity.load_balancer_scheme, Type="application",
        IpAddressType="ipv4", Tags=tag_list(stack),
    )["LoadBalancers"][0]
    elb.modify_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"], Attributes=wanted)
    return lb, True


def get_or_create_target_group(aws: Aws, stack: str, suffix: str, port: int, vpc_id: str, target_type: str,
                               unhealthy_threshold: int) -> tuple[str, bool]:
    """The stack's target group `suffix` (HTTP, health check /health every 15 s), made if missing."""
    elb = aws.client("elbv2")
    name = short_name(stack, suffix)
    try:
        return elb.describe_target_groups(Names=[name])["TargetGroups"][0]["TargetGroupArn"], False
    except ClientError as exc:
        if error_code(exc) != "TargetGroupNotFound":
            raise
    return elb.create_target_group(
        Name=name, Protocol="HTTP", Port=port, VpcId=vpc_id, TargetType=target_type,
        HealthCheckProtocol="HTTP", HealthCheckPath="/health", HealthCheckIntervalSeconds=15, HealthCheckPort="traffic-port",
        HealthCheckTimeoutSeconds=5, HealthyThresholdCount=2, UnhealthyThresholdCount=unhealthy_threshold,
        Matcher={"HttpCode": "200"}, Tags=tag_list(stack),
    )["TargetGroups"][0]["TargetGroupArn"], True


def ensure_target_group(aws: Aws, stack: str, capacity: EcsGpuCapacity, vpc_id: str) -> tuple[str, bool]:
    elb = aws.client("elbv2")
    arn, created = get_or_create_target_group(aws, stack, "tg", capacity.container_port, vpc_id, "instance", unhealthy_threshold=5)
    # Least outstanding requests suits uneven generation lengths; AWS refuses it together with slow start.
    # The deregistration delay is scale-in's safety: a task leaving the target group gets no new request
    # and finishes those in flight for up to this long before ECS stops it (stopTimeout then gives vLLM
    # 120 s more); a target with nothing in flight leaves at once, so a long delay costs an idle task nothing.
    elb.modify_target_group_attributes(TargetGroupArn=arn, Attributes=[
        {"Key": "deregistration_delay.timeout_seconds", "Value": str(capacity.drain_s)},
        {"Key": "load_balancing.algorithm.type", "Value": "least_outstanding_requests"}])
    return arn, created


def ensure_listener(aws: Aws, stack: str, capacity: EcsGpuCapacity, lb_arn: str, tg_arn: str) -> tuple[str, bool]:
    elb = aws.client("elbv2")
    port = 443 if capacity.certificate_arn else 80
    for listener in elb.describe_listeners(LoadBalancerArn=lb_arn)["Listeners"]:
        if listener["Port"] == port:
            return listener["ListenerArn"], False
    kwargs: dict = {"Protocol": "HTTP", "Port": port}
    if capacity.certificate_arn:
        kwargs = {"Protocol": "HTTPS", "Port": port, "Certificates": [{"CertificateArn": capacity.certificate_arn}],
                  "SslPolicy": "ELBSecurityPolicy-TLS13-1-2-2021-06"}
    arn = elb.create_listener(LoadBalancerArn=lb_arn, DefaultActions=[{"Type": "forward", "TargetGroupArn": tg_arn}],
                              Tags=tag_list(stack), **kwargs)["Listeners"][0]["ListenerArn"]
    return arn, True


def delete_load_balancer(aws: Aws, arn: str) -> bool:
    elb = aws.client("elbv2")
    if unless_gone(lambda: elb.describe_load_balancers(LoadBalancerArns=[arn]), "LoadBalancerNotFound") is None:
        return False
    elb.delete_load_balancer(LoadBalancerArn=arn)  # its listeners go with it
    elb.get_waiter("load_balancers_deleted").wait(LoadBalancerArns=[arn], WaiterConfig={"Delay": 5, "MaxAttempts": 60})
    return True


def delete_target_group(aws: Aws, arn: str) -> bool:
    # ResourceInUse while the load balancer drains is raised: the delete task retries it
    return unless_gone(lambda: aws.client("elbv2").delete_target_group(TargetGroupArn=arn), "TargetGroupNotFound") is not None


# --------------------------------------------------------------------------------------------- service


def deployment_configuration(capacity: EcsGpuCapacity) -> dict:
    """Rolling updates start the new task before stopping the old one only when the Auto Scaling
    group may add a host for it; at max_capacity == desired_count (one GPU host) that would wait
    forever, so the old task stops first (a short outage instead of a deadlock). With autoscaling
    the service may run max_replicas tasks, so that is what needs a host to spare."""
    spare = capacity.max_capacity > (capacity.replicas[1] if capacity.autoscaling else capacity.desired_count)
    return {"deploymentCircuitBreaker": {"enable": True, "rollback": True},
            "maximumPercent": 200 if spare else 100, "minimumHealthyPercent": 100 if spare else 0}


def ensure_service(aws: Aws, stack: str, cluster: str, task_def: str, capacity: EcsGpuCapacity, tg_arn: str,
                   capacity_provider: str | None) -> tuple[str, bool]:
    """Create the service, or update it in place to the new task definition (a rolling deployment).
    With autoscaling an update keeps the count Application Auto Scaling chose (within min..max), and
    at least one task: a redeploy of a stack scaled to zero (flows/scale.py) serves again."""
    ecs = aws.client("ecs")
    name = resource_name(stack, "service")
    found = [s for s in ecs.describe_services(cluster=cluster, services=[name])["services"] if s["status"] == "ACTIVE"]
    deployment = deployment_configuration(capacity)
    strategy = [{"capacityProvider": capacity_provider, "weight": 1, "base": 0}] if capacity_provider else None
    if found:
        lo, hi = capacity.replicas
        count = min(max(found[0]["desiredCount"], lo, 1), hi) if capacity.autoscaling else capacity.desired_count
        if found[0]["taskDefinition"] != task_def or found[0]["desiredCount"] != count:
            ecs.update_service(cluster=cluster, service=name, taskDefinition=task_def, desiredCount=count,
                               deploymentConfiguration=deployment, healthCheckGracePeriodSeconds=capacity.health_check_grace_s)
        return found[0]["serviceArn"], False
    kwargs = {"capacityProviderStrategy": strategy} if strategy else {}
    lo, hi = capacity.replicas  # with autoscaling at least one task, as flows/deploy.py records (min_replicas may be 0)
    arn = ecs.create_service(
        cluster=cluster, serviceName=name, taskDefinition=task_def,
        desiredCount=min(max(capacity.desired_count, lo, 1), hi) if capacity.autoscaling else capacity.desired_count,
        deploymentConfiguration=deployment,
        loadBalancers=[{"targetGroupArn": tg_arn, "containerName": CONTAINER, "containerPort": capacity.container_port}],
        healthCheckGracePeriodSeconds=capacity.health_check_grace_s, schedulingStrategy="REPLICA",
        tags=tag_list(stack, "key", "value"), propagateTags="SERVICE", enableECSManagedTags=True, **kwargs,
    )["service"]["serviceArn"]
    return arn, True


def delete_service(aws: Aws, cluster: str, name: str, timeout_s: float = 900) -> bool:
    """Scale to zero, delete, and wait until ECS calls it INACTIVE (its tasks stopped)."""
    ecs = aws.client("ecs")
    found = [s for s in (unless_gone(lambda: ecs.describe_services(cluster=cluster, services=[name]), "ClusterNotFoundException")
                         or {}).get("services", []) if s["status"] != "INACTIVE"]
    if not found:
        return False
    if found[0]["status"] == "ACTIVE":
        ecs.update_service(cluster=cluster, service=name, desiredCount=0)
        ecs.delete_service(cluster=cluster, service=name, force=True)
    # Not the services_inactive waiter: it fails on MISSING, which is what a deleted service becomes.
    deadline, delay = time.monotonic() + timeout_s, 1.0
    while any(s["status"] in ("ACTIVE", "DRAINING") for s in ecs.describe_services(cluster=cluster, services=[name])["services"]):
        if time.monotonic() > deadline:
            raise TimeoutError(f"service {name} still draining after {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 15)
    return True


# ----------------------------------------------------------------------------------------------- wait


class Readiness(BaseModel):
    service_stable: bool = False
    targets_healthy: bool = False
    models_answer: bool = False
    detail: str = ""


def readiness(aws: Aws, cluster: str, service: str, tg_arn: str, url: str, api_key: str, served_name: str) -> Readiness:
    ecs = aws.client("ecs")
    r = Readiness()
    svc = ecs.describe_services(cluster=cluster, services=[service])["services"][0]
    deployments = svc.get("deployments", [])
    failed = [d for d in deployments if d.get("rolloutState") == "FAILED"]
    if failed:
        raise DeployTimeout(f"the ECS deployment circuit breaker failed the rollout: {failed[0].get('rolloutStateReason')}")
    r.service_stable = (len(deployments) == 1 and svc["runningCount"] == svc["desiredCount"] > 0
                        and deployments[0].get("rolloutState", "COMPLETED") == "COMPLETED")
    health = aws.client("elbv2").describe_target_health(TargetGroupArn=tg_arn)["TargetHealthDescriptions"]
    r.targets_healthy = bool(health) and all(h["TargetHealth"]["State"] == "healthy" for h in health)
    r.detail = f"running {svc['runningCount']}/{svc['desiredCount']}, targets " + (
        ", ".join(h["TargetHealth"]["State"] for h in health) or "none registered")
    if r.service_stable and r.targets_healthy:
        try:
            resp = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {api_key}"}, timeout=10)
            r.models_answer = resp.status_code == 200 and any(m.get("id") == served_name for m in resp.json().get("data", []))
            if not r.models_answer:
                r.detail += f"; /v1/models answered {resp.status_code}"
        except httpx.HTTPError as exc:
            r.detail += f"; /v1/models: {type(exc).__name__}"
    return r


def diagnose(aws: Aws, stack: str, cluster: str, service: str, asg_name: str | None) -> list[str]:
    """What a person would look up in the console: service events, stopped tasks' reasons, the
    hosts (did any join?), the Auto Scaling group's failed launches, the last log lines."""
    ecs = aws.client("ecs")
    out: list[str] = []
    svc = ecs.describe_services(cluster=cluster, services=[service])["services"]
    if svc:
        out += [f"service event: {e['message']}" for e in svc[0].get("events", [])[:5]]
    stopped = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus="STOPPED").get("taskArns", [])[:5]
    if stopped:
        for t in ecs.describe_tasks(cluster=cluster, tasks=stopped).get("tasks", []):
            reasons = [t.get("stoppedReason")] + [c.get("reason") for c in t.get("containers", [])]
            out.append("stopped task: " + "; ".join(r for r in reasons if r))
    hosts = ecs.list_container_instances(cluster=cluster).get("containerInstanceArns", [])
    if not hosts:
        out.append(f"no container instance has joined cluster {cluster}: the GPU hosts never registered "
                   "(no EC2 capacity for the instance type, the instance role, the user data or the AMI)")
    if asg_name:
        activities = aws.client("autoscaling").describe_scaling_activities(AutoScalingGroupName=asg_name, MaxRecords=5)
        for a in activities.get("Activities", []):
            if a.get("StatusCode") in ("Failed", "Cancelled"):
                out.append(f"Auto Scaling: {a.get('StatusMessage') or a.get('Description')}")
    lines = last_log_lines(aws, stack)
    if lines:
        out.append("last log lines:\n  " + "\n  ".join(lines[-10:]))
    return out


def wait_until_ready(aws: Aws, stack: str, cluster: str, service: str, tg_arn: str, url: str, api_key: str,
                     served_name: str, asg_name: str | None, timeout_s: float, progress: Callable[[str], None],
                     poll_s: float = 15) -> None:
    """Stable service, healthy targets, and /v1/models through the load balancer; or DeployTimeout
    with the diagnosis."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while True:
        r = readiness(aws, cluster, service, tg_arn, url, api_key, served_name)
        if r.models_answer:
            return
        if r.detail != last:
            progress(r.detail)
            last = r.detail
        if time.monotonic() >= deadline:
            causes = diagnose(aws, stack, cluster, service, asg_name)
            raise DeployTimeout(f"stack {stack!r}: not ready after {timeout_s:.0f}s ({r.detail}); "
                                + (" | ".join(causes) if causes else "ECS reported nothing more"))
        time.sleep(min(poll_s, max(0.5, deadline - time.monotonic())))
