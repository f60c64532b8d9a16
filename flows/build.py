"""build-images: build the pipeline's images and push them, tagged by the content hash of their build context.

For each image (a folder under images/): hash its context -> that hash is the tag; make sure the
ECR repository exists (scan on push, immutable tags, lifecycle policy); if the registry has
the tag, skip; else build (docker, buildah or CodeBuild), push, read the manifest back and
record `repo@sha256:...` (the flow's result, a Prefect Variable for the deploy flow, and a
summary artifact).
"""

from __future__ import annotations

import time

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.variables import Variable
from pydantic import BaseModel

from blocks.image_build import ImageBuildSettings
from blocks.loading import load_config
from tasks.build.codebuild import codebuild_image
from tasks.build.ecr import ensure_ecr_repository
from tasks.build.images import (
    Builder,
    Target,
    build_image,
    explicit_target,
    find_remote_image,
    pick_builder,
    prepare_context,
    push_image,
)
from tasks.core.errors import PipelineInputError, flow
from tasks.core.markdown import code, table, text

# Images whose Dockerfile must carry a HEALTHCHECK (the lint warns otherwise).
NEEDS_HEALTHCHECK = {"vllm"}


class BuiltImage(BaseModel):
    name: str
    repository: str
    tag: str  # = the first 32 hex characters of context_sha256
    context_sha256: str
    uri: str  # registry/repository:tag
    image_ref: str  # registry/repository@sha256:... : what a deployment should pin
    digest: str
    size_bytes: int | None
    built: bool  # True: built (or found built locally) and pushed by this run; False: the registry had the tag
    builder: str | None
    build_seconds: float
    push_seconds: float
    variable: str  # the Prefect Variable holding image_ref


class BuildReport(BaseModel):
    images: list[BuiltImage]
    registry: str
    seconds: float


def image_variable(name: str) -> str:
    """The Prefect Variable the deploy flow reads an image reference from."""
    return "vllm_pipeline_image_" + name.replace("-", "_")


def build_all(settings: ImageBuildSettings, names: list[str] | None = None) -> BuildReport:
    """The flow's body, callable with a block object (tests and the pipeline use it)."""
    logger = get_run_logger()
    started = time.monotonic()
    names = names or list(settings.repositories)
    unknown = [n for n in names if n not in settings.repositories]
    if unknown:
        raise PipelineInputError(f"images {unknown} have no repository in ImageBuildSettings.repositories ({sorted(settings.repositories)})")
    builder: Builder | None = None
    results: list[BuiltImage] = []
    registry_label = settings.registry or "ECR"
    for name in names:
        t0 = time.monotonic()
        ctx = prepare_context(settings, name, require_healthcheck=name in NEEDS_HEALTHCHECK)
        repository = settings.repositories[name]
        if settings.is_ecr:
            repo = ensure_ecr_repository(settings, repository)
            host, _, path = repo.uri.partition("/")
            target = Target(host=host, repository=path, tag=ctx.tag, ecr_repository=repository)
            registry_label = host
        else:
            target = explicit_target(settings, repository, ctx.tag)
        remote = find_remote_image(settings, target)
        build_s = push_s = 0.0
        used = None
        if remote is not None:
            logger.info("image %s: %s is in the registry already (%s): build and push skipped", name, target.ref, remote.digest)
        else:
            pushed = None
            if settings.builder == "codebuild":
                used = "codebuild"
                run = codebuild_image(settings, ctx, target)
                build_s = run.seconds
                pushed = run.digest
            else:
                builder = builder or pick_builder(settings)
                used = builder.name
                tb = time.monotonic()
                build_image(settings, builder.name, ctx, target.ref)
                build_s = time.monotonic() - tb
                tp = time.monotonic()
                pushed = push_image(settings, builder.name, target)
                push_s = time.monotonic() - tp
            remote = find_remote_image(settings, target)  # read the manifest back: what the registry really holds
            if remote is None:
                raise RuntimeError(f"image {name}: pushed {target.ref} but the registry does not list it")
            if pushed and pushed != remote.digest:
                raise RuntimeError(f"image {name}: pushed digest {pushed} but the registry holds {remote.digest} for {target.ref}")
            logger.info("image %s: pushed %s (%s) in %.1f s", name, target.ref, remote.digest, time.monotonic() - t0)
        ref = target.with_digest(remote.digest)
        var = image_variable(name)
        Variable.set(var, ref, overwrite=True)
        results.append(BuiltImage(
            name=name, repository=repository, tag=ctx.tag, context_sha256=ctx.sha256, uri=target.ref, image_ref=ref,
            digest=remote.digest, size_bytes=remote.size_bytes, built=used is not None, builder=used,
            build_seconds=round(build_s, 2), push_seconds=round(push_s, 2), variable=var,
        ))
    report = BuildReport(images=results, registry=registry_label, seconds=round(time.monotonic() - started, 2))
    _summary(report)
    return report


def _summary(report: BuildReport) -> None:
    lines = [
        f"# Images ({text(report.registry)})",
        "",
        f"{sum(i.built for i in report.images)} built and pushed, {sum(not i.built for i in report.images)} skipped "
        f"(tag already in the registry), {report.seconds:.1f} s in all.",
        "",
        table(["image", "pinned reference", "size (MB)", "result", "builder", "build (s)", "push (s)"],
              [[i.name, code(i.image_ref), f"{i.size_bytes / 1e6:.1f}" if i.size_bytes is not None else "?",
                "built" if i.built else "skipped", i.builder or "-", f"{i.build_seconds:.1f}", f"{i.push_seconds:.1f}"]
               for i in report.images], align="llrllrr"),
    ]
    lines += ["", "Tags are the first 32 hex characters of each build context's sha256; "
              "the deploy flow reads the pinned references from the Prefect Variables " +
              ", ".join(code(i.variable) for i in report.images) + "."]
    create_markdown_artifact("\n".join(lines), key="build-images", description="Image URIs, digests, sizes, built or skipped")


@flow(name="build-images", log_prints=True)
def build_images(
    images: list[str] | None = None,
    image_build_block: str | None = None,
    builder: str | None = None,
    registry: str | None = None,
    keep_last: int | None = None,
) -> BuildReport:
    """Build and push the pipeline's images (default: every image in the block's `repositories`),
    skipping each one whose content-hash tag the registry already has. `builder`, `registry` and
    `keep_last` override the ImageBuildSettings block (saved as `image_build_block`, or the
    defaults); registry credentials come only from the block."""
    settings = load_config(ImageBuildSettings, image_build_block, builder=builder, registry=registry, keep_last=keep_last)
    return build_all(settings, images)
