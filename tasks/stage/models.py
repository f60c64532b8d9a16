"""Finding a staged model in the store: by explicit URI, or the newest staged revision of a repo."""

from __future__ import annotations

from prefect import task

from blocks.model_store import ModelStore
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.core.s3 import MANIFEST, Manifest, read_manifest, require_bucket, s3_client, split_s3
from tasks.core.state import ModelRef


@task(name="find-staged-model", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient)
def find_staged_model(store: ModelStore, repo_id: str | None = None, model_uri: str | None = None) -> ModelRef:
    s3 = s3_client(store)
    if model_uri:
        bucket, prefix = split_s3(model_uri)
        prefix = prefix.strip("/")
        require_bucket(s3, bucket)
        manifest = read_manifest(s3, bucket, prefix)
        if manifest is None:
            raise PipelineInputError(f"{model_uri} has no {MANIFEST}: stage the model first (stage-model flow)")
        return ModelRef(repo_id=manifest.repo_id, sha=manifest.sha, s3_uri=f"s3://{bucket}/{prefix}")
    if not repo_id:
        raise PipelineInputError("give model_uri or repo_id to say which staged model to deploy")
    base = "/".join(p for p in (store.bucket_folder, repo_id) if p)
    require_bucket(s3, store.bucket_name)
    newest: tuple[str, Manifest, str] | None = None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket_name, Prefix=base + "/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/" + MANIFEST):
                prefix = obj["Key"].rsplit("/", 1)[0]
                manifest = read_manifest(s3, store.bucket_name, prefix)
                if manifest and (newest is None or manifest.staged_at > newest[0]):
                    newest = (manifest.staged_at, manifest, prefix)
    if newest is None:
        raise PipelineInputError(f"no staged model for {repo_id!r} in s3://{store.bucket_name}/{base}/: run stage-model first")
    _, manifest, prefix = newest
    return ModelRef(repo_id=manifest.repo_id, sha=manifest.sha, s3_uri=f"s3://{store.bucket_name}/{prefix}")
