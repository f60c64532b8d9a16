"""Benchmark: our streamed Hub -> S3 staging against the usual approach and against the S3 ceiling.

What it measures, on one multi-file payload it makes itself (a tiny Llama folder from
`embedded.tiny_model.make_tiny_model`, padded to `--mb` MB, 10^6 bytes each, in `--shards`
safetensors shards, plus config/tokenizer json files), served by the local Hub and written
to the local S3 (moto):

  ours  our streamed staging: `tasks.stage.transfer.stream_file` for every selected file (Hub HTTP
        reads feed S3 multipart uploads directly, sha256 verified, nothing on disk), as the flow
        runs it: `files_in_flight` files at once, their parts on one shared part pool.
        The plain functions are called (revision resolution via `resolve_revision.fn`, URLs via
        `tasks.stage.hub.file_url`, headers via `tasks.stage.hub.hub_headers`), not the Prefect flow, so no
        Prefect overhead is in the numbers. Timed from resolving the revision to the last file
        completed.
  a     the usual guides' approach: `huggingface_hub.snapshot_download(local_dir=...)` of the
        same file selection to disk, then `upload_file` of each file, one after the other,
        with boto3's default TransferConfig. Timed from the download call to the last upload.
  b     the ceiling: `upload_file` (default TransferConfig) of the same bytes already on local
        disk (the folder the Hub serves), the files concurrently with the same max workers as
        ours and in the same order.

All three use the same S3 client (`tasks.core.aws.aws_client`), so what differs is the approach,
not client settings: over the stand-in's plain HTTP a default `boto3.client("s3")` would also
SHA-256 every request body for its signature, which it does not do against AWS (HTTPS), and
that would flatter ours against (a). `--plain-a` runs (a) with a default client instead.

Each run writes into its own fresh bucket (created before, checked and deleted after the timed
part), so nothing is skipped as already present; (a) downloads into a fresh folder each run.
After one untimed warm-up round (the first runs of a session were 20-30 % slower: cold
connections, threads, moto's first objects), the approaches run `--repeat` times,
interleaved, each going first in turn (ours a b, a b ours, b ours a, ...) to spread machine
noise; the report gives the median seconds and MB/s (payload / median seconds) of each, then
the ratios against the targets:

  ours/a time        <= 0.70   (ours takes at most 70% of the usual approach's time)
  ours/b throughput  >= 0.85   (ours reaches 85% of the from-disk upload ceiling)

Services: moto runs in its own process (`embedded.local_aws.local_aws`); the Hub runs in its
own process too (`python -m embedded.hub_server`) so its GIL does not slow the client. Every
process and temporary folder is removed at the end, also on an error, Ctrl-C or SIGTERM.

Run:  make bench     (= .venv/bin/python bench/stage.py)
      .venv/bin/python bench/stage.py --mb 60 --repeat 1      (a quick small run)
Options: --mb (payload MB, default 200), --repeat (default 5), --shards (default 4),
         --tmpdir (where the payload and downloads go; default: the system temp dir),
         --files-in-flight / --parts-in-flight / --part-size-mib (ours; default TransferSettings'),
         --no-warmup, --plain-a (see above).

Exit status: 0 when the report was printed, whether the targets pass or miss (it is a report,
not a test); 1 when a run failed (its error is printed) or the services could not start.
"""

from __future__ import annotations

import argparse
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from embedded.net import stop_process  # noqa: E402

# Before huggingface_hub is imported (it reads these once): no progress bars in the report.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

REPO_ID = "bench/model"
APPROACHES = ("ours", "a", "b")
LABELS = {
    "ours": "ours: streamed Hub->S3 (stream_file, files concurrent)",
    "a": "a: snapshot_download to disk, then upload_file one by one",
    "b": "b: upload_file from local disk, files concurrent (ceiling)",
}
TARGET_OURS_OVER_A_TIME = 0.70
TARGET_OURS_OVER_B_THROUGHPUT = 0.85
MB = 1_000_000


class _Terminated(Exception):
    pass


def _on_signal(signum, _frame):
    raise _Terminated(f"stopped by signal {signum}")


# -- services -------------------------------------------------------------------------------


