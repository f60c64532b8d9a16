"""Online batch inference: OpenAI Batch JSONL in S3 -> OpenAI batch output JSONL in S3, exactly once.

Every input line yields exactly one record, a result or an error. Records are flushed to
S3 in immutable shard objects (`<out>/shards/<run>-<seq>.jsonl`, written with
If-None-Match) that double as the checkpoint: a re-run lists the shards, skips the input
lines they hold, and does only the rest, so a run killed at any moment loses at most the
requests in flight and never writes a line twice. `finalize` merges the shards into
`output.jsonl` and `errors.jsonl` (OpenAI's layout) in input order and checks that every
line is accounted for exactly once.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Callable, Iterator

import httpx
from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from tasks.core.errors import PipelineInputError
from tasks.core.s3 import split_s3  # noqa: F401 - re-exported for the batch flow

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
RETRY_STATUS = {408, 429, 500, 502, 503, 504}


Concurrency = Annotated[int, Field(ge=1, le=1024, description="Requests in flight at once.")]


class BatchSettings(BaseModel):
    concurrency: Concurrency = 32
    max_attempts: int = Field(default=8, ge=1, le=50, description="Per request, for 429/5xx/timeouts/connection errors.")
    request_timeout_s: float = Field(default=300, gt=0)
    shard_lines: int = Field(default=200, ge=1, le=100_000, description="Records per checkpoint shard.")
    shard_seconds: float = Field(default=10, gt=0, description="Flush a shard at least this often.")


class EndpointDown(RuntimeError):
    """The endpoint stopped answering for longer than the retries cover: the run stops, a re-run resumes."""


@dataclass
class Parsed:
    line: int
    custom_id: str
    request: dict | None  # None: the line is an input error (see error)
    error: str | None = None


def parse_line(n: int, raw: bytes, seen: dict[str, int]) -> Parsed:
    """One input line, checked the way OpenAI's Batch API checks it."""
    try:
        obj = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return Parsed(n, f"line-{n}", None, f"line {n}: not valid JSON ({exc})")
    if not isinstance(obj, dict):
        return Parsed(n, f"line-{n}", None, f"line {n}: a request must be a JSON object")
    cid = obj.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return Parsed(n, f"line-{n}", None, f"line {n}: missing custom_id")
    if cid in seen:
        return Parsed(n, cid, None, f"line {n}: duplicate custom_id {cid!r} (first on line {seen[cid]})")
    seen[cid] = n
    if obj.get("method", "POST") != "POST":
        return Parsed(n, cid, None, f"line {n}: method must be POST")
    if obj.get("url") not in URLS:
        return Parsed(n, cid, None, f"line {n}: unsupported url {obj.get('url')!r} (one of {', '.join(URLS)})")
    if not isinstance(obj.get("body"), dict):
        return Parsed(n, cid, None, f"line {n}: body must be a JSON object")
    return Parsed(n, cid, obj)


def error_record(custom_id: str, code: str, message: str) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id, "response": None,
            "error": {"code": code, "message": message}}


def response_record(custom_id: str, status: int, request_id: str, body) -> dict:
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body}, "error": None}


def is_ok(record: dict) -> bool:
    return record.get("error") is None and (record.get("response") or {}).get("status_code") == 200


# --- S3 side: streamed input, shards, merge ------------------------------------------------

def iter_input(s3, bucket: str, key: str) -> Iterator[tuple[int, bytes]]:
    """(line number, raw bytes) for each non-blank line, streamed: the object is never loaded whole."""
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    for n, raw in enumerate(body.iter_lines(chunk_size=1 << 16), start=1):
        if raw.strip():
            yield n, raw


def require_input(s3, bucket: str, key: str) -> int:
    try:
        return s3.head_object(Bucket=bucket, Key=key)["ContentLength"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
            raise PipelineInputError(f"batch input s3://{bucket}/{key} does not exist") from None
        if exc.response.get("Error", {}).get("Code") in ("NoSuchBucket",):
            raise PipelineInputError(f"bucket {bucket!r} of the batch input does not exist") from None
        raise


def done_lines(s3, bucket: str, out_prefix: str) -> set[int]:
    done: set[int] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{out_prefix}/shards/"):
        for obj in page.get("Contents", []):
            for raw in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].iter_lines():
                if raw.strip():
                    done.add(json.loads(raw)["line"])
    return done


def write_shard(s3, bucket: str, out_prefix: str, run_id: str, seq: int, rows: list[dict]) -> None:
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    s3.put_object(Bucket=bucket, Key=f"{out_prefix}/shards/{run_id}-{seq:06d}.jsonl", Body=body, IfNoneMatch="*")


class MergeResult(BaseModel):
    lines: int
    ok: int
    failed: int
    output_uri: str
    errors_uri: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    per_model: dict[str, dict[str, int]] = {}  # requested model -> lines, ok, failed, completion_tokens


INVALID = "(invalid input)"  # the per-model bucket of lines that were not a request at all


