"""What a local vLLM server has served, from its own Prometheus `/metrics` (no API key: vLLM guards
only the /v1 routes). Parsed with prometheus_client's text parser (Prefect already brings it).

`vllm:request_success_total` counts every request the engine finished (any finish reason: stop,
length, abort, error), per model and engine; health checks and /v1/models are not requests to it.
The counters start at 0 with the process, so a reading belongs to one server process (its pid).
"""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families
from pydantic import BaseModel

SERVED = "vllm:request_success"
IN_FLIGHT = ("vllm:num_requests_running", "vllm:num_requests_waiting")


class ServerCounters(BaseModel):
    served: int  # requests finished since the process started
    in_flight: int  # requests running or waiting now


def parse_counters(text: str) -> ServerCounters:
    served = in_flight = 0.0
    for family in text_string_to_metric_families(text):
        if family.name == SERVED:
            served += sum(s.value for s in family.samples if s.name == f"{SERVED}_total")
        elif family.name in IN_FLIGHT:
            in_flight += sum(s.value for s in family.samples)
    return ServerCounters(served=int(served), in_flight=int(in_flight))


def read_counters(url: str, timeout: float = 5) -> ServerCounters | None:
    """The server's counters; None when it does not answer (stopped, or not started yet)."""
    try:
        resp = httpx.get(f"{url}/metrics", timeout=timeout)
    except httpx.TransportError:
        return None
    if resp.status_code != 200:
        return None
    return parse_counters(resp.text)
