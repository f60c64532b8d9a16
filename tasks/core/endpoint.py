"""A small OpenAI-API client for a vLLM endpoint that measures as it goes.

httpx, not the `openai` package: validation needs the raw SSE stream (to time the first
token and each later one, and to reassemble streamed tool-call deltas) and the raw status
codes (a wrong key must be a 401, not an exception type).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class Reply:
    status: int
    body: dict
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)  # [{"id", "name", "arguments"}]
    finish_reason: str | None = None
    usage: dict | None = None
    ttft: float | None = None  # seconds to the first content/tool token (streamed only)
    e2e: float = 0.0
    chunks: int = 0  # content-bearing SSE chunks (streamed only)
    itl: list[float] = field(default_factory=list)  # gaps between content chunks

    @property
    def tpot(self) -> float | None:
        n = (self.usage or {}).get("completion_tokens") or 0
        if self.ttft is None or n < 2:
            return None
        return (self.e2e - self.ttft) / (n - 1)


class EndpointError(RuntimeError):
    """The endpoint cannot be reached or answered in a way no check can use."""


# A load balancer in front of vLLM answers these while a target drains, restarts or sheds load; a reset
# connection is the same story. They say nothing about the model: retried, counted, reported.
RETRY_STATUS = frozenset({429, 502, 503, 504})


class Endpoint:
    def __init__(self, url: str, api_key: str, model: str, timeout: float = 180, attempts: int = 4,
                 backoff_s: float = 0.5):
        self.url = url.rstrip("/")
        self.model = model
        self._headers = {"Authorization": f"Bearer {api_key}"}
        self._http = httpx.Client(timeout=httpx.Timeout(timeout, connect=10))
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.retries = 0  # transient failures retried (429/502/503/504, resets), for the report
        self.attempt_started = time.perf_counter()

    def _retry(self, attempt: int, what: str) -> bool:
        """True (after a back-off) when another attempt is allowed."""
        if attempt + 1 >= self.attempts:
            return False
        self.retries += 1
        time.sleep(self.backoff_s * 2 ** attempt)
        return True

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "Endpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, path: str, **kwargs) -> httpx.Response:
        for attempt in range(self.attempts):
            self.attempt_started = time.perf_counter()  # latency is the successful attempt's, not the back-offs'
            try:
                resp = self._http.request(method, self.url + path, **kwargs)
            except httpx.TransportError as exc:
                if self._retry(attempt, path):
                    continue
                raise EndpointError(f"{self.url}{path}: {type(exc).__name__}: {exc}") from exc
            if resp.status_code in RETRY_STATUS and self._retry(attempt, path):
                continue
            return resp
        raise AssertionError("unreachable")

    def get(self, path: str, auth: bool = True) -> httpx.Response:
        return self._request("GET", path, headers=self._headers if auth else {})

    def post_raw(self, path: str, body: dict, headers: dict | None = None) -> httpx.Response:
        return self._request("POST", path, json=body, headers=headers or self._headers)

    def chat(self, body: dict, stream: bool = False) -> Reply:
        body = {"model": self.model, **body}
        return self._stream("/v1/chat/completions", body) if stream else self._once("/v1/chat/completions", body)

    def completion(self, body: dict, stream: bool = False) -> Reply:
        body = {"model": self.model, **body}
        return self._stream("/v1/completions", body) if stream else self._once("/v1/completions", body)

    def _once(self, path: str, body: dict) -> Reply:
        resp = self.post_raw(path, body)
        e2e = time.perf_counter() - self.attempt_started
        data = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {"text": resp.text}
        reply = Reply(status=resp.status_code, body=data, e2e=e2e, usage=data.get("usage"))
        if resp.status_code == 200 and data.get("choices"):
            choice = data["choices"][0]
            msg = choice.get("message") or {}
            reply.content = msg.get("content") or choice.get("text") or ""
            reply.finish_reason = choice.get("finish_reason")
            reply.tool_calls = [
                {"id": c.get("id"), "name": c["function"]["name"], "arguments": c["function"].get("arguments") or ""}
                for c in msg.get("tool_calls") or []
            ]
        return reply

    def _stream(self, path: str, body: dict) -> Reply:
        """One streamed request; a broken stream or a 502/503/504 is retried from the start (the
        timings are the successful attempt's)."""
        for attempt in range(self.attempts):
            try:
                reply = self._stream_once(path, body)
            except EndpointError:
                if self._retry(attempt, path):
                    continue
                raise
            if reply.status in RETRY_STATUS and self._retry(attempt, path):
                continue
            return reply
        raise AssertionError("unreachable")

    def _stream_once(self, path: str, body: dict) -> Reply:
        body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        started = time.perf_counter()
        reply = Reply(status=0, body={})
        calls: dict[int, dict] = {}
        last = None
        try:
            with self._http.stream("POST", self.url + path, json=body, headers=self._headers) as resp:
                reply.status = resp.status_code
                if resp.status_code != 200:
                    resp.read()
                    reply.body = resp.json() if resp.headers.get("content-type", "").startswith("application/json") else {"text": resp.text}
                    return reply
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        break
                    chunk = json.loads(payload)
                    if chunk.get("usage"):
                        reply.usage = chunk["usage"]
                    for choice in chunk.get("choices") or []:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or choice.get("text") or ""
                        got = bool(text) or bool(delta.get("tool_calls"))
                        if text:
                            reply.content += text
                        for tc in delta.get("tool_calls") or []:
                            slot = calls.setdefault(tc.get("index", 0), {"id": None, "name": "", "arguments": ""})
                            slot["id"] = tc.get("id") or slot["id"]
                            fn = tc.get("function") or {}
                            slot["name"] += fn.get("name") or ""
                            slot["arguments"] += fn.get("arguments") or ""
                        if choice.get("finish_reason"):
                            reply.finish_reason = choice["finish_reason"]
                        if got:
                            now = time.perf_counter()
                            reply.chunks += 1
                            if reply.ttft is None:
                                reply.ttft = now - started
                            elif last is not None:
                                reply.itl.append(now - last)
                            last = now
        except httpx.TransportError as exc:
            raise EndpointError(f"{self.url}{path}: stream broke: {type(exc).__name__}: {exc}") from exc
        reply.e2e = time.perf_counter() - started
        reply.tool_calls = [calls[i] for i in sorted(calls)]
        return reply
