"""scale: set a stack's desired count, down to zero between jobs and back (serverless-style).

ECS (tasks/targets/ecs/scale.py): the service's desired count, and the autoscaling target's minimum
with it so autoscaling does not undo it; GPU hosts follow by the capacity provider's managed scaling.
Local: 0 stops the server process, 1 starts it again from the model, settings and adapters in the
state record, on its old port when that is free. Scaling up waits until the stack answers
/v1/models. Before a local server stops, its request counters are sampled into the traffic kept
beside the record (the reap flow's idle clock: tasks/teardown/idle.py). The record's `scale` keeps the count, who set it
and when, and the replica-hours so far (the status and teardown flows' cost).

The batch flow wakes a stack at zero (`scale_stack(..., 1)`), runs, puts it back to zero, and
reports what the wake cost (`wake_cost`).
"""

from __future__ import annotations

import time
from typing import Annotated
from urllib.parse import urlsplit

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field, PositiveFloat, PositiveInt

from blocks.catalogue import gpu_instances
from blocks.loading import load_config
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.core.aws import Aws
from tasks.core.errors import PipelineInputError, flow
from tasks.core.markdown import code, text
from tasks.core.naming import check_stack_name, resource_name
from tasks.core.secrets import read_secret
from tasks.core.state import StackState, deployed, load_state, price_per_hour, update_state
from tasks.stage.lora import index_uri
from tasks.targets.ecs.scale import set_desired_count, set_host_floor, wait_scaled_up
from tasks.targets.local.server import endpoint_alive, start_local_server, stop_local_server, wait_local_ready
from tasks.teardown.idle import sample_traffic


class ScaleReport(BaseModel):
    stack: str
    target: str
    before: int
    after: int
    ready_s: float | None = None  # scaling up: seconds until the stack answered /v1/models
    endpoint: str | None = None


class WakeCost(BaseModel):
    """What waking a stack from zero for a job cost: from the scale-up call until the scale back to
    zero returned (so the model load is in it). GPU-hours are instance-hours x the instance type's
    GPUs (the whole host is billed); a local stack is a CPU process: 0 GPUs."""

    stack: str
    target: str
    replicas: int
    awake_s: float
    instance_type: str | None
    gpus_per_instance: int
    instance_hours: float
    gpu_hours: float
    cost_usd: float
    note: str


def max_replicas(state: StackState) -> int:
    if state.target == "local":
        return 1  # one server process
    return int(state.settings.get("max_replicas") or state.settings.get("desired_count") or 1)


def _check(state: StackState, replicas: int) -> None:
    if state.status != "running":
        raise PipelineInputError(f"stack {state.stack!r} is {state.status}, not running: deploy it (or tear it down) first")
    most = max_replicas(state)
    if replicas > most:
        raise PipelineInputError(
            f"stack {state.stack!r} can run at most {most} replica(s)"
            + (": a local stack is one server process" if state.target == "local"
               else " (max_replicas at its deploy; one task per GPU host): redeploy with a larger max_replicas"))


def _drop_process(state: StackState, pid: int | None) -> None:
    state.resources = [r for r in state.resources if not (r.kind == "process" and r.id == str(pid))]
    if state.endpoint is not None:
        state.endpoint.pid = None


def scale_stack(store: ModelStore, stack: str, replicas: int, by: str = "scale", ready_timeout_s: float = 1800,
                zero_ttl_hours: float | None = None, poll_s: float = 15) -> ScaleReport:
    """Set `stack` to `replicas` and record it; scaling up returns once the stack serves."""
    if replicas < 0:
        raise PipelineInputError("replicas must be 0 or more")
    state = deployed(store, stack, load_state(store, stack)[0])
    _check(state, replicas)
    if state.target == "local":
        return _scale_local(store, state, replicas, by, ready_timeout_s, zero_ttl_hours)
    return _scale_ecs(store, state, replicas, by, ready_timeout_s, zero_ttl_hours, poll_s)


