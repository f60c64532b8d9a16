"""What "idle" means (tasks/teardown/idle.py) and what a stack ran (the record's scale), as pure logic:
the reap decision, the local server's counters and the requests-in-the-last-hour window, replica-hours.
The same logic on real traffic: tests/test_scale_e2e.py (local) and tests/test_ecs_scaling.py (moto)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from flows.operations import describe
from tasks.core.state import Sample, Scale, StackState, Traffic
from tasks.targets.local.metrics import ServerCounters, parse_counters
from tasks.teardown.idle import judge, record_counters, served_since

NOW = datetime(2030, 5, 1, 12, 0, tzinfo=timezone.utc)


def ago(hours: float) -> str:
    return (NOW - timedelta(hours=hours)).isoformat(timespec="seconds")


def stack(**kw) -> StackState:
    base = dict(stack="s", target="ecs", status="running", created_at=ago(100), updated_at=ago(0), ttl_hours=24,
                settings={"price_per_hour": 2.0, "instance_type": "g5.12xlarge"})
    return StackState(**{**base, **kw})


# what vLLM 0.32's /metrics said after one request (finish reason "length"); the other families are left out
METRICS = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 1.0
# HELP vllm:num_requests_waiting Number of requests waiting to be processed.
# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 2.0
# HELP vllm:request_success_total Count of successfully processed requests.
# TYPE vllm:request_success_total counter
vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} 4.0
vllm:request_success_total{engine="0",finished_reason="length",model_name="m"} 1.0
vllm:request_success_total{engine="0",finished_reason="abort",model_name="m"} 0.0
vllm:request_success_created{engine="0",finished_reason="stop",model_name="m"} 1.7963161118279467e+09
"""


def test_server_counters_sum_every_finish_reason_and_count_what_is_in_flight():
    assert parse_counters(METRICS) == ServerCounters(served=5, in_flight=3)
    assert parse_counters("") == ServerCounters(served=0, in_flight=0)


def test_a_request_is_seen_by_the_first_sample_after_it():
    t = record_counters(Traffic(), 100, ago(5), ServerCounters(served=0, in_flight=0), NOW - timedelta(hours=2))
    assert t.last_request_at is None  # a fresh server that served nothing
    t = record_counters(t, 100, ago(5), ServerCounters(served=3, in_flight=0), NOW - timedelta(hours=1))
    assert t.last_request_at == ago(1)
    t = record_counters(t, 100, ago(5), ServerCounters(served=3, in_flight=0), NOW)
    assert t.last_request_at == ago(1)  # no new request: the time stays
    t = record_counters(t, 100, ago(5), ServerCounters(served=3, in_flight=1), NOW + timedelta(minutes=1))
    assert t.last_request_at == (NOW + timedelta(minutes=1)).isoformat(timespec="seconds")  # one running now
    # a new process (a wake) counts from 0 again: 1 < 3 is still a new request
    t = record_counters(t, 200, ago(0), ServerCounters(served=1, in_flight=0), NOW + timedelta(minutes=2))
    assert t.last_request_at == (NOW + timedelta(minutes=2)).isoformat(timespec="seconds")
    # no process (scaled to zero): nothing sampled, the time stays; samples older than 3 h are dropped
    t = record_counters(t, 0, None, None, NOW + timedelta(hours=2, minutes=30))
    assert t.last_request_at == (NOW + timedelta(minutes=2)).isoformat(timespec="seconds")
    assert [s.pid for s in t.samples] == [100, 100, 200]  # the two more than 3 h old are gone
    t = record_counters(t, 0, None, None, NOW + timedelta(hours=5))
    assert [s.pid for s in t.samples] == [200]  # the last one is always kept


