"""How the images are built and where they are pushed: builder, registry, repositories, retention."""

from __future__ import annotations

import re
from typing import Literal

from prefect.blocks.core import Block
from prefect_aws import AwsCredentials
from pydantic import Field, SecretStr, field_validator, model_validator

from blocks.model_store import check_bucket_name, coerce_aws_credentials

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
# ECR's (and the OCI distribution spec's) repository-name grammar.
_REPOSITORY = re.compile(r"^(?:[a-z0-9]+(?:[._-][a-z0-9]+)*/)*[a-z0-9]+(?:[._-][a-z0-9]+)*$")
# host[:port][/namespace...]: what goes before the repository name in an image reference.
_REGISTRY = re.compile(
    r"^(?P<host>(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
    r"|\[[0-9a-fA-F:]+\])(?::(?P<port>\d{1,5}))?(?P<path>(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)$"
)
_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_ARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# Build args end up in the image's history (`docker history`): a secret there is public.
SECRET_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY|CREDENTIAL)", re.I)
_CODEBUILD_PROJECT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{1,254}$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_PLATFORM = re.compile(r"^[a-z0-9]+/[a-z0-9_]+(/[a-z0-9]+)?$")

DEFAULT_REPOSITORIES = {"vllm": "vllm-pipeline/vllm", "runtime": "vllm-pipeline/runtime", "gateway": "vllm-pipeline/gateway"}


def split_registry(value: str) -> tuple[str, str]:
    """'host:port/namespace' -> ('host:port', 'namespace')."""
    host, _, path = value.partition("/")
    return host, path


