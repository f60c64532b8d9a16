"""The validate flow's checks: readiness, warm-up, smoke, streaming, the tool-calling suite, latency."""
