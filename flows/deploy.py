"""deploy-model: bring a staged model up as a vLLM endpoint for a stack, and record it."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from typing import Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.variables import Variable
from pydantic import PositiveFloat, PositiveInt, SecretStr

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.loading import load_config
from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from blocks.tool_gateway import ToolGateway
from blocks.vllm_server import VllmServerSettings
from flows.build import image_variable
from tasks.build.images import check_image_uri
from tasks.capacity.choice import CapacityPlan
from tasks.capacity.task import plan_task
from tasks.core.aws import Aws
from tasks.core.errors import PipelineInputError, flow
from tasks.core.markdown import code, text
from tasks.core.naming import check_stack_name, resource_name
from tasks.core.secrets import delete_secret
from tasks.core.state import ModelRef, StackState, delete_state, load_state, save_state
from tasks.core.timeline import render as render_cold_start
from tasks.gateway.config import config_digest, delete_toolset, publish_gateway, resolve_gateway
from tasks.stage.lora import check_adapters, find_staged_adapters, write_index
from tasks.stage.models import find_staged_model
from tasks.targets.ecs import gateway as ecs_gateway
from tasks.targets.ecs import metrics_agent
from tasks.targets.ecs.coldstart import ecs_cold_start
from tasks.targets.ecs.deploy import Recorder, deploy_ecs
from tasks.targets.local.coldstart import local_cold_start
from tasks.targets.local.gateway import gateway_alive, start_local_gateway, stop_local_gateway, wait_local_gateway
from tasks.targets.local.server import endpoint_alive, ensure_api_key, start_local_server, stop_local_server, wait_local_ready
from tasks.teardown.rollback import rollback
from tasks.teardown.sweep import delete_all

DEPLOY_LOCK_TTL = timedelta(minutes=30)


def last_built_image(name: str) -> str:
    """The image reference the build-images flow last pushed (a Prefect Variable)."""
    ref = Variable.get(image_variable(name))
    if not ref:
        raise PipelineInputError(f"no image_uri given and no {name!r} image built yet: run the build-images flow or pass image_uri")
    return ref


def _recent(ts: str) -> bool:
    return datetime.now(timezone.utc) - datetime.fromisoformat(ts) < DEPLOY_LOCK_TTL


def lock(state: StackState, ready_timeout_s: float) -> None:
    """Hold the stack for the whole deploy: DEPLOY_LOCK_TTL for creating the resources plus the wait
    for the server (`ready_timeout_s`), so a run still waiting is never taken for a dead one. A run
    that dies leaves a lock that expires by itself; teardown does not wait for it."""
    state.lock_until = (datetime.now(timezone.utc) + DEPLOY_LOCK_TTL + timedelta(seconds=ready_timeout_s)).isoformat()


def _busy(state: StackState) -> bool:
    held = state.status == "deploying" and state.lock_until is not None \
        and datetime.now(timezone.utc) < datetime.fromisoformat(state.lock_until)
    return held or _recent(state.updated_at)


def _refuse_if_busy(state: StackState | None, stack: str, target: str) -> None:
    if state is not None and state.target != target and state.status != "deleted":
        raise PipelineInputError(f"stack {stack!r} exists on target {state.target!r}: tear it down before deploying it to {target!r}")
    if state is not None and state.status in ("deploying", "tearing-down") and _busy(state):
        raise PipelineInputError(
            f"stack {stack!r} is {state.status} by another run since {state.updated_at}; wait for it or tear the stack down"
        )


def _adapter_uris(adapters: dict[str, ModelRef] | None) -> dict[str, str]:
    return {name: ref.s3_uri for name, ref in (adapters or {}).items()}


def deploy(
    stack: str, store: ModelStore, settings: VllmServerSettings, model: ModelRef, target: str = "local",
    ready_timeout_s: float = 900, ttl_hours: float = 24, adapters: dict[str, ModelRef] | None = None,
    gateway: ToolGateway | None = None,
) -> StackState:
    """The local target: the vLLM server as a process and, with `gateway`, the tool gateway beside it. A stack
    already serving the same model and adapters keeps its server; only a changed (or added, or removed)
    gateway is redone."""
    logger = get_run_logger()
    deploy_at = time.time()
    state, etag = load_state(store, stack)
    _refuse_if_busy(state, stack, "local")
    # the gateway's checks (tenant models, tool sets), before anything is made
    docs = resolve_gateway(gateway, [settings.served_model_name, *(adapters or {})], store) if gateway is not None else None
    if state is not None and state.target == "local" and state.status == "running" and endpoint_alive(state.endpoint):
        if state.model and state.model.s3_uri == model.s3_uri and state.adapters == (adapters or {}):
            digest = config_digest(gateway, docs, state.endpoint.url) if gateway is not None else None
            if (digest is None and state.gateway is None) or \
                    (state.gateway is not None and state.gateway.digest == digest and gateway_alive(state.gateway)):
                logger.info("stack %r already serves %s at %s: nothing to do", stack, model.s3_uri, state.endpoint.url)
                return state
            return _redo_gateway(stack, store, state, etag, gateway, docs, ready_timeout_s, target)
    old_endpoint = state.endpoint if state else None
    state = state or StackState(stack=stack, target="local")
    state.status, state.model, state.ttl_hours, state.adapters = "deploying", model, ttl_hours, dict(adapters or {})
    state.settings = settings.model_dump(mode="json", exclude={"api_key"})
    state.note(f"deploy {model.s3_uri}" + (f" with adapters {sorted(state.adapters)}" if state.adapters else ""))
    lock(state, ready_timeout_s)
    etag = save_state(store, state, etag)  # the lock: a concurrent deploy's conditional write fails
    _stop_gateway(state, remove=gateway is None, credentials=store.credentials)  # its upstream is about to change (or it is no longer wanted)
    if old_endpoint is not None and old_endpoint.pid:
        stop_local_server(old_endpoint.pid)  # a dead or outdated server is replaced
    secret_arn = ensure_api_key(stack, settings, store.credentials)
    state.add_resource("secret", secret_arn)
    etag = save_state(store, state, etag)
    index = write_index(store, stack, state.adapters) if settings.enable_lora else None
    requested_at = time.time()
    state.endpoint = start_local_server(stack, settings, model, secret_arn, _adapter_uris(adapters), index,
                                        credentials=store.credentials)
    state.add_resource("process", str(state.endpoint.pid))
    etag = save_state(store, state, etag)  # recorded before the wait: an interrupted deploy leaves nothing unknown
    try:
        ready = wait_local_ready(state.endpoint, ready_timeout_s, store.credentials)
    except BaseException as exc:
        stop_local_server(state.endpoint.pid)
        state.status = "failed"
        state.endpoint = None
        state.note(f"deploy failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        save_state(store, state, etag)
        raise
    state.cold_start = local_cold_start(state.endpoint, deploy_at, requested_at, ready, store.credentials)
    state.endpoint.own_requests = 1 if state.cold_start.get("first-token") else 0  # its probe: not traffic
    if gateway is not None:
        etag = _start_gateway(stack, store, state, etag, gateway, docs)
    state.status = "running"
    state.set_replicas(1, "deploy")  # a stack scaled to zero is serving again
    state.note(f"running at {state.endpoint.url}")
    save_state(store, state, etag)
    _local_artifact(stack, target, state, render_cold_start(state.cold_start))
    return state


def _local_artifact(stack: str, target: str, state: StackState, cold_start: str) -> None:
    model = state.model
    create_markdown_artifact(
        "\n".join([
            f"# Stack {code(stack)} deployed ({text(target)})",
            "",
            f"- model {code(model.repo_id)} @ {code(model.sha)} from {code(model.s3_uri)}",
            f"- endpoint {code(state.endpoint.url)} serving {code(state.endpoint.served_model_name)}",
            *_adapter_lines(state),
            f"- API key in Secrets Manager {code(state.endpoint.api_key_secret)}",
            f"- server log {code(state.endpoint.log_path)}",
            *_local_gateway_lines(state),
            "",
            cold_start,
        ]),
        key=f"deploy-{stack}",
        description=f"Stack {stack} deployed",
    )


def _local_gateway_lines(state: StackState) -> list[str]:
    gw = state.gateway
    if gw is None:
        return []
    return [
        f"- tool gateway {code(gw.url)} (clients: {code(gw.url + '/v1/chat/completions')}), log {code(gw.log_path)}",
        f"- gateway tenants {', '.join(code(t) for t in gw.tenants)}; each tenant's API keys, model and tool set in "
        f"Secrets Manager {code(gw.tenants_secret)} ({code('tenants.<tenant>.api_keys')})",
    ]


def _stop_gateway(state: StackState | None, remove: bool, credentials=None) -> None:
    """Stop the stack's local gateway process; `remove`: also delete its tenants secret and tool sets (a
    redeploy without a gateway)."""
    gw = state.gateway if state is not None else None
    if gw is None:
        return
    if gw.pid:
        stop_local_gateway(gw.pid)
    state.resources = [r for r in state.resources if not (r.kind == "gateway-process" and r.id == str(gw.pid))]
    if remove:
        delete_secret(gw.tenants_secret, credentials)
        for uri in gw.toolsets.values():
            delete_toolset(uri, credentials)
        gone = {("secret", gw.tenants_secret), *(("s3-object", u) for u in gw.toolsets.values())}
        state.resources = [r for r in state.resources if (r.kind, r.id) not in gone]
        state.gateway = None
        state.note("tool gateway removed")
    else:
        state.gateway = gw.model_copy(update={"pid": None})


def _start_gateway(stack: str, store: ModelStore, state: StackState, etag: str, gateway: ToolGateway, docs: dict) -> str:
    """Tool sets and the tenants secret (tasks/gateway/config.py), then the process beside the server; each
    recorded the moment it exists. A gateway that does not come up fails the deploy (the record says so)."""
    def record(kind: str, id: str) -> None:
        state.add_resource(kind, id)

    cfg = publish_gateway(stack, gateway, docs, store, state.endpoint.served_model_name, record=record)
    stale = [r for r in state.resources if r.kind == "s3-object" and r.id not in cfg.toolsets.values()]
    state.resources = [r for r in state.resources if r not in stale]  # publish_gateway deleted them
    etag = save_state(store, state, etag)
    state.gateway = start_local_gateway(stack, gateway, state.endpoint, cfg.tenants_secret, cfg.tenants, cfg.toolsets,
                                        config_digest(gateway, docs, state.endpoint.url), store.credentials)
    state.add_resource("gateway-process", str(state.gateway.pid))
    etag = save_state(store, state, etag)  # recorded before the wait
    try:
        wait_local_gateway(state.gateway)
    except BaseException as exc:
        _stop_gateway(state, remove=False)
        state.status = "failed"
        state.note(f"tool gateway failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        save_state(store, state, etag)
        raise
    state.note(f"tool gateway at {state.gateway.url} for tenants {state.gateway.tenants}")
    return etag


def _redo_gateway(stack: str, store: ModelStore, state: StackState, etag: str, gateway: ToolGateway | None, docs: dict | None,
                  ready_timeout_s: float, target: str) -> StackState:
    """The server stays; the gateway is added, restarted with its new configuration, or removed."""
    state.status = "deploying"
    state.note("update the tool gateway" if gateway is not None else "remove the tool gateway")
    lock(state, ready_timeout_s)
    etag = save_state(store, state, etag)
    _stop_gateway(state, remove=gateway is None, credentials=store.credentials)
    etag = save_state(store, state, etag)
    if gateway is not None:
        etag = _start_gateway(stack, store, state, etag, gateway, docs)
    state.status = "running"
    save_state(store, state, etag)
    _local_artifact(stack, target, state, render_cold_start(state.cold_start) if state.cold_start else "")
    return state


def _adapter_lines(state: StackState) -> list[str]:
    return [f"- LoRA adapter {code(name)} from {code(ref.s3_uri)}" for name, ref in sorted(state.adapters.items())]


def _remove_ecs_gateway(aws: Aws, stack: str, rec: Recorder) -> None:
    """The ECS gateway's resources deleted (dependency order, as teardown does) and dropped from the record."""
    state = rec.state
    doomed = ecs_gateway.recorded_resources(aws, stack, state)
    delete_all(aws, stack, doomed)
    gone = {(r.kind, r.id) for r in doomed}
    state.resources = [r for r in state.resources if (r.kind, r.id) not in gone]
    state.gateway = None
    state.note(f"tool gateway removed ({len(doomed)} resources)")
    rec.save()


