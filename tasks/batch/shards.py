"""Offline batch across many jobs: the valid requests split into N contiguous shards, one job each.

A shard is a contiguous run of the valid requests in input order (sizes differ by at most one).
Each has its own input and raw-output objects under `<out>/offline/`, and when its job succeeds
its records are written as one immutable object, `<out>/shards/offline-shard-<k>-of-<n>.jsonl`
(If-None-Match). That is the same kind of record object online mode checkpoints with, so
`done_lines` and `finalize` (tasks/batch/online.py) read it like any other, and its existence is
the shard's durable completion marker: a re-run runs only the requests no record covers, so a
shard whose lines all have a record is skipped, whatever `shards` the earlier run used. The
object's S3 metadata keeps the job's time, attempts and log, for the summary of a later run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Annotated, Literal

from pydantic import BaseModel, Field

from tasks.core.aws import error_code
from tasks.core.errors import PipelineInputError

# One GPU task per shard: 64 hosts is already more than one account's default GPU quota, and
# a shard must stay large enough that its job's start-up (minutes on ECS) is not the whole job.
MAX_SHARDS = 64
ShardCount = Annotated[int, Field(ge=1, le=MAX_SHARDS, description="Jobs the valid requests are split across.")]
ShardRetries = Annotated[int, Field(ge=0, le=5, description="Extra attempts for a failed shard's job, that shard alone.")]
ERRORS_KEY = "offline-input-errors"  # the input errors' record object: <out>/shards/offline-input-errors.jsonl


@dataclass
class ShardPlan:
    """One shard: its place in the split and the requests it still has to run (custom_id -> input line)."""

    index: int  # 1-based
    of: int
    first_line: int
    last_line: int
    size: int  # requests in the shard, done or not
    requests: dict[str, int] = field(default_factory=dict)  # the pending ones: empty when the shard is complete

    @property
    def name(self) -> str:
        return shard_name(self.index, self.of)


class ShardRun(BaseModel):
    """What one shard's job did, for the summary (per-shard time and the speed-up)."""

    index: int
    of: int
    first_line: int
    last_line: int
    requests: int
    state: Literal["ran", "done earlier"]
    wall_s: float | None = None  # the job's own time: process or ECS task start to exit
    attempts: int = 0
    exit_code: int | None = None
    log: str | None = None
    task_arn: str | None = None


def shard_name(index: int, of: int) -> str:
    return f"{index:05d}-of-{of:05d}"


def input_key(out_prefix: str, index: int, of: int) -> str:
    return f"{out_prefix}/offline/input-{shard_name(index, of)}.jsonl"


def raw_output_key(out_prefix: str, index: int, of: int) -> str:
    return f"{out_prefix}/offline/raw-output-{shard_name(index, of)}.jsonl"


def marker_key(out_prefix: str, index: int, of: int) -> str:
    return f"{out_prefix}/shards/offline-shard-{shard_name(index, of)}.jsonl"


def check_shards(shards: int, requests: int, input_uri: str) -> None:
    """Before anything is written: a shard with no request would start a GPU task for nothing."""
    if not 1 <= shards <= MAX_SHARDS:
        raise PipelineInputError(f"shards must be between 1 and {MAX_SHARDS}, not {shards}")
    if requests and shards > requests:
        raise PipelineInputError(f"shards={shards} but {input_uri} has only {requests} valid request(s): "
                                 f"give shards <= {requests}")


def split(lines: list[int], shards: int) -> list[list[int]]:
    """`lines` (in input order) as `shards` contiguous runs whose sizes differ by at most one."""
    q, r = divmod(len(lines), shards)
    out, start = [], 0
    for k in range(shards):
        size = q + (1 if k < r else 0)
        out.append(lines[start:start + size])
        start += size
    return out


def plan(expected: dict[str, int], shards: int, done: set[int]) -> list[ShardPlan]:
    """The split of the valid requests, each shard with the requests that have no record yet."""
    cid_of = {n: cid for cid, n in expected.items()}
    plans = []
    for k, part in enumerate(split(sorted(cid_of), shards), start=1):
        plans.append(ShardPlan(index=k, of=shards, first_line=part[0], last_line=part[-1], size=len(part),
                               requests={cid_of[n]: n for n in part if n not in done}))
    return plans


def rows_body(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def write_records(s3, bucket: str, key: str, rows: list[dict], meta: dict[str, str] | None = None) -> bool:
    """Write a record object once (If-None-Match). False: it exists already (a concurrent or earlier
    run wrote it first); its records stand and `finalize` keeps each line once either way."""
    metadata = {k: v for k, v in (meta or {}).items() if v.isascii() and len(v) <= 1024}
    try:
        s3.put_object(Bucket=bucket, Key=key, Body=rows_body(rows), IfNoneMatch="*", Metadata=metadata)
    except Exception as exc:
        if error_code(exc) in ("PreconditionFailed", "ConditionalRequestConflict"):
            return False
        raise
    return True


def marker_meta(run: ShardRun) -> dict[str, str]:
    return {"wall-s": str(run.wall_s), "attempts": str(run.attempts), "exit-code": str(run.exit_code),
            "log": run.log or "", "task-arn": run.task_arn or ""}


def earlier_run(s3, bucket: str, out_prefix: str, shard: ShardPlan) -> ShardRun:
    """A complete shard as its marker recorded it (the split of an earlier run with another `shards`
    has other keys: then only that it is done is known)."""
    run = ShardRun(index=shard.index, of=shard.of, first_line=shard.first_line, last_line=shard.last_line,
                   requests=shard.size, state="done earlier")
    try:
        meta = s3.head_object(Bucket=bucket, Key=marker_key(out_prefix, shard.index, shard.of)).get("Metadata", {})
    except Exception as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return run
        raise

    def num(key: str, kind):
        try:
            return kind(meta[key])
        except (KeyError, ValueError):
            return None

    return run.model_copy(update={"wall_s": num("wall-s", float), "attempts": num("attempts", int) or 0,
                                  "exit_code": num("exit-code", int), "log": meta.get("log") or None,
                                  "task_arn": meta.get("task-arn") or None})


def speedup(runs: list[ShardRun], jobs_wall_s: float) -> float | None:
    """Sum of the shard jobs' times over the wall time they took together: N for N shards in perfect
    parallel, 1 when they ran one after another. None when fewer than two ran in this run."""
    times = [r.wall_s for r in runs if r.state == "ran" and r.wall_s]
    if len(times) < 2 or jobs_wall_s <= 0:
        return None
    return round(sum(times) / jobs_wall_s, 2)
