"""The gateway's Prometheus metrics, in a registry of its own (one per app, so two apps in one process,
as in the tests, count apart). Label values are bounded: tenant names come from the tenants document,
tool names from the tenant's tool set (a name the model made up counts as `<unknown>`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
OVERHEAD_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
UNKNOWN_TOOL = "<unknown>"
NO_TENANT = "-"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("gateway_chat_requests", "chat completion requests, by tenant and HTTP status",
                                ["tenant", "status"], registry=r)
        self.rounds = Counter("gateway_tool_rounds", "tool rounds (upstream replies that asked for tools)", ["tenant"], registry=r)
        self.tool_calls = Counter("gateway_tool_calls", "tool calls by outcome: ok, error, timeout, rejected",
                                  ["tenant", "tool", "outcome"], registry=r)
        self.tool_latency = Histogram("gateway_tool_latency_seconds", "one tool call, checks included",
                                      ["tool"], buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_latency = Histogram("gateway_upstream_latency_seconds", "one upstream (vLLM) call",
                                          buckets=LATENCY_BUCKETS, registry=r)
        self.request_latency = Histogram("gateway_request_latency_seconds", "one chat request, end to end",
                                         buckets=LATENCY_BUCKETS, registry=r)
        self.overhead = Histogram("gateway_round_overhead_seconds",
                                  "per round: the gateway's own time, not spent waiting on the upstream or on tools",
                                  buckets=OVERHEAD_BUCKETS, registry=r)
