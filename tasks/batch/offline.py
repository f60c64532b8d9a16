"""Offline batch inference: vLLM's own batch runner in a one-off job, our exactly-once output around it.

vLLM's runner (`python -m vllm.entrypoints.openai.run_batch`) reads one local file, writes
one output file with a failed request as status_code 400 + an error string, and a line it
cannot parse aborts the whole run. So the flow, not the job:

1. `prepare_input` streams the S3 input through `tasks.batch.online.parse_line` (plus the runner's
   own limits: only /v1/chat/completions and /v1/embeddings), splits the valid requests into
   N contiguous shards (tasks/batch/shards.py) and writes each shard's clean input that still
   has work (`<out>/offline/input-<k>-of-<n>.jsonl`), and the input errors
   (`<out>/offline/input-errors.jsonl`);
2. one job per shard (the image entrypoint with ENTRYPOINT_MODE=batch: locally a process in the
   vLLM venv, on AWS an ECS task, see tasks/targets/ecs/batch_job.py) turns its input into
   `<out>/offline/raw-output-<k>-of-<n>.jsonl`;
3. `merge_records` maps a shard's raw records back to input lines (one per line: a missing or
   duplicated result is caught here), written as the shard's record object, and
   `tasks.batch.online.finalize` writes output.jsonl / errors.jsonl exactly as online mode does.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from pydantic import BaseModel

from blocks.vllm_server import VllmServerSettings
from tasks.batch.online import error_record, iter_input, parse_line, response_record
from tasks.batch.shards import ShardPlan, check_shards, input_key, plan

# What vLLM 0.32's run_batch serves (its registry matches /v1/chat/completions and
# /v1/embeddings exactly; /v1/completions would fail its input model and abort the run).
OFFLINE_URLS = ("/v1/chat/completions", "/v1/embeddings")


class JobResult(BaseModel):
    exit_code: int | None
    log: str  # local: the log file; ECS: a CloudWatch console link
    reason: str | None = None
    wall_s: float = 0.0
    task_arn: str | None = None


class OfflineJobFailed(RuntimeError):
    """The batch job ran and failed (non-zero exit, stopped, timed out); the message has the log."""


@dataclass
class Prepared:
    all_lines: set[int] = field(default_factory=set)
    expected: dict[str, int] = field(default_factory=dict)  # custom_id -> input line, for the clean requests
    input_errors: list[dict] = field(default_factory=list)  # {"line", "record"} rows
    models: dict[int, str] = field(default_factory=dict)  # input line -> requested model, for the per-model summary
    shards: list[ShardPlan] = field(default_factory=list)  # the split of the valid requests (none: no valid request)


def offline_check(body: dict, url: str) -> str | None:
    """The extra checks that keep one line from aborting vLLM's whole run (its input model is strict)."""
    if url not in OFFLINE_URLS:
        return f"url {url!r} is not supported by offline mode (vLLM's batch runner takes {', '.join(OFFLINE_URLS)})"
    if url == "/v1/chat/completions":
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs or not all(isinstance(m, dict) and "role" in m for m in msgs):
            return "body.messages must be a non-empty list of {role, content} objects"
    if url == "/v1/embeddings" and "input" not in body:
        return "body.input is required"
    return None


def prepare_input(s3, in_bucket: str, in_key: str, out_bucket: str, out_prefix: str, served_model_name: str,
                  shards: int = 1, done: set[int] | frozenset[int] = frozenset()) -> Prepared:
    """Stream and check the input, split the valid requests into `shards` contiguous shards, and upload
    the input of each shard that has requests without a record in `done`, and the input errors.
    `shards` is checked against the valid requests before anything is written. Returns the line map."""
    prep = Prepared()
    seen: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "input.jsonl"
        with clean.open("w", encoding="utf-8") as f:
            for n, raw in iter_input(s3, in_bucket, in_key):
                prep.all_lines.add(n)
                p = parse_line(n, raw, seen)
                if p.request is not None:
                    prep.models[n] = str(p.request["body"].setdefault("model", served_model_name))
                error = p.error if p.request is None else offline_check(p.request["body"], p.request["url"])
                if error:
                    if p.request is not None and not p.error:
                        error = f"line {n}: {error}"
                    prep.input_errors.append({"line": n, "record": error_record(p.custom_id, "invalid_request", error)})
                    continue
                req = p.request
                f.write(json.dumps({"custom_id": req["custom_id"], "method": "POST", "url": req["url"], "body": req["body"]},
                                   ensure_ascii=False) + "\n")
                prep.expected[p.custom_id] = n
        check_shards(shards, len(prep.expected), f"s3://{in_bucket}/{in_key}")
        if prep.expected:
            prep.shards = plan(prep.expected, shards, set(done))
        _upload_shard_inputs(s3, clean, prep, out_bucket, out_prefix, Path(tmp))
    body = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in prep.input_errors).encode()
    s3.put_object(Bucket=out_bucket, Key=f"{out_prefix}/offline/input-errors.jsonl", Body=body)
    return prep


