"""Operations a user runs from the UI: `status` (live stacks: age, endpoint, replicas, requests in the
last hour, cost so far) and `reap` (tear down stacks idle past their limit, so a forgotten GPU service
does not bill for days). What idle means: tasks/teardown/idle.py (requests served, not record writes)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from blocks.loading import load_config
from blocks.model_store import ModelStore
from flows.teardown import teardown
from tasks.core.errors import flow
from tasks.core.state import StackState, Traffic, list_stacks, load_traffic, price_per_hour
from tasks.teardown.idle import IdleVerdict, TrafficReading, judge, sample_traffic


class StackStatus(BaseModel):
    stack: str
    target: str
    status: str
    replicas: int  # the count the last deploy or scale set; 0: scaled to zero
    age_hours: float
    idle_hours: float  # since the last request, deploy or scale up (tasks/teardown/idle.py)
    idle_limit_hours: float  # ttl_hours, or zero_ttl_hours at zero
    ttl_hours: float
    requests_last_hour: int | None = None  # None: not known (local: no sample from an hour ago)
    last_request_at: str | None = None
    endpoint: str | None
    instance_type: str | None
    price_per_hour: float  # per hour now: the instance's price x replicas (0 at zero)
    cost_so_far_usd: float  # replica-hours run x the instance's price
    dashboard: str | None = None
    gateway: str | None = None  # the tool gateway's URL, when the stack has one


def _hours_since(ts: str, now: datetime) -> float:
    return (now - datetime.fromisoformat(ts)).total_seconds() / 3600


def describe(state: StackState, traffic: Traffic | None = None, requests_last_hour: int | None = None,
             now: datetime | None = None) -> StackStatus:
    now = now or datetime.now(timezone.utc)
    traffic = traffic or Traffic()
    instance = (state.settings or {}).get("instance_type")
    price = price_per_hour(state)
    verdict = judge(state, traffic, now)
    return StackStatus(
        stack=state.stack, target=state.target, status=state.status, replicas=state.replicas,
        age_hours=round(_hours_since(state.created_at, now), 2), idle_hours=round(verdict.idle_hours, 2),
        idle_limit_hours=verdict.limit_hours, ttl_hours=state.ttl_hours, requests_last_hour=requests_last_hour,
        last_request_at=traffic.last_request_at, endpoint=state.endpoint.url if state.endpoint else None,
        instance_type=instance, price_per_hour=round(price * state.replicas, 4),
        cost_so_far_usd=round(state.replica_hours(now) * price, 2), dashboard=(state.settings or {}).get("dashboard_url"),
        gateway=state.gateway.url if state.gateway else None,
    )


def observe(store: ModelStore, state: StackState, now: datetime, lookback: timedelta) -> TrafficReading | None:
    """A running stack's traffic, sampled now and kept beside its record; None when it is not running
    (its kept traffic is what there is) or could not be read (logged)."""
    if state.status != "running":
        return None
    try:
        return sample_traffic(store, state, now, lookback)
    except Exception as exc:  # noqa: BLE001 - one stack's unreadable metrics must not stop the others
        get_run_logger().warning("stack %r: traffic not read (%s)", state.stack,
                                 str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        return None


def stack_statuses(store: ModelStore, now: datetime | None = None) -> list[StackStatus]:
    now = now or datetime.now(timezone.utc)
    rows = []
    for state in list_stacks(store):
        reading = observe(store, state, now, timedelta(hours=1))
        traffic = reading.traffic if reading else load_traffic(store, state.stack)[0]
        rows.append(describe(state, traffic, reading.requests_last_hour if reading else None, now))
    return rows


@flow(name="status", log_prints=True)
def status(model_store_block: str | None = None) -> list[StackStatus]:
    """Every live stack with its age, endpoint, replicas, requests in the last hour, idle time and cost so far."""
    rows = stack_statuses(load_config(ModelStore, model_store_block))
    create_table_artifact([r.model_dump() for r in rows] or [{"stack": "(none)"}], key="stacks-status",
                          description="Live stacks")
    for r in rows:
        served = "?" if r.requests_last_hour is None else r.requests_last_hour
        print(f"{r.stack:24} {r.target:5} {r.status:12} x{r.replicas} age {r.age_hours:6.1f} h  idle {r.idle_hours:.1f} h  "
              f"{served} req/h  {r.endpoint or '-'}  ${r.cost_so_far_usd}" + (f"  {r.dashboard}" if r.dashboard else "")
              + (f"  gateway {r.gateway}" if r.gateway else ""))
    return rows


def reap_stacks(store: ModelStore, dry_run: bool = False, now: datetime | None = None) -> list[IdleVerdict]:
    """Sample each stack's traffic, judge it (tasks/teardown/idle.py) and tear down the expired ones;
    a running stack whose traffic could not be read is spared this time. `now`: the clock to judge
    by (tests). Returns the verdicts."""
    logger = get_run_logger()
    now = now or datetime.now(timezone.utc)
    verdicts, failed = [], []
    for state in list_stacks(store):
        limit = state.scale.zero_ttl_hours if state.at_zero else state.ttl_hours
        reading = observe(store, state, now, timedelta(hours=limit))
        if state.status == "running" and reading is None:
            logger.warning("stack %r spared: its traffic could not be read", state.stack)
            continue
        verdict = judge(state, reading.traffic if reading else load_traffic(store, state.stack)[0], now)
        verdicts.append(verdict)
        if not verdict.expired:
            logger.info("stack %r kept: %s", state.stack, verdict.why)
            continue
        logger.warning("stack %r: %s: %s", state.stack, verdict.why, "would tear down (dry run)" if dry_run else "tearing down")
        if not dry_run:
            try:
                teardown(state.stack, store)
            except Exception as exc:  # noqa: BLE001 - the other expired stacks are still reaped; this one fails the run below
                logger.error("stack %r: teardown failed: %s", state.stack, exc)
                failed.append(state.stack)
    if failed:
        raise RuntimeError(f"reap: teardown failed for {', '.join(map(repr, failed))} (the others were reaped); see the log")
    return verdicts


@flow(name="reap", log_prints=True)
def reap(model_store_block: str | None = None, dry_run: bool = False) -> list[str]:
    """Tear down every stack that served no request for longer than its TTL (ttl_hours; a stack scaled
    to zero by design: its zero_ttl_hours). Schedule it hourly: each run also samples the traffic."""
    verdicts = reap_stacks(load_config(ModelStore, model_store_block), dry_run)
    return [v.stack for v in verdicts if v.expired]
