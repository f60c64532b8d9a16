"""LoRA adapters: where they are staged, whether they fit the base model, and the stack's adapter index.

Checks run before anything is deployed and read only a few kilobytes: the adapter's
`adapter_config.json` and the JSON headers of its and the base model's safetensors files
(ranged GETs). A LoRA's A matrix is (rank x in) and its B matrix (out x rank), so comparing
them with the base weight of the module they adapt proves, without loading anything, that
the adapter was made for this architecture, not just for a model of the same name.

The adapter index (`s3://<bucket>/stacks/<stack>/adapters/index.json`, {served name: staged
URI}) is what the server's entrypoint reads: at start-up for `--lora-modules`, and at run
time through the LoRA resolver it registers, so an adapter added to a running stack is
fetched and loaded by each replica on its first request (images/vllm/entrypoint.py).
"""

from __future__ import annotations

import hashlib
import json
import struct

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.model_source import ADAPTER_PATTERNS, LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.core.s3 import (
    Manifest,
    ManifestFile,
    model_prefix,
    read_json,
    read_manifest,
    require_bucket,
    s3_client,
    split_s3,
    utc_now,
    write_manifest,
)
from tasks.core.state import ModelRef, adapter_index_key
from tasks.stage.models import find_staged_model

ADAPTER_CONFIG, ADAPTER_WEIGHTS = ADAPTER_PATTERNS
_RETRY = dict(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header


def s3_repo_id(uri: str) -> str:
    """The store path an s3:// adapter is staged under: `s3/<bucket>/<key>` (next to Hub repos)."""
    bucket, key = split_s3(uri)
    return f"s3/{bucket}/{key.strip('/')}"


def staged_repo_id(adapter: LoraAdapter) -> str:
    return s3_repo_id(adapter.source) if adapter.is_s3 else adapter.source


def adapter_source(source: ModelSource, adapter: LoraAdapter) -> ModelSource:
    """A Hub adapter is staged like a model: same streamed, verified, manifest-last path, its own files."""
    return ModelSource(repo_id=adapter.source, revision=adapter.revision, token=source.token,
                       allow_patterns=list(ADAPTER_PATTERNS), ignore_patterns=[])


@task(name="stage-s3-adapter", **_RETRY)
def stage_s3_adapter(store: ModelStore, adapter: LoraAdapter) -> ModelRef:
    """Copy an adapter folder from any S3 location into the store with a manifest. Its "revision"
    is a digest of the source objects' keys, sizes and ETags, so a changed source is staged anew
    and an unchanged one is found by its manifest and not copied again."""
    logger = get_run_logger()
    s3 = s3_client(store)
    src_bucket, src_key = split_s3(adapter.source)
    src_key = src_key.strip("/")
    objects = []
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=src_bucket, Prefix=src_key + "/"):
            objects += [o for o in page.get("Contents", []) if o["Key"].rsplit("/", 1)[-1] in ADAPTER_PATTERNS
                        and o["Key"].count("/") == src_key.count("/") + 1]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket", "404"):
            raise PipelineInputError(f"adapter {adapter.name!r}: bucket {src_bucket!r} does not exist") from None
        raise
    names = {o["Key"].rsplit("/", 1)[-1] for o in objects}
    if names != set(ADAPTER_PATTERNS):
        raise PipelineInputError(f"adapter {adapter.name!r}: {adapter.source} lacks {sorted(set(ADAPTER_PATTERNS) - names)} "
                                 "(a peft LoRA folder saved with safetensors)")
    digest = hashlib.sha256(json.dumps(sorted((o["Key"], o["Size"], o["ETag"]) for o in objects)).encode()).hexdigest()[:40]
    repo_id = s3_repo_id(adapter.source)
    prefix = model_prefix(store, repo_id, digest)
    require_bucket(s3, store.bucket_name)
    if read_manifest(s3, store.bucket_name, prefix) is not None:
        logger.info("adapter %r: %s already staged at s3://%s/%s", adapter.name, adapter.source, store.bucket_name, prefix)
        return ModelRef(repo_id=repo_id, sha=digest, s3_uri=f"s3://{store.bucket_name}/{prefix}")
    files = []
    for o in objects:
        name = o["Key"].rsplit("/", 1)[-1]
        data = s3.get_object(Bucket=src_bucket, Key=o["Key"], IfMatch=o["ETag"])["Body"].read()  # adapters are MBs
        if len(data) != o["Size"]:
            raise RuntimeError(f"adapter {adapter.name!r}: {o['Key']} read {len(data)} of {o['Size']} bytes")
        s3.put_object(Bucket=store.bucket_name, Key=f"{prefix}/{name}", Body=data)
        files.append(ManifestFile(path=name, size=len(data), sha256=hashlib.sha256(data).hexdigest()))
    write_manifest(s3, store.bucket_name, prefix, Manifest(repo_id=repo_id, revision=digest, sha=digest, files=files,
                                                         staged_at=utc_now(), source_endpoint=adapter.source))
    logger.info("adapter %r: %s staged at s3://%s/%s", adapter.name, adapter.source, store.bucket_name, prefix)
    return ModelRef(repo_id=repo_id, sha=digest, s3_uri=f"s3://{store.bucket_name}/{prefix}")


