"""The tool gateway (gateway/): every rule of its tool loop, tenants, streaming, metrics, its built-in tools
and tool-set loading, against a scripted OpenAI-compatible stand-in for vLLM (no model runs here).

The stand-in answers each chat request with the next step of a script (tool calls, or an answer) and
records what it received, so a test sees exactly what the model would have been shown. The gateway runs
as a real HTTP server (uvicorn in a thread), so streaming is real streaming. Tools with side effects
record their calls in CALLS: "never executed" is checked there. Moto (the session's local AWS) holds the
Secrets Manager secrets and the S3 tool set of the webhook case. ~15 s alone, 3.5 s of it starting
the session's moto server (shared with the other integration modules on a worker).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, RedirectResponse, StreamingResponse
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.builtin_tools import calculate, current_time, fetch
from gateway.settings import GatewaySettings
from gateway.toolset import load_toolset

pytestmark = pytest.mark.integration  # the webhook/S3/Secrets Manager case uses the moto server

REPO = Path(__file__).resolve().parents[1]
ACME_KEY, GLOBEX_KEY = "sk-acme-0123456789abcdef", "sk-globex-0123456789abcdef"
UPSTREAM_KEY = "upstream-key-0123456789"
ME = __name__  # the entry points below name this module as pytest imported it


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides tests/conftest.py's autouse Prefect test server for this module: the gateway has no Prefect."""
    yield


# ---------------------------------------------------------------- tools the tool sets point at

CALLS: list[tuple[str, Any]] = []


def record(n: int, note: str = "") -> dict[str, Any]:
    CALLS.append(("record", n))
    return {"recorded": n}


def nap(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)  # a sync tool: it runs in the gateway's thread pool
    CALLS.append(("nap", seconds))
    return {"slept": seconds}


def stall(seconds: float) -> dict[str, Any]:
    time.sleep(seconds)  # records nothing: a timed-out thread finishes after its test
    return {"slept": seconds}


def boom() -> None:
    raise RuntimeError("the CRM is down")


def globex_ledger() -> dict[str, Any]:
    CALLS.append(("globex_ledger", None))
    return {"balance": 1_000_000}


@pytest.fixture(autouse=True)
def _clear_calls():
    CALLS.clear()


def _python_tool(name: str, function: str, properties: dict | None = None, required=(), **extra) -> dict[str, Any]:
    return {"name": name, "description": f"test tool {name}", **extra,
            "parameters": {"type": "object", "properties": properties or {}, "required": list(required), "additionalProperties": False},
            "implementation": {"type": "python", "entry_point": f"{ME}:{function}"}}


ACME_TOOLS = [
    {"builtin": "calculate"},
    _python_tool("record", "record", {"n": {"type": "integer", "minimum": 0}, "note": {"type": "string"}}, ["n"]),
    _python_tool("nap", "nap", {"seconds": {"type": "number", "maximum": 5}}, ["seconds"], timeout_s=3),
    _python_tool("nap_limited", "stall", {"seconds": {"type": "number"}}, ["seconds"], timeout_s=0.3),
    _python_tool("stall", "stall", {"seconds": {"type": "number"}}, ["seconds"], timeout_s=5),
    _python_tool("boom", "boom"),
]
TENANTS = {"tenants": {
    "acme": {"api_keys": [ACME_KEY], "model": "acme-adapter", "toolset": {"tools": ACME_TOOLS}},
    "globex": {"api_keys": [GLOBEX_KEY], "model": "globex-adapter", "toolset": {"tools": [_python_tool("globex_ledger", "globex_ledger")]}},
}}


# ---------------------------------------------------------------- the scripted upstream


def calls(*pairs: tuple[str, Any], content: str | None = None) -> dict[str, Any]:
    """A turn that calls tools; a dict argument is sent as JSON, a str as it is (bad JSON included)."""
    return {"content": content, "tool_calls": [(name, args if isinstance(args, str) else json.dumps(args)) for name, args in pairs]}


def answer(text: str) -> dict[str, Any]:
    return {"content": text, "tool_calls": []}


def echo_tool_results(body: dict[str, Any]) -> dict[str, Any]:
    """The answer a model gives from what the tools returned: their contents, verbatim."""
    return answer(" | ".join(m["content"] for m in body["messages"] if m["role"] == "tool"))


