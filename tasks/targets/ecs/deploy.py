"""The `ecs` target: deploy vLLM as an ECS service on GPU capacity, and roll back on failure.

Each step is a retryable get-or-create task; what it creates is written to the stack's state record
at once (conditional writes), so a run that dies anywhere leaves a record teardown can follow, and
the tag scan finds what even the record missed. Rollback is driven by the record, not by in-process
hooks: when a step fails, the deploy flow calls tasks.teardown.rollback, which deletes what this run
created in dependency order (for a new stack: everything the stack has), and the error the user sees is
the one that caused it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import SecretStr

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.core.aws import Aws, unless_gone
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.core.naming import log_group_name, metrics_log_group_name, resource_name
from tasks.core.secrets import ensure_secret, read_secret
from tasks.core.state import Endpoint, GatewayEndpoint, ModelRef, Resource, StackState, save_state
from tasks.gateway.config import publish_gateway
from tasks.targets.ecs import alarms, dashboard, gpu_hosts, iam, metrics_agent, network, scaling
from tasks.targets.ecs import gateway as gw
from tasks.targets.ecs import service as svc

_RETRY = dict(retries=4, retry_delay_seconds=[2, 5, 15, 45], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


def step(name: str, fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """Run `fn` as a Prefect task named `name`: retried on throttling/5xx/capacity errors only."""
    return task(fn, name=name, **_RETRY)(*args, **kwargs)


class Recorder:
    """Writes each created resource to the state record the moment it exists."""

    def __init__(self, store: ModelStore, state: StackState, etag: str | None, region: str):
        self.store, self.state, self.etag, self.region = store, state, etag, region
        self.created: list[Resource] = []

    def keep(self, kind: str, rid: str, created: bool) -> str:
        if created:
            self.created.append(Resource(kind=kind, id=rid, region=self.region))
        if not any(r.kind == kind and r.id == rid for r in self.state.resources):
            self.state.add_resource(kind, rid, self.region)
            self.save()
        return rid

    def save(self) -> None:
        self.etag = save_state(self.store, self.state, self.etag)


def adapter_read_uris(adapters: dict[str, ModelRef] | None, adapter_index_uri: str | None) -> list[str]:
    """What the task role reads besides the model: each adapter's folder and the adapter index's folder."""
    uris = [r.s3_uri for r in (adapters or {}).values()]
    return uris + ([adapter_index_uri.rsplit("/", 1)[0]] if adapter_index_uri else [])


def deploy_ecs(
    stack: str, store: ModelStore, settings: VllmServerSettings, capacity: EcsGpuCapacity, model: ModelRef,
    image_uri: str, instance_type: str, rec: Recorder, hf_token: SecretStr | None = None, ready_timeout_s: float = 1800,
    poll_s: float = 15, adapters: dict[str, ModelRef] | None = None, adapter_index_uri: str | None = None,
    gateway: gw.GatewaySpec | None = None,
) -> Endpoint:
    """Every resource, in order; returns the endpoint once `/v1/models` answers through the load balancer
    (and, with a `gateway`, once the gateway's `/health` answers through its listener)."""
    logger = get_run_logger()
    agent = capacity.metrics_agent
    aws = Aws(store.credentials, capacity.region)
    partition, account = aws.partition(), aws.account()

    net = step("resolve-network", network.resolve_network, aws, capacity)
    step("ecs-service-linked-role", iam.ensure_service_linked_role, aws, "ecs.amazonaws.com")
    alb_sg = rec.keep("security-group", *step("security-group-alb", network.ensure_security_group, aws, stack, "alb",
                                                net.vpc_id, f"vllm-pipeline {stack}: load balancer"))
    lb_port = 443 if capacity.certificate_arn else 80
    step("ingress-alb", network.ensure_ingress, aws, alb_sg, lb_port, cidrs=capacity.ingress_cidrs or [net.cidr])

    api_key_arn = _keep_secret(rec, aws, stack, "api-key", settings.api_key)
    secrets = {"VLLM_API_KEY": api_key_arn}
    if hf_token is not None:
        secrets["HF_TOKEN"] = _keep_secret(rec, aws, stack, "hf-token", hf_token)

    log_arn, made = step("log-group", svc.ensure_log_group, aws, stack, capacity.log_retention_days)
    rec.keep("log-group", log_group_name(stack), made)

    exec_arn, made = step("role-execution", iam.ensure_role, aws, stack, "execution", "ecs-tasks.amazonaws.com",
                          iam.execution_policy(image_uri, log_arn, list(secrets.values()), partition))
    rec.keep("iam-role", resource_name(stack, "execution"), made)
    task_arn, made = step("role-task", iam.ensure_role, aws, stack, "task", "ecs-tasks.amazonaws.com",
                          iam.task_policy(model.s3_uri, partition, adapter_read_uris(adapters, adapter_index_uri)))
    rec.keep("iam-role", resource_name(stack, "task"), made)
    if agent.enabled:
        _, made = step("log-group-metrics", svc.ensure_log_group, aws, stack, capacity.log_retention_days,
                       metrics_log_group_name(stack))
        rec.keep("log-group", metrics_log_group_name(stack), made)
    step("role-task-metrics-agent", iam.put_inline_policy, aws, resource_name(stack, "task"), metrics_agent.POLICY_NAME,
         metrics_agent.task_policy(stack, partition, capacity.region, account) if agent.enabled else None)

    asg_name = provider = None
    if capacity.cluster:
        cluster = capacity.cluster
        found = aws.client("ecs").describe_clusters(clusters=[cluster])["clusters"]
        if not found or found[0]["status"] != "ACTIVE":
            raise PipelineInputError(f"EcsGpuCapacity.cluster {cluster!r} does not exist in {capacity.region}")
        logger.warning("existing cluster %r: its GPU hosts' security group must admit %s on port %d", cluster, alb_sg,
                       capacity.container_port)
    else:
        cluster_arn, made = step("cluster", gpu_hosts.ensure_cluster, aws, stack)
        cluster = rec.keep("cluster", resource_name(stack, "cluster"), made)
        host_sg = rec.keep("security-group", *step("security-group-host", network.ensure_security_group, aws, stack,
                                                     "host", net.vpc_id, f"vllm-pipeline {stack}: GPU hosts"))
        step("ingress-host", network.ensure_ingress, aws, host_sg, capacity.container_port, source_group=alb_sg)
        _, made = step("role-instance", iam.ensure_role, aws, stack, "instance", "ec2.amazonaws.com",
                       iam.instance_policy(cluster_arn, partition, capacity.region, account))
        rec.keep("iam-role", resource_name(stack, "instance"), made)
        profile_arn, made = step("instance-profile", iam.ensure_instance_profile, aws, stack, resource_name(stack, "instance"))
        rec.keep("instance-profile", resource_name(stack, "instance"), made)
        ami = step("gpu-ami", gpu_hosts.gpu_ami, aws, capacity.ami_parameter)
        cache_bytes = step("model-cache-bytes", gpu_hosts.model_cache_bytes, store, model.s3_uri,
                           [r.s3_uri for r in (adapters or {}).values()])
        data = gpu_hosts.launch_template_data(capacity, ami, cluster, profile_arn, host_sg, instance_type, stack, cache_bytes)
        lt_id = rec.keep("launch-template", *step("launch-template", gpu_hosts.ensure_launch_template, aws, stack, data))
        asg_arn, made = step("auto-scaling-group", gpu_hosts.ensure_auto_scaling_group, aws, stack, capacity, lt_id,
                             net.subnets, instance_type)
        asg_name = rec.keep("asg", resource_name(stack, "hosts"), made)
        _, made = step("capacity-provider", gpu_hosts.ensure_capacity_provider, aws, stack, asg_arn, cluster)
        provider = rec.keep("capacity-provider", resource_name(stack, "gpu"), made)

    definition = svc.task_definition(stack, settings, capacity, instance_type, image_uri, model.s3_uri, exec_arn,
                                     task_arn, secrets, {n: r.s3_uri for n, r in (adapters or {}).items()}, adapter_index_uri,
                                     [metrics_agent.container(stack, capacity.region, capacity.container_port, svc.CONTAINER, agent)]
                                     if agent.enabled else None)
    td_arn, made = step("task-definition", svc.register_task_definition, aws, definition)
    rec.keep("task-definition", definition["family"], made)
    if made:
        rec.created.append(Resource(kind="task-definition-revision", id=td_arn, region=capacity.region))

    lb, made = step("load-balancer", svc.ensure_load_balancer, aws, stack, capacity, net.subnets, alb_sg)
    rec.keep("load-balancer", lb["LoadBalancerArn"], made)
    tg_arn = rec.keep("target-group", *step("target-group", svc.ensure_target_group, aws, stack, capacity, net.vpc_id))
    rec.keep("listener", *step("listener", svc.ensure_listener, aws, stack, capacity, lb["LoadBalancerArn"], tg_arn))

    before = step("service-before", _service_task_definition, aws, cluster, stack)
    svc_arn, made = step("service", svc.ensure_service, aws, stack, cluster, td_arn, capacity, tg_arn, provider)
    rec.keep("service", f"{cluster}/{resource_name(stack, 'service')}", made)
    if before and before != td_arn:
        rec.created.append(Resource(kind="service-revision", id=before, region=capacity.region))

    operate(stack, aws, capacity, rec, cluster, lb["LoadBalancerArn"], tg_arn, partition, account)

    scheme = "https" if capacity.certificate_arn else "http"
    url = f"{scheme}://{lb['DNSName']}"
    gw_tg = None
    if gateway is not None:  # before the wait: its task starts while the GPU hosts do
        rec.state.gateway, gw_tg = deploy_gateway(stack, aws, store, capacity, gateway, rec, net, alb_sg, lb, lb_port, cluster,
                                                  f"{url}/v1", api_key_arn, settings.served_model_name, partition, account)
    rec.state.endpoint = Endpoint(url=url, served_model_name=settings.served_model_name, api_key_secret=api_key_arn)
    rec.save()
    logger.info("stack %r: waiting up to %.0fs for the service, its targets and %s/v1/models", stack, ready_timeout_s, url)
    api_key = read_secret(api_key_arn, store.credentials, capacity.region).get_secret_value()
    task(svc.wait_until_ready, name="wait-until-ready", cache_policy=NO_CACHE)(
        aws, stack, cluster, resource_name(stack, "service"), tg_arn, url, api_key, settings.served_model_name, asg_name,
        ready_timeout_s, lambda line: logger.info("stack %r: %s", stack, line), poll_s)
    if gateway is not None:
        task(gw.wait_until_ready, name="wait-until-gateway-ready", cache_policy=NO_CACHE)(
            aws, stack, cluster, gw_tg, rec.state.gateway.url, ready_timeout_s,
            lambda line: logger.info("stack %r: %s", stack, line), poll_s)
    return rec.state.endpoint


def deploy_gateway(stack: str, aws: Aws, store: ModelStore, capacity: EcsGpuCapacity, spec: gw.GatewaySpec, rec: Recorder,
                   net: network.Network, alb_sg: str, lb: dict, lb_port: int, cluster: str, upstream_url: str,
                   api_key_arn: str, base_name: str, partition: str, account: str) -> tuple[GatewayEndpoint, str]:
    """The tool gateway's resources (tasks/targets/ecs/gateway.py), each recorded the moment it exists; returns
    its endpoint and its target group. The tool sets and the tenants secret are the local target's too
    (tasks/gateway/config.py)."""
    block, region = spec.block, capacity.region
    before = {(r.kind, r.id) for r in rec.state.resources}
    config = step("gateway-tenants", publish_gateway, stack, block, spec.docs, store, base_name, region,
                  lambda kind, rid: rec.keep(kind, rid, (kind, rid) not in before))

    gw_sg = rec.keep("security-group", *step("security-group-gateway", network.ensure_security_group, aws, stack, gw.KIND,
                                               net.vpc_id, f"vllm-pipeline {stack}: tool gateway"))
    rec.keep("ingress-rule", *step("ingress-gateway", network.ensure_rule, aws, gw_sg, gw.CONTAINER_PORT, alb_sg,
                                   "from the load balancer"))
    for cidr in capacity.ingress_cidrs or [net.cidr]:
        rec.keep("ingress-rule", *step("ingress-alb-gateway", network.ensure_rule, aws, alb_sg, block.listener_port, cidr,
                                       "vllm-pipeline gateway clients (ingress_cidrs)"))
    rec.keep("ingress-rule", *step("ingress-alb-from-gateway", network.ensure_rule, aws, alb_sg, lb_port, gw_sg,
                                   "the tool gateway's calls to vLLM"))

    log_arn, made = step("log-group-gateway", svc.ensure_log_group, aws, stack, capacity.log_retention_days, gw.log_group(stack))
    rec.keep("log-group", gw.log_group(stack), made)
    exec_kind, task_kind = gw.role_kinds()
    exec_arn, made = step("role-gateway-execution", iam.ensure_role, aws, stack, exec_kind, "ecs-tasks.amazonaws.com",
                          iam.execution_policy(spec.image_uri, log_arn, [api_key_arn], partition))
    rec.keep("iam-role", resource_name(stack, exec_kind), made)
    secrets = [config.tenants_secret, *(gw.secret_resource(s, partition, region, account) for s in spec.header_secrets)]
    task_arn, made = step("role-gateway-task", iam.ensure_role, aws, stack, task_kind, "ecs-tasks.amazonaws.com",
                          gw.task_policy(list(config.toolsets.values()), secrets, partition))
    rec.keep("iam-role", resource_name(stack, task_kind), made)

    env = gw.environment(upstream_url, config.tenants_secret, block, region, spec.digest)
    definition = gw.task_definition(stack, block, spec.image_uri, exec_arn, task_arn, env, api_key_arn, region)
    family_known = ("task-definition", gw.family(stack)) in before
    td_arn, made = step("task-definition-gateway", svc.register_task_definition, aws, definition)
    rec.keep("task-definition", gw.family(stack), made and not family_known)  # a new family: a rollback removes it
    if made:
        rec.created.append(Resource(kind="task-definition-revision", id=td_arn, region=region))

    tg_arn = rec.keep("target-group", *step("target-group-gateway", gw.ensure_target_group, aws, stack, net.vpc_id,
                                            int(min(3600, block.deadline_s))))
    listener = rec.keep("listener", *step("listener-gateway", gw.ensure_listener, aws, stack, lb["LoadBalancerArn"],
                                          block.listener_port, tg_arn))
    rec.keep("listener-rule", *step("listener-rule-gateway-metrics", gw.ensure_metrics_rule, aws, stack, listener))
    previous = step("gateway-before", _service_task_definition, aws, cluster, stack, gw.KIND)
    public = step("gateway-public-ip", gw.public_ip, aws, net.subnets)
    _, made = step("service-gateway", gw.ensure_service, aws, stack, cluster, td_arn, tg_arn, gw_sg, net.subnets, public)
    rec.keep("service", f"{cluster}/{resource_name(stack, gw.KIND)}", made)
    if previous and previous != td_arn:
        rec.created.append(Resource(kind="gateway-revision", id=previous, region=region))
    endpoint = GatewayEndpoint(url=f"http://{lb['DNSName']}:{block.listener_port}", tenants_secret=config.tenants_secret,
                               tenants=config.tenants, toolsets=config.toolsets)
    return endpoint, tg_arn


def operate(stack: str, aws: Aws, capacity: EcsGpuCapacity, rec: Recorder, cluster: str, lb_arn: str, tg_arn: str,
            partition: str, account: str) -> None:
    """What operating the stack needs, after the service: autoscaling (when max_replicas > min_replicas),
    alarms and their SNS topic (when subscriptions are given), the dashboard (its URL in the record's settings)."""
    if capacity.autoscaling:
        rid, made = step("scalable-target", scaling.ensure_scalable_target, aws, stack, cluster, capacity)
        rec.keep("scalable-target", rid, made)
        rec.keep("scaling-policy", *step("scaling-policy", scaling.ensure_scaling_policy, aws, stack, rid,
                                         scaling.policy_configuration(stack, capacity.scaling, lb_arn, tg_arn),
                                         capacity.scaling.signal))
    alarm_arns: list[str] = []
    if capacity.alarms.enabled:
        topic = None
        if capacity.alarms.topic_subscriptions:
            topic = rec.keep("alarm-topic", *step("alarm-topic", alarms.ensure_topic, aws, stack))
            step("alarm-subscriptions", alarms.ensure_subscriptions, aws, topic, capacity.alarms.topic_subscriptions)
        specs = alarms.alarm_specs(stack, capacity.alarms, lb_arn, tg_arn, cluster, topic,
                                   capacity.metrics_agent if capacity.metrics_agent.enabled else None)
        for what, spec in specs:
            name = rec.keep("alarm", *step(f"alarm-{what}", alarms.ensure_alarm, aws, stack, spec))
            alarm_arns.append(f"arn:{partition}:cloudwatch:{capacity.region}:{account}:alarm:{name}")
        if not capacity.metrics_agent.enabled:  # the agent was turned off: its alarm would only ever say "no data"
            step("alarm-gpu-memory-off", alarms.delete_alarm, aws, alarms.alarm_name(stack, "gpu-memory"))
    if capacity.dashboard:
        body = dashboard.dashboard_body(stack, capacity.region, lb_arn, tg_arn, cluster, alarm_arns,
                                        agent=capacity.metrics_agent.enabled,
                                        price_per_hour=rec.state.settings.get("price_per_hour"))
        name = rec.keep("dashboard", *step("dashboard", dashboard.ensure_dashboard, aws, stack, body))
        rec.state.settings["dashboard_url"] = dashboard.console_url(capacity.region, name, partition)


def _keep_secret(rec: Recorder, aws: Aws, stack: str, what: str, value: SecretStr | None) -> str:
    existed = any(r.kind == "secret" and r.id.split(":secret:")[-1].startswith(f"vllm-pipeline/{stack}/{what}")
                  for r in rec.state.resources)
    arn = step(f"secret-{what}", ensure_secret, stack, what, value, aws.credentials, aws.region)
    return rec.keep("secret", arn, not existed)


def _service_task_definition(aws: Aws, cluster: str, stack: str, kind: str = "service") -> str | None:
    """The service's task definition now: what a failed update rolls back to. None only when there is
    no service (or no cluster yet); any other error (throttled, denied) is raised, so an update never
    goes ahead without knowing what to roll back to (the step's retry rule retries the transient ones)."""
    found = (unless_gone(lambda: aws.client("ecs").describe_services(cluster=cluster, services=[resource_name(stack, kind)]),
                         "ClusterNotFoundException") or {}).get("services", [])
    return next((s["taskDefinition"] for s in found if s["status"] == "ACTIVE"), None)
