"""The validate flow's checks, each a Prefect task returning a CheckResult (pass/fail, timings, details)."""

from __future__ import annotations

import re
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field, PositiveFloat

from tasks.core.endpoint import Endpoint, EndpointError, Reply
from tasks.validation.suite import SUITE_CONCURRENCY, CaseResult, Gate, Suite, run_suite

_TASK = dict(cache_policy=NO_CACHE)
GAUGES = ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
          "vllm:prompt_tokens_total", "vllm:generation_tokens_total")


class CheckResult(BaseModel):
    name: str
    passed: bool
    seconds: float
    details: dict = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)


class Samples(BaseModel):
    """Latency samples of streamed requests, in seconds."""

    ttft: list[float] = Field(default_factory=list)
    tpot: list[float] = Field(default_factory=list)
    e2e: list[float] = Field(default_factory=list)

    def add(self, reply: Reply) -> None:
        if reply.ttft is not None:
            self.ttft.append(reply.ttft)
        if reply.tpot is not None:
            self.tpot.append(reply.tpot)
        self.e2e.append(reply.e2e)

    def extend(self, other: "Samples") -> None:
        self.ttft += other.ttft
        self.tpot += other.tpot
        self.e2e += other.e2e


class LatencyThresholds(BaseModel):
    """p95 limits in milliseconds; None: not checked. Defaults suit a 2-core CPU test run."""

    ttft_p95_ms: PositiveFloat | None = 30_000
    tpot_p95_ms: PositiveFloat | None = 2_000
    e2e_p95_ms: PositiveFloat | None = 120_000


def _result(name: str, started: float, problems: list[str], **details) -> CheckResult:
    res = CheckResult(name=name, passed=not problems, seconds=round(time.perf_counter() - started, 3), details=details, problems=problems)
    logger = get_run_logger()
    (logger.info if res.passed else logger.error)("%s: %s%s", name, "passed" if res.passed else "FAILED", "" if res.passed else ": " + "; ".join(problems))
    return res


@task(name="check-readiness", **_TASK)
def check_readiness(ep: Endpoint, expected_max_model_len: int | None) -> CheckResult:
    started, problems, details = time.perf_counter(), [], {}
    health = ep.get("/health", auth=False)
    if health.status_code != 200:
        problems.append(f"/health answered {health.status_code}")
    models = ep.get("/v1/models")
    if models.status_code != 200:
        problems.append(f"/v1/models answered {models.status_code}: {models.text[:200]}")
    else:
        cards = {m["id"]: m for m in models.json().get("data", [])}
        details["models"] = sorted(cards)
        card = cards.get(ep.model)
        if card is not None and card.get("max_model_len") is None and card.get("parent") in cards:
            card = {**card, "max_model_len": cards[card["parent"]].get("max_model_len")}  # a LoRA adapter's card
        if card is None:
            problems.append(f"served name {ep.model!r} not in /v1/models {sorted(cards)}")
        elif expected_max_model_len and card.get("max_model_len") != expected_max_model_len:
            problems.append(f"max_model_len is {card.get('max_model_len')}, configured {expected_max_model_len}")
        else:
            details["max_model_len"] = card.get("max_model_len") if card else None
    metrics = ep.get("/metrics", auth=False)
    if metrics.status_code == 200:
        gauges = {}
        for line in metrics.text.splitlines():
            m = re.match(r"^([a-z_:]+)(\{[^}]*\})?\s+([-0-9.eE+]+)$", line)
            if m and m[1] in GAUGES:
                gauges[m[1]] = gauges.get(m[1], 0.0) + float(m[3])
        details["metrics"] = gauges
        if not gauges:
            problems.append("/metrics has none of the vLLM gauges " + ", ".join(GAUGES))
    else:
        problems.append(f"/metrics answered {metrics.status_code}")
    return _result("readiness", started, problems, **details)


_PROMPTS = [
    "Say hello.",
    "List three fruits.",
    "Explain in two sentences what a GPU is and why it helps machine learning.",
    "Write a short paragraph about the history of Paris, covering its founding, the middle ages, the revolution "
    "and the modern city, in plain language for a student.",
]


@task(name="warm-up", **_TASK)
def warm_up(ep: Endpoint, requests: int = 8, concurrency: int = 4) -> tuple[CheckResult, Samples]:
    """Pay first-request costs before users do; TTFT of one request before and after."""
    started, problems, samples = time.perf_counter(), [], Samples()
    before = ep.chat({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}, stream=True)

    def one(i: int) -> Reply:
        return ep.chat({"messages": [{"role": "user", "content": _PROMPTS[i % len(_PROMPTS)]}], "max_tokens": 24}, stream=True)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        replies = list(pool.map(one, range(requests)))
    failed = [r.status for r in replies if r.status != 200]
    if before.status != 200 or failed:
        problems.append(f"warm-up requests failed with HTTP {failed or before.status}")
    for r in replies:
        samples.add(r)
    after = ep.chat({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "temperature": 0}, stream=True)
    samples.add(after)
    return _result("warm-up", started, problems, requests=requests, concurrency=concurrency,
                   ttft_before_ms=round((before.ttft or 0) * 1000, 1), ttft_after_ms=round((after.ttft or 0) * 1000, 1)), samples