USAGE = {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}


class FakeUpstream:
    """An OpenAI-compatible chat endpoint that plays a script; plus a webhook, pages and a redirect."""

    def __init__(self) -> None:
        self.script: list[Any] | Callable[[dict], dict] = []
        self.received: list[dict[str, Any]] = []
        self.auth: list[str | None] = []
        self.hooks: list[dict[str, Any]] = []
        self.chunk_delay = 0.0
        self.url = ""
        app = FastAPI()

        @app.post("/v1/chat/completions")
        async def chat(request: Request):
            body = await request.json()
            self.received.append(body)
            self.auth.append(request.headers.get("authorization"))
            step = self.script(body) if callable(self.script) else self.script.pop(0)
            step = step(body) if callable(step) else step
            if "status" in step:
                return JSONResponse({"error": {"message": "overloaded"}}, status_code=step["status"])
            if body.get("stream"):
                return StreamingResponse(self._sse(body, step), media_type="text/event-stream")
            message: dict[str, Any] = {"role": "assistant", "content": step["content"]}
            if step["tool_calls"]:
                message["tool_calls"] = [{"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": a}}
                                         for i, (n, a) in enumerate(step["tool_calls"])]
            return {"id": f"chatcmpl-{len(self.received)}", "object": "chat.completion", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if step["tool_calls"] else "stop"}],
                    "usage": USAGE}

        @app.api_route("/hook/{name}", methods=["GET", "POST"])
        async def hook(name: str, request: Request):
            self.hooks.append({"name": name, "auth": request.headers.get("authorization"), "body": await request.body()})
            if name == "fail":
                return JSONResponse({"detail": "backend exploded"}, status_code=500)
            return {"customer": "Ada", "tier": "gold"}

        @app.get("/page")
        async def page(size: int = 20):
            return PlainTextResponse("x" * size)

        @app.get("/redirect")
        async def redirect(to: str):
            return RedirectResponse(to, status_code=302)

        self.app = app

    async def _sse(self, body: dict[str, Any], step: dict[str, Any]):
        def event(delta: dict[str, Any], finish: str | None = None) -> str:
            return "data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}) + "\n\n"

        yield event({"role": "assistant", "content": ""})
        for word in (step["content"] or "").split(" ") if step["content"] else []:
            await asyncio.sleep(self.chunk_delay)
            yield event({"content": word + " "})
        for i, (name, args) in enumerate(step["tool_calls"]):  # in two pieces, as vLLM streams arguments
            yield event({"tool_calls": [{"index": i, "id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args[:3]}}]})
            yield event({"tool_calls": [{"index": i, "function": {"arguments": args[3:]}}]})
        yield event({}, "tool_calls" if step["tool_calls"] else "stop")
        yield "data: " + json.dumps({"id": "chatcmpl-s", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                                     "choices": [], "usage": USAGE}) + "\n\n"
        yield "data: [DONE]\n\n"


@contextmanager
def serve(app: FastAPI) -> Iterator[str]:
    """An ASGI app on a free 127.0.0.1 port, in a thread (lifespan included); its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture(scope="module")
def upstream() -> Iterator[FakeUpstream]:
    fake = FakeUpstream()
    with serve(fake.app) as url:
        fake.url = url
        yield fake


@pytest.fixture()
def script(upstream):
    """The stand-in, its records cleared for this test."""
    upstream.received.clear()
    upstream.auth.clear()
    upstream.hooks.clear()
    upstream.chunk_delay = 0.0
    return upstream


@contextmanager
def gateway(upstream: FakeUpstream, tmp_path: Path, tenants: dict = TENANTS, **limits: Any) -> Iterator[str]:
    path = tmp_path / "tenants.json"
    path.write_text(json.dumps(tenants))
    settings = GatewaySettings(upstream_url=f"{upstream.url}/v1", upstream_api_key=UPSTREAM_KEY, tenants_file=path,
                               **{"max_rounds": 3, "deadline_s": 20, "tool_timeout_s": 2, **limits})
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture(scope="module")
def gw(upstream, tmp_path_factory) -> Iterator[str]:
    with gateway(upstream, tmp_path_factory.mktemp("gw")) as url:
        yield url


def chat(url: str, key: str | None = ACME_KEY, question: str = "question", **extra: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{url}/v1/chat/completions", headers=headers, timeout=30,
                      json={"messages": [{"role": "user", "content": question}], **extra})


def outcomes(response: httpx.Response) -> list[tuple[str, str]]:
    return [(c["name"], c["outcome"]) for r in response.json()["metadata"]["rounds"] for c in r["tool_calls"]]


def tool_messages(body: dict[str, Any]) -> list[str]:
    return [m["content"] for m in body["messages"] if m["role"] == "tool"]


# ---------------------------------------------------------------- the loop's rules, one case each


@dataclass
class Case:
    script: list[Any]
    outcomes: list[tuple[str, str]]
    said: list[str] = field(default_factory=list)  # what the model is shown as the tool results, in order (substrings)
    executed: list[tuple[str, Any]] = field(default_factory=list)


CASES = {
    "no_tools_needed": Case([answer("Paris.")], []),
    "result_fed_back": Case([calls(("calculate", {"expression": "6*7"})), echo_tool_results],
                            [("calculate", "ok")], ['"result": 42']),
    "bad_json_never_executed": Case([calls(("record", '{"n": 1')), echo_tool_results],
                                    [("record", "rejected")], ["not valid JSON"]),
    "schema_violation_never_executed": Case(
        [calls(("record", {"n": -1}), ("record", {"n": "one"}), ("record", {"n": 2, "extra": True}), ("record", {})), echo_tool_results],
        [("record", "rejected")] * 4, ["minimum of 0", "not of type 'integer'", "Additional properties", "'n' is a required property"]),
    "only_the_valid_call_runs": Case([calls(("record", {"n": 5}), ("record", {"n": -5})), echo_tool_results],
                                     [("record", "ok"), ("record", "rejected")], ['"recorded": 5', "minimum of 0"], [("record", 5)]),
    "unknown_tool": Case([calls(("drop_tables", {})), echo_tool_results], [("drop_tables", "rejected")], ["unknown tool 'drop_tables'"]),
    "exception_becomes_result": Case([calls(("boom", {})), echo_tool_results], [("boom", "error")], ["RuntimeError: the CRM is down"]),
    "timeout_becomes_result": Case([calls(("nap_limited", {"seconds": 1.0})), echo_tool_results],
                                   [("nap_limited", "timeout")], ["timed out after 0.3 s"]),
    "two_rounds": Case([calls(("record", {"n": 1})), calls(("record", {"n": 2})), answer("done")],
                       [("record", "ok"), ("record", "ok")], [], [("record", 1), ("record", 2)]),
}


@pytest.mark.parametrize("name", CASES)
def test_tool_loop_rule(name, gw, script):
    case = CASES[name]
    script.script = list(case.script)
    response = chat(gw)
    assert response.status_code == 200, response.text
    assert outcomes(response) == case.outcomes
    seen = tool_messages(script.received[-1])
    assert len(seen) == len(case.said) or not case.said
    for text, expected in zip(seen, case.said):
        assert expected in text, (expected, text)
    assert CALLS == case.executed  # bad calls, unknown tools: never executed
    metadata = response.json()["metadata"]
    assert metadata["tool_rounds"] == len(case.script) - 1 and metadata["stopped"] == "answer"
    assert metadata["usage"]["total_tokens"] == 15 * len(case.script)  # summed over every upstream call
    assert all(c["latency_ms"] >= 0 for r in metadata["rounds"] for c in r["tool_calls"])
    if name == "result_fed_back":  # the final answer is the upstream's, built from the tool's result
        assert '"result": 42' in response.json()["choices"][0]["message"]["content"]
        first = script.received[0]
        assert first["model"] == "acme-adapter" and first["tool_choice"] == "auto"
        assert script.auth[0] == f"Bearer {UPSTREAM_KEY}"  # the gateway's key upstream, not the client's
        follow_up = script.received[1]["messages"]
        assert follow_up[1]["tool_calls"][0]["function"] == {"name": "calculate", "arguments": '{"expression": "6*7"}'}
        assert follow_up[2]["tool_call_id"] == follow_up[1]["tool_calls"][0]["id"]


def test_independent_calls_run_concurrently(gw, script):
    """Two 0.5 s (sync, threaded) tools in one turn take ~0.5 s, not 1 s."""
    script.script = [calls(("nap", {"seconds": 0.5}), ("nap", {"seconds": 0.5})), answer("rested")]
    response = chat(gw)
    assert outcomes(response) == [("nap", "ok"), ("nap", "ok")] and CALLS == [("nap", 0.5), ("nap", 0.5)]
    tools_ms = response.json()["metadata"]["rounds"][0]["tools_ms"]
    assert 450 <= tools_ms < 850, tools_ms  # one after the other: >= 1000


@pytest.mark.parametrize("obeys_none", [True, False], ids=["forced_answer", "still_calling"])
def test_max_rounds(gw, script, obeys_none):
    """A model that keeps calling tools gets max_rounds tool rounds, then one call with tool_choice=none."""
    def always_tools(body):
        if body["tool_choice"] == "none" and obeys_none:
            return answer("giving up")
        return calls(("record", {"n": len(script.received)}))

    script.script = always_tools
    response = chat(gw, tool_choice="required")
    assert [b["tool_choice"] for b in script.received] == ["required", "auto", "auto", "none"]
    assert CALLS == [("record", 1), ("record", 2), ("record", 3)]  # the 4th turn's calls are never run
    if obeys_none:
        assert response.status_code == 200
        assert response.json()["metadata"]["stopped"] == "max_rounds"
        assert response.json()["metadata"]["tool_rounds"] == 3
    else:
        assert response.status_code == 502
        assert "after 3 rounds" in response.json()["error"]["message"]


def test_deadline(upstream, script, tmp_path):
    """The deadline cuts a tool's own (longer) timeout, and no upstream call starts after it: 504."""
    script.script = [calls(("stall", {"seconds": 2.0})), answer("never")]
    with gateway(upstream, tmp_path, deadline_s=0.8) as url:
        started = time.perf_counter()
        response = chat(url)
        wall = time.perf_counter() - started
    assert response.status_code == 504, response.text
    assert response.json()["error"]["type"] == "deadline_exceeded"
    assert [(c["name"], c["outcome"]) for c in response.json()["metadata"]["rounds"][0]["tool_calls"]] == [("stall", "timeout")]
    assert len(script.received) == 1 and wall < 1.9, wall  # the tool's own 5 s timeout would take 2 s


def test_requests_the_gateway_refuses(gw, script):
    script.script = []
    assert chat(gw, tools=[{"type": "function", "function": {"name": "x"}}]).status_code == 400
    assert chat(gw, model="globex-adapter").status_code == 400
    assert chat(gw, n=2).status_code == 400
    assert chat(gw, tool_choice={"type": "function", "function": {"name": "globex_ledger"}}).status_code == 400
    assert chat(gw, chat_template="{{ 'injected' }}").status_code == 400  # only sampling/output controls go upstream
    assert script.received == []
    script.script = [answer("ok")]
    assert chat(gw, temperature=0, max_tokens=7, stream_options={"include_usage": False}).status_code == 200
    assert (script.received[0]["temperature"], script.received[0]["max_tokens"]) == (0, 7)
    assert "stream_options" not in script.received[0]


# ---------------------------------------------------------------- tenants


def test_tenant_isolation(gw, script):
    def get(path, key):
        return httpx.get(f"{gw}{path}", headers={"Authorization": f"Bearer {key}"} if key else {}, timeout=10)

    acme = [t["function"]["name"] for t in get("/v1/tools", ACME_KEY).json()["data"]]
    globex = [t["function"]["name"] for t in get("/v1/tools", GLOBEX_KEY).json()["data"]]
    assert acme == ["calculate", "record", "nap", "nap_limited", "stall", "boom"] and globex == ["globex_ledger"]
    assert [m["id"] for m in get("/v1/models", ACME_KEY).json()["data"]] == ["acme-adapter"]
    for key in (None, "sk-nobody-0123456789abcdef", ACME_KEY[:-1], GLOBEX_KEY + "x"):
        assert get("/v1/tools", key).status_code == 401
        assert chat(gw, key=key).status_code == 401
    assert httpx.get(f"{gw}/v1/tools", headers={"Authorization": f"Basic {ACME_KEY}"}).status_code == 401

    # acme's model calls globex's tool: it is not acme's, so it is unknown, and never runs
    script.script = [calls(("globex_ledger", {})), echo_tool_results]
    response = chat(gw, key=ACME_KEY)
    assert outcomes(response) == [("globex_ledger", "rejected")] and CALLS == []
    assert all(b["model"] == "acme-adapter" for b in script.received)
    assert {t["function"]["name"] for b in script.received for t in b["tools"]} == set(acme)
    assert "globex" not in json.dumps(script.received[-1]["messages"][-1]).replace("'globex_ledger'", "")
    # and globex's own key runs it, with globex's model
    script.script = [calls(("globex_ledger", {})), echo_tool_results]
    assert outcomes(chat(gw, key=GLOBEX_KEY)) == [("globex_ledger", "ok")] and CALLS == [("globex_ledger", None)]
    assert script.received[-1]["model"] == "globex-adapter"


@pytest.mark.parametrize("document, error", [
    ({"tenants": {"a": {"api_keys": ["short"], "model": "m", "toolset": {"tools": []}}}}, "at least 16"),
    ({"tenants": {"a": {"api_keys": [ACME_KEY], "model": "m", "toolset": {"tools": []}},
                  "b": {"api_keys": [ACME_KEY], "model": "m", "toolset": {"tools": []}}}}, "appears twice"),
    ({"tenants": {"Bad Name": {"api_keys": [ACME_KEY], "model": "m", "toolset": {"tools": []}}}}, "tenant names"),
    ({"tenants": {"a": {"api_keys": [ACME_KEY], "model": "m", "toolset": {"tools": [{"builtin": "nope"}]}}}}, "no built-in tool"),
])
def test_bad_tenants_documents_stop_the_start(document, error):
    from gateway.tenants import TenantRegistry

    with pytest.raises(ValueError, match=error):
        TenantRegistry.from_document(document)


# ---------------------------------------------------------------- streaming and metrics


def _events(response: httpx.Response) -> tuple[list[tuple[float, str]], float]:
    started, lines = time.perf_counter(), []
    for line in response.iter_lines():
        if line:
            lines.append((time.perf_counter() - started, line))
    return lines, time.perf_counter() - started


def test_streaming_the_final_answer(gw, script):
    script.script = [calls(("calculate", {"expression": "6*7"})), answer("The answer is 42.")]
    script.chunk_delay = 0.15  # the answer's four words arrive 0.15 s apart
    with httpx.stream("POST", f"{gw}/v1/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"}, timeout=30,
                      json={"messages": [{"role": "user", "content": "6*7?"}], "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines, total = _events(response)
    assert all(b["stream"] for b in script.received)  # every round streamed upstream (tool-call deltas reassembled)
    assert json.loads(script.received[1]["messages"][1]["tool_calls"][0]["function"]["arguments"]) == {"expression": "6*7"}
    data = [(t, json.loads(line[5:])) for t, line in lines if line.startswith("data: {")]
    text = [(t, d["choices"][0]["delta"].get("content")) for t, d in data if d["choices"] and d["choices"][0]["delta"].get("content")]
    assert "".join(c for _, c in text).strip() == "The answer is 42."
    assert text[0][0] < total - 0.3, (text[0][0], total)  # the first words arrive before the answer is done
    assert any(line.startswith(": round 1 tool calculate ok") for _, line in lines)  # progress, as SSE comments
    assert data[0][1]["choices"][0]["delta"]["role"] == "assistant"
    assert data[-2][1]["choices"][0]["finish_reason"] == "stop"
    assert [(c["name"], c["outcome"]) for c in data[-1][1]["metadata"]["rounds"][0]["tool_calls"]] == [("calculate", "ok")]
    assert lines[-1][1] == "data: [DONE]"
    assert len({d["id"] for _, d in data}) == 1  # one stream id over all rounds


def test_streaming_errors(upstream, script, tmp_path):
    """Before any event the client gets a plain HTTP error; after a tool round's progress, an SSE error event."""
    def post(url):
        return httpx.post(f"{url}/v1/chat/completions", headers={"Authorization": f"Bearer {ACME_KEY}"}, timeout=30,
                          json={"messages": [{"role": "user", "content": "x"}], "stream": True})

    script.script = [{"status": 503}, calls(("stall", {"seconds": 2.0}))]
    with gateway(upstream, tmp_path, deadline_s=0.5) as url:
        refused = post(url)
        late = post(url)
    assert refused.status_code == 502 and refused.json()["error"]["type"] == "upstream_error"
    assert "HTTP 503" in refused.json()["error"]["message"]
    assert late.status_code == 200
    lines = [line for line in late.text.splitlines() if line]
    assert lines[1].startswith(": round 1 tool stall timeout")
    assert json.loads(lines[-2][5:])["error"]["type"] == "deadline_exceeded" and lines[-1] == "data: [DONE]"


def _samples(url: str) -> dict[tuple[str, tuple], float]:
    text = httpx.get(f"{url}/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_move(gw, script):
    before = _samples(gw)
    script.script = [calls(("record", {"n": 1}), ("record", {"n": "x"}), ("made_up", {})), answer("ok")]
    assert chat(gw).status_code == 200
    assert chat(gw, key="sk-nobody-0123456789abcdef").status_code == 401
    after = _samples(gw)

    def moved(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("gateway_chat_requests_total", tenant="acme", status="200") == 1
    assert moved("gateway_chat_requests_total", tenant="-", status="401") == 1
    assert moved("gateway_tool_rounds_total", tenant="acme") == 1
    assert moved("gateway_tool_calls_total", tenant="acme", tool="record", outcome="ok") == 1
    assert moved("gateway_tool_calls_total", tenant="acme", tool="record", outcome="rejected") == 1
    assert moved("gateway_tool_calls_total", tenant="acme", tool="<unknown>", outcome="rejected") == 1  # bounded labels
    assert moved("gateway_tool_latency_seconds_count", tool="record") == 2
    assert moved("gateway_upstream_latency_seconds_count") == 2
    assert moved("gateway_round_overhead_seconds_count") == 2
    assert httpx.get(f"{gw}/health").json() == {"status": "ok", "tenants": 2}


# ---------------------------------------------------------------- built-in tools


@pytest.mark.parametrize("expression, result", [
    ("2 + 3 * 4", 14), ("(17.5 * 3) - 2**10", -971.5), ("-7 // 2", -4), ("2**-1", 0.5), ("max(3, 9, 4) % 5", 4),
    ("round(sqrt(2) * pi, 4)", 4.4429), ("10**100 // 10**99", 10),
])
def test_calculator_evaluates_arithmetic(expression, result):
    assert calculate(expression)["result"] == result


@pytest.mark.parametrize("expression, error", [
    ("__import__('os')", "__import__()"), ("__import__('os').system('id')", "Call"), ("(1).__class__", "Attribute"), ("open('/etc/passwd')", "open()"),
    ("[1] * 10", "List"), ("x + 1", "x"), ("lambda: 1", "Lambda"), ("'a' * 3", "not a number"), ("True + 1", "not a number"),
    ("9**9**9", "exponent"), ("10**5000", "larger than 4096 bits"), ("2**4096", "over 4096 bits"), ("1e308 * 10", "not finite"),
    ("exp(1000)", "too large"), ("1/0", "division by zero"), ("1 +", "not an arithmetic expression"), ("1+" * 200 + "1", "longer than"),
    ("+".join(["1"] * 100), "more than 128 parts"),
])
def test_calculator_refuses_what_is_not_bounded_arithmetic(expression, error):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=re.escape(error)):
        calculate(expression)
    assert time.perf_counter() - started < 0.1


def test_clock():
    paris = current_time("Europe/Paris")
    assert paris["utc_offset"] in ("+0100", "+0200") and paris["weekday"]
    with pytest.raises(ValueError, match="unknown time zone"):
        current_time("Mars/Olympus_Mons")
    with pytest.raises(ValueError, match="unknown time zone"):
        current_time("../../etc/passwd")


def test_fetch_reaches_only_allowed_hosts(upstream):
    page = f"{upstream.url}/page"
    ok = asyncio.run(fetch(page, allowed_hosts=["127.0.0.1"]))
    assert ok["status"] == 200 and ok["text"] == "x" * 20 and not ok["truncated"]
    big = asyncio.run(fetch(f"{page}?size=5000", allowed_hosts=["127.0.0.1"], max_bytes=1000))
    assert big["truncated"] and len(big["text"]) == 1000
    refused = {
        "not on the list": (page, ["example.com"]),
        "a redirect off the list": (f"{upstream.url}/redirect?to=https://evil.example/x", ["127.0.0.1"]),
        "plain http to a remote host": ("http://example.com/", ["example.com"]),
        "credentials in the URL": ("https://user:pw@example.com/", ["example.com"]),
        "a subdomain wildcard is not its parent": ("https://example.com/", ["*.example.com"]),
    }
    for why, (url, allowed) in refused.items():
        with pytest.raises(ValueError):
            asyncio.run(fetch(url, allowed_hosts=allowed))
            pytest.fail(why)
    followed = asyncio.run(fetch(f"{upstream.url}/redirect?to=/page", allowed_hosts=["127.0.0.1"]))
    assert followed["url"].endswith("/page") and followed["text"] == "x" * 20


# ---------------------------------------------------------------- tool sets


def _tool(**implementation: Any) -> dict[str, Any]:
    return {"name": "t", "parameters": {"type": "object", "properties": {"url": {"type": "string"}}},
            "implementation": implementation}


@pytest.mark.parametrize("tools, error", [
    ([{"builtin": "calculate"}, {"builtin": "calculate"}], "unique"),
    ([{**_tool(type="python", entry_point=f"{ME}:record"), "parameters": {"type": "object", "properties": {"n": {"type": "strin"}}}}],
     "not a valid JSON schema"),
    ([{**_tool(type="python", entry_point=f"{ME}:record"), "parameters": {"type": "string"}}], "type object"),
    ([_tool(type="python", entry_point="no_such_package.mod:fn")], "does not import"),
    ([_tool(type="python", entry_point="gateway.builtin_tools")], "not package.module:function"),
    ([_tool(type="python", entry_point=f"{ME}:record")], r"takes no argument\(s\) \['url'\]"),
    ([{"builtin": "fetch"}], r"needs \['allowed_hosts'\]"),
    ([{"builtin": "fetch", "implementation": {"bind": {"allowed_hosts": ["a.com"], "url": "x"}}}], "both bound by the tool set"),
    ([_tool(type="webhook", url="http://crm.example.com/hook")], "only https"),
    ([{**_tool(type="webhook", url="https://crm.example.com/hook"), "name": "has space"}], "1-64 letters"),
    ([_tool(type="webhook", url="https://x.example/h", headers={"A": {"secret": "s", "template": "Bearer"}})], r"contain \{value\}"),
])
def test_bad_tool_sets_are_refused_at_load(tools, error):
    with pytest.raises(ValueError, match=error):
        load_toolset({"tools": tools})


def test_builtin_tool_with_bound_allow_list(tmp_path, upstream):
    path = tmp_path / "tools.yaml"
    path.write_text(yaml.safe_dump({"tools": [{"builtin": "fetch", "timeout_s": 3, "implementation": {"bind": {"allowed_hosts": ["127.0.0.1"]}}}]}))
    toolset = load_toolset(path)
    assert toolset.openai()[0]["function"]["parameters"]["properties"] == {"url": {"type": "string", "description": "an https:// URL"}}
    assert "allowed_hosts" not in json.dumps(toolset.openai())  # the model never sees what the tool set binds


def test_webhook_with_a_secret_header_from_s3_and_secrets_manager(local_aws, upstream, script, tmp_path):
    """Tenants from a Secrets Manager secret, their tool set from S3, a webhook whose Authorization header
    is a (JSON) secret: the webhook sees the header, the model sees the webhook's answer, /v1/tools shows
    neither the URL nor the secret, and a webhook's 500 is a tool error."""
    import boto3

    sm, s3 = boto3.client("secretsmanager"), boto3.client("s3")
    token_arn = sm.create_secret(Name=f"gw-test/crm-{os.urandom(3).hex()}", SecretString=json.dumps({"token": "s3cr3t-crm"}))["ARN"]
    hook = {"type": "webhook", "headers": {"Authorization": {"secret": token_arn, "key": "token", "template": "Bearer {value}"},
                                           "X-Caller": "gateway"}}
    toolset = {"tools": [
        {"name": "crm_lookup", "parameters": {"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]},
         "timeout_s": 5, "implementation": {**hook, "url": f"{upstream.url}/hook/crm"}},
        {"name": "crm_broken", "implementation": {**hook, "url": f"{upstream.url}/hook/fail", "method": "GET"}},
    ]}
    key = f"gateway/{os.urandom(3).hex()}/acme.yaml"
    s3.put_object(Bucket=local_aws.bucket, Key=key, Body=yaml.safe_dump(toolset).encode())
    tenants = {"tenants": {"acme": {"api_keys": [ACME_KEY], "model": "acme-adapter", "toolset": f"s3://{local_aws.bucket}/{key}"}}}
    tenants_name = f"gw-test/tenants-{os.urandom(3).hex()}"
    sm.create_secret(Name=tenants_name, SecretString=json.dumps(tenants))

    settings = GatewaySettings(upstream_url=f"{upstream.url}/v1", tenants_secret=tenants_name)
    script.script = [calls(("crm_lookup", {"email": "ada@example.com"}), ("crm_broken", {})), echo_tool_results]
    with serve(create_app(settings)) as url:
        listed = httpx.get(f"{url}/v1/tools", headers={"Authorization": f"Bearer {ACME_KEY}"}).text
        response = chat(url)
    assert "s3cr3t" not in listed and "/hook/" not in listed and "crm_lookup" in listed
    assert outcomes(response) == [("crm_lookup", "ok"), ("crm_broken", "error")]
    crm = next(h for h in script.hooks if h["name"] == "crm")
    assert crm["auth"] == "Bearer s3cr3t-crm" and json.loads(crm["body"]) == {"email": "ada@example.com"}
    said = tool_messages(script.received[-1])
    assert json.loads(said[0]) == {"customer": "Ada", "tier": "gold"}
    assert "HTTP 500" in said[1] and "backend exploded" in said[1]
    assert "s3cr3t" not in json.dumps(response.json())


# ---------------------------------------------------------------- settings and `python -m gateway`


def test_settings_from_a_file_and_the_environment(tmp_path):
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"upstream_url": "http://10.0.0.5:8000/v1", "tenants_file": "/etc/t.json", "max_rounds": 4}))
    settings = GatewaySettings.load({"GATEWAY_CONFIG": str(config), "GATEWAY_MAX_ROUNDS": "7", "GATEWAY_DEADLINE_S": "30"})
    assert (settings.upstream_url, settings.max_rounds, settings.deadline_s) == ("http://10.0.0.5:8000/v1", 7, 30.0)
    with pytest.raises(ValueError, match="exactly one of tenants_file and tenants_secret"):
        GatewaySettings.load({"GATEWAY_CONFIG": str(config), "GATEWAY_TENANTS_SECRET": "arn:x"})
    with pytest.raises(ValueError):
        GatewaySettings.load({"GATEWAY_TENANTS_FILE": "/t.json", "GATEWAY_MAX_ROUNDS": "0"})


def test_python_m_gateway_serves(upstream, script, tmp_path):
    tenants = tmp_path / "tenants.yaml"
    tenants.write_text(yaml.safe_dump({"tenants": {"acme": {"api_keys": [ACME_KEY], "model": "acme-adapter",
                                                            "toolset": "tools.yaml"}}}))
    (tmp_path / "tools.yaml").write_text(yaml.safe_dump({"tools": [{"builtin": "calculate"}, {"builtin": "current_time"}]}))
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({"upstream_url": f"{upstream.url}/v1", "tenants_file": str(tenants)}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GATEWAY_CONFIG": str(config), "GATEWAY_PORT": str(port), "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "gateway"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "python -m gateway did not listen"
                time.sleep(0.1)
        tools = httpx.get(f"{url}/v1/tools", headers={"Authorization": f"Bearer {ACME_KEY}"}).json()["data"]
        assert [t["function"]["name"] for t in tools] == ["calculate", "current_time"]
        script.script = [calls(("calculate", {"expression": "2**10"})), echo_tool_results]
        assert '"result": 1024' in chat(url).json()["choices"][0]["message"]["content"]
    finally:
        proc.terminate()
        proc.wait(15)
