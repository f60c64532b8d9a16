"""The local target's cold-start timeline, measured: the deploy's own times, the server log's phase lines
(the entrypoint's and vLLM's), the wait's first /health 200 and ready, and a first token.

The server log (runtime.py) is appended to by every run of the stack, so the run is found by its
entrypoint start line, which names the process id the deploy started (the entrypoint execs vLLM in
that same process). It is read from its end: a long-lived stack's log holds every request it served.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials

from tasks.core.errors import retry_if_transient
from tasks.core.secrets import read_secret
from tasks.core.state import Endpoint
from tasks.core.timeline import Phase, Timeline, first_token, parse_log
from tasks.targets.local.runtime import ReadyTimes


def run_lines(path: Path, pid: int, block: int = 1 << 20) -> list[str]:
    """The log's lines from the entrypoint start line of process `pid` on; [] when there is none."""
    start = re.compile(rb"\[entrypoint\] phase=start t=\S+ pid=%d\b" % pid)
    try:
        f = path.open("rb")
    except FileNotFoundError:
        return []
    with f:
        size = f.seek(0, 2)
        pos = size
        while pos > 0:
            pos = max(0, pos - block)
            f.seek(pos)
            data = f.read(size - pos)
            hits = list(start.finditer(data))
            if hits:
                begin = data.rfind(b"\n", 0, hits[-1].start()) + 1
                return data[begin:].decode(errors="replace").splitlines()
            block *= 2
    return []


@task(name="local-cold-start", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def local_cold_start(endpoint: Endpoint, deploy_at: float, requested_at: float, ready: ReadyTimes,
                     credentials: AwsCredentials | None = None) -> Timeline:
    """The timeline of the start that just became ready, with a first token measured now (one
    completion of one token: the stack's traffic sampling does not count it, Endpoint.own_requests)."""
    logger = get_run_logger()
    key = read_secret(endpoint.api_key_secret, credentials).get_secret_value()
    token = first_token(endpoint.url, key, endpoint.served_model_name)
    if token is None:
        logger.warning("cold start: the one-token completion to %s got no token; the timeline ends at ready", endpoint.url)
    logged = parse_log(run_lines(Path(endpoint.log_path), endpoint.pid), pid=endpoint.pid)
    if not any(p.source == "entrypoint" for p in logged):
        logger.warning("cold start: no entrypoint phase line of pid %s in %s", endpoint.pid, endpoint.log_path)
    timeline = Timeline.build([
        Phase(name="deploy-start", at=deploy_at, source="deploy"),
        Phase(name="server-requested", at=requested_at, source="deploy", detail=f"pid {endpoint.pid}"),
        *logged,
        Phase(name="health", at=ready.health_at, source="deploy", detail="the wait's poll (once a second)"),
        Phase(name="ready", at=ready.ready_at, source="deploy", detail=f"serves {endpoint.served_model_name}"),
        token,
    ])
    end = timeline.seconds_to("first-token") or timeline.seconds_to("ready")
    logger.info("cold start: %d phases, %.1f s from the deploy's start to the %s", len(timeline.phases), end or 0,
                "first token" if token else "ready")
    return timeline