class ImageBuildSettings(Block):
    """Builds images/<name>/Dockerfile and pushes it to ECR (or any Registry v2) tagged by its content hash."""

    _block_type_name = "vLLM Image Build Settings"
    _block_type_slug = "vllm-image-build-settings"
    _description = "Builder (docker, buildah or CodeBuild), target registry, repository names and retention for the pipeline's images."

    builder: Literal["auto", "docker", "buildah", "codebuild"] = Field(
        default="auto",
        description="'auto' takes a Docker engine if one answers, else buildah; 'codebuild' builds on AWS (no local engine).",
    )
    registry: str | None = Field(
        default=None,
        description="None: the account's ECR registry (login by get_authorization_token). "
        "Otherwise an explicit Registry v2 'host[:port][/namespace]' with the credentials below.",
    )
    registry_username: str | None = Field(default=None, description="User for an explicit registry.")
    registry_password: SecretStr | None = Field(default=None, description="Password or token for an explicit registry; never logged.")
    insecure_registry: bool = Field(default=False, description="Plain HTTP, no TLS verification: a local test registry only.")
    repositories: dict[str, str] = Field(
        default_factory=lambda: dict(DEFAULT_REPOSITORIES),
        description="Image name (its folder under images/) -> repository name.",
    )
    keep_last: int = Field(default=10, ge=1, le=1000, description="ECR lifecycle policy: keep the newest N images per repository.")
    scan_on_push: bool = Field(default=True, description="ECR basic scanning of every pushed image.")
    build_args: dict[str, str] = Field(default_factory=dict, description="--build-arg values (no secrets: they stay in the image history).")
    platform: str = Field(default="linux/amd64", description="Target platform of the images (ECS GPU hosts are x86_64).")
    pull_policy: Literal["missing", "always", "never"] = Field(default="missing", description="When the builder pulls the base image.")
    context_dir: str | None = Field(default=None, description="Folder holding images/<name>/; None is this project's root.")
    storage_root: str | None = Field(default=None, description="buildah: container storage folder (--root); None uses buildah's default.")
    buildah_storage_driver: str = Field(default="vfs", description="buildah: storage driver ('vfs' works everywhere, 'overlay' is faster).")
    region: str | None = Field(default=None, description="ECR/CodeBuild region; None is the credentials' region.")
    credentials: AwsCredentials = Field(default_factory=AwsCredentials)
    codebuild_project: str = Field(default="vllm-pipeline-image-build", description="CodeBuild project (created when missing and a role is given).")
    codebuild_bucket: str | None = Field(default=None, description="S3 bucket the build contexts are uploaded to (builder 'codebuild').")
    codebuild_prefix: str = Field(default="image-build-contexts", description="Key prefix of the uploaded contexts.")
    codebuild_service_role_arn: str | None = Field(default=None, description="Role for a CodeBuild project this pipeline creates.")
    codebuild_image: str = Field(default="aws/codebuild/amazonlinux-x86_64-standard:5.0")
    codebuild_compute_type: str = Field(default="BUILD_GENERAL1_LARGE", description="The vLLM image needs a large build host's disk.")
    codebuild_timeout_minutes: int = Field(default=90, ge=5, le=2160)

    @field_validator("credentials", mode="before")
    @classmethod
    def _credentials(cls, value):
        return coerce_aws_credentials(value)

    @field_validator("registry")
    @classmethod
    def _registry(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip().removeprefix("https://").removeprefix("http://").rstrip("/")
        m = _REGISTRY.match(value)
        if not m or (m.group("port") and not 0 < int(m.group("port")) < 65536):
            raise ValueError(f"{value!r} is not a registry 'host[:port][/namespace]' (e.g. 127.0.0.1:5000 or ghcr.io/acme)")
        return value

    @field_validator("repositories")
    @classmethod
    def _repositories(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("must name at least one image")
        bad_names = [k for k in value if not _IMAGE_NAME.match(k)]
        if bad_names:
            raise ValueError(f"image names must be folder names under images/ (lowercase, digits, '-', '_'): {bad_names}")
        bad = {k: v for k, v in value.items() if not (2 <= len(v) <= 256 and _REPOSITORY.match(v))}
        if bad:
            raise ValueError(f"not repository names (lowercase path components of letters, digits, '._-'): {bad}")
        return value

    @field_validator("build_args")
    @classmethod
    def _build_args(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k in value if not _ARG_NAME.match(k)]
        if bad:
            raise ValueError(f"not build-arg names: {bad}")
        secret = [k for k in value if SECRET_NAME.search(k)]
        if secret:
            raise ValueError(f"{secret} look like secrets: build args are readable in the image history; use a build secret instead")
        return value

    @field_validator("platform")
    @classmethod
    def _platform(cls, value: str) -> str:
        if not _PLATFORM.match(value):
            raise ValueError(f"{value!r} is not a platform 'os/arch[/variant]' (e.g. linux/amd64)")
        return value

    @field_validator("region")
    @classmethod
    def _region(cls, value: str | None) -> str | None:
        if value is not None and not _REGION.match(value):
            raise ValueError(f"{value!r} is not an AWS region name (e.g. us-east-1)")
        return value

    @field_validator("buildah_storage_driver")
    @classmethod
    def _driver(cls, value: str) -> str:
        if value not in {"vfs", "overlay", "btrfs", "zfs"}:
            raise ValueError(f"{value!r} is not a buildah storage driver (vfs, overlay, btrfs, zfs)")
        return value

    @field_validator("codebuild_project")
    @classmethod
    def _project(cls, value: str) -> str:
        if not _CODEBUILD_PROJECT.match(value):
            raise ValueError(f"{value!r} is not a CodeBuild project name (2-255 letters, digits, '-', '_')")
        return value

    @field_validator("codebuild_bucket")
    @classmethod
    def _bucket(cls, value: str | None) -> str | None:
        return None if value is None else check_bucket_name(value)

    @field_validator("codebuild_prefix")
    @classmethod
    def _prefix(cls, value: str) -> str:
        value = value.strip("/")
        if not value or ".." in value.split("/") or any(ord(c) < 32 for c in value):
            raise ValueError(f"{value!r} is not a safe S3 key prefix")
        return value

    @field_validator("codebuild_service_role_arn")
    @classmethod
    def _role(cls, value: str | None) -> str | None:
        if value is not None and not _ROLE_ARN.match(value):
            raise ValueError(f"{value!r} is not an IAM role ARN")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ImageBuildSettings":
        if self.registry is None:
            if self.registry_username or self.registry_password:
                raise ValueError("registry_username/registry_password: ECR logs in with get_authorization_token; set registry to use them")
            if self.insecure_registry:
                raise ValueError("insecure_registry: ECR is always HTTPS")
        elif (self.registry_password is None) != (self.registry_username is None):
            raise ValueError("registry_username and registry_password go together")
        if self.builder == "codebuild":
            if self.registry is not None:
                raise ValueError("builder 'codebuild' pushes to ECR only (registry must be None)")
            if not self.codebuild_bucket:
                raise ValueError("codebuild_bucket: builder 'codebuild' uploads the build context to S3 and needs a bucket")
        return self

    @property
    def is_ecr(self) -> bool:
        return self.registry is None