@task(name="smoke", **_TASK)
def smoke(ep: Endpoint) -> CheckResult:
    started, problems, details = time.perf_counter(), [], {}
    chat = ep.chat({"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32, "temperature": 0})
    problems += _usage_problems("chat", chat, 32)
    details["chat"] = chat.content[:120]
    text = ep.completion({"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0})
    problems += _usage_problems("completion", text, 16)
    details["completion"] = text.content[:120]
    capped = ep.chat({"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 5,
                      "temperature": 0, "ignore_eos": True})
    used = (capped.usage or {}).get("completion_tokens")
    if capped.status != 200 or used != 5 or capped.finish_reason != "length":
        problems.append(f"max_tokens=5 not respected: HTTP {capped.status}, completion_tokens={used}, finish_reason={capped.finish_reason}")
    wrong = ep.post_raw("/v1/chat/completions", {"model": ep.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
                        headers={"Authorization": "Bearer not-the-key"})
    details["wrong_key_status"] = wrong.status_code
    if wrong.status_code != 401:
        problems.append(f"a request with a wrong API key got HTTP {wrong.status_code}, expected 401")
    return _result("smoke", started, problems, **details)


def _usage_problems(what: str, reply: Reply, max_tokens: int) -> list[str]:
    if reply.status != 200:
        return [f"{what}: HTTP {reply.status}: {str(reply.body)[:200]}"]
    problems = []
    if not reply.content.strip():
        problems.append(f"{what}: empty output")
    u = reply.usage or {}
    if not u or u.get("prompt_tokens", 0) <= 0 or u.get("total_tokens") != u.get("prompt_tokens", 0) + u.get("completion_tokens", 0):
        problems.append(f"{what}: usage does not add up: {u}")
    if u.get("completion_tokens", 0) > max_tokens:
        problems.append(f"{what}: {u.get('completion_tokens')} completion tokens > max_tokens {max_tokens}")
    return problems


@task(name="streaming", **_TASK)
def streaming(ep: Endpoint, requests: int = 3) -> tuple[CheckResult, Samples]:
    started, problems, samples = time.perf_counter(), [], Samples()
    itl: list[float] = []
    for i in range(requests):
        r = ep.chat({"messages": [{"role": "user", "content": _PROMPTS[2 + i % 2]}], "max_tokens": 48, "temperature": 0}, stream=True)
        if r.status != 200:
            problems.append(f"stream {i}: HTTP {r.status}")
            continue
        samples.add(r)
        itl += r.itl
        n = (r.usage or {}).get("completion_tokens", 0)
        if r.chunks < 2:
            problems.append(f"stream {i}: {r.chunks} content chunk(s): not incremental")
        if not r.content.strip() or r.finish_reason not in ("stop", "length"):
            problems.append(f"stream {i}: incomplete message (finish_reason={r.finish_reason}, {len(r.content)} chars)")
        if n and r.chunks > n + 1:
            problems.append(f"stream {i}: {r.chunks} chunks for {n} tokens")
    return _result("streaming", started, problems, requests=requests,
                   ttft_ms=_ms(samples.ttft, 50), itl_p50_ms=_ms(itl, 50), itl_p95_ms=_ms(itl, 95)), samples


@task(name="tool-calling-suite", **_TASK)
def tool_suite(ep: Endpoint, suite: Suite, gate: Gate, concurrency: int = SUITE_CONCURRENCY) -> tuple[CheckResult, list[CaseResult], Samples]:
    from tasks.validation.suite import gate_failures

    started = time.perf_counter()
    results = run_suite(ep, suite, gate.level, concurrency)
    samples = Samples(ttft=[r.ttft for r in results if r.ttft is not None], e2e=[r.seconds for r in results if r.ttft is not None])
    problems = gate_failures(results, gate)
    passed = sum(r.passed for r in results)
    return _result("tool-calling", started, problems, level=gate.level, cases=len(results), passed=passed), results, samples


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def _ms(values: list[float], p: float) -> float | None:
    v = percentile(values, p)
    return None if v is None else round(v * 1000, 1)


@task(name="latency-summary", **_TASK)
def latency_summary(samples: Samples, thresholds: LatencyThresholds) -> CheckResult:
    started, problems, details = time.perf_counter(), [], {}
    for metric in ("ttft", "tpot", "e2e"):
        values = getattr(samples, metric)
        for p in (50, 95, 99):
            details[f"{metric}_p{p}_ms"] = _ms(values, p)
        limit = getattr(thresholds, f"{metric}_p95_ms")
        got = details[f"{metric}_p95_ms"]
        if limit is not None and got is not None and got > limit:
            problems.append(f"{metric} p95 {got:.0f} ms > threshold {limit:.0f} ms")
    details["samples"] = len(samples.e2e)
    return _result("latency", started, problems, **details)


__all__ = ["CheckResult", "EndpointError", "LatencyThresholds", "Samples", "check_readiness", "latency_summary",
           "smoke", "streaming", "tool_suite", "warm_up"]
