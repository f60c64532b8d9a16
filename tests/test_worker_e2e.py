"""A real worker (issue #22): `prefect deploy --all` from one copy of the project, `prefect worker start --pool
vllm-local` from another, clean copy (as a container would have it: git's tracked and untracked-but-not-ignored
files, no environments, no caches), and every vllm-local deployment run through the API with real parameters,
each waited for and required to end Completed, its artifacts and outputs read back.

The deployer's copy is deleted before the worker starts, so a flow run can only load its code from the worker's
copy; the vLLM server the deploy run starts is checked to be the worker copy's entrypoint. One stack (the default
model, eager, LoRA enabled for update-adapters) serves every run that needs a server, in this order:
stage-model and build-images; plan-capacity and deploy-model; validate (its cheapest suite option: tool_choice
"none" only, one warm-up request), batch-inference (4 lines), status, reap (the stack is minutes into its 24 h
TTL: spared) and scale (to the one replica it has: nothing restarts) at once; pipeline (stage skipped as staged,
deploy a no-op on the running stack, the full validate gate, a 4-line batch, keep_running so the stack stays);
update-adapters (a small random adapter from S3); teardown. build-images builds a one-file image from the image
tests' scratch-made base into their local Registry v2 (the project's own Dockerfiles need base images this
machine cannot pull: tests/test_runtime_image.py builds the runtime one on a Debian-made base).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_images import HELLO, _context, _settings, base_image, buildah_root, registry  # noqa: F401 - fixtures

from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from embedded.adapter_kit import make_adapter
from embedded.stack import DEFAULT_REPO_ID

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e
STACK = "worker-e2e"
BLOCKS = {"store": "worker-e2e-store", "server": "worker-e2e-server", "build": "worker-e2e-build"}


def _copy_project(dest: Path) -> Path:
    """The project as a clone (plus local changes) has it: git's tracked and untracked, not ignored, files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():  # a tracked file deleted in the working tree is listed too
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


async def _client_call(fn):
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return await fn(client)


def _prepare_server():
    """The two work pools (as docs/blocks-and-deployments.md creates them) and the runtime image variable."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.variables import Variable

    async def pools(client):
        template = json.loads((REPO / "images/runtime/ecs-base-job-template.json").read_text())
        for pool in (WorkPoolCreate(name="vllm-local", type="process"),
                     WorkPoolCreate(name="vllm-ecs", type="ecs", base_job_template=template)):
            try:
                await client.create_work_pool(pool)
            except ObjectAlreadyExists:
                pass

    asyncio.run(_client_call(pools))
    Variable.set("vllm_pipeline_image_runtime", "example/runtime:1", overwrite=True)


def _run(name: str, **parameters) -> str:
    from prefect.deployments import run_deployment

    return str(run_deployment(name, parameters=parameters, timeout=0).id)


def _wait(runs: dict[str, str], worker_log: Path, timeout: float = 900) -> None:
    """Until every run is final; each must be Completed, or the message carries its logs and the worker's."""
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    deadline = time.monotonic() + timeout
    states = {}
    while time.monotonic() < deadline:
        states = {name: asyncio.run(_client_call(lambda c, i=run_id: c.read_flow_run(i))).state for name, run_id in runs.items()}
        if all(s is not None and s.is_final() for s in states.values()):
            break
        time.sleep(1)
    bad = {name: s for name, s in states.items() if s is None or not s.is_completed()}
    if bad:
        logs = []
        for name in bad:
            got = asyncio.run(_client_call(lambda c, n=name: c.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[runs[n]])))))
            logs.append(f"--- {name}:\n" + "\n".join(r.message for r in got[-30:]))
        pytest.fail(f"not Completed: { {n: (s.type.value if s else None, s.message if s else '') for n, s in bad.items()} }\n"
                    + "\n".join(logs) + "\n--- worker:\n" + worker_log.read_text(errors="replace")[-4000:])


def _artifacts(run_id: str) -> dict[str, str]:
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    got = asyncio.run(_client_call(lambda c: c.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))))
    return {a.key: a.data if isinstance(a.data, str) else json.dumps(a.data) for a in got if a.key}


