"""stage-model: copy a Hub repo at a pinned revision into the S3 model store, streamed and verified."""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.futures import as_completed, wait
from pydantic import BaseModel

from blocks.loading import load_config
from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from tasks.core.errors import PipelineInputError, flow
from tasks.core.markdown import code, table
from tasks.core.progress import Progress
from tasks.core.s3 import model_prefix
from tasks.core.state import ModelRef
from tasks.stage.hub import resolve_revision
from tasks.stage.lora import ADAPTER_WEIGHTS, adapter_source, stage_s3_adapter
from tasks.stage.staging import check_model_store, find_manifest, scan_prefix, stage_file, write_model_manifest
from tasks.stage.transfer import FileResult, TransferSettings, staging_order


class StagedModel(BaseModel):
    repo_id: str
    revision: str
    sha: str
    s3_uri: str
    bucket: str
    prefix: str
    files: int
    total_bytes: int
    bytes_uploaded: int
    seconds: float
    already_staged: bool
    adapters: dict[str, str] = {}  # served name -> staged s3:// URI of each LoRA adapter


def _artifact_key(repo_id: str) -> str:
    return "stage-" + "".join(c if c.isalnum() else "-" for c in repo_id.lower()).strip("-")


def stage(source: ModelSource, store: ModelStore, transfer: TransferSettings) -> StagedModel:
    """The stage flow's body, callable with block objects (the pipeline and tests use it)."""
    logger = get_run_logger()
    started = time.monotonic()
    check_model_store(store)
    snapshot = resolve_revision(source)
    prefix = model_prefix(store, snapshot.repo_id, snapshot.sha)
    s3_uri = f"s3://{store.bucket_name}/{prefix}/"
    logger.info("%s@%s is commit %s: %d files, %d bytes -> %s", source.repo_id, source.revision, snapshot.sha,
                len(snapshot.files), snapshot.total_bytes, s3_uri)
    done = find_manifest(store, prefix, snapshot)
    if done is not None:
        logger.info("already staged at %s (manifest of %s): nothing to transfer", s3_uri, done.staged_at)
        result = StagedModel(
            repo_id=snapshot.repo_id, revision=snapshot.revision, sha=snapshot.sha, s3_uri=s3_uri, bucket=store.bucket_name,
            prefix=prefix, files=len(done.files), total_bytes=done.total_bytes, bytes_uploaded=0,
            seconds=time.monotonic() - started, already_staged=True,
        )
        _summary(result, [])
        return result

    progress = Progress(_artifact_key(source.repo_id) + "-progress", snapshot.total_bytes, f"Staging {source.repo_id}@{snapshot.sha[:12]}")
    pending = staging_order(snapshot.files, transfer)
    scan = scan_prefix(store, prefix)
    parts = transfer.part_pool()
    running, results = [], []
    try:
        while pending or running:
            while pending and len(running) < transfer.files_in_flight:
                f = pending.pop(0)
                running.append(stage_file.submit(source, store, snapshot, prefix, f, transfer, parts, scan, progress))
            finished = next(as_completed(running))
            running.remove(finished)
            results.append(finished.result())
    finally:
        wait(running)  # never leave a transfer running behind a failed one
        parts.shutdown(wait=True)
    progress.finish()
    write_model_manifest(store, prefix, snapshot, results)
    result = StagedModel(
        repo_id=snapshot.repo_id, revision=snapshot.revision, sha=snapshot.sha, s3_uri=s3_uri, bucket=store.bucket_name,
        prefix=prefix, files=len(results), total_bytes=sum(r.size for r in results),
        bytes_uploaded=sum(r.bytes_uploaded for r in results), seconds=time.monotonic() - started, already_staged=False,
    )
    _summary(result, results)
    return result


def stage_adapter(source: ModelSource, adapter: LoraAdapter, store: ModelStore, transfer: TransferSettings) -> ModelRef:
    """One adapter next to its base: a Hub repo through `stage` (streamed, verified, manifest last,
    skipped when staged), an s3:// folder copied into the store with a manifest."""
    if adapter.is_s3:
        return stage_s3_adapter(store, adapter)
    hub = adapter_source(source, adapter)
    try:
        snapshot = resolve_revision(hub)
    except PipelineInputError as exc:
        raise PipelineInputError(f"adapter {adapter.name!r}: {exc}") from None
    if ADAPTER_WEIGHTS not in {f.path for f in snapshot.files}:
        raise PipelineInputError(f"adapter {adapter.name!r}: {adapter.source}@{adapter.revision} has no {ADAPTER_WEIGHTS} "
                                 "(vLLM serves peft adapters saved with safetensors)")
    staged = stage(hub, store, transfer)
    return ModelRef(repo_id=staged.repo_id, sha=staged.sha, s3_uri=staged.s3_uri.rstrip("/"))


def stage_all(source: ModelSource, store: ModelStore, transfer: TransferSettings) -> StagedModel:
    """The base model, then each of its LoRA adapters."""
    result = stage(source, store, transfer)
    if source.adapters:
        result.adapters = {a.name: stage_adapter(source, a, store, transfer).s3_uri for a in source.adapters}
        get_run_logger().info("adapters staged: %s", ", ".join(f"{n} -> {u}" for n, u in result.adapters.items()))
    return result


def _summary(result: StagedModel, files: list[FileResult]) -> None:
    mbps = result.bytes_uploaded / max(result.seconds, 1e-6) / 1e6
    lines = [
        f"# Staged {code(result.repo_id)}",
        "",
        f"- revision {code(result.revision)} = commit {code(result.sha)}",
        f"- location {code(result.s3_uri)} (manifest `_manifest.json` written last)",
        f"- {result.files} files, {result.total_bytes / 1e6:.1f} MB; uploaded {result.bytes_uploaded / 1e6:.1f} MB "
        f"in {result.seconds:.1f} s ({mbps:.1f} MB/s)",
        f"- {'already staged: nothing transferred' if result.already_staged else 'transferred and verified (size + sha256)'}",
    ]
    if files:
        lines += ["", table(["file", "size (MB)", "sha256", "uploaded"],
                            [[code(r.path), f"{r.size / 1e6:.2f}", code(r.sha256[:16] + "…"), "no (already there)" if r.skipped else "yes"]
                             for r in sorted(files, key=lambda r: r.path)], align="lrll")]
    create_markdown_artifact("\n".join(lines), key=_artifact_key(result.repo_id), description=f"Staged {result.repo_id}")


@flow(name="stage-model", log_prints=True)
def stage_model(
    repo_id: str | None = None,
    revision: str | None = None,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    transfer: TransferSettings = TransferSettings(),
) -> StagedModel:
    """Stage a Hub model, and the block's LoRA adapters, into S3. `repo_id`/`revision` override the
    ModelSource block (saved under `model_source_block`, or the defaults); the token, if any, comes
    only from the block."""
    source = load_config(ModelSource, model_source_block, repo_id=repo_id, revision=revision)
    store = load_config(ModelStore, model_store_block)
    return stage_all(source, store, transfer)