def _scale_local(store: ModelStore, state: StackState, replicas: int, by: str, ready_timeout_s: float,
                 zero_ttl_hours: float | None) -> ScaleReport:
    logger = get_run_logger()
    stack, before, ep = state.stack, state.replicas, state.endpoint
    alive = endpoint_alive(ep)
    report = ScaleReport(stack=stack, target="local", before=before, after=replicas, endpoint=ep.url)
    if replicas == 0:
        pid = ep.pid
        if alive:
            sample_traffic(store, state)  # the requests it served outlive it (tasks/teardown/idle.py)
        if pid:
            stop_local_server(pid)

        what = f"server pid {pid} stopped" if pid else "no server was running"

        def stopped(s: StackState) -> None:
            _drop_process(s, pid)
            s.set_replicas(0, by, zero_ttl_hours)
            s.note(f"scaled {before} -> 0 ({by}): {what}")

        update_state(store, stack, stopped)
        logger.info("stack %r scaled to zero: %s", stack, what)
        return report
    if alive:
        if before != replicas or zero_ttl_hours:
            update_state(store, stack, lambda s: s.set_replicas(replicas, by, zero_ttl_hours))
        logger.info("stack %r already serves at %s", stack, ep.url)
        return report.model_copy(update={"ready_s": 0.0})
    settings = VllmServerSettings.model_validate(state.settings)
    started = time.monotonic()
    new = start_local_server(stack, settings, state.model, ep.api_key_secret,
                             {n: r.s3_uri for n, r in state.adapters.items()},
                             index_uri(store, stack) if settings.enable_lora else None,
                             credentials=store.credentials, port=urlsplit(ep.url).port)

    def running(s: StackState) -> None:  # recorded before the wait: an interrupted wake leaves nothing unknown
        _drop_process(s, ep.pid)
        s.endpoint = new
        s.add_resource("process", str(new.pid))
        s.set_replicas(replicas, by, zero_ttl_hours)
        s.note(f"scaled {before} -> {replicas} ({by}): server pid {new.pid} at {new.url}")

    update_state(store, stack, running)
    try:
        wait_local_ready(new, ready_timeout_s, store.credentials)
    except BaseException as exc:
        stop_local_server(new.pid)
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__

        def failed(s: StackState) -> None:
            _drop_process(s, new.pid)
            s.set_replicas(before, f"{by} failed")
            s.note(f"scale to {replicas} failed: {why}")

        update_state(store, stack, failed)
        raise
    return report.model_copy(update={"ready_s": round(time.monotonic() - started, 1), "endpoint": new.url})