def _ecs_gateway_lines(state: StackState) -> list[str]:
    if state.gateway is None:
        return []
    return [f"- tool gateway {code(state.gateway.url)} (Fargate) for tenants {', '.join(code(t) for t in state.gateway.tenants)}; "
            f"their keys in Secrets Manager {code(state.gateway.tenants_secret)}"]


def _operating_lines(state: StackState, capacity: EcsGpuCapacity) -> list[str]:
    lo, hi = capacity.replicas
    kinds = [r.kind for r in state.resources]
    lines = [f"- autoscaling {lo}..{hi} tasks on {capacity.scaling.target_requests_per_minute:g} requests per task per minute"
             if capacity.autoscaling else f"- fixed at {capacity.desired_count} task(s) (no autoscaling)"]
    if "alarm" in kinds:
        lines.append(f"- {kinds.count('alarm')} CloudWatch alarms"
                     + (f", notifying {len(capacity.alarms.topic_subscriptions)} subscription(s)" if "alarm-topic" in kinds else ""))
    if state.settings.get("dashboard_url"):
        lines.append(f"- dashboard {state.settings['dashboard_url']}")
    return lines


def choose_instance(plan: CapacityPlan, capacity: EcsGpuCapacity, settings: VllmServerSettings) -> tuple[str, VllmServerSettings, float]:
    """The capacity planner's verdict, before any AWS resource: the instance type (the block's, if
    it fits; the planner's choice when the block leaves it empty), the tensor-parallel size it needs,
    and the price per hour (price overrides included). Too small is a PipelineInputError."""
    if capacity.instance_type is None:
        if plan.chosen is None:
            raise PipelineInputError(plan.refusal or f"{plan.model}: nothing in the catalogue fits")
        cand = plan.chosen
    else:
        cand = plan.configured
        if cand is None or not cand.fits:
            better = f"; the planner would choose {plan.chosen.instance_type} (TP {plan.chosen.tensor_parallel_size}, " \
                     f"${plan.chosen.price_per_hour:.3f}/h)" if plan.chosen else f"; {plan.refusal}"
            reason = cand.reason if cand is not None else "not evaluated"
            raise PipelineInputError(f"{capacity.instance_type} cannot serve {plan.model} at max_model_len "
                                     f"{plan.settings.max_model_len:,}: {reason}{better}")
        for fallback in capacity.fallback_instance_types:
            ok = [c for c in plan.candidates if c.instance_type == fallback and c.fits
                  and c.tensor_parallel_size == cand.tensor_parallel_size]
            if not ok:
                raise PipelineInputError(f"fallback instance type {fallback} cannot serve {plan.model} at tensor parallel "
                                         f"size {cand.tensor_parallel_size}: drop it from fallback_instance_types")
    if cand.tensor_parallel_size != settings.tensor_parallel_size:
        settings = settings.model_copy(update={"tensor_parallel_size": cand.tensor_parallel_size})
    return cand.instance_type, settings, cand.price_per_hour


