"""The ECS target's cold-start timeline, from what AWS keeps of the start and the deploy's own times.

- the service's PRIMARY deployment (created when the deploy asked for the revision) and its events:
  "has started N tasks", "registered N targets in (target-group ...)", "has reached a steady state";
- the first task this deploy started: image pull start and end, container start; its GPU host: when EC2
  launched it and when it joined the cluster, if after the deploy began (a host that was already
  there is warm capacity, not part of this start);
- the task's CloudWatch log stream (`vllm/vllm/<task id>`): the entrypoint's phase lines and vLLM's own,
  each at the time the awslogs driver stamped it, parsed by tasks/core/timeline.py as on the local target;
- the deploy's start, ready (`/v1/models` through the load balancer, polled every `poll_s`) and a first
  token through the load balancer.
What cannot be read (denied, throttled past its retries) is logged and left out: the stack serves
either way. moto keeps no service events or task times and runs no container; there the timeline
holds the deployment, a host, the log lines and the deploy's own times (tests/test_timeline.py).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime

from botocore.exceptions import BotoCoreError, ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from tasks.core.aws import Aws, error_code
from tasks.core.errors import retry_if_transient
from tasks.core.naming import log_group_name, resource_name
from tasks.core.secrets import read_secret
from tasks.core.state import Endpoint
from tasks.core.timeline import Phase, Timeline, first_token, parse_log

STREAM_PREFIX = "vllm/vllm/"  # awslogs-stream-prefix "vllm" / container "vllm" / task id (tasks/targets/ecs/service.py)
MAX_LOG_EVENTS = 20_000  # a just-started task's stream is its start-up and a few health checks
SERVICE_EVENTS: list[tuple[str, re.Pattern]] = [
    ("task-started", re.compile(r"has started \d+ tasks?")),
    ("targets-registered", re.compile(r"registered \d+ targets?")),
    ("steady-state", re.compile(r"has reached a steady state")),
]


_SERVICE = re.compile(r"^\(service [^)]*\) ")


def _ts(value: object) -> float | None:
    if isinstance(value, datetime):
        return value.timestamp()
    return float(value) if isinstance(value, (int, float)) else None


def event_phases(events: list[dict], since: float) -> list[Phase]:
    """The first service event of each kind at or after `since` (describe_services lists the newest first)."""
    out: dict[str, Phase] = {}
    for e in sorted(events, key=lambda e: _ts(e.get("createdAt")) or 0):
        at = _ts(e.get("createdAt"))
        if at is None or at < since:
            continue
        for name, pattern in SERVICE_EVENTS:
            if name not in out and pattern.search(e.get("message", "")):
                out[name] = Phase(name=name, at=at, source="ecs", detail=_SERVICE.sub("", e["message"])[:120])
    return list(out.values())


def task_phases(t: dict) -> list[Phase]:
    tid = t["taskArn"].rsplit("/", 1)[-1]
    times = [("task-started", t.get("createdAt"), f"task {tid}"), ("image-pull-begin", t.get("pullStartedAt"), ""),
             ("image-pull-end", t.get("pullStoppedAt"), ""), ("container-started", t.get("startedAt"), "")]
    return [Phase(name=n, at=_ts(v), source="ecs", detail=d) for n, v, d in times if _ts(v) is not None]


def first_task(aws: Aws, cluster: str, service: str, since: float) -> dict | None:
    """The earliest running task of the service created since the deploy began (a task that failed on
    the way is not the start that served)."""
    ecs = aws.client("ecs")
    arns = ecs.list_tasks(cluster=cluster, serviceName=service, desiredStatus="RUNNING").get("taskArns", [])[:100]
    tasks = ecs.describe_tasks(cluster=cluster, tasks=arns).get("tasks", []) if arns else []
    mine = [t for t in tasks if (_ts(t.get("createdAt")) or 0) >= since]
    return min(mine, key=lambda t: _ts(t["createdAt"])) if mine else None


def host_phases(aws: Aws, cluster: str, since: float, host_arn: str | None) -> list[Phase]:
    """The task's host (or, without a task, the first host that joined since), if it is new."""
    ecs = aws.client("ecs")
    arns = [host_arn] if host_arn else ecs.list_container_instances(cluster=cluster).get("containerInstanceArns", [])[:100]
    hosts = ecs.describe_container_instances(cluster=cluster, containerInstances=arns).get("containerInstances", []) \
        if arns else []
    new = [h for h in hosts if (_ts(h.get("registeredAt")) or 0) >= since]
    if not new:
        return []
    host = min(new, key=lambda h: _ts(h["registeredAt"]))
    iid = host.get("ec2InstanceId", "")
    kind = next((a.get("value") for a in host.get("attributes", []) if a.get("name") == "ecs.instance-type"), "")
    out = [Phase(name="host-registered", at=_ts(host["registeredAt"]), source="ecs", detail=f"{iid} {kind}".strip())]
    if iid:
        found = aws.client("ec2").describe_instances(InstanceIds=[iid])["Reservations"]
        launched = _ts(found[0]["Instances"][0].get("LaunchTime")) if found else None
        if launched is not None and launched >= since:
            out.append(Phase(name="host-launch", at=launched, source="ecs", detail=iid))
    return out