@task(name="find-staged-adapters", **_RETRY)
def find_staged_adapters(store: ModelStore, adapters: list[LoraAdapter]) -> dict[str, ModelRef]:
    """The newest staged copy of each adapter, by served name."""
    found = {}
    for a in adapters:
        try:
            found[a.name] = find_staged_model.fn(store, repo_id=staged_repo_id(a))
        except PipelineInputError as exc:
            raise PipelineInputError(f"adapter {a.name!r}: {exc}") from None
    return found


# ------------------------------------------------------------------------------------------ checks

def safetensors_shapes(s3, bucket: str, key: str) -> dict[str, list[int]]:
    """Tensor name -> shape from a safetensors file's header: two ranged GETs, whatever its size."""
    head = s3.get_object(Bucket=bucket, Key=key, Range="bytes=0-7")["Body"].read()
    if len(head) != 8:
        raise PipelineInputError(f"s3://{bucket}/{key} is not a safetensors file (shorter than 8 bytes)")
    (n,) = struct.unpack("<Q", head)
    if not 2 <= n <= MAX_HEADER:
        raise PipelineInputError(f"s3://{bucket}/{key} is not a safetensors file (header length {n})")
    header = json.loads(s3.get_object(Bucket=bucket, Key=key, Range=f"bytes=8-{7 + n}")["Body"].read())
    return {name: meta["shape"] for name, meta in header.items() if name != "__metadata__"}


def model_shapes(s3, model: ModelRef) -> dict[str, list[int]]:
    bucket, prefix = split_s3(model.s3_uri)
    manifest = read_manifest(s3, bucket, prefix.strip("/"))
    if manifest is None:
        raise PipelineInputError(f"{model.s3_uri} has no manifest: stage it first")
    shapes: dict[str, list[int]] = {}
    for f in manifest.files:
        if f.path.endswith(".safetensors"):
            shapes.update(safetensors_shapes(s3, bucket, f"{prefix.strip('/')}/{f.path}"))
    return shapes


def _same_repo(a: str, b: str) -> bool:
    return a.strip().strip("/").lower() == b.strip().strip("/").lower()


