"""Hardening: retries under injected faults, concurrent deploys, hostile input.

The end-to-end part (fake secrets scanned everywhere, chaos during validate and batch, load from
1 to 256 concurrent requests) is tests/test_hardening_e2e.py."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from chaos_proxy import ChaosProxy
from prefect import flow
from pydantic import ValidationError
from test_capacity import SMOLLM2_135M, SMOLLM2_BYTES
from test_ecs_target import run_deploy, stage_fake

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from embedded.local_aws import patched_env
from tasks.core.aws import Aws, aws_client
from tasks.core.endpoint import Endpoint, EndpointError
from tasks.core.errors import PipelineInputError
from tasks.core.state import StateConflict, load_state
from tasks.teardown.sweep import leftovers

# ------------------------------------------------------------------------------ endpoint retries (unit)


class _Upstream(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(n)
        body = json.dumps({"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
                           "usage": {"completion_tokens": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture()
def upstream():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Upstream)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_endpoint_retries_503_429_and_resets_and_counts_them(upstream):
    with ChaosProxy(upstream, rate=0.3, kinds=("throttle", "error_5xx", "drop"), aws=False, seed=3) as proxy:
        with Endpoint(proxy.url, "k", "m", backoff_s=0.01, attempts=8) as ep:
            replies = [ep.chat({"messages": []}) for _ in range(40)]
    assert all(r.status == 200 and r.content == "ok" for r in replies)
    assert ep.retries == sum(proxy.counts.values()) > 0


def test_endpoint_gives_up_after_its_attempts(upstream):
    with ChaosProxy(upstream, rate=1.0, kinds=("drop",), aws=False) as proxy:
        with Endpoint(proxy.url, "k", "m", backoff_s=0.01, attempts=3) as ep, pytest.raises(EndpointError):
            ep.chat({"messages": []})
    assert ep.retries == 2 and proxy.counts["drop"] == 3


# ------------------------------------------------------------------------------------ chaos against AWS


@pytest.mark.integration
def test_stage_deploy_and_teardown_under_aws_and_hub_faults(local_aws, bucket, hub, tiny_model, capsys):
    """15 % of AWS requests throttled, failed or dropped, and a Hub file dropped mid-way: stage
    still copies every byte, the ECS deploy still gets to its wait (and rolls back), teardown still
    leaves nothing."""
    from flows.stage import stage
    from tasks.stage.transfer import TransferSettings

    store = ModelStore(bucket_name=bucket)
    hub.inject("drop_mid_file", "model-00001-of-00002.safetensors")
    with ChaosProxy(local_aws.endpoint, rate=0.15) as proxy, patched_env({"AWS_ENDPOINT_URL": proxy.url}):
        staged = flow(name="t-chaos-stage")(stage)(ModelSource(repo_id="acme/tiny"), store, TransferSettings())
        model = stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])
        with pytest.raises(Exception, match="no container instance has joined"):
            run_deploy("chaos", store, model)
        left = leftovers(Aws(region="us-east-1"), "chaos")
    s3 = aws_client("s3")
    manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{staged.prefix}/_manifest.json")["Body"].read())
    assert len(manifest["files"]) == staged.files >= 3
    for f in manifest["files"]:
        body = s3.get_object(Bucket=bucket, Key=f"{staged.prefix}/{f['path']}")["Body"].read()
        assert body == (tiny_model / f["path"]).read_bytes(), f["path"]
    assert left == [] and load_state(store, "chaos")[0] is None
    injected = dict(proxy.counts)
    assert set(injected) == {"throttle", "error_5xx", "drop"} and sum(injected.values()) >= 20
    with capsys.disabled():
        print(f"\nchaos (AWS): {proxy.requests} requests, faults injected {injected}, every one retried; "
              f"hub: 1 dropped file resumed")


# ------------------------------------------------------------------------------------------ concurrency


@pytest.mark.integration
def test_two_deploys_of_one_stack_one_refuses_and_two_stacks_proceed(bucket):
    store = ModelStore(bucket_name=bucket)
    model = stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])

    def attempt(stack, timeout=2):
        try:
            run_deploy(stack, store, model, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - the outcome is what is tested
            return exc
        return None

    # The deploy that gets the lock waits 30 s for hosts that never come, so the two runs overlap
    # even when one thread starts late on a loaded machine (with 2 s the first could finish and roll
    # back before the second read the record, and then the second rightly proceeded).
    with ThreadPoolExecutor(2) as pool:
        same = list(pool.map(lambda s: attempt(s, timeout=30), ["locked", "locked"]))
    refused = [e for e in same if isinstance(e, (PipelineInputError, StateConflict))]
    proceeded = [e for e in same if e is not None and "no container instance" in str(e)]
    assert len(refused) == 1 and len(proceeded) == 1, same
    assert "another" in str(refused[0])  # "…is deploying by another run…" or "…another deploy or teardown…"

    with ThreadPoolExecutor(2) as pool:
        both = list(pool.map(attempt, ["para-a", "para-b"]))
    assert all("no container instance" in str(e) for e in both), both  # both reached the wait
    for stack in ("locked", "para-a", "para-b"):
        assert leftovers(Aws(region="us-east-1"), stack) == []


# ------------------------------------------------------------------------------------ bad input sweep


def s3_snapshot() -> dict[str, int]:
    """Every bucket and how many objects it holds: equal before and after means nothing was written."""
    s3 = aws_client("s3")
    return {b["Name"]: s3.list_objects_v2(Bucket=b["Name"]).get("KeyCount", 0) for b in s3.list_buckets()["Buckets"]}


def _hostile_flows():
    from flows.batch import batch_inference
    from flows.build import build_images
    from flows.deploy import deploy_model
    from flows.plan import plan_capacity
    from flows.stage import stage_model
    from flows.teardown import teardown_stack
    from flows.validate import validate

    return [
        ("stage: path traversal in repo id", lambda: stage_model(repo_id="../../etc/passwd")),
        ("stage: huge repo id", lambda: stage_model(repo_id="a/" + "b" * 5000)),
        ("stage: empty repo id", lambda: stage_model(repo_id="")),
        ("stage: traversal in revision", lambda: stage_model(repo_id="acme/tiny", revision="../../main")),
        ("deploy: empty stack", lambda: deploy_model(stack="")),
        ("deploy: traversal in stack", lambda: deploy_model(stack="../other")),
        ("deploy: huge stack", lambda: deploy_model(stack="a" * 10_000)),
        ("deploy: wrong type", lambda: deploy_model(stack=["a"])),
        ("deploy: unknown target", lambda: deploy_model(stack="ok", target="k8s")),
        ("deploy: traversal in model uri", lambda: deploy_model(stack="ok", model_uri="s3://b/models/../../stacks/x")),
        ("deploy: not an s3 uri", lambda: deploy_model(stack="ok", model_uri="file:///etc/passwd")),
        ("deploy: bad image", lambda: deploy_model(stack="ok", target="ecs", model_uri="s3://b/m/x", image_uri="x y")),
        ("deploy: negative timeout", lambda: deploy_model(stack="ok", ready_timeout_s="soon")),
        ("validate: no stack or endpoint", lambda: validate()),
        ("validate: traversal in stack", lambda: validate(stack="../x")),
        ("batch: traversal in input", lambda: batch_inference(input_uri="s3://b/in/../../stacks/x/state.json", stack="ok")),
        ("batch: control characters", lambda: batch_inference(input_uri="s3://b/in/\x00x.jsonl", stack="ok")),
        ("batch: huge key", lambda: batch_inference(input_uri="s3://b/" + "k" * 2000, stack="ok")),
        ("batch: empty input", lambda: batch_inference(input_uri="", stack="ok")),
        ("batch: zero concurrency", lambda: batch_inference(input_uri="s3://b/in/x.jsonl", stack="ok", concurrency=0)),
        ("batch: huge concurrency", lambda: batch_inference(input_uri="s3://b/in/x.jsonl", stack="ok", concurrency=10**9)),
        ("teardown: traversal", lambda: teardown_stack(stack="../../x")),
        ("teardown: empty", lambda: teardown_stack(stack="")),
        ("plan: unknown instance", lambda: plan_capacity(model_uri="s3://b/m/x", instance_types=["p9.huge"])),
        ("plan: negative concurrency", lambda: plan_capacity(model_uri="s3://b/m/x", concurrency=-1)),
        ("build: traversal in image name", lambda: build_images(images=["../../etc"])),
    ]


HOSTILE_BLOCKS = [
    (ModelSource, {"repo_id": "a/b\x00c"}),
    (ModelSource, {"repo_id": "acme/tiny", "revision": "main\nx"}),
    (ModelStore, {"bucket_name": "../x"}),
    (ModelStore, {"bucket_name": "b", "bucket_folder": "../../x"}),
    (VllmServerSettings, {"served_model_name": ""}),
    (VllmServerSettings, {"max_model_len": -1}),
    (VllmServerSettings, {"max_model_len": "long"}),
    (VllmServerSettings, {"gpu_memory_utilization": 7}),
    (VllmServerSettings, {"extra_args": ["--api-key", "sk-leaked"]}),
    (EcsGpuCapacity, {"subnets": ["subnet-1; rm -rf /"]}),
    (EcsGpuCapacity, {"ingress_cidrs": ["0.0.0.0/0; drop"]}),
    (EcsGpuCapacity, {"region": "../../etc"}),
    (EcsGpuCapacity, {"instance_type": "t3.micro"}),
    (EcsGpuCapacity, {"container_port": 22}),
    (EcsGpuCapacity, {"certificate_arn": "arn:aws:iam::1:role/x"}),
]


@pytest.mark.integration
@pytest.mark.parametrize("name", [n for n, _ in _hostile_flows()])
def test_hostile_flow_parameters_are_clear_errors_and_create_nothing(name, local_aws):
    call = dict(_hostile_flows())[name]
    before = s3_snapshot()
    with pytest.raises(PipelineInputError) as err:
        call()
    message = str(err.value)
    assert 0 < len(message) <= 400 and "\n" not in message, (name, message)  # one line (tests/test_param_errors.py: every parameter)
    assert s3_snapshot() == before, name  # nothing written, no bucket made


@pytest.mark.parametrize(("block", "fields"), HOSTILE_BLOCKS, ids=[f"{b.__name__}-{list(f)[-1]}-{i}" for i, (b, f) in enumerate(HOSTILE_BLOCKS)])
def test_hostile_block_fields_are_refused_naming_the_field(block, fields):
    with pytest.raises(ValidationError) as err:
        block(**fields)
    assert list(fields)[-1] in str(err.value)  # the hostile field is the last one


@pytest.mark.integration
def test_non_utf8_jsonl_lines_become_error_records(bucket):
    """A batch input with bytes that are not UTF-8 loses no line: each bad one is an error record."""
    from tasks.batch.online import parse_line

    seen: dict[str, int] = {}
    bad = parse_line(1, b'{"custom_id": "x\xff\xfe", "method": "POST"}', seen)
    assert bad.request is None and "not valid JSON" in bad.error
    good = parse_line(2, json.dumps({"custom_id": "ok", "method": "POST", "url": "/v1/chat/completions",
                                     "body": {"messages": []}}).encode(), seen)
    assert good.request is not None


def test_no_flow_takes_a_raw_secret_as_a_parameter():
    """Secrets live in blocks (SecretStr) and in Secrets Manager; a parameter is stored in plain text."""
    import importlib

    import yaml
    from conftest import REPO

    suspicious = ("token", "password", "secret_key", "api_key", "access_key")
    for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        module, _, name = d["entrypoint"].partition(":")
        fl = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        for param in fl.parameters.properties:
            assert not any(s in param for s in suspicious) or param.endswith(("_secret", "_block")), (d["name"], param)
