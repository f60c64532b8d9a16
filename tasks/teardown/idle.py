"""What "idle" means, for the reap flow, and the traffic the status flow shows.

A stack is idle for the time since the latest of:
- the last request it served: ECS, the load balancer's `RequestCount` in CloudWatch; local, the
  server's own Prometheus counters (`vllm:request_success_total`, requests running or waiting),
  sampled by status, reap and the scale flow (before it stops a server) into the traffic kept beside
  the state record (tasks/core/state.py, traffic_key), so the time survives the process; a local
  request counts at the first sample that sees it (at most one sampling interval late, never early:
  a stack is not torn down for want of a sample);
- its last deploy, or scale to a non-zero count (someone, or the batch, asked it to serve);
- for a record that is not running (a failed or interrupted deploy), the record's last write.
Reap tears a stack down when it has been idle longer than its limit: `ttl_hours`, or, for a stack
scaled to zero by design (the scale flow or the batch), its own `zero_ttl_hours`. A deploy in
progress (status deploying, lock unexpired) is never idle; a stack whose traffic could not be read
is spared until a reading succeeds.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from itertools import groupby

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from blocks.model_store import ModelStore
from tasks.core.aws import Aws
from tasks.core.errors import retry_if_transient
from tasks.core.state import Sample, StackState, Traffic, load_traffic, update_traffic
from tasks.targets.ecs.traffic import request_counts
from tasks.targets.local.metrics import ServerCounters, read_counters
from tasks.targets.local.runtime import is_our_server

HOUR = timedelta(hours=1)
KEEP_SAMPLES = timedelta(hours=3)  # reap samples hourly: an hour-old sample is always among them


def _t(ts: str) -> datetime:
    return datetime.fromisoformat(ts)


def _stamp(now: datetime) -> str:
    return now.isoformat(timespec="seconds")


class TrafficReading(BaseModel):
    traffic: Traffic  # the record's traffic, updated
    requests_last_hour: int | None  # None: not known (no sample from an hour ago)


class IdleVerdict(BaseModel):
    stack: str
    idle_since: str
    idle_hours: float
    limit_hours: float
    at_zero: bool
    expired: bool
    why: str


def judge(state: StackState, traffic: Traffic, now: datetime | None = None) -> IdleVerdict:
    """The reap decision for one stack, from its record and its traffic (sample that first)."""
    now = now or datetime.now(timezone.utc)
    at_zero = state.at_zero
    limit = state.scale.zero_ttl_hours if at_zero else state.ttl_hours
    marks = {"created": state.created_at, "last request": traffic.last_request_at,
             "deploy or scale up": state.scale.active_at if state.scale else None,
             "record written": state.updated_at if state.status != "running" else None}
    what, since = max(((k, _t(v)) for k, v in marks.items() if v), key=lambda kv: kv[1])
    idle_h = max(0.0, (now - since).total_seconds() / 3600)
    if state.status == "deploying" and state.lock_until and now < _t(state.lock_until):
        return IdleVerdict(stack=state.stack, idle_since=_stamp(since), idle_hours=round(idle_h, 4), limit_hours=limit,
                           at_zero=at_zero, expired=False, why=f"a deploy holds it until {state.lock_until}")
    expired = idle_h > limit
    kind = "scaled to zero by design: its own limit zero_ttl_hours" if at_zero else "ttl_hours"
    why = f"idle {idle_h:.2f} h since its {what} ({_stamp(since)}) {'>' if expired else '<='} {limit:g} h ({kind})"
    return IdleVerdict(stack=state.stack, idle_since=_stamp(since), idle_hours=round(idle_h, 4), limit_hours=limit,
                       at_zero=at_zero, expired=expired, why=why)


def served_since(samples: list[Sample], start: datetime) -> int | None:
    """Requests the sampled server processes finished after `start`, counted from each process's
    newest sample at or before `start` (or from 0 if it started after `start`), so the window is at
    least `start`..now and as much longer as the sampling gap; None when no sample bounds it."""
    total = 0
    for _, group in groupby(sorted(samples, key=lambda s: s.at), key=lambda s: (s.pid, s.started_at)):
        seen = list(group)
        last = seen[-1]
        if _t(last.at) <= start:
            continue  # this process was last seen before the window
        if last.started_at and _t(last.started_at) >= start:
            base = 0
        else:
            before = [s for s in seen if _t(s.at) <= start]
            if not before:
                return None
            base = before[-1].served
        total += max(0, last.served - base)
    return total


def record_counters(traffic: Traffic, pid: int, started_at: str | None, counters: ServerCounters | None,
                    now: datetime) -> Traffic:
    """`traffic` with one more reading of a server process's counters: a request is seen when the
    counter passed the previous sample's (a new process: passed 0) or one is in flight now."""
    traffic = traffic.model_copy(deep=True)
    if counters is not None:
        prev = traffic.samples[-1] if traffic.samples else None
        same = prev is not None and prev.pid == pid and prev.started_at == started_at
        if counters.served > (prev.served if same else 0) or counters.in_flight:
            traffic.last_request_at = _stamp(now)
        traffic.samples.append(Sample(at=_stamp(now), pid=pid, served=counters.served, started_at=started_at))
    traffic.samples = [s for s in traffic.samples if now - _t(s.at) <= KEEP_SAMPLES] or traffic.samples[-1:]
    traffic.sampled_at = _stamp(now)
    return traffic