def _upload_shard_inputs(s3, clean: Path, prep: Prepared, out_bucket: str, out_prefix: str, tmp: Path) -> None:
    """One pass over the clean file, each pending request into its shard's file (complete shards get none)."""
    todo = [s for s in prep.shards if s.requests]
    shard_of = {n: s for s in todo for n in s.requests.values()}
    files = {s.index: (tmp / f"{s.name}.jsonl").open("w", encoding="utf-8") for s in todo}
    try:
        with clean.open(encoding="utf-8") as f:
            for raw in f:
                n = prep.expected[json.loads(raw)["custom_id"]]
                if n in shard_of:
                    files[shard_of[n].index].write(raw)
    finally:
        for fh in files.values():
            fh.close()
    for s in todo:
        s3.upload_file(str(tmp / f"{s.name}.jsonl"), out_bucket, input_key(out_prefix, s.index, s.of))


def to_openai(rec: dict) -> dict:
    """One vLLM run_batch record as an OpenAI batch record (as online mode writes them)."""
    cid = rec["custom_id"]
    resp = rec.get("response") or {}
    status = resp.get("status_code")
    err = rec.get("error")
    rid = resp.get("request_id") or ""
    if err is None and status == 200:
        return response_record(cid, 200, rid, resp.get("body"))
    if isinstance(err, dict):  # vLLM's ErrorResponse: {"error": {message, type, code}}, as the server's 4xx body
        return response_record(cid, int(status or (err.get("error") or {}).get("code") or 400), rid, err)
    return error_record(cid, "batch_runner_error", f"HTTP {status}: {err}" if status else str(err or "no result"))


def merge_records(raw_lines: Iterable[bytes], expected: dict[str, int], input_errors: list[dict]) -> tuple[list[dict], int]:
    """{"line", "record"} rows, one per input line: the runner's results, the input errors, and an
    error record for any request the runner returned no result for. Returns (rows, records ignored)."""
    rows = list(input_errors)
    got: set[str] = set()
    ignored = 0
    for raw in raw_lines:
        if not raw.strip():
            continue
        try:
            rec = json.loads(raw)
            cid = rec["custom_id"]
        except (ValueError, KeyError, TypeError):
            ignored += 1
            continue
        if cid not in expected or cid in got:  # not ours, or a second result for it: never a second line
            ignored += 1
            continue
        got.add(cid)
        rows.append({"line": expected[cid], "record": to_openai(rec)})
    for cid, n in expected.items():
        if cid not in got:
            rows.append({"line": n, "record": error_record(cid, "no_result", "vLLM's batch runner returned no result for it")})
    return rows, ignored


def batch_vllm_args(settings: VllmServerSettings) -> list[str]:
    """The server flags without the listener's: run_batch serves no HTTP."""
    args = settings.server_args()
    out: list[str] = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--host", "--port"):
            skip = True
            continue
        out.append(a)
    return out


def job_environment(settings: VllmServerSettings, model_uri: str, input_uri: str, output_uri: str,
                    adapters: dict[str, str] | None = None) -> dict[str, str]:
    """The entrypoint's batch-mode environment. No secrets: run_batch needs no API key."""
    return {
        "ENTRYPOINT_MODE": "batch",
        "MODEL_URI": model_uri,
        "VLLM_ARGS": json.dumps(batch_vllm_args(settings)),
        "LORA_ADAPTERS": json.dumps(adapters or {}),
        "BATCH_INPUT_URI": input_uri,
        "BATCH_OUTPUT_URI": output_uri,
    }
