"""The server-side tool loop: ask the upstream (vLLM, OpenAI-compatible) with the tenant's tools, run the
tool calls it returns, feed the results back, until it answers without tool calls.

Rules (tests/test_gateway.py has a case for each):
- a call's arguments are parsed and checked against the tool's schema before it runs; a bad call, or a
  tool the tenant does not have, goes back to the model as a tool error and is never executed;
- the calls of one turn are independent (OpenAI's parallel tool calls) and run concurrently;
- each tool has a timeout; a tool that raises or times out becomes a tool result the model sees;
- at most `max_rounds` tool rounds; then one last call with `tool_choice: "none"` asks for the answer
  (`metadata.stopped` says "max_rounds");
- the whole request has a deadline (`deadline_s`), which also cuts every upstream call and tool timeout:
  past it the request fails with 504.
The answer is the upstream's final chat.completion with `metadata` added: the rounds, each tool call's
name, outcome (ok/error/timeout/rejected) and latency, the usage summed over all rounds, and where the time
went (upstream, tools, the gateway's own overhead).

Streaming: with `on_delta`, every upstream call is streamed; the content deltas of a round are handed to
`on_delta` as they arrive, so the final answer reaches the client token by token. Content that the model
writes before a tool call in the same turn reaches the client too, as it would from OpenAI's API.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from gateway.executor import ToolCallRecord, ToolRunner
from gateway.metrics import UNKNOWN_TOOL, GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.tenants import Tenant

# Request keys the gateway owns: the tenant's tools, its model, the streaming mode, one choice.
OWNED_KEYS = frozenset({"model", "messages", "tools", "tool_choice", "stream", "stream_options", "n", "functions", "function_call"})
# What a client's request may set besides those, forwarded as given: sampling and output controls. Anything
# else (vLLM's request-level `chat_template`, say) is refused: the gateway decides what reaches the GPU tier.
FORWARDED_KEYS = frozenset({
    "temperature", "top_p", "top_k", "min_p", "max_tokens", "max_completion_tokens", "stop", "seed", "presence_penalty",
    "frequency_penalty", "repetition_penalty", "logit_bias", "logprobs", "top_logprobs", "user", "parallel_tool_calls",
    "response_format",
})
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")

OnDelta = Callable[[str], Awaitable[None]]
OnTool = Callable[[int, ToolCallRecord], Awaitable[None]]


class GatewayError(Exception):
    """A request that cannot be answered; `status` and `kind` become the OpenAI-style error body."""

    status = 500
    kind = "gateway_error"

    def __init__(self, message: str, metadata: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        self.metadata = metadata

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"error": {"message": self.message, "type": self.kind, "code": self.status}}
        if self.metadata is not None:
            out["metadata"] = self.metadata
        return out


class BadRequest(GatewayError):
    status, kind = 400, "invalid_request_error"


class UpstreamError(GatewayError):
    status, kind = 502, "upstream_error"


class DeadlineExceeded(GatewayError):
    status, kind = 504, "deadline_exceeded"


def check_request(tenant: Tenant, body: dict[str, Any]) -> None:
    """What a client may not ask of the gateway (400s, before any upstream call)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise BadRequest("messages must be a non-empty list of chat messages")
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools come from your tenant's tool set (GET /v1/tools); a request may not bring its own")
    if body.get("model") not in (None, tenant.model):
        raise BadRequest(f"model must be omitted or {tenant.model!r} (your tenant's model)")
    if unknown := sorted(set(body) - OWNED_KEYS - FORWARDED_KEYS):
        raise BadRequest(f"the gateway does not forward {unknown}; it forwards {sorted(FORWARDED_KEYS)}")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1: the tool loop follows one choice")
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name")
        if name not in tenant.tools:
            raise BadRequest(f"tool_choice names {name!r}, which is not one of your tools")
    elif choice not in (None, "auto", "none", "required"):
        raise BadRequest("tool_choice must be auto, none, required or a named function")


