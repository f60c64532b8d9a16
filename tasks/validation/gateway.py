"""Validate's checks of a stack's tool gateway (docs/gateway.md), run as its two check tenants (`validate-a`,
`validate-b`, whose tool sets are gateway/check_tools.py's) through the gateway's public API only.

Each check forces the first call with a named `tool_choice` (the gateway honours it on turn 1; later turns are
`auto`), so what is judged is the gateway's behaviour, read from the response's `metadata` (each call's
outcome, the rounds) and the answer, not whether a small model on one CPU's numerics decides to call a tool:

    gateway-readiness       /health; each check tenant's /v1/models is its model; a wrong key gets 401
    gateway-isolation       each tenant's /v1/tools lists its own tools only; naming the other tenant's tool is a 400
    gateway-multi-step      a tool returns a code the model cannot guess (made from the tool set's seed); the final
                            answer, in a later round, quotes it: the tool ran and its result reached the model
    gateway-tool-timeout    a tool that sleeps past its 1 s timeout: outcome `timeout` in about 1 s, and an answer
    gateway-tool-error      a tool that raises: outcome `error` with the exception, and an answer
    gateway-bad-arguments   a tool whose schema no call meets (guided decoding ignores `not`; the gateway's
                            check does not): outcome `rejected` (the tool, which fails loudly if run, never ran)
    gateway-streaming       the same multi-step request streamed: content in several chunks after the tool round's
                            progress comment, a last chunk with `metadata`, then [DONE]
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, SecretStr

from blocks.model_store import ModelStore
from gateway.check_tools import PICKUP_CODE_TOOL, SLOW_TIMEOUT_S, pickup_code, seed_of
from tasks.core.s3 import s3_client, split_s3
from tasks.core.secrets import read_secret
from tasks.validation.checks import CheckResult

TENANT_A, TENANT_B = "validate-a", "validate-b"
_TASK = dict(cache_policy=NO_CACHE)
MAX_TOKENS = 64
# A forced call's result must be back within its timeout plus this (thread hand-off, scheduling on a busy CPU).
TIMEOUT_SLACK_S = 2.0
QUESTION = "What is the pickup code of order A-1042?"


class GatewayTarget(BaseModel):
    """What the checks need: the gateway's URL, the check tenants' keys and model, and the seed of their tools."""

    url: str
    api_keys: dict[str, SecretStr]  # tenant -> one of its API keys (not `keys`: dict(model) would take it for a mapping)
    model: str
    seed: str
    toolsets: dict[str, list[str]]  # tenant -> its tool names, as deployed

    @property
    def code(self) -> str:
        return pickup_code(self.seed, "a")


def _result(name: str, started: float, problems: list[str], **details: Any) -> CheckResult:
    res = CheckResult(name=name, passed=not problems, seconds=round(time.perf_counter() - started, 3), details=details,
                      problems=problems)
    logger = get_run_logger()
    (logger.info if res.passed else logger.error)("%s: %s%s", name, "passed" if res.passed else "FAILED",
                                                  "" if res.passed else ": " + "; ".join(problems))
    return res


def _auth(key: str | SecretStr) -> dict[str, str]:
    return {"Authorization": f"Bearer {key.get_secret_value() if isinstance(key, SecretStr) else key}"}


def _chat(http: httpx.Client, t: GatewayTarget, tool: str, content: str = QUESTION, **extra: Any) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": content}], "tool_choice": {"type": "function", "function": {"name": tool}},
            "max_tokens": MAX_TOKENS, "temperature": 0, **extra}
    return http.post(f"{t.url}/v1/chat/completions", json=body, headers=_auth(t.api_keys[TENANT_A]))


def _first_call(body: dict[str, Any]) -> dict[str, Any]:
    rounds = (body.get("metadata") or {}).get("rounds") or []
    calls = rounds[0].get("tool_calls") if rounds else None
    return calls[0] if calls else {}


def _answer(body: dict[str, Any]) -> str:
    choices = body.get("choices") or [{}]
    return (choices[0].get("message") or {}).get("content") or ""


def _forced(http: httpx.Client, t: GatewayTarget, name: str, tool: str, outcome: str, problems: list[str]) -> dict[str, Any]:
    """One forced call of `tool`; a problem for anything but a 200 whose first call had `outcome`."""
    resp = _chat(http, t, tool)
    if resp.status_code != 200:
        problems.append(f"{name}: HTTP {resp.status_code}: {resp.text[:300]}")
        return {}
    body = resp.json()
    call = _first_call(body)
    if call.get("name") != tool or call.get("outcome") != outcome:
        problems.append(f"the first call should be {tool} with outcome {outcome!r}, metadata says {call or 'no call'}")
    if not (body.get("metadata") or {}).get("stopped"):
        problems.append(f"no final answer: metadata.stopped is {body.get('metadata', {}).get('stopped')!r}")
    return body


@task(name="gateway-readiness", **_TASK)
def gateway_readiness(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    with httpx.Client(timeout=30) as http:
        health = http.get(f"{t.url}/health")
        if health.status_code != 200:
            problems.append(f"/health answered {health.status_code}")
        for tenant, key in sorted(t.api_keys.items()):
            models = http.get(f"{t.url}/v1/models", headers=_auth(key))
            ids = [m.get("id") for m in models.json().get("data", [])] if models.status_code == 200 else []
            if ids != [t.model]:
                problems.append(f"{tenant}'s /v1/models should list only {t.model!r}: HTTP {models.status_code} {ids}")
        wrong = http.post(f"{t.url}/v1/chat/completions", headers=_auth("sk-not-a-tenant-key-000000"),
                          json={"messages": [{"role": "user", "content": "hi"}]})
        if wrong.status_code != 401:
            problems.append(f"a wrong key got HTTP {wrong.status_code}, not 401")
    return _result("gateway-readiness", started, problems, tenants=sorted(t.api_keys), model=t.model)


@task(name="gateway-isolation", **_TASK)
def gateway_isolation(t: GatewayTarget) -> CheckResult:
    started, problems, seen = time.perf_counter(), [], {}
    with httpx.Client(timeout=30) as http:
        for me, other in ((TENANT_A, TENANT_B), (TENANT_B, TENANT_A)):
            resp = http.get(f"{t.url}/v1/tools", headers=_auth(t.api_keys[me]))
            names = sorted(d["function"]["name"] for d in resp.json().get("data", [])) if resp.status_code == 200 else []
            seen[me] = names
            if names != sorted(t.toolsets[me]):
                problems.append(f"{me}'s /v1/tools lists {names}, not its own tools {sorted(t.toolsets[me])}")
            foreign = t.toolsets[other][0]
            forced = http.post(f"{t.url}/v1/chat/completions", headers=_auth(t.api_keys[me]), json={
                "messages": [{"role": "user", "content": "Call the tool."}],
                "tool_choice": {"type": "function", "function": {"name": foreign}}, "max_tokens": 16})
            if forced.status_code != 400:
                problems.append(f"{me} naming {other}'s tool {foreign} got HTTP {forced.status_code}, not 400: {forced.text[:200]}")
    return _result("gateway-isolation", started, problems, tools=", ".join(f"{k}: {v}" for k, v in seen.items()))


@task(name="gateway-multi-step", **_TASK)
def gateway_multi_step(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    with httpx.Client(timeout=180) as http:
        body = _forced(http, t, "multi-step", PICKUP_CODE_TOOL, "ok", problems)
    meta, answer = body.get("metadata") or {}, _answer(body)
    if body and len(meta.get("rounds") or []) < 2:
        problems.append(f"one round only: the answer should come after the tool's result ({meta.get('rounds')})")
    if body and t.code not in answer:
        problems.append(f"the answer does not quote the code {t.code} only the tool knows: {answer[:200]!r}")
    return _result("gateway-multi-step", started, problems, answer=answer[:200], rounds=len(meta.get("rounds") or []),
                   overhead_ms=meta.get("overhead_ms"))


@task(name="gateway-tool-timeout", **_TASK)
def gateway_tool_timeout(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    with httpx.Client(timeout=180) as http:
        body = _forced(http, t, "tool-timeout", "slow_lookup", "timeout", problems)
    latency = _first_call(body).get("latency_ms")
    if latency is not None and not SLOW_TIMEOUT_S * 1000 <= latency <= (SLOW_TIMEOUT_S + TIMEOUT_SLACK_S) * 1000:
        problems.append(f"the timed-out call took {latency:.0f} ms; its timeout is {SLOW_TIMEOUT_S:g} s")
    return _result("gateway-tool-timeout", started, problems, latency_ms=latency, answer=_answer(body)[:120])


@task(name="gateway-tool-error", **_TASK)
def gateway_tool_error(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    with httpx.Client(timeout=180) as http:
        body = _forced(http, t, "tool-error", "broken_lookup", "error", problems)
    error = _first_call(body).get("error") or ""
    if body and "RuntimeError" not in error:
        problems.append(f"the error should name the tool's exception, it says {error[:200]!r}")
    return _result("gateway-tool-error", started, problems, error=error[:120], answer=_answer(body)[:120])


@task(name="gateway-bad-arguments", **_TASK)
def gateway_bad_arguments(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    with httpx.Client(timeout=180) as http:
        body = _forced(http, t, "bad-arguments", "strict_lookup", "rejected", problems)
    error = _first_call(body).get("error") or ""
    if body and "do not match the schema" not in error:
        problems.append(f"the rejection should say the arguments do not match the schema: {error[:200]!r}")
    return _result("gateway-bad-arguments", started, problems, error=error[:160])


@task(name="gateway-streaming", **_TASK)
def gateway_streaming(t: GatewayTarget) -> CheckResult:
    started, problems = time.perf_counter(), []
    chunks, comments, content, meta, done, first_content_at = 0, [], [], None, False, None
    body = {"messages": [{"role": "user", "content": QUESTION}], "stream": True, "max_tokens": MAX_TOKENS, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": PICKUP_CODE_TOOL}}}
    with httpx.Client(timeout=180) as http, \
            http.stream("POST", f"{t.url}/v1/chat/completions", json=body, headers=_auth(t.api_keys[TENANT_A])) as resp:
        if resp.status_code != 200:
            problems.append(f"HTTP {resp.status_code}: {resp.read().decode(errors='replace')[:300]}")
        else:
            for line in resp.iter_lines():
                if line.startswith(":"):
                    comments.append(line[1:].strip())
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    problems.append(f"error event: {event['error']}")
                meta = event.get("metadata", meta)
                for choice in event.get("choices") or []:
                    if text := (choice.get("delta") or {}).get("content"):
                        chunks += 1
                        content.append(text)
                        first_content_at = first_content_at or time.perf_counter()
    answer = "".join(content)
    if resp.status_code == 200:
        if not done:
            problems.append("the stream did not end with [DONE]")
        if chunks < 2:
            problems.append(f"the answer came in {chunks} content chunk(s), not streamed")
        if not any(c.startswith(f"round 1 tool {PICKUP_CODE_TOOL} ok") for c in comments):
            problems.append(f"no progress comment for the tool round: {comments[:3]}")
        call = _first_call({"metadata": meta}) if meta else {}
        if call.get("name") != PICKUP_CODE_TOOL or call.get("outcome") != "ok":
            problems.append(f"the last chunk's metadata should report {PICKUP_CODE_TOOL} ok: {call or meta}")
    return _result("gateway-streaming", started, problems, chunks=chunks, quotes_code=t.code in answer, answer=answer[:160],
                   ttft_s=round(first_content_at - started, 2) if first_content_at else None)


CHECKS = (gateway_readiness, gateway_isolation, gateway_multi_step, gateway_tool_timeout, gateway_tool_error,
          gateway_bad_arguments, gateway_streaming)


def gateway_checks(t: GatewayTarget) -> list[CheckResult]:
    """Every gateway check, in order; one that cannot reach the gateway is a failed check, not a crash."""
    results = []
    for check in CHECKS:
        try:
            results.append(check(t))
        except (httpx.HTTPError, ValueError) as exc:
            name = check.name
            results.append(CheckResult(name=name, passed=False, seconds=0.0, problems=[f"{type(exc).__name__}: {exc}"]))
    return results


def gateway_target(url: str, tenants_secret: str, store: ModelStore, region: str | None = None) -> GatewayTarget | None:
    """The check tenants of a deployed gateway, from its tenants secret and their stored tool sets; None when
    it was deployed without them (ToolGateway.checks=False)."""
    tenants = json.loads(read_secret(tenants_secret, store.credentials, region).get_secret_value())["tenants"]
    if TENANT_A not in tenants or TENANT_B not in tenants:
        return None
    s3, toolsets, seed = s3_client(store), {}, None
    for name in (TENANT_A, TENANT_B):
        bucket, key = split_s3(tenants[name]["toolset"])
        doc = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        toolsets[name] = [tool["name"] for tool in doc["tools"]]
        seed = seed or seed_of(doc)
    return GatewayTarget(url=url, api_keys={n: SecretStr(tenants[n]["api_keys"][0]) for n in (TENANT_A, TENANT_B)},
                         model=tenants[TENANT_A]["model"], seed=seed or "", toolsets=toolsets)