def start_hub(folder: Path, log_path: Path, timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """The local Hub in its own process; returns it and its endpoint (from its `HF_ENDPOINT=` line)."""
    from embedded.net import free_port, wait_for_port

    port = free_port()
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "embedded.hub_server", "--repo", f"{REPO_ID}={folder}", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, text=True,
    )
    log.close()  # the child holds its own copy
    try:
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
        deadline = time.monotonic() + timeout  # the server hashes every file before it listens
        line = ""
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.5)
                break
            except queue.Empty:
                if proc.poll() is not None:
                    break
        if not line.startswith("HF_ENDPOINT="):
            err = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"the hub server did not start (exit {proc.poll()}, said {line!r}): {err}")
        endpoint = line.strip().partition("=")[2]
        wait_for_port(port, timeout=30, proc=proc)
        return proc, endpoint
    except BaseException:
        stop_process(proc)
        raise




# -- S3 buckets ------------------------------------------------------------------------------


def fresh_bucket(s3, approach: str, rep: int) -> str:
    name = f"bench-{approach}-{rep}-{os.urandom(4).hex()}"
    s3.create_bucket(Bucket=name)
    return name


def bucket_sizes(s3, bucket: str) -> dict[str, int]:
    sizes = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for obj in page.get("Contents", []):
            sizes[obj["Key"]] = obj["Size"]
    return sizes


def drop_bucket(s3, bucket: str) -> None:
    """Empty and delete a bench bucket (moto keeps objects in memory)."""
    try:
        for up in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []):
            try:  # an interrupted run's upload may complete meanwhile
                s3.abort_multipart_upload(Bucket=bucket, Key=up["Key"], UploadId=up["UploadId"])
            except s3.exceptions.ClientError:
                pass
        keys = list(bucket_sizes(s3, bucket))
        for i in range(0, len(keys), 1000):
            s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": k} for k in keys[i:i + 1000]], "Quiet": True})
        s3.delete_bucket(Bucket=bucket)
    except Exception as exc:  # cleanup must not hide the measurement
        print(f"  (could not delete bucket {bucket}: {exc})", flush=True)


# -- the three approaches --------------------------------------------------------------------


def _concurrently(fn, items, workers: int) -> list:
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="bench-file")
    try:
        results = list(pool.map(fn, items))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def run_ours(ctx: dict, bucket: str) -> float:
    from tasks.stage.hub import file_url, hub_headers, resolve_revision
    from tasks.stage.transfer import PrefixScan, http_pool, staging_order, stream_file

    s3, settings, source = ctx["s3_project"], ctx["settings"], ctx["source"]
    started = time.perf_counter()
    snapshot = resolve_revision.fn(source)
    headers = hub_headers(source)
    prefix = f"{snapshot.repo_id}/{snapshot.sha}"
    scan = PrefixScan.of(s3, bucket, prefix)  # as the flow's scan-staged-prefix task

    def one(f):
        with http_pool(settings.streams) as http:  # as tasks.stage.staging.stage_file
            return stream_file(
                s3, http, file_url(snapshot, f.path), headers, bucket, f"{prefix}/{f.path}", f, settings, parts, scan
            )

    files = staging_order(snapshot.files, settings)  # the flow's order and concurrency
    with settings.part_pool() as parts:
        results = _concurrently(one, files, settings.files_in_flight)
    seconds = time.perf_counter() - started
    skipped = [r.path for r in results if r.skipped]
    uploaded = sum(r.bytes_uploaded for r in results)
    if skipped or uploaded != ctx["total_bytes"]:
        raise RuntimeError(f"ours uploaded {uploaded} of {ctx['total_bytes']} bytes, skipped {skipped}")
    return seconds


def run_a(ctx: dict, bucket: str, rep: int) -> float:
    from huggingface_hub import snapshot_download

    s3 = ctx["s3_a"]
    local_dir = ctx["work"] / f"download-{rep}"
    try:
        started = time.perf_counter()
        got = Path(snapshot_download(
            REPO_ID, local_dir=local_dir, endpoint=ctx["endpoint"], allow_patterns=ctx["paths"], token=False,
        ))
        for path in ctx["paths"]:
            s3.upload_file(str(got / path), bucket, f"{ctx['prefix']}/{path}")
        return time.perf_counter() - started
    finally:
        shutil.rmtree(local_dir, ignore_errors=True)


