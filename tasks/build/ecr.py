"""ECR: the repositories the images live in, the registry login, and "is this tag there already?".

Repositories are get-or-create and carry `vllm-pipeline:managed-by`. Only a repository this
pipeline manages gets its settings reconciled (scan on push, immutable tags, the lifecycle
policy); one a person made is used as it is, so a lifecycle rule never expires their images.
"""

from __future__ import annotations

import base64
import json

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, SecretStr

from blocks.image_build import ImageBuildSettings
from tasks.core.aws import aws_client, error_code
from tasks.core.errors import PipelineInputError, retry_if_transient

MANAGED_BY_KEY = "vllm-pipeline:managed-by"
MANAGED_BY_VALUE = "vllm-pipeline"


class RegistryLogin(BaseModel):
    """Where to push and how to log in; the password is a short-lived token for ECR."""

    host: str  # e.g. 123456789012.dkr.ecr.us-east-1.amazonaws.com
    username: str
    password: SecretStr


class RemoteImage(BaseModel):
    """An image the registry holds: its manifest digest and (where the registry says) its size."""

    digest: str
    size_bytes: int | None = None
    pushed_at: str | None = None


class EcrRepository(BaseModel):
    name: str
    uri: str
    arn: str
    created: bool
    managed: bool


def ecr_client(settings: ImageBuildSettings):
    return aws_client("ecr", settings.credentials, region=settings.region)


def lifecycle_policy(keep_last: int) -> str:
    """Untagged images go after a day; of the rest, the newest `keep_last` stay."""
    return json.dumps(
        {
            "rules": [
                {
                    "rulePriority": 1,
                    "description": "expire untagged images after 1 day",
                    "selection": {"tagStatus": "untagged", "countType": "sinceImagePushed", "countUnit": "days", "countNumber": 1},
                    "action": {"type": "expire"},
                },
                {
                    "rulePriority": 2,
                    "description": f"keep the last {keep_last} images",
                    "selection": {"tagStatus": "any", "countType": "imageCountMoreThan", "countNumber": keep_last},
                    "action": {"type": "expire"},
                },
            ]
        },
        sort_keys=True,
    )


def _denied(exc: ClientError, what: str) -> PipelineInputError | None:
    code = error_code(exc)
    if code in ("AccessDeniedException", "AccessDenied", "UnrecognizedClientException", "InvalidSignatureException"):
        msg = exc.response.get("Error", {}).get("Message", code)
        return PipelineInputError(f"ECR refused {what}: {msg} (the credentials need ecr:{what})")
    return None


def ensure_repository_sync(ecr, name: str, keep_last: int, scan_on_push: bool = True) -> EcrRepository:
    """Get-or-create `name`; reconcile a managed repository's settings. Safe to run any number of times."""
    created = False
    try:
        repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    except ClientError as exc:
        if error_code(exc) != "RepositoryNotFoundException":
            raise _denied(exc, "DescribeRepositories") or exc
        try:
            repo = ecr.create_repository(
                repositoryName=name,
                imageTagMutability="IMMUTABLE",
                imageScanningConfiguration={"scanOnPush": scan_on_push},
                encryptionConfiguration={"encryptionType": "AES256"},
                tags=[{"Key": MANAGED_BY_KEY, "Value": MANAGED_BY_VALUE}],
            )["repository"]
            created = True
        except ClientError as exc2:
            if error_code(exc2) != "RepositoryAlreadyExistsException":  # a concurrent run made it
                raise _denied(exc2, "CreateRepository") or exc2
            repo = ecr.describe_repositories(repositoryNames=[name])["repositories"][0]
    tags = {t["Key"]: t["Value"] for t in ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"]).get("tags", [])}
    managed = tags.get(MANAGED_BY_KEY) == MANAGED_BY_VALUE
    if managed:
        if repo.get("imageTagMutability") != "IMMUTABLE":
            ecr.put_image_tag_mutability(repositoryName=name, imageTagMutability="IMMUTABLE")
        if repo.get("imageScanningConfiguration", {}).get("scanOnPush") != scan_on_push:
            ecr.put_image_scanning_configuration(repositoryName=name, imageScanningConfiguration={"scanOnPush": scan_on_push})
        wanted = lifecycle_policy(keep_last)
        try:
            current = ecr.get_lifecycle_policy(repositoryName=name)["lifecyclePolicyText"]
        except ClientError as exc:
            if error_code(exc) != "LifecyclePolicyNotFoundException":
                raise
            current = None
        if current is None or json.loads(current) != json.loads(wanted):
            ecr.put_lifecycle_policy(repositoryName=name, lifecyclePolicyText=wanted)
    return EcrRepository(name=name, uri=repo["repositoryUri"], arn=repo["repositoryArn"], created=created, managed=managed)


def ecr_login_sync(ecr) -> RegistryLogin:
    """get_authorization_token -> (registry host, 'AWS', token): what `docker login` wants."""
    try:
        data = ecr.get_authorization_token()["authorizationData"][0]
    except ClientError as exc:
        raise _denied(exc, "GetAuthorizationToken") or exc
    user, sep, password = base64.b64decode(data["authorizationToken"]).decode().partition(":")
    if not sep or not password:
        raise PipelineInputError("ECR returned an authorization token that is not base64 'user:password'")
    host = data["proxyEndpoint"].removeprefix("https://").removeprefix("http://").rstrip("/")
    return RegistryLogin(host=host, username=user, password=SecretStr(password))


def find_ecr_image_sync(ecr, repository: str, tag: str) -> RemoteImage | None:
    """The image `repository:tag` if ECR has it, else None."""
    try:
        details = ecr.describe_images(repositoryName=repository, imageIds=[{"imageTag": tag}])["imageDetails"]
    except ClientError as exc:
        if error_code(exc) in ("ImageNotFoundException", "RepositoryNotFoundException"):
            return None
        raise _denied(exc, "DescribeImages") or exc
    if not details:
        return None
    d = details[0]
    pushed = d.get("imagePushedAt")
    return RemoteImage(digest=d["imageDigest"], size_bytes=d.get("imageSizeInBytes"), pushed_at=str(pushed) if pushed else None)


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def ensure_ecr_repository(settings: ImageBuildSettings, name: str) -> EcrRepository:
    repo = ensure_repository_sync(ecr_client(settings), name, settings.keep_last, settings.scan_on_push)
    logger = get_run_logger()
    if repo.created:
        logger.info("created ECR repository %s (scan on push, immutable tags, keep last %d)", repo.uri, settings.keep_last)
    elif not repo.managed:
        logger.warning("ECR repository %s exists and is not tagged %s=%s: used as it is (no lifecycle policy set)",
                       repo.uri, MANAGED_BY_KEY, MANAGED_BY_VALUE)
    return repo