def _scale_ecs(store: ModelStore, state: StackState, replicas: int, by: str, ready_timeout_s: float,
               zero_ttl_hours: float | None, poll_s: float) -> ScaleReport:
    logger = get_run_logger()
    stack, ep = state.stack, state.endpoint
    region = state.settings.get("region")
    aws = Aws(store.credentials, region)
    cluster = state.settings.get("cluster") or resource_name(stack, "cluster")
    started = time.monotonic()
    tg_arn = next((r.id for r in state.resources if r.kind == "target-group"), None)
    asg = next((r.id for r in state.resources if r.kind == "asg"), None)
    if replicas > 0 and tg_arn is None:
        raise PipelineInputError(f"stack {stack!r} records no target group: redeploy it instead of scaling it")
    floor = state.settings.get("host_floor_before_zero")
    before = set_desired_count(aws, stack, cluster, replicas)
    if replicas == 0:
        floor = set_host_floor(aws, asg, 0) or floor
    elif floor:
        set_host_floor(aws, asg, floor)

    def scaled(s: StackState) -> None:
        s.set_replicas(replicas, by, zero_ttl_hours)
        s.note(f"scaled {before} -> {replicas} ({by})")
        if replicas == 0 and floor:
            s.settings["host_floor_before_zero"] = floor
        elif replicas > 0:
            s.settings.pop("host_floor_before_zero", None)

    update_state(store, stack, scaled)
    report = ScaleReport(stack=stack, target="ecs", before=before, after=replicas, endpoint=ep.url)
    if replicas == 0:
        logger.info("stack %r scaled to zero: its tasks drain; managed scaling removes its GPU hosts (host floor 0)", stack)
        return report
    key = read_secret(ep.api_key_secret, store.credentials, region).get_secret_value()
    logger.info("stack %r: %d -> %d tasks; waiting up to %.0fs until it serves", stack, before, replicas, ready_timeout_s)
    try:
        wait_scaled_up(aws, stack, cluster, tg_arn, ep.url, key, ep.served_model_name, asg, ready_timeout_s,
                       lambda line: logger.info("stack %r: %s", stack, line), poll_s)
    except BaseException as exc:
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        logger.error("stack %r did not serve at %d tasks (%s): back to %d", stack, replicas, why, before)
        set_desired_count(aws, stack, cluster, before)  # hosts launched for the new tasks are not left waiting
        if before == 0:
            set_host_floor(aws, asg, 0)

        def failed(s: StackState) -> None:
            s.set_replicas(before, f"{by} failed")
            s.note(f"scale to {replicas} failed: {why}")
            if before == 0 and floor:
                s.settings["host_floor_before_zero"] = floor

        update_state(store, stack, failed)
        raise
    return report.model_copy(update={"ready_s": round(time.monotonic() - started, 1)})


def wake_cost(state: StackState, replicas: int, awake_s: float) -> WakeCost:
    instance = state.settings.get("instance_type") if state.target == "ecs" else None
    gpus = gpu_instances()[instance].gpus if instance in gpu_instances() else 0
    hours = replicas * awake_s / 3600
    note = ("ECS: the GPU host starts before its task is placed and managed scaling terminates it about 15 minutes "
            "after the scale to zero; that host time is billed too and is not in this figure"
            if state.target == "ecs" else
            f"local: a CPU process, 0 GPUs; on a GPU instance this wake would be {hours:.4f} instance-hours x its GPUs")
    return WakeCost(stack=state.stack, target=state.target, replicas=replicas, awake_s=round(awake_s, 1),
                    instance_type=instance, gpus_per_instance=gpus, instance_hours=round(hours, 5),
                    gpu_hours=round(hours * gpus, 5), cost_usd=round(hours * price_per_hour(state), 4), note=note)


@flow(name="scale", log_prints=True)
def scale(
    stack: str,
    replicas: Annotated[int, Field(ge=0, le=100)],
    model_store_block: str | None = None,
    ready_timeout_s: PositiveInt = 1800,
    zero_ttl_hours: PositiveFloat | None = None,
) -> ScaleReport:
    """Set stack `stack` to `replicas` (0: scale to zero; ECS at most the deploy's max_replicas,
    local 0 or 1) and wait until it serves when scaling up. `zero_ttl_hours`: how long the stack may
    stay at zero without a request or a wake before the reap flow removes it (default 168)."""
    check_stack_name(stack)
    store = load_config(ModelStore, model_store_block)
    report = scale_stack(store, stack, replicas, "scale flow", ready_timeout_s, zero_ttl_hours)
    at_zero = ("no task: requests get 503 until a scale or a batch run wakes it; managed scaling removes its idle GPU "
               "hosts" if report.target == "ecs" else "its server process is stopped; a scale to 1 or a batch run starts it")
    create_markdown_artifact("\n".join([
        f"# Stack {code(stack)} scaled {report.before} → {report.after} ({text(report.target)})", "",
        f"- endpoint {code(report.endpoint)}" + (f", serving again after {report.ready_s} s" if report.ready_s else ""),
        f"- at zero: {at_zero}" if report.after == 0 else "- a redeploy puts the block's replica bounds back",
    ]), key=f"scale-{stack}", description=f"Scale of {stack}")
    return report
