"""Prefect tasks of the stage flow: check the store, find a finished manifest, stream files, write the manifest."""

from __future__ import annotations

from concurrent.futures import Executor

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from tasks.core.errors import retry_if_transient
from tasks.core.s3 import Manifest, ManifestFile, read_manifest, require_bucket, s3_client, utc_now, write_manifest
from tasks.stage.hub import HubFile, RepoSnapshot, file_url, hub_headers
from tasks.stage.transfer import FileResult, PrefixScan, TransferSettings, http_pool, stream_file

_RETRY = dict(retries=3, retry_delay_seconds=[1, 5, 15], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


@task(name="check-model-store", **_RETRY)
def check_model_store(store: ModelStore) -> None:
    require_bucket(s3_client(store), store.bucket_name)


@task(name="find-staged-manifest", **_RETRY)
def find_manifest(store: ModelStore, prefix: str, snapshot: RepoSnapshot) -> Manifest | None:
    """The existing manifest, if it already covers every file this run would stage (same hashes)."""
    manifest = read_manifest(s3_client(store), store.bucket_name, prefix)
    if manifest is None or manifest.sha != snapshot.sha:
        return None
    staged = {f.path: f for f in manifest.files}
    for f in snapshot.files:
        have = staged.get(f.path)
        if have is None or have.size != f.size or (f.sha256 and have.sha256 != f.sha256):
            return None
    return manifest


@task(name="scan-staged-prefix", **_RETRY)
def scan_prefix(store: ModelStore, prefix: str) -> PrefixScan:
    """The objects and unfinished uploads already under the model's prefix, listed once for the run."""
    return PrefixScan.of(s3_client(store), store.bucket_name, prefix)


@task(name="stage-file", task_run_name="stage-{f.path}", **_RETRY)
def stage_file(
    source: ModelSource, store: ModelStore, snapshot: RepoSnapshot, prefix: str, f: HubFile, transfer: TransferSettings,
    parts: Executor, scan: PrefixScan, progress=None,
) -> FileResult:
    """One file; `parts` is the run's shared part pool (`TransferSettings.part_pool`), `scan` the
    run's `PrefixScan`."""
    logger = get_run_logger()
    s3 = s3_client(store)
    with http_pool(transfer.streams) as http:
        result = stream_file(
            s3, http, file_url(snapshot, f.path), hub_headers(source), store.bucket_name, f"{prefix}/{f.path}", f, transfer,
            parts, scan, on_bytes=progress.add if progress else (lambda n: None),
        )
    if result.skipped:
        logger.info("%s: already in S3 and verified, skipped", f.path)
    else:
        mbps = result.size / max(result.seconds, 1e-6) / 1e6
        logger.info("%s: %d bytes staged and verified in %.1fs (%.1f MB/s)", f.path, result.size, result.seconds, mbps)
    return result


@task(name="write-model-manifest", **_RETRY)
def write_model_manifest(store: ModelStore, prefix: str, snapshot: RepoSnapshot, results: list[FileResult]) -> Manifest:
    manifest = Manifest(
        repo_id=snapshot.repo_id,
        revision=snapshot.revision,
        sha=snapshot.sha,
        files=[ManifestFile(path=r.path, size=r.size, sha256=r.sha256) for r in sorted(results, key=lambda r: r.path)],
        staged_at=utc_now(),
        source_endpoint=snapshot.endpoint,
    )
    write_manifest(s3_client(store), store.bucket_name, prefix, manifest)
    return manifest
