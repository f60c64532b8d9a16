"""The vLLM image's entrypoint, outside a container: fetch a staged model from S3 by its manifest and verify it."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest

from embedded.model_kit import REPO_ROOT, vllm_python
from tasks.core.aws import aws_client
from tasks.core.s3 import Manifest, ManifestFile, utc_now, write_manifest

pytestmark = [pytest.mark.integration, pytest.mark.vllm]
ENTRYPOINT = REPO_ROOT / "images" / "vllm" / "entrypoint.py"


def _load_entrypoint():
    spec = importlib.util.spec_from_file_location("vllm_entrypoint", ENTRYPOINT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage(bucket: str, folder: Path, prefix: str) -> None:
    import hashlib

    s3 = aws_client("s3")
    files = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            s3.put_object(Bucket=bucket, Key=f"{prefix}/{rel}", Body=p.read_bytes())
            files.append(ManifestFile(path=rel, size=p.stat().st_size, sha256=hashlib.sha256(p.read_bytes()).hexdigest()))
    write_manifest(s3, bucket, prefix, Manifest(repo_id="acme/tiny", revision="main", sha="0" * 40, files=files,
                                                staged_at=utc_now(), source_endpoint="test"))


def test_fetch_verifies_and_reuses_the_cache(local_aws, bucket, tiny_model, tmp_path):
    _stage(bucket, tiny_model, "models/acme/tiny/abc")
    entry = _load_entrypoint()
    target = entry.fetch(f"s3://{bucket}/models/acme/tiny/abc", tmp_path)
    for p in tiny_model.rglob("*"):
        if p.is_file():
            assert (target / p.relative_to(tiny_model)).read_bytes() == p.read_bytes()
    cmd = entry.build_command({"MODEL_URI": f"s3://{bucket}/models/acme/tiny/abc",
                               "VLLM_ARGS": json.dumps(["--model", "{model}", "--port", "8000"])}, tmp_path)
    assert cmd[1:4] == ["-m", "vllm.entrypoints.openai.api_server", "--model"] and cmd[4] == str(target)


def test_corrupted_object_exits_non_zero_with_a_clear_message(local_aws, bucket, tiny_model, tmp_path):
    _stage(bucket, tiny_model, "models/acme/tiny/bad")
    aws_client("s3").put_object(Bucket=bucket, Key="models/acme/tiny/bad/config.json", Body=b'{"tampered": true}')
    env = {**os.environ, "MODEL_URI": f"s3://{bucket}/models/acme/tiny/bad", "MODEL_CACHE_DIR": str(tmp_path),
           "VLLM_ARGS": "[]"}
    out = subprocess.run([str(vllm_python()), str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "config.json: sha256" in out.stderr and "!= manifest" in out.stderr
    assert not (tmp_path / bucket / "models/acme/tiny/bad/config.json").exists()  # nothing unverified kept


def test_unstaged_model_exits_with_a_clear_message(local_aws, bucket, tmp_path):
    env = {**os.environ, "MODEL_URI": f"s3://{bucket}/models/none", "MODEL_CACHE_DIR": str(tmp_path), "VLLM_ARGS": "[]"}
    out = subprocess.run([str(vllm_python()), str(ENTRYPOINT)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "has no _manifest.json" in out.stderr
