"""The AWS CodeBuild builder: for users without a local Docker engine or buildah.

The build context (exactly the hashed files, as a deterministic zip) goes to S3; a CodeBuild
build (privileged, Docker inside) logs in to ECR, builds, pushes and exports the digest.
We wait with back-off and stream its CloudWatch log lines into the flow's log. The project
is get-or-create when a service role is given; otherwise it must exist.
"""

from __future__ import annotations

import shlex
import time
from typing import Callable

import yaml
from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from blocks.image_build import ImageBuildSettings
from tasks.core.aws import aws_client, error_code
from tasks.build.ecr import MANAGED_BY_KEY, MANAGED_BY_VALUE
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.build.images import CONTEXT_LABEL, BuildContext, RunResult, Target, build_failure, context_zip

DONE = {"SUCCEEDED", "FAILED", "FAULT", "STOPPED", "TIMED_OUT"}


class CodeBuildRun(BaseModel):
    build_id: str
    status: str
    source: str  # s3://bucket/key of the context zip
    log_lines: int
    digest: str | None = None  # exported by the buildspec (IMAGE_DIGEST)
    seconds: float


def context_key(settings: ImageBuildSettings, ctx: BuildContext) -> str:
    return f"{settings.codebuild_prefix}/{ctx.name}/{ctx.sha256}.zip"


def upload_context(s3, settings: ImageBuildSettings, ctx: BuildContext) -> str:
    """Put the context zip at a key named by its hash; an object already there is the same bytes."""
    bucket, key = settings.codebuild_bucket, context_key(settings, ctx)
    try:
        s3.head_object(Bucket=bucket, Key=key)
        return f"{bucket}/{key}"
    except ClientError as exc:
        if error_code(exc) not in ("404", "NoSuchKey", "NotFound"):
            if error_code(exc) in ("403", "AccessDenied"):
                raise PipelineInputError(f"S3 bucket {bucket!r}: access denied uploading the build context") from None
            raise
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=context_zip(ctx), ContentType="application/zip",
                      Metadata={"context-sha256": ctx.sha256})
    except ClientError as exc:
        if error_code(exc) in ("NoSuchBucket", "404"):
            raise PipelineInputError(f"codebuild_bucket {bucket!r} does not exist: create it or fix ImageBuildSettings.codebuild_bucket") from None
        raise
    return f"{bucket}/{key}"


def buildspec(settings: ImageBuildSettings, ctx: BuildContext, target: Target) -> str:
    """Log in to ECR, build, push, export the digest: one phase, so a failed build never pushes."""
    q = shlex.quote
    build = ["docker", "build", "--platform", settings.platform, "-f", ctx.dockerfile, "-t", target.ref,
             "--label", f"{CONTEXT_LABEL}={ctx.sha256}"]
    if settings.pull_policy == "always":
        build.append("--pull")
    for k in sorted(settings.build_args):
        build += ["--build-arg", f"{k}={settings.build_args[k]}"]
    build.append(".")
    spec = {
        "version": 0.2,
        "env": {"exported-variables": ["IMAGE_DIGEST"]},
        "phases": {
            "pre_build": {
                "commands": [
                    f"aws ecr get-login-password --region $AWS_DEFAULT_REGION | docker login --username AWS --password-stdin {q(target.host)}",
                ]
            },
            "build": {
                "commands": [
                    " ".join(q(a) for a in build),
                    f"docker push {q(target.ref)}",
                    f"IMAGE_DIGEST=$(docker inspect --format '{{{{index .RepoDigests 0}}}}' {q(target.ref)} | cut -d@ -f2)",
                    'echo "pushed digest $IMAGE_DIGEST"',
                ]
            },
        },
    }
    return yaml.safe_dump(spec, sort_keys=False)


def ensure_project(cb, settings: ImageBuildSettings) -> bool:
    """True when this call created the project."""
    name = settings.codebuild_project
    found = cb.batch_get_projects(names=[name]).get("projects", [])
    if found:
        return False
    if not settings.codebuild_service_role_arn:
        raise PipelineInputError(
            f"CodeBuild project {name!r} does not exist: create it (privileged mode, a role that reads "
            f"s3://{settings.codebuild_bucket} and pushes to ECR) or set ImageBuildSettings.codebuild_service_role_arn"
        )
    try:
        cb.create_project(
            name=name,
            description="vllm-pipeline image builds (context zip from S3, docker build + push to ECR)",
            source={"type": "S3", "location": f"{settings.codebuild_bucket}/{settings.codebuild_prefix}/"},
            artifacts={"type": "NO_ARTIFACTS"},
            environment={"type": "LINUX_CONTAINER", "image": settings.codebuild_image,
                         "computeType": settings.codebuild_compute_type, "privilegedMode": True},
            serviceRole=settings.codebuild_service_role_arn,
            timeoutInMinutes=settings.codebuild_timeout_minutes,
            tags=[{"key": MANAGED_BY_KEY, "value": MANAGED_BY_VALUE}],
        )
    except ClientError as exc:
        if error_code(exc) != "ResourceAlreadyExistsException":
            raise
        return False
    return True


