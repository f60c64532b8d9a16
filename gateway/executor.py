"""Running one tool call the model asked for, so that whatever happens the model gets a tool result.

Order of checks: the name must be one of the tenant's tools, the arguments must parse as a JSON object and
validate against the tool's schema; a call that fails any of these is `rejected` and never executed.
Then the tool runs under its timeout (cut to what is left of the request's deadline) and a process-wide
bound on concurrent tool calls: `ok`, `error` (it raised, or a webhook answered >= 400) or `timeout`.

Sync Python tools run in a thread pool; a timed-out thread cannot be killed, so it is abandoned (it
finishes in the background, its result dropped). Tools that wait on I/O should be `async def`.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx

from gateway.settings import GatewaySettings
from gateway.toolset import PythonImpl, Tool, WebhookImpl

Outcome = Literal["ok", "error", "timeout", "rejected"]
MAX_ERROR_CHARS = 500


@dataclass
class ToolCallRecord:
    """What `metadata` reports about one call (and what the metrics count)."""

    id: str
    name: str
    outcome: Outcome
    latency_ms: float
    error: str | None = None
    known_tool: bool = field(default=True, repr=False)

    def public(self) -> dict[str, Any]:
        out = {"id": self.id, "name": self.name, "outcome": self.outcome, "latency_ms": round(self.latency_ms, 2)}
        if self.error:
            out["error"] = self.error
        return out


class Rejected(Exception):
    """The call is not executed: unknown tool or arguments that do not fit the schema."""


class WebhookError(Exception):
    pass


def parse_arguments(tool: Tool, raw: Any) -> dict[str, Any]:
    """The model's arguments as a checked dict, or Rejected saying what is wrong (the model reads it)."""
    if raw is None or (isinstance(raw, str) and not raw.strip()):
        raw = "{}"
    if isinstance(raw, str):
        try:
            args = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise Rejected(f"arguments are not valid JSON ({exc.msg} at position {exc.pos})") from None
    else:
        args = raw
    if not isinstance(args, dict):
        raise Rejected(f"arguments must be a JSON object, not {type(args).__name__}")
    errors = sorted(tool.validator.iter_errors(args), key=lambda e: list(e.absolute_path))
    if errors:
        said = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(arguments)'}: {e.message}" for e in errors[:3])
        raise Rejected(f"arguments do not match the schema of {tool.name}: {said}")
    return args


class ToolRunner:
    def __init__(self, settings: GatewaySettings, http: httpx.AsyncClient):
        self.settings = settings
        self.http = http
        self._slots = asyncio.Semaphore(settings.max_concurrent_tools)
        self._threads = ThreadPoolExecutor(max_workers=settings.max_concurrent_tools, thread_name_prefix="gateway-tool")

    def close(self) -> None:
        self._threads.shutdown(wait=False, cancel_futures=True)

    async def run(self, call: dict[str, Any], tools: dict[str, Tool], remaining_s: float) -> tuple[dict[str, Any], ToolCallRecord]:
        """(the tool message for the model, the record). Never raises for anything the tool does."""
        started = time.perf_counter()
        function = call.get("function") or {}
        name = str(function.get("name", ""))
        call_id = call["id"]
        tool = tools.get(name)
        outcome: Outcome = "ok"
        error = None
        try:
            if tool is None:
                raise Rejected(f"unknown tool {name!r}; the tools are: {', '.join(sorted(tools)) or 'none'}")
            args = parse_arguments(tool, function.get("arguments"))
            timeout = min(tool.timeout_s or self.settings.tool_timeout_s, max(remaining_s, 0.0))
            try:
                async with asyncio.timeout(timeout):
                    async with self._slots:
                        result = await self._execute(tool, args)
            except TimeoutError:
                outcome, error = "timeout", f"tool {name} timed out after {timeout:.3g} s"
            else:
                content = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False, default=str)
        except Rejected as exc:
            outcome, error = "rejected", str(exc)
        except Exception as exc:  # noqa: BLE001 - a tool's failure is a result the model sees, not the gateway's
            outcome, error = "error", f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        if error is not None:
            content = json.dumps({"error": error, "outcome": outcome})
        limit = self.settings.max_tool_result_chars
        if len(content) > limit:
            content = content[:limit] + f"... [cut at {limit} characters]"
        record = ToolCallRecord(call_id, name, outcome, (time.perf_counter() - started) * 1000, error, known_tool=tool is not None)
        return {"role": "tool", "tool_call_id": call_id, "content": content}, record

    async def _execute(self, tool: Tool, args: dict[str, Any]) -> Any:
        impl = tool.implementation
        if isinstance(impl, PythonImpl):
            fn = impl.function
            if inspect.iscoroutinefunction(fn):
                result = await fn(**args, **impl.bind)
            else:
                result = await asyncio.get_running_loop().run_in_executor(self._threads, functools.partial(fn, **args, **impl.bind))
            if inspect.isawaitable(result):
                result = await result
            return result
        assert isinstance(impl, WebhookImpl)
        return await self._webhook(impl, args)

    async def _webhook(self, impl: WebhookImpl, args: dict[str, Any]) -> Any:
        """The arguments as a JSON body (query parameters for GET and DELETE); the answer's JSON or text."""
        if impl.method in ("GET", "DELETE"):
            params = {k: v if isinstance(v, str) else json.dumps(v) for k, v in args.items()}
            request = self.http.build_request(impl.method, impl.url, params=params, headers=impl.request_headers())
        else:
            request = self.http.build_request(impl.method, impl.url, json=args, headers=impl.request_headers())
        response = await self.http.send(request, stream=True)
        try:
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > impl.max_response_bytes:
                    raise WebhookError(f"webhook answered more than {impl.max_response_bytes} bytes")
        finally:
            await response.aclose()
        text = body.decode(response.encoding or "utf-8", errors="replace")
        if response.status_code >= 400:
            raise WebhookError(f"webhook answered HTTP {response.status_code}: {text[:200]}")
        if "json" in response.headers.get("content-type", ""):
            try:
                return json.loads(text)
            except json.JSONDecodeError:
                pass
        return text