def finalize(s3, bucket: str, out_prefix: str, input_lines: set[int], model_of: dict[int, str] | None = None) -> MergeResult:
    """Merge shards into output.jsonl / errors.jsonl in input order; every line exactly once."""
    by_line: dict[int, dict] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{out_prefix}/shards/"):
        for obj in sorted(page.get("Contents", []), key=lambda o: o["Key"]):
            for raw in s3.get_object(Bucket=bucket, Key=obj["Key"])["Body"].iter_lines():
                if raw.strip():
                    row = json.loads(raw)
                    by_line.setdefault(row["line"], row["record"])  # a line is kept once, whatever happened
    missing = sorted(input_lines - set(by_line))
    if missing:
        raise RuntimeError(f"{len(missing)} input lines have no record (first: {missing[:5]}): re-run to finish them")
    ok_rows, err_rows, tokens, per_model = [], [], [0, 0], {}
    for n in sorted(by_line):
        rec = by_line[n]
        (ok_rows if is_ok(rec) else err_rows).append(json.dumps(rec, ensure_ascii=False))
        usage = ((rec.get("response") or {}).get("body") or {}).get("usage") or {}
        tokens[0] += usage.get("prompt_tokens", 0) or 0
        tokens[1] += usage.get("completion_tokens", 0) or 0
        if model_of is not None:
            m = per_model.setdefault(model_of.get(n, INVALID), {"lines": 0, "ok": 0, "failed": 0, "completion_tokens": 0})
            m["lines"] += 1
            m["ok" if is_ok(rec) else "failed"] += 1
            m["completion_tokens"] += usage.get("completion_tokens", 0) or 0
    out_key, err_key = f"{out_prefix}/output.jsonl", f"{out_prefix}/errors.jsonl"
    s3.put_object(Bucket=bucket, Key=out_key, Body=("\n".join(ok_rows) + ("\n" if ok_rows else "")).encode())
    s3.put_object(Bucket=bucket, Key=err_key, Body=("\n".join(err_rows) + ("\n" if err_rows else "")).encode())
    return MergeResult(lines=len(by_line), ok=len(ok_rows), failed=len(err_rows), output_uri=f"s3://{bucket}/{out_key}",
                       errors_uri=f"s3://{bucket}/{err_key}", prompt_tokens=tokens[0], completion_tokens=tokens[1],
                       per_model=dict(sorted(per_model.items())))


# --- the online runner ------------------------------------------------------------------------

@dataclass
class RunStats:
    sent: int = 0
    ok: int = 0
    failed: int = 0
    retries: int = 0
    latencies: list[float] = field(default_factory=list)


async def run_online(
    lines: Iterator[Parsed],
    endpoint: Callable[[], tuple[str, str]],
    flush: Callable[[list[dict]], None],
    settings: BatchSettings,
    on_done: Callable[[int], None] = lambda n: None,
) -> RunStats:
    """Send every request (bounded concurrency), retry what retrying can fix, hand records to
    `flush` in shards. `endpoint()` returns (base URL, API key); it is asked again after a
    connection failure, so a server restarted elsewhere (a redeploy) is picked up mid-run."""
    stats = RunStats()
    buffer: list[dict] = []
    last_flush = time.monotonic()
    lock = asyncio.Lock()
    url, key = endpoint()
    state = {"url": url, "key": key}
    sem = asyncio.Semaphore(settings.concurrency)
    fatal: list[BaseException] = []

    async def emit(line: int, record: dict) -> None:
        nonlocal buffer, last_flush
        rows = None
        async with lock:
            buffer.append({"line": line, "record": record})
            stats.ok += is_ok(record)
            stats.failed += not is_ok(record)
            on_done(1)
            if len(buffer) >= settings.shard_lines or time.monotonic() - last_flush >= settings.shard_seconds:
                rows, buffer = buffer, []
                last_flush = time.monotonic()
        if rows:  # written outside the lock: other requests keep completing meanwhile
            await asyncio.to_thread(flush, rows)

    async def one(client: httpx.AsyncClient, p: Parsed) -> None:
        try:
            if p.request is None:
                await emit(p.line, error_record(p.custom_id, "invalid_request", p.error or "invalid line"))
                return
            req = p.request
            for attempt in range(1, settings.max_attempts + 1):
                started = time.perf_counter()
                try:
                    resp = await client.post(state["url"] + req["url"], json=req["body"],
                                             headers={"Authorization": f"Bearer {state['key']}"})
                except (httpx.TransportError, httpx.TimeoutException) as exc:
                    if attempt == settings.max_attempts:
                        raise EndpointDown(f"{state['url']}: {type(exc).__name__} after {attempt} attempts") from exc
                    stats.retries += 1
                    await asyncio.sleep(min(30, 0.5 * 2**attempt) * (0.5 + random.random()))
                    state["url"], state["key"] = await asyncio.to_thread(endpoint)
                    continue
                if resp.status_code in RETRY_STATUS and attempt < settings.max_attempts:
                    stats.retries += 1
                    await asyncio.sleep(min(30, 0.5 * 2**attempt) * (0.5 + random.random()))
                    continue
                try:
                    body = resp.json()
                except ValueError:
                    body = {"text": resp.text[:2000]}
                stats.latencies.append(time.perf_counter() - started)
                rid = resp.headers.get("x-request-id", f"req_{uuid.uuid4().hex}")
                await emit(p.line, response_record(p.custom_id, resp.status_code, rid, body))
                return
        except BaseException as exc:  # noqa: BLE001 - stop the run, keep what is done
            fatal.append(exc)
        finally:
            sem.release()

    timeout = httpx.Timeout(settings.request_timeout_s, connect=10)
    limits = httpx.Limits(max_connections=settings.concurrency, max_keepalive_connections=settings.concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
        tasks: set[asyncio.Task] = set()
        for p in lines:
            await sem.acquire()
            if fatal:
                sem.release()
                break
            stats.sent += 1
            t = asyncio.create_task(one(client, p))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)
    async with lock:
        if buffer:
            await asyncio.to_thread(flush, buffer)
    if fatal:
        raise fatal[0]
    return stats
