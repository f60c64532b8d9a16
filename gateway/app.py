"""The gateway's HTTP face: OpenAI's chat completions with the tool loop behind it.

    POST /v1/chat/completions   Bearer key -> tenant; the tool loop; `stream: true` streams the answer (SSE)
    GET  /v1/tools              the caller's tenant's tools (OpenAI tool definitions, no implementation)
    GET  /v1/models             the caller's tenant's model
    GET  /health                the process is up and its tenants loaded (it does not call the upstream)
    GET  /metrics               Prometheus text format (unauthenticated: keep it off the public listener)

Streaming: the tool rounds run first; the answer's content deltas are sent as OpenAI chat.completion.chunk
events as the upstream produces them. Progress is sent as SSE comments (`: round 1 tool calculate ok 3 ms`),
which OpenAI clients and every SSE parser skip; they also keep an idle connection (a load balancer's
60-second idle timeout) open during long tool rounds, as does `: keep-alive` every KEEPALIVE_S. Before
[DONE] comes one chunk with no choices that carries `metadata` (and the final round's `usage`). An error
before the first event is a plain HTTP error; after it, an SSE `data: {"error": ...}` event.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from gateway import aws
from gateway.executor import ToolCallRecord, ToolRunner
from gateway.loop import BadRequest, GatewayError, ToolLoop
from gateway.metrics import NO_TENANT, GatewayMetrics
from gateway.settings import GatewaySettings
from gateway.tenants import Tenant, TenantRegistry, load_tenants

KEEPALIVE_S = 15.0


class Unauthorized(GatewayError):
    status, kind = 401, "invalid_api_key"


def _error_response(exc: GatewayError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def create_app(settings: GatewaySettings, registry: TenantRegistry | None = None) -> FastAPI:
    """The app, with every tenant's tool set loaded and checked now (a bad one stops the start, not a request)."""
    registry = registry if registry is not None else load_tenants(settings)
    if settings.upstream_api_key is not None:
        upstream_key: str | None = settings.upstream_api_key.get_secret_value()
    else:
        upstream_key = aws.read_secret(settings.upstream_api_key_secret) if settings.upstream_api_key_secret else None
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        headers = {"Authorization": f"Bearer {upstream_key}"} if upstream_key else {}
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=128)
        async with (
            httpx.AsyncClient(base_url=settings.upstream_url, headers=headers, limits=limits,
                              timeout=httpx.Timeout(settings.upstream_timeout_s, connect=10)) as upstream,
            # the tool's own timeout (asyncio) bounds a webhook call; no redirects: a webhook's URL is what was checked
            httpx.AsyncClient(follow_redirects=False, timeout=None, limits=limits) as webhooks,
        ):
            runner = ToolRunner(settings, webhooks)
            app.state.loop = ToolLoop(settings, upstream, runner, metrics)
            try:
                yield
            finally:
                runner.close()

    app = FastAPI(title="vllm-pipeline tool gateway", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.metrics = metrics

    def authenticate(request: Request) -> Tenant:
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        tenant = registry.authenticate(key.strip()) if scheme.lower() == "bearer" else None
        if tenant is None:
            raise Unauthorized("a valid API key is required: Authorization: Bearer <key>")
        return tenant

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError) -> JSONResponse:
        return _error_response(exc)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "tenants": len(registry.tenants)}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tools")
    async def tools(request: Request) -> dict[str, Any]:
        return {"object": "list", "data": authenticate(request).openai_tools}

    @app.get("/v1/models")
    async def models(request: Request) -> dict[str, Any]:
        tenant = authenticate(request)
        return {"object": "list", "data": [{"id": tenant.model, "object": "model", "owned_by": "vllm-pipeline"}]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        started = time.perf_counter()
        tenant_name, status = NO_TENANT, 500

        def count(final_status: int) -> None:
            metrics.requests.labels(tenant_name, str(final_status)).inc()
            metrics.request_latency.observe(time.perf_counter() - started)

        try:
            tenant = authenticate(request)
            tenant_name = tenant.name
            try:
                body = await request.json()
            except ValueError:
                raise BadRequest("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise BadRequest("the request body must be a JSON object")
            if body.get("stream"):
                response = await _stream(request.app.state.loop, tenant, body, count)
                status = response.status_code
                if isinstance(response, StreamingResponse):
                    status = 0  # counted when the stream ends
                return response
            completion = await request.app.state.loop.run(tenant, body)
            status = 200
            return JSONResponse(completion)
        except GatewayError as exc:
            status = exc.status
            return _error_response(exc)
        finally:
            if status:
                count(status)

    return app


async def _stream(loop: ToolLoop, tenant: Tenant, body: dict[str, Any], count) -> Response:
    """Run the loop in a task that fills a queue; the response drains it as SSE."""
    stream_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def chunk(delta: dict[str, Any] | None, finish_reason: str | None = None, **extra: Any) -> str:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
        return _sse({"id": stream_id, "object": "chat.completion.chunk", "created": created, "model": tenant.model,
                     "choices": choices, **extra})

    async def on_delta(text: str) -> None:
        await queue.put(("data", chunk({"content": text})))

    async def on_tool(round_no: int, record: ToolCallRecord) -> None:
        await queue.put(("data", f": round {round_no} tool {record.name} {record.outcome} {record.latency_ms:.0f} ms\n\n"))

    async def produce() -> None:
        try:
            completion = await loop.run(tenant, body, on_delta, on_tool)
        except GatewayError as exc:
            await queue.put(("error", exc))
            return
        except Exception as exc:  # noqa: BLE001 - the stream must end with an error event, not hang
            await queue.put(("error", GatewayError(f"{type(exc).__name__}: {exc}")))
            return
        await queue.put(("data", chunk({}, completion["choices"][0].get("finish_reason") or "stop")))
        await queue.put(("data", chunk(None, usage=completion.get("usage"), metadata=completion["metadata"])))
        await queue.put(("end", None))

    task = asyncio.create_task(produce())
    kind, first = await queue.get()
    if kind == "error":  # nothing sent yet: a plain HTTP error
        return _error_response(first)

    async def events() -> AsyncIterator[str]:
        status = 499  # the client went away, unless the stream ends
        try:
            yield chunk({"role": "assistant", "content": ""})
            item: tuple[str, Any] = (kind, first)
            while True:
                what, payload = item
                if what == "end":
                    status = 200
                    break
                if what == "error":
                    status = payload.status
                    yield _sse(payload.body())
                    break
                yield payload
                try:
                    item = await asyncio.wait_for(queue.get(), KEEPALIVE_S)
                except TimeoutError:
                    item = ("data", ": keep-alive\n\n")
            yield "data: [DONE]\n\n"
        finally:
            task.cancel()
            count(status)

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