def log_events(aws: Aws, stack: str, since: float, stream: str | None) -> list[tuple[str, float]]:
    """(message, unix time) of the task's stream; without a task, of the first server stream begun since."""
    logs = aws.client("logs")
    group = log_group_name(stack)
    if stream is None:
        streams = logs.describe_log_streams(logGroupName=group, orderBy="LastEventTime", descending=True,
                                            limit=50)["logStreams"]
        begun = [s for s in streams if s["logStreamName"].startswith(STREAM_PREFIX)
                 and (s.get("firstEventTimestamp") or 0) >= since * 1000]
        if not begun:
            return []
        stream = min(begun, key=lambda s: s["firstEventTimestamp"])["logStreamName"]
    out: list[tuple[str, float]] = []
    token = None
    while len(out) < MAX_LOG_EVENTS:
        kwargs = {"nextToken": token} if token else {}
        try:
            page = logs.get_log_events(logGroupName=group, logStreamName=stream, startFromHead=True, **kwargs)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":  # the task has not logged yet
                return out
            raise
        out += [(e["message"], e["timestamp"] / 1000) for e in page["events"]]
        if not page["events"] or page.get("nextForwardToken") in (None, token):
            return out
        token = page["nextForwardToken"]
    return out


def ecs_phases(aws: Aws, stack: str, cluster: str, since: float, warn: Callable[[str], None]) -> list[Phase]:
    """Everything AWS says about this start; a part that cannot be read is left out, and said."""
    service = resource_name(stack, "service")
    phases: list[Phase] = []

    def part(what: str, fn: Callable[[], object]):
        try:
            return fn()
        except (ClientError, BotoCoreError) as exc:
            warn(f"cold start: cannot read the {what} ({exc})")
            return None

    svc = part("service", lambda: aws.client("ecs").describe_services(cluster=cluster, services=[service])["services"])
    if svc:
        primary = next((d for d in svc[0].get("deployments", []) if d.get("status") == "PRIMARY"), None)
        created = _ts(primary.get("createdAt")) if primary else None
        if created is not None and created >= since:
            revision = primary.get("taskDefinition", "").rsplit("/", 1)[-1]
            phases.append(Phase(name="server-requested", at=created, source="ecs", detail=f"deployment of {revision}"))
        phases += event_phases(svc[0].get("events", []), since)
    first = part("service's tasks", lambda: first_task(aws, cluster, service, since))
    if first:
        phases += task_phases(first)
    phases += part("GPU hosts", lambda: host_phases(aws, cluster, since, first.get("containerInstanceArn") if first else None)) or []
    stream = STREAM_PREFIX + first["taskArn"].rsplit("/", 1)[-1] if first else None
    phases += parse_log(part("server log", lambda: log_events(aws, stack, since, stream)) or [])
    return phases


@task(name="ecs-cold-start", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def ecs_cold_start(store: ModelStore, capacity: EcsGpuCapacity, stack: str, endpoint: Endpoint, deploy_at: float,
                   ready_at: float, poll_s: float) -> Timeline:
    """The timeline of the deploy that just became ready (its first task, its host, its log) and a first
    token through the load balancer."""
    logger = get_run_logger()
    aws = Aws(store.credentials, capacity.region)
    cluster = capacity.cluster or resource_name(stack, "cluster")
    aws_says = ecs_phases(aws, stack, cluster, deploy_at, logger.warning)
    key = read_secret(endpoint.api_key_secret, store.credentials, capacity.region).get_secret_value()
    token = first_token(endpoint.url, key, endpoint.served_model_name, timeout=30)
    if token is None:
        logger.warning("cold start: the one-token completion through %s got no token; the timeline ends at ready", endpoint.url)
    timeline = Timeline.build([
        Phase(name="deploy-start", at=deploy_at, source="deploy"),
        *aws_says,
        Phase(name="ready", at=ready_at, source="deploy", detail=f"through the load balancer (polled every {poll_s:g} s)"),
        token,
    ])
    if not any(p.source in ("entrypoint", "vllm") for p in timeline.phases):
        logger.info("cold start: no new task's log since the deploy began (nothing restarted, or no log yet)")
    return timeline
