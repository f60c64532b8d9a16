"""S3 helpers shared by the flows: bucket checks, JSON objects, the staged-model manifest."""

from __future__ import annotations

import json
from datetime import datetime, timezone

from botocore.exceptions import ClientError
from pydantic import BaseModel

from blocks.model_store import ModelStore
from tasks.core.aws import aws_client
from tasks.core.errors import PipelineInputError

MANIFEST = "_manifest.json"


class ManifestFile(BaseModel):
    path: str
    size: int
    sha256: str


class Manifest(BaseModel):
    """Written last: its presence means every listed file is in S3 and verified."""

    repo_id: str
    revision: str
    sha: str
    files: list[ManifestFile]
    staged_at: str
    source_endpoint: str

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)


def s3_client(store: ModelStore):
    return aws_client("s3", store.credentials)


def require_bucket(s3, bucket: str) -> None:
    """Fail before any transfer when the bucket is missing or unreadable."""
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code in ("404", "NoSuchBucket", "NotFound"):
            raise PipelineInputError(f"S3 bucket {bucket!r} does not exist: create it or fix ModelStore.bucket_name") from None
        if code in ("403", "AccessDenied", "Forbidden"):
            raise PipelineInputError(f"access to S3 bucket {bucket!r} denied: the credentials need s3:ListBucket/GetObject/PutObject") from None
        raise


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key) of an s3:// URI; refuses anything else, '..' segments, control characters and
    keys longer than S3 allows, before any call."""
    if not isinstance(uri, str) or not uri.startswith("s3://") or "/" not in uri[5:] or not uri[5:].partition("/")[0]:
        raise PipelineInputError(f"{str(uri)[:200]!r} is not an s3://bucket/key URI")
    bucket, _, key = uri[5:].partition("/")
    if ".." in key.split("/"):
        raise PipelineInputError(f"{uri[:200]!r} contains '..'")
    if len(key.encode()) > 1024 or len(bucket) > 63:
        raise PipelineInputError(f"{uri[:80]!r}...: S3 bucket names stop at 63 characters and keys at 1024 bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise PipelineInputError(f"{uri[:200]!r} contains control characters")
    return bucket, key


def model_prefix(store: ModelStore, repo_id: str, sha: str) -> str:
    return "/".join(p for p in (store.bucket_folder, repo_id, sha) if p)


def read_json(s3, bucket: str, key: str) -> dict | None:
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise


def read_manifest(s3, bucket: str, prefix: str) -> Manifest | None:
    raw = read_json(s3, bucket, f"{prefix}/{MANIFEST}")
    return Manifest.model_validate(raw) if raw is not None else None


def write_manifest(s3, bucket: str, prefix: str, manifest: Manifest) -> str:
    key = f"{prefix}/{MANIFEST}"
    s3.put_object(Bucket=bucket, Key=key, Body=manifest.model_dump_json(indent=2).encode(), ContentType="application/json")
    return f"s3://{bucket}/{key}"


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