def sample_local(store: ModelStore, state: StackState, now: datetime) -> TrafficReading:
    """The running server's counters (none when it is stopped) into the stack's samples."""
    ep = state.endpoint
    alive = bool(ep is not None and ep.pid and is_our_server(ep.pid))
    counters = read_counters(ep.url) if alive else None
    if alive and counters is None:  # busy or answering oddly: unknown, not "no request" (reap spares it this round)
        raise RuntimeError(f"stack {state.stack!r}: the server is running but its /metrics counters could not be read")
    if counters is not None and ep.own_requests:  # the deploy's first-token probe is not use (tasks/targets/local/coldstart.py)
        counters = counters.model_copy(update={"served": max(0, counters.served - ep.own_requests)})
    pid, started_at = (ep.pid, ep.started_at) if alive else (0, None)
    traffic = update_traffic(store, state.stack, lambda t: record_counters(t, pid, started_at, counters, now))
    return TrafficReading(traffic=traffic, requests_last_hour=served_since(traffic.samples, now - HOUR))


def sample_ecs(store: ModelStore, state: StackState, now: datetime, lookback: timedelta) -> TrafficReading:
    """The load balancer's RequestCount over `lookback` (at least the last hour)."""
    lb = next((r.id for r in state.resources if r.kind == "load-balancer"), None)
    if lb is None:  # no load balancer, no request
        return TrafficReading(traffic=load_traffic(store, state.stack)[0], requests_last_hour=0)
    aws = Aws(store.credentials, state.settings.get("region"))
    lookback = max(lookback, HOUR)
    period, points = request_counts(aws, lb, now - lookback, now)
    hour = request_counts(aws, lb, now - HOUR, now)[1] if period != 60 else [(ts, v) for ts, v in points if ts >= now - HOUR]
    seen = min(max(ts for ts, _ in points) + timedelta(seconds=period), now) if points else None  # end of the last busy period

    def merge(t: Traffic) -> Traffic:
        t = t.model_copy()
        if seen is not None and (t.last_request_at is None or seen > _t(t.last_request_at)):
            t.last_request_at = _stamp(seen)
        t.sampled_at = _stamp(now)
        return t

    return TrafficReading(traffic=update_traffic(store, state.stack, merge), requests_last_hour=int(sum(v for _, v in hour)))


@task(name="sample-traffic", task_run_name="sample-traffic-{state.stack}", retries=2, retry_delay_seconds=[5, 20],
      retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def sample_traffic(store: ModelStore, state: StackState, now: datetime | None = None,
                   lookback: timedelta = HOUR) -> TrafficReading:
    """Read the stack's traffic now and merge it into what is kept beside its record."""
    now = now or datetime.now(timezone.utc)
    if state.target == "local":
        return sample_local(store, state, now)
    return sample_ecs(store, state, now, lookback)