def test_requests_in_the_last_hour_from_the_samples():
    start = NOW - timedelta(hours=1)
    one = [Sample(at=ago(1.5), pid=1, served=10, started_at=ago(9)), Sample(at=ago(0.5), pid=1, served=14, started_at=ago(9)),
           Sample(at=ago(0), pid=1, served=20, started_at=ago(9))]
    assert served_since(one, start) == 10  # from the newest sample at least an hour old
    assert served_since(one[1:], start) is None  # nothing bounds the window from before
    # a process stopped (scaled to zero) 30 min ago and another started 10 min ago: both count
    woken = [Sample(at=ago(0.2), pid=2, served=3, started_at=ago(0.17)), Sample(at=ago(0), pid=2, served=7, started_at=ago(0.17))]
    assert served_since(one[:2] + woken, start) == 4 + 7
    assert served_since([Sample(at=ago(2), pid=1, served=99, started_at=ago(9))], start) == 0  # last seen before the window


def test_reap_decision():
    s = stack(scale=Scale(replicas=1, since=ago(50), active_at=ago(50)))
    v = judge(s, Traffic(last_request_at=ago(30)), NOW)
    assert v.expired and v.idle_hours == 30 and "last request" in v.why
    assert not judge(s, Traffic(last_request_at=ago(2)), NOW).expired  # served 2 h ago: busy, however old its deploy
    s.scale.active_at = ago(3)
    v = judge(s, Traffic(), NOW)
    assert not v.expired and "deploy or scale up" in v.why  # deployed (or woken) 3 h ago, no request yet

    # scaled to zero by design: its own limit, not ttl_hours
    z = stack(scale=Scale(replicas=0, since=ago(40), active_at=ago(48)))
    v = judge(z, Traffic(last_request_at=ago(45)), NOW)
    assert v.at_zero and not v.expired and v.limit_hours == 168 and "zero_ttl_hours" in v.why
    z.scale.zero_ttl_hours = 24
    assert judge(z, Traffic(last_request_at=ago(45)), NOW).expired
    # a server that died is not "at zero by design": ttl_hours
    dead = stack(scale=Scale(replicas=1, since=ago(48), active_at=ago(48)))
    assert judge(dead, Traffic(last_request_at=ago(45)), NOW).expired and not judge(dead, Traffic(), NOW).at_zero

    # a deploy in progress is never idle; a failed one counts from its record's last write
    busy = stack(status="deploying", lock_until=(NOW + timedelta(minutes=20)).isoformat(), updated_at=ago(30))
    assert not judge(busy, Traffic(), NOW).expired
    failed = stack(status="failed", updated_at=ago(5))
    assert not judge(failed, Traffic(), NOW).expired and "record written" in judge(failed, Traffic(), NOW).why
    # a record from before scale to zero: its creation, then its requests
    assert judge(stack(), Traffic(), NOW).expired and not judge(stack(), Traffic(last_request_at=ago(1)), NOW).expired


def test_replica_hours_and_status_cost_follow_the_scale():
    s = stack(created_at=ago(4))
    s.set_replicas(2, "deploy", now=NOW - timedelta(hours=3))  # 1 h at desired_count 1 before it (no scale record)
    s.set_replicas(0, "scale", zero_ttl_hours=12, now=NOW - timedelta(hours=1))
    assert s.at_zero and s.scale.zero_ttl_hours == 12 and s.scale.active_at == ago(3)  # going to zero is not activity
    assert s.replica_hours(NOW) == 1 + 2 * 2
    row = describe(s, Traffic(), None, NOW)
    assert row.replicas == 0 and row.price_per_hour == 0 and row.cost_so_far_usd == 10.0 and row.idle_limit_hours == 12
    s.set_replicas(1, "batch", now=NOW - timedelta(minutes=30))
    assert s.scale.zero_ttl_hours == 12 and s.scale.active_at == ago(0.5) and s.replica_hours(NOW) == 5.5
    assert describe(s, Traffic(), 7, NOW).price_per_hour == 2.0 and describe(s, Traffic(), 7, NOW).requests_last_hour == 7
