"""The embedded default itself: the moto server, the local hub and the default model kit."""

from __future__ import annotations

import filecmp
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from embedded.hub_server import HubRepo, LocalHub
from embedded.model_kit import REPO_ROOT, ensure_default_model, vllm_python

pytestmark = [pytest.mark.integration, pytest.mark.vllm]


def test_moto_server_reached_through_endpoint_variable_only(monkeypatch):
    from embedded.local_aws import local_aws
    from tasks.core.aws import aws_client

    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(var, raising=False)
    with local_aws(bucket="kit-check") as stack:
        assert os.environ["AWS_ENDPOINT_URL"] == stack.endpoint
        s3 = aws_client("s3")  # no endpoint argument anywhere: boto3 reads the variable
        assert s3.meta.endpoint_url == stack.endpoint
        assert "kit-check" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        port = int(stack.endpoint.rsplit(":", 1)[1])
    assert "AWS_ENDPOINT_URL" not in os.environ  # restored on exit
    with pytest.raises(OSError):  # and the server is gone
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_snapshot_download_from_local_hub_is_byte_identical(tiny_model, tmp_path):
    from huggingface_hub import snapshot_download

    repo = HubRepo(tiny_model)
    with LocalHub({"acme/tiny": repo}) as hub:
        out = Path(snapshot_download("acme/tiny", endpoint=hub.endpoint, local_dir=tmp_path / "dl"))
    assert repo.files, "the tiny model has files"
    for rel in repo.files:
        assert filecmp.cmp(tiny_model / rel, out / rel, shallow=False), rel


def test_hub_reports_sizes_and_hashes(tiny_model):
    from huggingface_hub import HfApi

    repo = HubRepo(tiny_model)
    with LocalHub({"acme/tiny": repo}) as hub:
        info = HfApi(endpoint=hub.endpoint).model_info("acme/tiny", files_metadata=True)
    assert info.sha == repo.sha
    for s in info.siblings:
        f = repo.files[s.rfilename]
        assert s.size == f.size and s.blob_id == f.blob_id
        assert (s.lfs.sha256 if s.lfs else None) == (f.sha256 if f.lfs else None)


# --- the default model kit (runs in the vLLM environment, which has torch) ---------------

TOOLS = [{"type": "function", "function": {"name": "get_current_weather", "description": "Get the weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required": ["city"]}}}]
CONVERSATION = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function",
     "function": {"name": "get_current_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'},
]
GOLDEN = (
    "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist with"
    " the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    '{"name": "get_current_weather", "description": "Get the weather", "parameters": {"type": "object", "properties":'
    ' {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, "required":'
    ' ["city"]}}\n</tools>\n\nFor each function call, return a json object with function name and arguments within'
    ' <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n'
    "</tool_call><|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n<tool_call>\n"
    '{"name": "get_current_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call><|im_end|>\n'
    '<|im_start|>user\n<tool_response>\n{"temperature": 21}\n</tool_response><|im_end|>\n<|im_start|>assistant\n'
)

_PROBE = """
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, tools, conv = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder)
model = AutoModelForCausalLM.from_pretrained(folder)
rendered = tok.apply_chat_template(conv, tools=tools, tokenize=False, add_generation_prompt=True)
ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                              add_generation_prompt=True, return_tensors="pt", return_dict=True)
out = model.generate(**ids, max_new_tokens=24, do_sample=False)
answer = tok.decode(out[0][ids["input_ids"].shape[1]:], skip_special_tokens=True)
print(json.dumps({"rendered": rendered, "answer": answer, "arch": model.config.architectures,
                  "layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size}))
"""


@pytest.fixture(scope="module")
def default_model() -> Path:
    return ensure_default_model()


def test_default_model_is_a_normal_hf_folder(default_model):
    names = {p.name for p in default_model.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= names
    config = json.loads((default_model / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 30
    assert "quantization_config" not in config


def test_default_model_loads_renders_tools_and_answers(default_model):
    out = subprocess.run(
        [str(vllm_python()), "-c", _PROBE, str(default_model), json.dumps(TOOLS), json.dumps(CONVERSATION)],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    probe = json.loads(out.stdout.strip().splitlines()[-1])
    assert probe["arch"] == ["LlamaForCausalLM"] and probe["hidden"] == 576
    assert probe["rendered"] == GOLDEN
    assert "Paris" in probe["answer"]


def test_second_build_is_a_cache_hit(default_model):
    stamp = (default_model / "model.safetensors").stat().st_mtime_ns
    out = subprocess.run(
        [str(vllm_python()), "-X", "importtime", "-m", "embedded.model_kit", "build"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert Path(out.stdout.strip()) == default_model
    assert (default_model / "model.safetensors").stat().st_mtime_ns == stamp
    assert "torch" not in {line.split("|")[-1].strip().split(".")[0] for line in out.stderr.splitlines() if "|" in line}