def adapter_problems(config: dict | None, shapes: dict[str, list[int]], base_repo_id: str,
                     base_shapes: dict[str, list[int]], max_lora_rank: int) -> list[str]:
    """Why this adapter cannot be served on this base with this rank limit; empty when it can."""
    if config is None:
        return [f"no {ADAPTER_CONFIG}"]
    if str(config.get("peft_type", "")).upper() != "LORA":
        return [f"peft_type is {config.get('peft_type')!r}, not LORA"]
    problems = []
    base = str(config.get("base_model_name_or_path") or "")
    if not _same_repo(base, base_repo_id):
        problems.append(f"it was trained on {base!r}, not on the deployed base {base_repo_id!r}")
    ranks = [int(config.get("r") or 0), *[int(v) for v in (config.get("rank_pattern") or {}).values()]]
    if max(ranks) > max_lora_rank:
        problems.append(f"rank {max(ranks)} exceeds the server's max_lora_rank {max_lora_rank} (raise max_lora_rank)")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (full-weight modules) cannot be served by vLLM")
    missing, mismatched = set(), []
    for key, shape in sorted(shapes.items()):
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        base_shape = base_shapes.get(module + ".weight")
        if base_shape is None:
            missing.add(module.rsplit(".", 1)[-1])
            continue
        out_dim, in_dim = base_shape[0], base_shape[-1]
        ok = shape[-1] == in_dim if ".lora_A." in key else shape[0] == out_dim
        if not ok and len(mismatched) < 3:
            mismatched.append(f"{module} ({'A' if '.lora_A.' in key else 'B'} {shape} vs base {base_shape})")
    if missing:
        problems.append(f"target modules {sorted(missing)} are not in the base model")
    if mismatched:
        problems.append("shapes do not fit the base model: " + "; ".join(mismatched))
    if not any(".lora_A." in k for k in shapes):
        problems.append(f"{ADAPTER_WEIGHTS} holds no LoRA weights")
    return problems


@task(name="check-adapters", **_RETRY)
def check_adapters(store: ModelStore, base: ModelRef, adapters: dict[str, ModelRef], served_model_name: str,
                   enable_lora: bool, max_lora_rank: int) -> None:
    """Refuse, before anything is created, adapters this base and server cannot serve: one line per adapter."""
    if not adapters:
        return
    if not enable_lora:
        raise PipelineInputError(f"adapters {sorted(adapters)} are listed but VllmServerSettings.enable_lora is false")
    if served_model_name in adapters:
        raise PipelineInputError(f"adapter {served_model_name!r}: the name is the base model's served name; rename it")
    s3 = s3_client(store)
    base_shapes = model_shapes(s3, base)
    errors = []
    for name, ref in adapters.items():
        bucket, prefix = split_s3(ref.s3_uri)
        prefix = prefix.strip("/")
        config = read_json(s3, bucket, f"{prefix}/{ADAPTER_CONFIG}")
        try:
            shapes = safetensors_shapes(s3, bucket, f"{prefix}/{ADAPTER_WEIGHTS}")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                raise
            shapes = {}
        problems = adapter_problems(config, shapes, base.repo_id, base_shapes, max_lora_rank)
        if config is not None and not shapes:
            problems.append(f"no {ADAPTER_WEIGHTS}")
        if problems:
            errors.append(f"adapter {name!r} ({ref.repo_id}): " + "; ".join(problems))
    if errors:
        for line in errors:  # in full: the raised message is clipped when many adapters fail
            get_run_logger().error(line)
        raise PipelineInputError(" | ".join(errors))
    get_run_logger().info("adapters %s fit %s (rank <= %d, modules and shapes match)", sorted(adapters), base.repo_id,
                          max_lora_rank)


# ------------------------------------------------------------------------------- the adapter index

def index_uri(store: ModelStore, stack: str) -> str:
    return f"s3://{store.bucket_name}/{adapter_index_key(stack)}"


def write_index(store: ModelStore, stack: str, adapters: dict[str, ModelRef]) -> str:
    body = json.dumps({name: ref.s3_uri for name, ref in sorted(adapters.items())}, indent=2).encode()
    s3_client(store).put_object(Bucket=store.bucket_name, Key=adapter_index_key(stack), Body=body, ContentType="application/json")
    return index_uri(store, stack)


def read_index(store: ModelStore, stack: str) -> dict[str, str] | None:
    return read_json(s3_client(store), store.bucket_name, adapter_index_key(stack))
