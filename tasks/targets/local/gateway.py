"""The local target's tool gateway: `python -m gateway` as a process beside the vLLM server.

It runs in the pipeline's own environment (the gateway needs only FastAPI, uvicorn, httpx, jsonschema,
prometheus_client, PyYAML and boto3, all pinned there), in its own session so it outlives the deploy flow
run, like the vLLM server; teardown stops it. Its upstream is the stack's vLLM endpoint with the stack's API
key (read from Secrets Manager by the gateway itself); its tenants are the stack's tenants secret, and the
tool sets the S3 objects that secret names (tasks/gateway/config.py). The ModelStore block's AWS credentials
are handed to it as the standard AWS variables, so it reads what the deploy wrote. Its log goes to
~/.cache/vllm-pipeline/stacks/<stack>/gateway.log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials

from blocks.tool_gateway import ToolGateway
from tasks.core.s3 import utc_now
from tasks.core.state import Endpoint, GatewayEndpoint
from tasks.targets.local.paths import REPO_ROOT, free_port, port_free
from tasks.targets.local.processes import alive, command_line, stop_group
from tasks.targets.local.runtime import stack_dir, tail


class GatewayStartError(RuntimeError):
    """The gateway died or never answered /health; the message quotes its log."""


def is_our_gateway(pid: int | None) -> bool:
    """True when `pid` is alive and runs `python -m gateway` (not a recycled pid)."""
    argv = command_line(pid)
    if argv is None:
        return False
    return any(a == "-m" and nxt == "gateway" for a, nxt in zip(argv, argv[1:]))


def _alive(pid: int) -> bool:
    return alive(pid, is_our_gateway)


def gateway_alive(gw: GatewayEndpoint | None) -> bool:
    if gw is None or not is_our_gateway(gw.pid):
        return False
    try:
        return httpx.get(f"{gw.url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _aws_env(credentials: AwsCredentials | None) -> dict[str, str]:
    """The block's credentials as the variables boto3 reads (the gateway has no Prefect blocks)."""
    if credentials is None:
        return {}
    env = {
        "AWS_ACCESS_KEY_ID": credentials.aws_access_key_id,
        "AWS_SECRET_ACCESS_KEY": credentials.aws_secret_access_key.get_secret_value() if credentials.aws_secret_access_key else None,
        "AWS_SESSION_TOKEN": credentials.aws_session_token,
        "AWS_PROFILE": credentials.profile_name,
        "AWS_DEFAULT_REGION": credentials.region_name,
        "AWS_ENDPOINT_URL": credentials.aws_client_parameters.endpoint_url,
    }
    return {k: str(v) for k, v in env.items() if v}


def start_gateway_process(stack: str, gateway: ToolGateway, endpoint: Endpoint, tenants_secret: str,
                          credentials: AwsCredentials | None = None) -> tuple[int, str, str]:
    """Start `python -m gateway`; returns (pid, base URL, log path) without waiting. The block's port if it
    is free, else any free one."""
    port = gateway.port if port_free(gateway.port) else free_port()
    log_path = stack_dir(stack) / "gateway.log"
    env = {
        **os.environ,
        **_aws_env(credentials),
        "GATEWAY_UPSTREAM_URL": f"{endpoint.url}/v1",
        "GATEWAY_UPSTREAM_API_KEY_SECRET": endpoint.api_key_secret,
        "GATEWAY_TENANTS_SECRET": tenants_secret,
        "GATEWAY_MAX_ROUNDS": str(gateway.max_rounds),
        "GATEWAY_DEADLINE_S": str(gateway.deadline_s),
        "GATEWAY_TOOL_TIMEOUT_S": str(gateway.tool_timeout_s),
        "GATEWAY_UPSTREAM_TIMEOUT_S": str(gateway.upstream_timeout_s),
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH")) if p),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("GATEWAY_CONFIG", None)  # only what the stack says
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "gateway"], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=stack_dir(stack), start_new_session=True)
    return proc.pid, f"http://127.0.0.1:{port}", str(log_path)


def wait_gateway(pid: int, url: str, log_path: str, timeout: float) -> None:
    """Until /health answers 200; a process that exits fails at once, quoting its log (a tool set that does
    not load stops the gateway before it listens)."""
    deadline = time.monotonic() + timeout
    last = "no answer yet"
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise GatewayStartError(f"the gateway (pid {pid}) exited during start-up; last log lines:\n{tail(log_path)}")
            try:
                resp = http.get(f"{url}/health")
                if resp.status_code == 200:
                    return
                last = f"/health answered {resp.status_code}"
            except httpx.TransportError as exc:
                last = type(exc).__name__
            time.sleep(0.5)
    stop_gateway_process(pid)
    raise GatewayStartError(f"the gateway did not answer /health within {timeout:.0f}s ({last}); last log lines:\n{tail(log_path)}")


def stop_gateway_process(pid: int | None, grace: float = 10) -> bool:
    """SIGTERM its process group, SIGKILL after `grace` seconds. False if it was already gone."""
    return stop_group(pid, is_our_gateway, grace, poll=0.2)


@task(name="start-local-gateway", cache_policy=NO_CACHE)
def start_local_gateway(stack: str, gateway: ToolGateway, endpoint: Endpoint, tenants_secret: str, tenants: list[str],
                        toolsets: dict[str, str], digest: str, credentials: AwsCredentials | None = None) -> GatewayEndpoint:
    """Start the gateway; returns at once so the pid is recorded before the wait."""
    started = utc_now()
    pid, url, log_path = start_gateway_process(stack, gateway, endpoint, tenants_secret, credentials)
    get_run_logger().info("tool gateway starting: pid %d, %s, log %s", pid, url, log_path)
    return GatewayEndpoint(url=url, tenants_secret=tenants_secret, tenants=tenants, toolsets=toolsets, pid=pid,
                           log_path=log_path, started_at=started, digest=digest)


@task(name="wait-local-gateway", cache_policy=NO_CACHE)
def wait_local_gateway(gw: GatewayEndpoint, timeout_s: float = 60) -> None:
    wait_gateway(gw.pid, gw.url, gw.log_path, timeout_s)
    get_run_logger().info("tool gateway ready at %s (tenants %s)", gw.url, ", ".join(gw.tenants))


@task(name="stop-local-gateway", cache_policy=NO_CACHE)
def stop_local_gateway(pid: int | None) -> bool:
    stopped = stop_gateway_process(pid)
    get_run_logger().info("tool gateway pid %s %s", pid, "stopped" if stopped else "was not running")
    return stopped
