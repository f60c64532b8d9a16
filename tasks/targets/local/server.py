"""Prefect tasks of the local target: API key in Secrets Manager, start/stop the local server."""

from __future__ import annotations

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect_aws import AwsCredentials

from blocks.vllm_server import VllmServerSettings
from tasks.core.errors import retry_if_transient
from tasks.core.s3 import utc_now
from tasks.core.secrets import ensure_secret, read_secret
from tasks.core.state import Endpoint, ModelRef
from tasks.targets.local.runtime import ReadyTimes, is_our_server, start_server, stop_server, wait_ready

_RETRY = dict(retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


@task(name="ensure-api-key-secret", **_RETRY)
def ensure_api_key(stack: str, settings: VllmServerSettings, credentials: AwsCredentials | None = None) -> str:
    """`credentials`: the ModelStore block's, the same that read the key back and tear it down."""
    return ensure_secret(stack, "api-key", settings.api_key, credentials)


def endpoint_alive(endpoint: Endpoint | None) -> bool:
    if endpoint is None or not is_our_server(endpoint.pid):
        return False
    try:
        return httpx.get(f"{endpoint.url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


@task(name="start-local-vllm", cache_policy=NO_CACHE)
def start_local_server(
    stack: str, settings: VllmServerSettings, model: ModelRef, api_key_secret: str, adapters: dict[str, str] | None = None,
    adapter_index_uri: str | None = None, credentials: AwsCredentials | None = None, port: int | None = None,
) -> Endpoint:
    """Start the server through the image entrypoint; returns at once so the pid is recorded before the wait.
    `port`: keep this one if it is free (a stack woken from zero keeps its URL)."""
    api_key = read_secret(api_key_secret, credentials).get_secret_value()
    started = utc_now()
    pid, url, log_path = start_server(stack, settings, model.s3_uri, api_key, adapters, adapter_index_uri, port)
    get_run_logger().info("vLLM server starting: pid %d, %s, log %s", pid, url, log_path)
    return Endpoint(
        url=url, served_model_name=settings.served_model_name, api_key_secret=api_key_secret,
        pid=pid, log_path=log_path, started_at=started,
    )


@task(name="wait-local-vllm-ready", cache_policy=NO_CACHE)
def wait_local_ready(endpoint: Endpoint, ready_timeout_s: float, credentials: AwsCredentials | None = None) -> ReadyTimes:
    """Until the server serves the model; a dead server fails at once, quoting its log. Returns when it
    first answered /health and /v1/models (the cold-start timeline's, tasks/targets/local/coldstart.py)."""
    api_key = read_secret(endpoint.api_key_secret, credentials).get_secret_value()
    ready = wait_ready(endpoint.pid, endpoint.url, endpoint.served_model_name, api_key, endpoint.log_path, ready_timeout_s)
    get_run_logger().info("vLLM server ready at %s serving %r", endpoint.url, endpoint.served_model_name)
    return ready


@task(name="stop-local-vllm", cache_policy=NO_CACHE)
def stop_local_server(pid: int | None) -> bool:
    stopped = stop_server(pid)
    get_run_logger().info("local vLLM server pid %s %s", pid, "stopped" if stopped else "was not running")
    return stopped