def run_b(ctx: dict, bucket: str) -> float:
    from tasks.stage.transfer import staging_order

    s3, folder = ctx["s3_project"], ctx["folder"]
    paths = [f.path for f in staging_order(ctx["files"], ctx["settings"])]  # the same order as ours

    def one(path: str) -> None:
        s3.upload_file(str(folder / path), bucket, f"{ctx['prefix']}/{path}")

    started = time.perf_counter()
    _concurrently(one, paths, ctx["settings"].files_in_flight)
    return time.perf_counter() - started


def measure(ctx: dict, approach: str, rep: int) -> float:
    """One timed run into a fresh bucket; the bucket is checked (every file, right size) and dropped after."""
    admin = ctx["s3_project"]
    bucket = fresh_bucket(admin, approach, rep)
    try:
        if approach == "ours":
            seconds = run_ours(ctx, bucket)
        elif approach == "a":
            seconds = run_a(ctx, bucket, rep)
        else:
            seconds = run_b(ctx, bucket)
        got = bucket_sizes(admin, bucket)
        if got != ctx["expected"]:
            missing = sorted(set(ctx["expected"]) - set(got))
            wrong = sorted(k for k in got if k in ctx["expected"] and got[k] != ctx["expected"][k])
            extra = sorted(set(got) - set(ctx["expected"]))
            raise RuntimeError(f"bucket content differs: missing {missing}, wrong size {wrong}, unexpected {extra}")
        return seconds
    finally:
        drop_bucket(admin, bucket)


# -- report ----------------------------------------------------------------------------------


def report(ctx: dict, times: dict[str, list[float]], failures: list[str]) -> None:
    total = ctx["total_bytes"]
    median = {a: statistics.median(times[a]) for a in APPROACHES if times[a]}
    print()
    print(f"{'approach':<60} {'median s':>9} {'MB/s':>8}  runs (s)")
    for a in APPROACHES:
        runs = " ".join(f"{t:.2f}" for t in times[a]) or "-"
        if a in median:
            print(f"{LABELS[a]:<60} {median[a]:>9.2f} {total / MB / median[a]:>8.1f}  {runs}")
        else:
            print(f"{LABELS[a]:<60} {'-':>9} {'-':>8}  {runs}")
    print()
    if "ours" in median and "a" in median:
        r = median["ours"] / median["a"]
        verdict = "PASS" if r <= TARGET_OURS_OVER_A_TIME else "MISS"
        print(f"ours/a time:        {r:.2f}  (target <= {TARGET_OURS_OVER_A_TIME:.2f})  {verdict}")
    else:
        print(f"ours/a time:        n/a   (target <= {TARGET_OURS_OVER_A_TIME:.2f})  no result")
    if "ours" in median and "b" in median:
        r = (total / median["ours"]) / (total / median["b"])
        verdict = "PASS" if r >= TARGET_OURS_OVER_B_THROUGHPUT else "MISS"
        print(f"ours/b throughput:  {r:.2f}  (target >= {TARGET_OURS_OVER_B_THROUGHPUT:.2f})  {verdict}")
    else:
        print(f"ours/b throughput:  n/a   (target >= {TARGET_OURS_OVER_B_THROUGHPUT:.2f})  no result")
    if failures:
        print(f"\n{len(failures)} run(s) failed:")
        for f in failures:
            print(f"  {f}")