@dataclass
class Trace:
    """What happened so far: becomes `metadata` (also on errors, so a 504 says where the time went)."""

    tenant: str
    model: str
    started: float = field(default_factory=time.perf_counter)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, int] = field(default_factory=lambda: dict.fromkeys(USAGE_KEYS, 0))
    upstream_s: float = 0.0
    tools_s: float = 0.0
    stopped: str | None = None

    def add_usage(self, usage: dict[str, Any] | None) -> None:
        for key in USAGE_KEYS:
            self.usage[key] += int((usage or {}).get(key) or 0)

    def metadata(self) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.started
        return {
            "tenant": self.tenant, "model": self.model, "stopped": self.stopped,
            "tool_rounds": sum(1 for r in self.rounds if r["tool_calls"]),
            "rounds": self.rounds, "usage": self.usage,
            "elapsed_ms": round(elapsed * 1000, 2), "upstream_ms": round(self.upstream_s * 1000, 2),
            "tools_ms": round(self.tools_s * 1000, 2),
            "overhead_ms": round(max(elapsed - self.upstream_s - self.tools_s, 0.0) * 1000, 2),
        }


class ToolLoop:
    def __init__(self, settings: GatewaySettings, upstream: httpx.AsyncClient, runner: ToolRunner, metrics: GatewayMetrics):
        self.settings = settings
        self.upstream = upstream
        self.runner = runner
        self.metrics = metrics

    async def run(self, tenant: Tenant, body: dict[str, Any], on_delta: OnDelta | None = None,
                  on_tool: OnTool | None = None) -> dict[str, Any]:
        """The final chat.completion with `metadata`; GatewayError when there is none to give."""
        check_request(tenant, body)
        trace = Trace(tenant.name, tenant.model)
        deadline = trace.started + self.settings.deadline_s
        messages = list(body["messages"])
        extra = {k: v for k, v in body.items() if k in FORWARDED_KEYS}
        tool_choice: Any = body.get("tool_choice", "auto")
        while True:
            out_of_rounds = len(trace.rounds) >= self.settings.max_rounds
            request = {**extra, "model": tenant.model, "messages": messages, "tools": tenant.openai_tools,
                       "tool_choice": "none" if out_of_rounds else tool_choice}
            round_started = time.perf_counter()
            completion = await self._upstream(request, deadline, trace, on_delta)
            upstream_s = time.perf_counter() - round_started
            message = completion["choices"][0]["message"]
            calls = message.get("tool_calls") or []
            entry: dict[str, Any] = {"round": len(trace.rounds) + 1, "upstream_ms": round(upstream_s * 1000, 2), "tool_calls": []}
            trace.rounds.append(entry)
            if not calls:
                trace.stopped = "max_rounds" if out_of_rounds else "answer"
                self._overhead(round_started, upstream_s, 0.0)
                completion["metadata"] = trace.metadata()
                return completion
            if out_of_rounds:
                raise UpstreamError(f"the model still asked for tools after {self.settings.max_rounds} rounds under "
                                    "tool_choice=none", trace.metadata())
            self.metrics.rounds.labels(tenant.name).inc()
            calls = [self._normalised(c) for c in calls]
            messages.append({"role": "assistant", "content": message.get("content"), "tool_calls": calls})
            tools_started = time.perf_counter()
            results = await asyncio.gather(*(self.runner.run(c, tenant.tools, deadline - time.perf_counter()) for c in calls))
            tools_s = time.perf_counter() - tools_started
            trace.tools_s += tools_s
            for tool_message, record in results:
                messages.append(tool_message)
                entry["tool_calls"].append(record.public())
                tool_label = record.name if record.known_tool else UNKNOWN_TOOL
                self.metrics.tool_calls.labels(tenant.name, tool_label, record.outcome).inc()
                self.metrics.tool_latency.labels(tool_label).observe(record.latency_ms / 1000)
                if on_tool is not None:
                    await on_tool(entry["round"], record)
            entry["tools_ms"] = round(tools_s * 1000, 2)
            tool_choice = "auto"  # a required or named choice applies to the first turn; then the model may answer
            self._overhead(round_started, upstream_s, tools_s)

    def _overhead(self, round_started: float, upstream_s: float, tools_s: float) -> None:
        self.metrics.overhead.observe(max(time.perf_counter() - round_started - upstream_s - tools_s, 0.0))

    @staticmethod
    def _normalised(call: dict[str, Any]) -> dict[str, Any]:
        """The call as the next request sends it back: an id, arguments as a JSON string."""
        function = call.get("function") or {}
        args = function.get("arguments")
        if not isinstance(args, str):
            args = json.dumps(args if args is not None else {})
        return {"id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                "function": {"name": function.get("name", ""), "arguments": args}}

    async def _upstream(self, request: dict[str, Any], deadline: float, trace: Trace, on_delta: OnDelta | None) -> dict[str, Any]:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            raise DeadlineExceeded(f"the request's deadline ({self.settings.deadline_s:g} s) passed", trace.metadata())
        limit = min(self.settings.upstream_timeout_s, remaining)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit):
                if on_delta is None:
                    response = await self.upstream.post("chat/completions", json=request)
                    if response.status_code >= 400:
                        raise UpstreamError(f"upstream answered HTTP {response.status_code}: {response.text[:500]}", trace.metadata())
                    completion = response.json()
                else:
                    completion = await self._streamed(request, trace, on_delta)
        except TimeoutError:
            if limit < self.settings.upstream_timeout_s:
                raise DeadlineExceeded(f"the request's deadline ({self.settings.deadline_s:g} s) passed", trace.metadata()) from None
            raise DeadlineExceeded(f"upstream did not answer within {limit:g} s", trace.metadata()) from None
        except (httpx.HTTPError, ValueError) as exc:
            raise UpstreamError(f"upstream call failed: {type(exc).__name__}: {exc}", trace.metadata()) from None
        finally:
            spent = time.perf_counter() - started
            trace.upstream_s += spent
            self.metrics.upstream_latency.observe(spent)
        if not isinstance(completion, dict) or not completion.get("choices"):
            raise UpstreamError("upstream answered without choices", trace.metadata())
        trace.add_usage(completion.get("usage"))
        return completion

    async def _streamed(self, request: dict[str, Any], trace: Trace, on_delta: OnDelta) -> dict[str, Any]:
        """One streamed upstream call, reassembled into a chat.completion; content deltas go to on_delta."""
        request = {**request, "stream": True, "stream_options": {"include_usage": True}}
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        completion: dict[str, Any] = {}
        finish_reason = None
        async with self.upstream.stream("POST", "chat/completions", json=request) as response:
            if response.status_code >= 400:
                text = (await response.aread()).decode(errors="replace")
                raise UpstreamError(f"upstream answered HTTP {response.status_code}: {text[:500]}", trace.metadata())
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    raise UpstreamError(f"upstream stream error: {chunk['error']}", trace.metadata())
                completion.update({k: chunk[k] for k in ("id", "created", "model") if k in chunk})
                if chunk.get("usage"):
                    completion["usage"] = chunk["usage"]
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if text := delta.get("content"):
                        content.append(text)
                        await on_delta(text)
                    for part in delta.get("tool_calls") or []:
                        call = calls.setdefault(part.get("index", 0), {"id": None, "type": "function",
                                                                       "function": {"name": "", "arguments": ""}})
                        call["id"] = part.get("id") or call["id"]
                        function = part.get("function") or {}
                        call["function"]["name"] += function.get("name") or ""
                        call["function"]["arguments"] += function.get("arguments") or ""
                    finish_reason = choice.get("finish_reason") or finish_reason
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None}
        if calls:
            message["tool_calls"] = [calls[i] for i in sorted(calls)]
        return {"id": completion.get("id", f"chatcmpl-{uuid.uuid4().hex}"), "object": "chat.completion",
                "created": completion.get("created", int(time.time())), "model": completion.get("model", request["model"]),
                "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
                "usage": completion.get("usage")}