def deploy_to_ecs(
    stack: str, store: ModelStore, settings: VllmServerSettings, capacity: EcsGpuCapacity, model: ModelRef, image_uri: str,
    hf_token: SecretStr | None = None, ready_timeout_s: float = 1800, ttl_hours: float = 24, keep_failed: bool = False,
    poll_s: float = 15, adapters: dict[str, ModelRef] | None = None, gateway: ToolGateway | None = None,
) -> StackState:
    """Plan, then create or update every resource of the stack; on failure roll back what this run made
    (`keep_failed`: keep it for debugging) and raise the error that caused it. With `gateway`, the tool
    gateway as a Fargate service behind the stack's load balancer (tasks/targets/ecs/gateway.py); its image:
    the block's `image_uri`, else the one build-images last built as "gateway"."""
    logger = get_run_logger()
    deploy_at = time.time()
    check_image_uri(image_uri)
    plan = plan_task(store, model, settings, capacity)
    instance_type, settings, price = choose_instance(plan, capacity, settings)
    metrics_agent.check_settings(capacity.metrics_agent, settings)
    gateway_spec = None
    if gateway is not None:  # every check of the gateway, before any resource
        gateway_spec = ecs_gateway.prepare(capacity, gateway, [settings.served_model_name, *(adapters or {})], store,
                                           check_image_uri(gateway.image_uri or last_built_image("gateway")))
    logger.info("stack %r: %s (TP %d, $%.3f/h) per the capacity plan", stack, instance_type, settings.tensor_parallel_size, price)
    state, etag = load_state(store, stack)
    _refuse_if_busy(state, stack, "ecs")
    new_stack = state is None or state.status != "running"
    state = state or StackState(stack=stack, target="ecs")
    previous = state.model_copy(deep=True)
    state.status, state.model, state.ttl_hours, state.adapters = "deploying", model, ttl_hours, dict(adapters or {})
    state.settings = {
        **settings.model_dump(mode="json", exclude={"api_key"}), "instance_type": instance_type, "price_per_hour": price,
        "region": capacity.region, "cluster": capacity.cluster, "desired_count": capacity.desired_count, "image_uri": image_uri,
        "min_replicas": capacity.replicas[0], "max_replicas": capacity.replicas[1],
    }
    state.note(f"deploy {model.s3_uri} on {instance_type} ({image_uri})")
    rec = Recorder(store, state, None, capacity.region)
    lock(state, ready_timeout_s)
    rec.etag = save_state(store, state, etag)  # the lock: a concurrent deploy's conditional write fails
    try:
        index = write_index(store, stack, state.adapters) if settings.enable_lora else None
        deploy_ecs(stack, store, settings, capacity, model, image_uri, instance_type, rec, hf_token, ready_timeout_s, poll_s,
                   state.adapters, index, gateway_spec)
        ready_at = time.time()
    except BaseException as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        state.note(f"deploy failed: {first}")
        if keep_failed:
            state.status = "failed"
            rec.save()
            logger.error("stack %r failed and is kept for debugging (keep_failed): tear it down when done", stack)
            raise
        try:
            rollback(Aws(store.credentials, capacity.region), stack, rec, new_stack)
        except Exception as rb:  # noqa: BLE001 - the cause is what the user must see; the rollback error is logged
            logger.error("stack %r: rollback incomplete (%s): run the teardown flow", stack, rb)
            state.status = "failed"
            rec.save()
            raise exc from None
        if new_stack:
            delete_state(store, stack)
        else:
            state.status, state.model, state.adapters, state.gateway = "running", previous.model, previous.adapters, previous.gateway
            if settings.enable_lora:
                write_index(store, stack, previous.adapters)  # the replicas rolled back to serve the old set
            state.note("update rolled back")
            rec.save()
        raise
    if gateway is None and state.gateway is not None:  # a redeploy without the gateway removes it, as on the local target
        _remove_ecs_gateway(Aws(store.credentials, capacity.region), stack, rec)
    state.cold_start = ecs_cold_start(store, capacity, stack, state.endpoint, deploy_at, ready_at, poll_s)
    state.status = "running"
    # what the deploy asked for; with autoscaling an update keeps the service's own count (at least one), not tracked here
    lo, hi = capacity.replicas  # the count a new service starts at (tasks/targets/ecs/service.py)
    state.set_replicas(min(max(capacity.desired_count, lo, 1), hi) if capacity.autoscaling else capacity.desired_count, "deploy")
    state.note(f"running at {state.endpoint.url}")
    rec.save()
    create_markdown_artifact(
        "\n".join([
            f"# Stack {code(stack)} deployed (ecs)",
            "",
            f"- model {code(model.repo_id)} @ {code(model.sha)} from {code(model.s3_uri)}",
            f"- image {code(image_uri)}",
            f"- {capacity.desired_count} x {code(instance_type)} in {text(capacity.region)} (TP {settings.tensor_parallel_size}, "
            f"${price:.3f}/h each), cluster {code(capacity.cluster or resource_name(stack, 'cluster'))}",
            f"- endpoint {code(state.endpoint.url)} serving {code(state.endpoint.served_model_name)}",
            *_adapter_lines(state),
            f"- API key in Secrets Manager {code(state.endpoint.api_key_secret)}",
            *_ecs_gateway_lines(state),
            *_operating_lines(state, capacity),
            f"- {len(state.resources)} resources recorded in {code(f's3://{store.bucket_name}/stacks/{stack}/state.json')}",
            "",
            render_cold_start(state.cold_start),
        ]),
        key=f"deploy-{stack}", description=f"Stack {stack} deployed",
    )
    return state


