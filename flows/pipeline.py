"""pipeline: stage -> build -> plan -> deploy -> validate -> batch (optional) -> teardown (unless keep_running).

Each step is its own flow, run here as a subflow, so each has its own runs and artifacts in
the UI. Once something was deployed, a failure anywhere later still tears the stack down
(unless `keep_failed`), so a failed run does not leave a GPU service billing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel, PositiveFloat, PositiveInt

from blocks.tool_gateway import ToolGateway
from flows.batch import BatchSummary, batch_inference
from flows.build import BuildReport, build_images
from flows.deploy import deploy_model
from flows.plan import artifact_key as plan_artifact_key
from flows.plan import plan_capacity
from flows.stage import StagedModel, stage_model
from flows.stage import _artifact_key as stage_artifact_key
from flows.teardown import TeardownReport, teardown_stack
from flows.validate import ValidationReport, validate
from tasks.batch.online import Concurrency
from tasks.core.errors import flow
from tasks.core.markdown import Md, artifact_page_link, bold, code, flow_run_link, table, text
from tasks.core.naming import check_stack_name

STEP_FLOWS = {"stage": "stage-model", "build": "build-images", "plan": "plan-capacity", "deploy": "deploy-model",
              "validate": "validate", "batch": "batch-inference", "teardown": "teardown"}
REASON_LIMIT = 300  # characters of a failure's reason in the summary; the step's own run logs it in full


class StepOutcome(BaseModel):
    step: str
    outcome: Literal["done", "skipped", "failed", "not reached"] = "not reached"
    detail: str = ""  # markdown (tasks/core/markdown.py): what a done step made, or why a step was skipped
    reason: str = ""  # a failed step's error, its first line
    artifact: str | None = None  # the artifact key the step's subflow writes


class PipelineResult(BaseModel):
    stack: str
    staged: StagedModel
    build: BuildReport | None = None
    plan: str | None
    endpoint: str | None
    validation: ValidationReport | None
    batches: list[BatchSummary]
    teardown: TeardownReport | None
    steps: list[StepOutcome] = []  # every step's outcome, in order (what the summary artifact shows)


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
    gateway: str | ToolGateway | None = None,
) -> PipelineResult:
    """Take a Hub model to a validated endpoint, run a batch on it, and tear it down
    (`keep_running` keeps the stack; `keep_failed` keeps a failed stack for debugging).
    `build` (default: only for target ecs) builds and pushes the images first, skipped when
    their content is unchanged; the ecs deploy then runs the vLLM image just built. `gateway` (a saved
    ToolGateway block's name, or the block): the tool gateway deployed beside the server, checked by validate
    (docs/gateway.md)."""
    check_stack_name(stack)
    logger = get_run_logger()
    stores = dict(model_store_block=model_store_block)
    steps = Steps(stack)
    result: PipelineResult | None = None
    failed, deploying = True, False
    try:
        with steps.run("stage") as step:
            staged = stage_model(repo_id=repo_id, revision=revision, model_source_block=model_source_block, **stores)
            step.artifact = stage_artifact_key(staged.repo_id)
            step.detail = _stage_line(staged)
        model_uri = f"s3://{staged.bucket}/{staged.prefix}"
        if (target == "ecs") if build is None else build:
            with steps.run("build") as step:
                built = build_images(images=None, image_build_block=image_build_block)
                step.detail = _build_line(built)
        else:
            built = None
            steps.skip("build", "the local target runs the entrypoint without an image" if target == "local"
                       else "build=False: the deploy runs the image last built")
        image_uri = next((i.image_ref for i in built.images if i.name == "vllm"), None) if built else None
        with steps.run("plan", artifact=plan_artifact_key(staged.repo_id)) as step:
            plan = plan_capacity(model_uri=model_uri, server_settings_block=server_settings_block, capacity_block=capacity_block, **stores)
            plan_line = (f"{plan.chosen.instance_type} (TP {plan.chosen.tensor_parallel_size}, ${plan.chosen.price_per_hour}/h)"
                         if plan.chosen else None)
            step.detail = text(f"on AWS: {plan_line}" if plan_line else "nothing in the catalogue fits")
        result = PipelineResult(stack=stack, staged=staged, build=built, plan=plan_line, endpoint=None, validation=None,
                                batches=[], teardown=None)
        deploying = True
        with steps.run("deploy") as step:
            state = deploy_model(stack=stack, target=target, model_uri=model_uri, image_uri=image_uri,
                                 model_source_block=model_source_block, server_settings_block=server_settings_block,
                                 capacity_block=capacity_block, ready_timeout_s=ready_timeout_s, ttl_hours=ttl_hours,
                                 keep_failed=keep_failed, gateway=gateway, **stores)
            result.endpoint = state.endpoint.url
            step.detail = Md(f"{text(target)}: {code(state.endpoint.served_model_name)} at {code(state.endpoint.url)}"
                             + (f"; tool gateway at {code(state.gateway.url)}" if state.gateway else ""))
        with steps.run("validate") as step:
            result.validation = validate(stack=stack, **stores)
            step.detail = _validate_line(result.validation)
        if batch_input_uri:
            with steps.run("batch") as step:
                result.batches = batch_inference(input_uri=batch_input_uri, stack=stack, concurrency=batch_concurrency, **stores)
                step.detail = _batch_line(result.batches)
        else:
            steps.skip("batch", "no batch_input_uri given")
        failed = False
    finally:
        try:
            if not deploying:
                steps.skip("teardown", "nothing was deployed")
            elif (failed and not keep_failed) or (not failed and not keep_running):
                try:
                    with steps.run("teardown") as step:
                        report = teardown_stack(stack=stack, capacity_block=capacity_block, **stores)
                        step.detail = _teardown_line(report)
                    if result is not None:
                        result.teardown = report
                except Exception:
                    if not failed:
                        raise
                    # the step that failed first is the error the run reports; this one is in the summary and the log
                    logger.exception("teardown after the failure of step %r failed too", steps.failed_step)
            elif failed:
                steps.skip("teardown", "stack kept for debugging (keep_failed): tear it down when done")
                logger.warning("pipeline failed; stack %r kept for debugging (keep_failed): tear it down when done", stack)
            else:
                steps.skip("teardown", "stack kept running (keep_running)")
        finally:
            try:
                _summary(stack, steps)
            except Exception:
                if steps.failed_step is None:
                    raise
                logger.exception("could not write the pipeline summary artifact")
    result.steps = list(steps.items.values())
    return result


class Steps:
    """Each step's real outcome, as the pipeline runs: what the summary reports."""

    def __init__(self, stack: str):
        artifacts = {"build": "build-images", "deploy": f"deploy-{stack}", "validate": f"validate-{stack}",
                     "batch": f"batch-{stack}", "teardown": f"teardown-{stack}"}
        self.items = {s: StepOutcome(step=s, artifact=artifacts.get(s)) for s in STEP_FLOWS}

    @contextmanager
    def run(self, step: str, artifact: str | None = None):
        item = self.items[step]
        item.artifact = artifact or item.artifact
        try:
            yield item
        except BaseException as exc:
            item.outcome, item.reason = "failed", first_line(exc)
            raise
        item.outcome = "done"

    def skip(self, step: str, why: str) -> None:
        self.items[step].outcome, self.items[step].detail = "skipped", text(why)

    @property
    def failed_step(self) -> str | None:
        return next((s.step for s in self.items.values() if s.outcome == "failed"), None)


def first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _stage_line(r: StagedModel) -> Md:
    moved = "already staged" if r.already_staged else f"{r.bytes_uploaded / 1e6:.1f} MB uploaded"
    adapters = f"; LoRA adapters {', '.join(code(a) for a in sorted(r.adapters))}" if r.adapters else ""
    return Md(f"{r.files} files, {r.total_bytes / 1e6:.1f} MB, {moved}{adapters}: {code(r.s3_uri)}")


def _build_line(b: BuildReport) -> Md:
    return Md(", ".join(f"{code(i.image_ref)} ({'built' if i.built else 'unchanged, skipped'})" for i in b.images))


def _validate_line(v: ValidationReport) -> Md:
    cases = f"{sum(c.passed for c in v.cases)}/{len(v.cases)} tool cases passed"
    names = f"; adapters {', '.join(code(a.served_model_name) for a in v.adapters)}" if v.adapters else ""
    return Md(f"passed: {len(v.checks)} checks, {cases} (every gated cell met its bar){names}")


def _batch_line(batches: list[BatchSummary]) -> Md:
    if not batches:
        return text("nothing to do: no new input")
    return Md("; ".join(f"{b.ok} ok, {b.failed} failed, {b.output_tokens_per_s} output tok/s: {code(b.output_uri)}"
                        for b in batches))


def _teardown_line(t: TeardownReport) -> Md:
    left = text(", ".join(t.left)) if t.left else Md("nothing left")
    return Md(f"{len(t.deleted)} resources deleted; tag scan: {left}")


def _runs_and_artifacts() -> tuple[dict[str, object], dict[tuple[object, str], object]]:
    """This run's subflow runs (flow name -> run id, the latest of each) and the artifacts they wrote
    ((run id, key) -> artifact id), read back from the API; empty when it cannot be read."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowFilter,
        FlowFilterId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
    )
    from prefect.client.schemas.sorting import FlowRunSort

    run_id = flow_run.get_id()
    if not run_id:
        return {}, {}
    try:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[run_id])),
                                         sort=FlowRunSort.START_TIME_ASC)
            if not runs:
                return {}, {}
            flows = {f.id: f.name for f in client.read_flows(flow_filter=FlowFilter(id=FlowFilterId(any_=list({r.flow_id for r in runs}))))}
            arts = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[r.id for r in runs])))
    except Exception as exc:  # noqa: BLE001 - the summary is still written, without links
        get_run_logger().warning("pipeline summary: could not read the subflow runs (%s); no links", exc)
        return {}, {}
    by_flow = {flows.get(r.flow_id): r.id for r in runs}  # ascending start time: the latest run of each flow wins
    return by_flow, {(a.flow_run_id, a.key): a.id for a in arts if a.key}


OUTCOME = {"done": "done", "skipped": "skipped", "failed": "**FAILED**", "not reached": "not reached"}


def _summary(stack: str, steps: Steps) -> None:
    runs, artifacts = _runs_and_artifacts()
    failed = steps.failed_step
    rows = []
    for s in steps.items.values():
        run_id = runs.get(STEP_FLOWS[s.step]) if s.outcome in ("done", "failed") else None
        art = artifacts.get((run_id, s.artifact)) if run_id and s.artifact else None
        if art:
            where = artifact_page_link(s.artifact, art)
        elif s.outcome == "failed":
            where = Md(f"none written; {flow_run_link('the run’s logs', run_id)}" if run_id else "none written")
        else:
            where = Md("–")
        if s.outcome == "failed":
            detail = text(s.reason, limit=REASON_LIMIT)
        elif s.outcome == "not reached":
            detail = text(f"not run: step {failed!r} failed" if failed else "not run")
        else:
            detail = Md(s.detail)
        rows.append([bold(s.step) if s.outcome == "failed" else s.step, Md(OUTCOME[s.outcome]), where,
                     flow_run_link("run", run_id) if run_id else Md("–"), detail])
    head = (f"**FAILED** at {text(failed)}: {text(steps.items[failed].reason, limit=REASON_LIMIT)}" if failed
            else "completed")
    lines = [
        f"# Pipeline for stack {code(stack)}: {'FAILED' if failed else 'completed'}",
        "",
        Md(head) if failed else "Every step completed or was skipped as asked.",
        "",
        "Each step is a subflow of this run: its own run (logs) and artifact are linked.",
        "",
        table(["step", "outcome", "artifact", "run", "details"], rows),
    ]
    create_markdown_artifact("\n".join(lines), key=f"pipeline-{stack}", description=f"Pipeline run {flow_run.get_id()}")
