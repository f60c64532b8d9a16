"""The gateway's AWS calls: reading secrets and S3 objects, with plain boto3.

Not tasks/core/aws.py: that factory is built on prefect-aws's credentials block, and the gateway is
its own small image without Prefect. boto3 reads `AWS_ENDPOINT_URL` (and the per-service variables)
itself, so the local moto server and AWS take the same path here too; on ECS the credentials are the
task role's.
"""

from __future__ import annotations

import functools
import threading
from typing import Any
from urllib.parse import urlsplit

import boto3
from botocore.config import Config

_CONFIG = Config(connect_timeout=5, read_timeout=30, retries={"mode": "standard", "max_attempts": 5})
_LOCK = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    return boto3.session.Session()


@functools.cache
def _client(service: str, region: str | None) -> Any:
    with _LOCK:  # boto3 sessions are not thread-safe while making clients; the clients themselves are
        return _session().client(service, region_name=region, config=_CONFIG)


def client(service: str, region: str | None = None) -> Any:
    return _client(service, region)


def _region_of(secret_id: str) -> str | None:
    """A secret's ARN names its region; Secrets Manager answers for it only there."""
    return secret_id.split(":")[3] if secret_id.startswith("arn:") and secret_id.count(":") >= 6 else None


def read_secret(secret_id: str) -> str:
    """The SecretString of a secret, by ARN or name."""
    return client("secretsmanager", _region_of(secret_id)).get_secret_value(SecretId=secret_id)["SecretString"]


def read_s3(uri: str, max_bytes: int = 1 << 20) -> bytes:
    """An object's bytes; a tool set or tenants document, so anything over `max_bytes` is refused."""
    parts = urlsplit(uri)
    if parts.scheme != "s3" or not parts.netloc or not parts.path.strip("/"):
        raise ValueError(f"not an s3://bucket/key URI: {uri!r}")
    s3 = client("s3")
    key = parts.path.lstrip("/")
    size = s3.head_object(Bucket=parts.netloc, Key=key)["ContentLength"]
    if size > max_bytes:
        raise ValueError(f"{uri} is {size} bytes; the gateway reads at most {max_bytes}")
    return s3.get_object(Bucket=parts.netloc, Key=key)["Body"].read()
