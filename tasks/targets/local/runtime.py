"""The local target: the vLLM server as a local process, started through the image's entrypoint.

The process runs in the vLLM virtualenv (.venv-vllm), in its own session so it outlives
the deploy flow run (validate and batch runs use it later); teardown stops it. Its log
goes to ~/.cache/vllm-pipeline/stacks/<stack>/server.log.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import httpx

from blocks.vllm_server import VllmServerSettings
from tasks.targets.local.paths import REPO_ROOT, cache_root, free_port, port_free, vllm_python
from tasks.targets.local.processes import alive, command_line, stop_group

ENTRYPOINT = REPO_ROOT / "images" / "vllm" / "entrypoint.py"


class ServerStartError(RuntimeError):
    """The server died or never became ready; the message quotes its log."""


class ReadyTimes(NamedTuple):
    """When the wait saw the server answer (unix seconds; it polls once a second): the cold-start timeline's ends."""

    health_at: float  # the first /health 200
    ready_at: float  # /v1/models listing the served name


def stack_dir(stack: str) -> Path:
    d = cache_root() / "stacks" / stack
    d.mkdir(parents=True, exist_ok=True)
    return d


def tail(path: str | Path, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    return "\n".join(text[-lines:])


def is_our_server(pid: int | None) -> bool:
    """True when `pid` is alive and is a vLLM API server (not a recycled pid): vLLM's server module, or the
    entrypoint serving in-process (runtime LoRA) from any copy of the project -- a worker in another copy
    deploys the stacks this one validates, reaps and tears down (tests/test_worker_e2e.py)."""
    argv = command_line(pid)
    if argv is None:
        return False
    suffix = "/" + "/".join(ENTRYPOINT.parts[-3:])  # /images/vllm/entrypoint.py
    return "vllm.entrypoints.openai.api_server" in argv or any(a.endswith(suffix) for a in argv)


def start_server(
    stack: str, settings: VllmServerSettings, model_uri: str, api_key: str, adapters: dict[str, str] | None = None,
    adapter_index_uri: str | None = None, port: int | None = None,
) -> tuple[int, str, str]:
    """Start the entrypoint; returns (pid, base URL, log path). Does not wait for readiness.
    `port`: the one to use if it is free (a stack woken from zero keeps its URL); else any free one."""
    port = port if port and port_free(port) else free_port()
    log_path = stack_dir(stack) / "server.log"
    env = {
        **os.environ,
        "MODEL_URI": model_uri,
        "MODEL_CACHE_DIR": str(cache_root() / "model-cache"),
        "MODEL_LOAD_FORMAT": settings.load_format,
        "VLLM_ARGS": json.dumps(settings.server_args(host="127.0.0.1", port=port)),
        "LORA_ADAPTERS": json.dumps(adapters or {}),
        **({"LORA_INDEX_URI": adapter_index_uri} if adapter_index_uri else {}),
        "VLLM_API_KEY": api_key,
        "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib),
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "true" if settings.enable_lora else "false",
        "PYTHONUNBUFFERED": "1",
    }
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [str(vllm_python()), str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=env,
            cwd=stack_dir(stack), start_new_session=True,
        )
    return proc.pid, f"http://127.0.0.1:{port}", str(log_path)


def wait_ready(pid: int, url: str, served_name: str, api_key: str, log_path: str, timeout: float) -> ReadyTimes:
    """Until /health is 200 and /v1/models lists the served name; a dead process fails at once."""
    deadline = time.monotonic() + timeout
    headers = {"Authorization": f"Bearer {api_key}"}
    last = "no answer yet"
    health_at = None
    with httpx.Client(timeout=5) as http:
        while time.monotonic() < deadline:
            if not _alive(pid):
                raise ServerStartError(f"the vLLM server (pid {pid}) exited during start-up; last log lines:\n{tail(log_path)}")
            try:
                if http.get(f"{url}/health").status_code == 200:
                    health_at = health_at or time.time()
                    models = http.get(f"{url}/v1/models", headers=headers)
                    if models.status_code == 200 and served_name in [m["id"] for m in models.json()["data"]]:
                        return ReadyTimes(health_at, time.time())
                    last = f"/v1/models answered {models.status_code}: {models.text[:200]}"
            except httpx.TransportError as exc:
                last = f"{type(exc).__name__}"
            time.sleep(1)
    stop_server(pid)
    raise ServerStartError(f"the vLLM server was not ready after {timeout:.0f}s ({last}); last log lines:\n{tail(log_path)}")


def _alive(pid: int) -> bool:
    return alive(pid, is_our_server)


def stop_server(pid: int | None, grace: float = 20) -> bool:
    """SIGTERM the server's process group, SIGKILL after `grace` seconds. False if it was already gone."""
    return stop_group(pid, is_our_server, grace, poll=0.3)