def _batch_lines(n: int, tag: str) -> bytes:
    return "".join(json.dumps({"custom_id": f"{tag}-{i}", "method": "POST", "url": "/v1/chat/completions",
                               "body": {"messages": [{"role": "user", "content": f"Say a colour. ({i})"}], "max_tokens": 8}}) + "\n"
                   for i in range(n)).encode()


def _results(s3, bucket: str, output_prefix: str) -> list[dict]:
    """The batch's OpenAI-layout output file (successes; failures would be in errors.jsonl beside it)."""
    body = s3.get_object(Bucket=bucket, Key=f"{output_prefix}/output.jsonl")["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line]


def test_worker_in_a_clean_copy_runs_every_local_deployment(tmp_path, local_aws, bucket, registry, buildah_root,  # noqa: F811
                                                            base_image):  # noqa: F811
    from prefect import flow
    from prefect.settings import PREFECT_API_URL
    from prefect.variables import Variable

    from embedded.hub_server import HubRepo, LocalHub
    from embedded.model_kit import ensure_default_model
    from flows.build import image_variable
    from flows.teardown import teardown
    from tasks.core.aws import Aws, aws_client
    from tasks.core.secrets import read_secret
    from tasks.core.state import load_state
    from tasks.stage.models import find_staged_model
    from tasks.targets.local.runtime import is_our_server
    from tasks.teardown.sweep import leftovers

    deployer, worker_copy = _copy_project(tmp_path / "deployer" / "vllm-pipeline"), _copy_project(tmp_path / "worker" / "vllm-pipeline")
    # the vLLM environment, linked into the copy as scripts/setup.sh links it into a checkout
    (worker_copy / ".venv-vllm").symlink_to((REPO / ".venv-vllm").resolve())
    store = ModelStore(bucket_name=bucket)
    store.save(BLOCKS["store"], overwrite=True)
    VllmServerSettings(enforce_eager=True, enable_lora=True, max_lora_rank=8, max_loras=1).save(BLOCKS["server"], overwrite=True)
    _settings(registry, buildah_root, _context(tmp_path / "hello", HELLO, {"images/hello/app.txt": "hi", "shared/lib.txt": "x"})
              ).save(BLOCKS["build"], overwrite=True)
    s3 = aws_client("s3")
    s3.put_object(Bucket=bucket, Key="batches/in/worker.jsonl", Body=_batch_lines(4, "batch"))
    s3.put_object(Bucket=bucket, Key="pipeline/in/worker.jsonl", Body=_batch_lines(4, "pipe"))
    base = ensure_default_model()
    adapter = make_adapter(tmp_path / "style", DEFAULT_REPO_ID, json.loads((base / "config.json").read_text()), seed=7)
    for p in adapter.iterdir():
        s3.put_object(Bucket=bucket, Key=f"incoming/style-lora/{p.name}", Body=p.read_bytes())

    api = PREFECT_API_URL.value()
    _prepare_server()
    deploy = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", "--all"], cwd=deployer,
                            env={**os.environ, "PREFECT_API_URL": api, "PWD": str(deployer)}, capture_output=True, text=True, timeout=300)
    assert deploy.returncode == 0, deploy.stdout[-3000:] + deploy.stderr[-3000:]
    shutil.rmtree(deployer.parent)  # a worker elsewhere does not have the deployer's checkout

    worker_log = tmp_path / "worker.log"
    stored = {"model_store_block": BLOCKS["store"]}
    with LocalHub({DEFAULT_REPO_ID: HubRepo(base)}) as hub, worker_log.open("w") as log:
        env = {**os.environ, "PREFECT_API_URL": api, "PWD": str(worker_copy), "HF_ENDPOINT": hub.endpoint,
               "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_HOME": str(tmp_path / "prefect-home"),
               "VLLM_PIPELINE_CACHE": str(tmp_path / "cache")}  # the model cache and server log go with the test
        env.pop("PYTHONPATH", None)
        worker = subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "vllm-local"], cwd=worker_copy,
                                  env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            runs = {"stage": _run("stage-model/stage-model", repo_id=DEFAULT_REPO_ID, **stored),
                    "build": _run("build-images/build-images", image_build_block=BLOCKS["build"])}
            _wait(runs, worker_log)
            runs |= {"plan": _run("plan-capacity/plan-capacity", repo_id=DEFAULT_REPO_ID, server_settings_block=BLOCKS["server"],
                                  concurrency=1, **stored),
                     "deploy": _run("deploy-model/deploy-model", stack=STACK, target="local", repo_id=DEFAULT_REPO_ID,
                                    server_settings_block=BLOCKS["server"], ready_timeout_s=600, **stored)}
            _wait(runs, worker_log)
            state, _ = load_state(store, STACK)
            assert state.status == "running" and is_our_server(state.endpoint.pid)
            cmdline = Path(f"/proc/{state.endpoint.pid}/cmdline").read_bytes().decode(errors="replace")
            assert str(worker_copy / "images" / "vllm" / "entrypoint.py") in cmdline, cmdline  # the worker copy's code
            runs |= {"validate": _run("validate/validate", stack=STACK, modes=["none"], warmup_requests=1, **stored),
                     "batch": _run("batch-inference/batch-inference", input_uri=f"s3://{bucket}/batches/in/worker.jsonl",
                                   stack=STACK, concurrency=4, **stored),
                     "status": _run("status/status", **stored),
                     "reap": _run("reap/reap", dry_run=False, **stored),
                     "scale": _run("scale/scale", stack=STACK, replicas=1, **stored)}
            _wait(runs, worker_log)
            runs["pipeline"] = _run("pipeline/pipeline", stack=STACK, repo_id=DEFAULT_REPO_ID, keep_running=True,
                                    batch_input_uri=f"s3://{bucket}/pipeline/in/worker.jsonl", batch_concurrency=4,
                                    server_settings_block=BLOCKS["server"], **stored)
            _wait(runs, worker_log)
            runs["adapters"] = _run("update-adapters/update-adapters", stack=STACK,
                                    add=[{"name": "style", "source": f"s3://{bucket}/incoming/style-lora"}], **stored)
            _wait(runs, worker_log)
            after, _ = load_state(store, STACK)
            key = read_secret(after.endpoint.api_key_secret).get_secret_value()
            models = httpx.get(f"{after.endpoint.url}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=30).json()
            runs["teardown"] = _run("teardown/teardown", stack=STACK, **stored)
            _wait(runs, worker_log)
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            try:
                worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
            if load_state(store, STACK)[0] is not None:  # a failed run leaves no server behind
                flow(name="worker-e2e-cleanup")(lambda: teardown(STACK, store))()

    # what each run did, read back from its artifacts, S3 and the registry
    art = {name: _artifacts(run_id) for name, run_id in runs.items()}
    assert "stage-huggingfacetb-smollm2-135m-instruct" in art["stage"]
    assert find_staged_model.fn(store, repo_id=DEFAULT_REPO_ID).repo_id == DEFAULT_REPO_ID
    assert "g4dn.xlarge" in art["plan"]["capacity-plan-huggingfacetb-smollm2-135m-instruct"]
    assert Variable.get(image_variable("hello")).startswith(f"{registry.host}/test/hello@sha256:")
    assert "1 built and pushed" in art["build"]["build-images"]
    assert "PASSED" in art["validate"][f"validate-{STACK}"].splitlines()[0]
    batch = _results(s3, bucket, "batches/in-results/worker")
    assert sorted(r["custom_id"] for r in batch) == [f"batch-{i}" for i in range(4)]
    assert all(r["response"]["status_code"] == 200 for r in batch)
    assert STACK in art["status"]["stacks-status"]
    assert f"scale-{STACK}" in art["scale"]  # already at 1: it serves on, nothing restarted
    assert "deploy" in art["pipeline"][f"pipeline-{STACK}"] and "completed" in art["pipeline"][f"pipeline-{STACK}"].splitlines()[0]
    assert sorted(r["custom_id"] for r in _results(s3, bucket, "pipeline/in-results/worker")) == [f"pipe-{i}" for i in range(4)]
    assert sorted(m["id"] for m in models["data"]) == ["smollm2-135m-instruct", "style"]
    assert after.endpoint.pid == state.endpoint.pid  # reap spared it; pipeline's deploy and the adapter kept the server
    assert set(after.adapters) == {"style"}
    assert load_state(store, STACK)[0] is None and leftovers(Aws(), STACK) == [] and not is_our_server(state.endpoint.pid)
