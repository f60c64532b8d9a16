"""pipeline: stage -> build -> plan -> deploy -> validate -> batch (optional) -> teardown (unless keep_running).

Each step is its own flow, run here as a subflow, so each has its own runs and artifacts in
the UI. Once something was deployed, a failure anywhere later still tears the stack down
(unless `keep_failed`), so a failed run does not leave a GPU service billing.
"""

from __future__ import annotations

from typing import Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, PositiveFloat, PositiveInt

from flows.batch import BatchSummary, batch_inference
from flows.build import BuildReport, build_images
from flows.deploy import deploy_model
from flows.plan import plan_capacity
from flows.stage import StagedModel, stage_model
from flows.teardown import TeardownReport, teardown_stack
from flows.validate import ValidationReport, validate
from tasks.batch import Concurrency
from tasks.errors import flow
from tasks.naming import check_stack_name


class PipelineResult(BaseModel):
    stack: str
    staged: StagedModel
    build: BuildReport | None = None
    plan: str | None
    endpoint: str | None
    validation: ValidationReport | None
    batches: list[BatchSummary]
    teardown: TeardownReport | None


@flow(name="pipeline", log_prints=True)
def pipeline(
    stack: str,
    repo_id: str | None = None,
    revision: str | None = None,
    target: Literal["local", "ecs"] = "local",
    batch_input_uri: str | None = None,
    batch_concurrency: Concurrency = 32,
    keep_running: bool = False,
    keep_failed: bool = False,
    ttl_hours: PositiveFloat = 24,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    server_settings_block: str | None = None,
    capacity_block: str | None = None,
    image_build_block: str | None = None,
    build: bool | None = None,
    ready_timeout_s: PositiveInt = 1800,
) -> PipelineResult:
    """Take a Hub model to a validated endpoint, run a batch on it, and tear it down
    (`keep_running` keeps the stack; `keep_failed` keeps a failed stack for debugging).
    `build` (default: only for target ecs) builds and pushes the images first, skipped when
    their content is unchanged; the ecs deploy then runs the vLLM image just built."""
    check_stack_name(stack)
    logger = get_run_logger()
    stores = dict(model_store_block=model_store_block)
    staged = stage_model(repo_id=repo_id, revision=revision, model_source_block=model_source_block, **stores)
    model_uri = f"s3://{staged.bucket}/{staged.prefix}"
    built = build_images(images=None, image_build_block=image_build_block) if (target == "ecs" if build is None else build) else None
    image_uri = next((i.image_ref for i in built.images if i.name == "vllm"), None) if built else None
    plan = plan_capacity(model_uri=model_uri, server_settings_block=server_settings_block, capacity_block=capacity_block, **stores)
    plan_line = (f"{plan.chosen.instance_type} (TP {plan.chosen.tensor_parallel_size}, ${plan.chosen.price_per_hour}/h)"
                 if plan.chosen else None)
    result = PipelineResult(stack=stack, staged=staged, build=built, plan=plan_line, endpoint=None, validation=None, batches=[], teardown=None)
    failed = True
    try:
        state = deploy_model(stack=stack, target=target, model_uri=model_uri, image_uri=image_uri,
                             model_source_block=model_source_block, server_settings_block=server_settings_block, capacity_block=capacity_block,
                             ready_timeout_s=ready_timeout_s, ttl_hours=ttl_hours, keep_failed=keep_failed, **stores)
        result.endpoint = state.endpoint.url
        result.validation = validate(stack=stack, **stores)
        if batch_input_uri:
            result.batches = batch_inference(input_uri=batch_input_uri, stack=stack, concurrency=batch_concurrency, **stores)
        failed = False
    finally:
        if (failed and not keep_failed) or (not failed and not keep_running):
            result.teardown = teardown_stack(stack=stack, capacity_block=capacity_block, **stores)
        elif failed:
            logger.warning("pipeline failed; stack %r kept for debugging (keep_failed): tear it down when done", stack)
        _summary(result, failed)
    return result


def _summary(r: PipelineResult, failed: bool) -> None:
    run = flow_run.get_id()
    lines = [
        f"# Pipeline for stack `{r.stack}`: {'FAILED' if failed else 'completed'}",
        "",
        "Each step is a subflow of this run; open it for its own artifacts "
        f"(`stage-…`, `capacity-plan-…`, `deploy-{r.stack}`, `validate-{r.stack}`, `batch-{r.stack}`, `teardown-{r.stack}`).",
        "",
        "| step | result |",
        "|---|---|",
        f"| stage | `{r.staged.s3_uri}` ({r.staged.files} files, {r.staged.total_bytes / 1e6:.1f} MB; "
        f"{'already staged' if r.staged.already_staged else f'{r.staged.bytes_uploaded / 1e6:.1f} MB uploaded'}"
        f"{f'; LoRA adapters {sorted(r.staged.adapters)}' if r.staged.adapters else ''}) |",
        f"| build | {_build_line(r.build)} |",
        f"| plan | {r.plan or 'nothing fits'} |",
        f"| deploy | {r.endpoint or 'not deployed'} |",
        f"| validate | {('passed' if r.validation.passed else 'FAILED') if r.validation else 'not run'} |",
    ]
    for b in r.batches:
        lines.append(f"| batch | `{b.output_uri}`: {b.ok} ok, {b.failed} failed, {b.output_tokens_per_s} output tok/s |")
    if r.teardown:
        lines.append(f"| teardown | {len(r.teardown.deleted)} resources deleted; tag scan: {r.teardown.left or 'nothing left'} |")
    else:
        lines.append("| teardown | stack kept running |")
    create_markdown_artifact("\n".join(lines), key=f"pipeline-{r.stack}", description=f"Pipeline run {run}")


def _build_line(b: BuildReport | None) -> str:
    if b is None:
        return "not run (the local target runs the entrypoint without an image)"
    return ", ".join(f"`{i.image_ref}` ({'built' if i.built else 'unchanged, skipped'})" for i in b.images)