# -- main ------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=200, help="payload size in MB (10^6 bytes); default 200")
    parser.add_argument("--repeat", type=int, default=5, help="runs of each approach, interleaved; default 5")
    parser.add_argument("--shards", type=int, default=4, help="safetensors shards the payload is split into; default 4")
    parser.add_argument("--tmpdir", default=None, help="where the payload and downloads go (default: system temp)")
    parser.add_argument("--files-in-flight", type=int, help="ours (and b's file concurrency); default: TransferSettings'")
    parser.add_argument("--parts-in-flight", type=int, help="ours; default: TransferSettings'")
    parser.add_argument("--part-size-mib", type=int, help="ours; default: TransferSettings'")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first round")
    parser.add_argument("--plain-a", action="store_true", help="(a) with a default boto3.client('s3'), as the guides write it")
    args = parser.parse_args(argv)
    if args.mb <= 0 or args.repeat < 1 or args.shards < 1:
        parser.error("--mb must be > 0, --repeat and --shards >= 1")

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    import boto3
    from boto3.s3.transfer import TransferConfig

    from blocks.model_source import ModelSource
    from embedded.local_aws import local_aws
    from embedded.tiny_model import make_tiny_model
    from tasks.core.aws import aws_client
    from tasks.stage.hub import resolve_revision
    from tasks.stage.transfer import TransferSettings

    settings = TransferSettings(**{k: v for k, v in (
        ("files_in_flight", args.files_in_flight), ("parts_in_flight", args.parts_in_flight), ("part_size_mib", args.part_size_mib),
    ) if v is not None})
    hub_proc = None
    failures: list[str] = []
    times: dict[str, list[float]] = {a: [] for a in APPROACHES}
    work = Path(tempfile.mkdtemp(prefix="bench-stage-", dir=args.tmpdir))
    try:
        folder = work / "model"
        t0 = time.perf_counter()
        make_tiny_model(folder, shards=args.shards, extra_bytes=int(args.mb * MB))
        print(f"payload made in {time.perf_counter() - t0:.1f}s under {folder}", flush=True)

        with local_aws() as aws:
            hub_proc, endpoint = start_hub(folder, work / "hub.log")
            os.environ["HF_ENDPOINT"] = endpoint
            print(f"moto S3 at {aws.endpoint} (pid of its own); hub at {endpoint} (pid {hub_proc.pid})", flush=True)

            source = ModelSource(repo_id=REPO_ID)
            snapshot = resolve_revision.fn(source)  # the selection all three approaches copy (also warms up)
            prefix = f"{snapshot.repo_id}/{snapshot.sha}"
            paths = [f.path for f in snapshot.files]
            total = snapshot.total_bytes
            ctx = {
                "settings": settings, "source": source, "endpoint": endpoint, "folder": folder, "work": work,
                "paths": paths, "files": snapshot.files, "prefix": prefix, "total_bytes": total,
                "expected": {f"{prefix}/{f.path}": f.size for f in snapshot.files},
                "s3_project": aws_client("s3"),  # ours, b and the bucket admin
                "s3_a": boto3.client("s3") if args.plain_a else aws_client("s3"),
            }
            tc = TransferConfig()
            print(
                f"payload: {len(paths)} files, {total / MB:.1f} MB ({args.shards} safetensors shards), "
                f"{REPO_ID}@{snapshot.sha[:12]}\n"
                f"ours: files_in_flight={settings.files_in_flight} parts_in_flight={settings.parts_in_flight} "
                f"({settings.streams} streams shared by the files) "
                f"part_size={settings.part_size_mib} MiB; boto3 default TransferConfig: "
                f"chunk {tc.multipart_chunksize // (1 << 20)} MiB, {tc.max_request_concurrency} threads per file\n"
                f"S3 client of (a): {'default boto3.client(s3)' if args.plain_a else 'the project client, as ours and b'}\n"
                f"machine: {os.cpu_count()} CPUs; {args.repeat} run(s) of each, interleaved",
                flush=True,
            )
            for rep in range(0 if args.warmup else 1, args.repeat + 1):
                label = "warm-up" if rep == 0 else f"run {rep}/{args.repeat}"
                for approach in APPROACHES[rep % 3:] + APPROACHES[:rep % 3]:  # each goes first in turn
                    try:
                        seconds = measure(ctx, approach, rep)
                    except _Terminated:
                        raise
                    except Exception as exc:
                        failures.append(f"{label} {approach}: {type(exc).__name__}: {exc}")
                        print(f"{label}  {approach:<4}  FAILED: {type(exc).__name__}: {exc}", flush=True)
                        traceback.print_exc()
                        continue
                    if rep:
                        times[approach].append(seconds)
                    print(f"{label}  {approach:<4}  {seconds:7.2f} s  {total / MB / seconds:7.1f} MB/s", flush=True)
            report(ctx, times, failures)
    except (_Terminated, KeyboardInterrupt) as exc:
        print(f"bench interrupted: {exc or 'Ctrl-C'}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(f"bench could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup even if signalled again
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        stop_process(hub_proc)  # moto is stopped by local_aws's exit
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