def log_lines(logs, group: str, stream: str, token: str | None) -> tuple[list[str], str | None]:
    """New lines of a CloudWatch log stream since `token` (all of them for None), and the next token."""
    lines: list[str] = []
    while True:
        kw = {"logGroupName": group, "logStreamName": stream, "startFromHead": True}
        if token:
            kw["nextToken"] = token
        try:
            resp = logs.get_log_events(**kw)
        except ClientError as exc:
            if error_code(exc) == "ResourceNotFoundException":  # the stream appears once the build starts
                return lines, token
            raise
        lines += [e["message"].rstrip("\n") for e in resp.get("events", [])]
        nxt = resp.get("nextForwardToken")
        if not resp.get("events") or nxt == token:
            return lines, nxt or token
        token = nxt


def failure_message(build: dict, tail: list[str]) -> str:
    failed = [p for p in build.get("phases", []) if p.get("phaseStatus") not in (None, "SUCCEEDED")]
    parts = []
    for p in failed:
        ctx = "; ".join(c.get("message", "") for c in p.get("contexts", []) if c.get("message"))
        parts.append(f"phase {p.get('phaseType')} {p.get('phaseStatus')}" + (f": {ctx}" if ctx else ""))
    return "; ".join(parts) or f"status {build.get('buildStatus')}"


def backoff(start: float = 2.0, cap: float = 30.0):
    delay = start
    while True:
        yield delay
        delay = min(cap, delay * 2)


def wait_for_build(cb, logs, build_id: str, timeout_s: float, on_line: Callable[[str], None],
                   sleep: Callable[[float], None] = time.sleep) -> tuple[dict, list[str]]:
    """Poll until the build ends (back-off 2 s doubling to 30 s), streaming its log lines; (build, all lines)."""
    deadline = time.monotonic() + timeout_s
    token = None
    seen: list[str] = []
    for delay in backoff():
        build = cb.batch_get_builds(ids=[build_id])["builds"][0]
        group, stream = build.get("logs", {}).get("groupName"), build.get("logs", {}).get("streamName")
        if group and stream:
            new, token = log_lines(logs, group, stream, token)
            for line in new:
                on_line(line)
            seen += new
        if build.get("buildStatus") in DONE:
            return build, seen
        if time.monotonic() > deadline:
            cb.stop_build(id=build_id)
            raise TimeoutError(f"CodeBuild build {build_id} still {build.get('currentPhase')} after {timeout_s:.0f} s: stopped")
        sleep(delay)
    raise AssertionError("unreachable")


@task(retries=2, retry_delay_seconds=[10, 60], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def codebuild_image(settings: ImageBuildSettings, ctx: BuildContext, target: Target) -> CodeBuildRun:
    """Build and push ctx to target on CodeBuild; raises with the failing phase and log tail when it fails."""
    logger = get_run_logger()
    started = time.monotonic()
    s3 = aws_client("s3", settings.credentials, region=settings.region)
    cb = aws_client("codebuild", settings.credentials, region=settings.region)
    logs = aws_client("logs", settings.credentials, region=settings.region)
    if ensure_project(cb, settings):
        logger.info("created CodeBuild project %s", settings.codebuild_project)
    source = upload_context(s3, settings, ctx)
    build = cb.start_build(
        projectName=settings.codebuild_project,
        sourceTypeOverride="S3",
        sourceLocationOverride=source,
        buildspecOverride=buildspec(settings, ctx, target),
        artifactsOverride={"type": "NO_ARTIFACTS"},
        environmentTypeOverride="LINUX_CONTAINER",
        imageOverride=settings.codebuild_image,
        computeTypeOverride=settings.codebuild_compute_type,
        privilegedModeOverride=True,
        timeoutInMinutesOverride=settings.codebuild_timeout_minutes,
        idempotencyToken=f"{ctx.name}-{ctx.sha256[:48]}",
    )["build"]
    build_id = build["id"]
    logger.info("image %s: CodeBuild build %s started from s3://%s", ctx.name, build_id, source)
    build, lines = wait_for_build(cb, logs, build_id, settings.codebuild_timeout_minutes * 60 + 300,
                                  on_line=lambda ln: logger.info("[%s codebuild] %s", ctx.name, ln))
    status = build.get("buildStatus")
    if status != "SUCCEEDED":
        reason = failure_message(build, lines)
        result = RunResult(returncode=1, tail=lines[-40:], output="\n".join(lines[-2000:]))
        base_err = build_failure(ctx.name, result, ctx.base_images)
        if "base image not found" in str(base_err):
            raise base_err
        raise PipelineInputError(f"image {ctx.name!r}: CodeBuild build {build_id} {status}: {reason}; "
                                 f"log tail: {' | '.join([ln for ln in lines if ln.strip()][-15:]) or '(no log lines)'}")
    exported = {v.get("name"): v.get("value") for v in build.get("exportedEnvironmentVariables", [])}
    return CodeBuildRun(build_id=build_id, status=status, source=f"s3://{source}", log_lines=len(lines),
                        digest=exported.get("IMAGE_DIGEST") or None, seconds=time.monotonic() - started)
