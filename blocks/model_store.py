"""Where staged models live: an S3 bucket (prefect-aws's S3Bucket, with AWS's bucket-name rules checked up front)."""

from __future__ import annotations

import ipaddress
import re

from prefect_aws import AwsCredentials, S3Bucket
from pydantic import Field, field_validator

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


def check_bucket_name(value: str) -> str:
    """AWS's general-purpose bucket naming rules, so a bad name fails before any call."""
    problems = []
    if not _BUCKET.match(value):
        problems.append("3-63 characters of lowercase letters, digits, '.' and '-', starting and ending with a letter or digit")
    if ".." in value or ".-" in value or "-." in value:
        problems.append("no adjacent periods or period-hyphen pairs")
    try:
        ipaddress.ip_address(value)
        problems.append("not formatted as an IP address")
    except ValueError:
        pass
    if value.startswith(("xn--", "sthree-", "amzn-s3-demo-")) or value.endswith(("-s3alias", "--ol-s3", "--x-s3", ".mrap")):
        problems.append("no reserved prefix or suffix")
    if problems:
        raise ValueError(f"{value!r} is not a valid S3 bucket name: " + "; ".join(problems))
    return value


def coerce_aws_credentials(value):
    """A plain dict becomes AwsCredentials (a saved block's dict carries its slug and is left to Prefect)."""
    return AwsCredentials(**value) if isinstance(value, dict) and "block_type_slug" not in value else value


class ModelStore(S3Bucket):
    """The S3 bucket (and key prefix) staged models and stack state live in."""

    _block_type_name = "vLLM Model Store"
    _block_type_slug = "vllm-model-store"
    _description = "S3 bucket and prefix for staged models, stack state and batch files."

    bucket_name: str = Field(default="vllm-pipeline-models", description="Name of the S3 bucket.")
    bucket_folder: str = Field(default="models", description="Key prefix models are staged under.")
    credentials: AwsCredentials = Field(default_factory=AwsCredentials)

    @field_validator("credentials", mode="before")
    @classmethod
    def _credentials(cls, value):
        return coerce_aws_credentials(value)

    @field_validator("bucket_name")
    @classmethod
    def _bucket(cls, value: str) -> str:
        return check_bucket_name(value)

    @field_validator("bucket_folder")
    @classmethod
    def _folder(cls, value: str) -> str:
        value = value.strip("/")
        if ".." in value.split("/") or "\\" in value or any(ord(c) < 32 for c in value):
            raise ValueError(f"{value!r} is not a safe S3 key prefix")
        return value