@flow(name="deploy-model", log_prints=True)
def deploy_model(
    stack: str,
    target: Literal["local", "ecs"] = "local",
    model_uri: str | None = None,
    repo_id: str | None = None,
    image_uri: str | None = None,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    server_settings_block: str | None = None,
    capacity_block: str | None = None,
    ready_timeout_s: PositiveInt = 900,
    ttl_hours: PositiveFloat = 24,
    keep_failed: bool = False,
    gateway: str | ToolGateway | None = None,
) -> StackState:
    """Deploy the staged model (`model_uri`, or the newest staged revision of `repo_id` /
    the ModelSource block's repo) as stack `stack`. A running stack serving the same model is a no-op.
    target="ecs": on ECS GPU capacity (EcsGpuCapacity block) from the vLLM image `image_uri`
    (default: the one the build-images flow last pushed); a failed deploy is rolled back unless
    `keep_failed`. The `reap` flow tears the stack down `ttl_hours` after its last deploy.
    `gateway` (a saved ToolGateway block's name, or the block): the tool gateway beside the server, a
    process locally, a Fargate service on ECS (docs/gateway.md); a redeploy without it removes it."""
    check_stack_name(stack)
    gateway = load_config(ToolGateway, gateway) if isinstance(gateway, str) else gateway
    store = load_config(ModelStore, model_store_block)
    settings = load_config(VllmServerSettings, server_settings_block)
    capacity = load_config(EcsGpuCapacity, capacity_block) if target == "ecs" else None
    source = load_config(ModelSource, model_source_block)
    if not model_uri and not repo_id:
        repo_id = source.repo_id
    if target == "ecs":
        image_uri = check_image_uri(image_uri or last_built_image("vllm"))
    if source.adapters and not settings.enable_lora:
        raise PipelineInputError(f"the model source lists adapters {[a.name for a in source.adapters]} but "
                                 "VllmServerSettings.enable_lora is false")
    model = find_staged_model(store, repo_id=repo_id, model_uri=model_uri)
    adapters = find_staged_adapters(store, source.adapters) if source.adapters else {}
    check_adapters(store, model, adapters, settings.served_model_name, settings.enable_lora, settings.max_lora_rank)
    if target == "ecs":
        return deploy_to_ecs(stack, store, settings, capacity, model, image_uri, source.token, ready_timeout_s, ttl_hours,
                             keep_failed, adapters=adapters, gateway=gateway)
    return deploy(stack, store, settings, model, target, ready_timeout_s, ttl_hours, adapters, gateway)
