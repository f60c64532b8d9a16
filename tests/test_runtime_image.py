"""The flow-runtime image (issue #22), built for real and run as Prefect's ECS work pool runs it.

The base is a python:3.11 slim-bookworm stand-in made from Debian's archive (tests/debian_base.py, cached in
~/.cache/vllm-pipeline/images/), given as the build arg PYTHON_IMAGE; images/runtime/Dockerfile is built on it by
the product's own builder (tasks/build/images.py, buildah). Then three flow runs of the ECS deployments
(`prefect deploy` from prefect.yaml onto a vllm-ecs pool with images/runtime/ecs-base-job-template.json) are
submitted by prefect-aws's own ECSWorker; the RunTask request it makes is recorded instead of sent (moto's RunTask
cannot place a Fargate task whose containers carry no memory of their own, which is what the worker registers),
and its container override -- command and environment, exactly as ECS would hand them over -- is run in a fresh
container of the image (`buildah run`, host network, the image's user, entrypoint and working directory) against
the session's moto server and the local hub. AWS credentials are only in the blocks; the environment carries the
endpoints, as an operator would set them in the pool's `env` job variable.

The gateway's image (images/gateway/) is built the same way in the same container storage, on the same base,
and `python -m gateway` runs in it as the ECS service runs it: tenants from a Secrets Manager secret, the tool set
from S3 (both on moto), answering /health; the image holds the gateway and its pinned libraries, nothing of the
pipeline.

The build needs PyPI. pip in the image trusts Debian's CA bundle; where this machine's HTTPS passes a proxy
with its own CA, its bundle is lent to the build's RUN steps by a containers.conf volume (read-only, for the
build only: nothing of it is committed to the image).
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
import uuid
from pathlib import Path

import pytest
from debian_base import base_archive, import_base
from debian_base import image_ref as base_ref
from prefect import flow
from prefect_aws import AwsCredentials

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.image_build import ImageBuildSettings
from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration
HOST_CA = Path("/etc/ssl/certs/ca-certificates.crt")
POOL = "vllm-ecs"
CLUSTER = "vllm-pipeline-flows"
ACCOUNT = "123456789012"
VLLM_IMAGE = f"{ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm@sha256:" + "ab" * 32
DEPLOYMENTS = ("deploy-model-ecs", "teardown-ecs", "pipeline-ecs")
TIMINGS: dict[str, float] = {}
# overlay, not the builder's default vfs: vfs copies the whole ~630 MB image into every new container (10-20 s each
# on 2 busy cores, four containers here) and diffs whole trees to commit; overlay does neither.
STORAGE_DRIVER = "overlay"


def _buildah_base(root: Path) -> list[str]:
    return ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", STORAGE_DRIVER]


def _check(done: subprocess.CompletedProcess, what: str) -> subprocess.CompletedProcess:
    assert done.returncode == 0, f"{what} failed ({done.returncode}): {(done.stdout or '')[-3000:]}{(done.stderr or '')[-3000:]}"
    return done


@pytest.fixture(scope="module")
def runtime_image(tmp_path_factory, local_aws):
    """(buildah argv prefix, local image reference): images/runtime/Dockerfile built on the Debian-made base by
    the build tasks, beside `prefect deploy` of the three ECS deployments (which read the image's Variable)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectAlreadyExists
    from prefect.settings import PREFECT_API_URL
    from prefect.variables import Variable

    from flows.build import image_variable
    from tasks.build.images import build_image, prepare_context

    if shutil.which("buildah") is None:
        pytest.fail("buildah is not installed: run scripts/setup.sh")
    root = tmp_path_factory.mktemp("runtime-containers")
    buildah = _buildah_base(root)
    settings = ImageBuildSettings(builder="buildah", storage_root=str(root), buildah_storage_driver=STORAGE_DRIVER,
                                  pull_policy="never", build_args={"PYTHON_IMAGE": base_ref()})

    @flow(name="t-build-runtime-image")
    def build() -> str:
        ctx = prepare_context(settings, "runtime")
        ref = f"localhost/vllm-pipeline/runtime:{ctx.tag}"
        Variable.set(image_variable("runtime"), ref, overwrite=True)  # what build-images records for the ECS pool
        deploy = _deploy_in_background()
        started = time.monotonic()
        import_base(buildah, base_archive())
        TIMINGS["base"] = time.monotonic() - started
        # CONTAINERS_CONF replaces buildah's containers.conf for the build only; its one setting lends this machine's
        # CA bundle to the RUN steps (pip's HTTPS to PyPI), read-only and never committed.
        conf = root / "containers.conf"
        conf.write_text("[containers]\nvolumes = [%s]\n" % (f'"{HOST_CA}:{HOST_CA}:ro"' if HOST_CA.is_file() else ""))
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CONTAINERS_CONF", str(conf))
            started = time.monotonic()
            build_image(settings, "buildah", ctx, ref)
            TIMINGS["build"] = time.monotonic() - started
        assert deploy.wait(timeout=300) == 0, (root / "deploy.log").read_text()[-3000:]
        return ref

    def _deploy_in_background() -> subprocess.Popen:
        async def pool():
            template = json.loads((REPO / "images" / "runtime" / "ecs-base-job-template.json").read_text())
            async with get_client() as client:
                try:
                    await client.create_work_pool(WorkPoolCreate(name=POOL, type="ecs", base_job_template=template))
                except ObjectAlreadyExists:  # another test made it: bring its template in line
                    await client.update_work_pool(POOL, WorkPoolUpdate(base_job_template=template))

        asyncio.run(pool())
        env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(REPO)}
        names = [a for d in DEPLOYMENTS for a in ("--name", d)]
        with (root / "deploy.log").open("w") as log:
            return subprocess.Popen([sys.executable, "-m", "prefect", "--no-prompt", "deploy", *names], cwd=REPO, env=env,
                                    stdout=log, stderr=subprocess.STDOUT)

    ref = build()
    yield buildah, ref
    subprocess.run([*buildah, "rm", "--all"], capture_output=True, timeout=120)  # nothing stays mounted
    shutil.rmtree(root, ignore_errors=True)
    print("\nruntime image seconds:", {k: round(v, 1) for k, v in TIMINGS.items()})  # shown with -s


@pytest.fixture(scope="module")
def gateway_image(runtime_image) -> str:
    """images/gateway/Dockerfile built by the build task in the runtime image's storage, where the base is imported
    already (so its cost here is the build alone)."""
    from tasks.build.images import build_image, prepare_context

    buildah, _ = runtime_image
    root = Path(buildah[buildah.index("--root") + 1]).parent
    settings = ImageBuildSettings(builder="buildah", storage_root=str(root), buildah_storage_driver=STORAGE_DRIVER,
                                  pull_policy="never", build_args={"PYTHON_IMAGE": base_ref()})

    @flow(name="t-build-gateway-image")
    def build() -> str:
        ctx = prepare_context(settings, "gateway")
        ref = f"localhost/vllm-pipeline/gateway:{ctx.tag}"
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("CONTAINERS_CONF", str(root / "containers.conf"))  # the runtime build's: the host CA for pip
            started = time.monotonic()
            build_image(settings, "buildah", ctx, ref)
            TIMINGS["gateway build"] = time.monotonic() - started
        return ref

    return build()


@pytest.fixture()
def saved_blocks(bucket, local_aws, request):
    """The runs' configuration as saved blocks; the only AWS credentials the container gets are in them."""
    creds = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=local_aws.region)
    name = request.node.name.replace("_", "-")[:40]
    ModelStore(bucket_name=bucket, credentials=creds).save(f"{name}-store", overwrite=True)
    VllmServerSettings(max_model_len=512).save(f"{name}-server", overwrite=True)
    EcsGpuCapacity(ingress_cidrs=["10.3.0.0/16"], region=local_aws.region).save(f"{name}-capacity", overwrite=True)
    return {"model_store_block": f"{name}-store", "server_settings_block": f"{name}-server",
            "capacity_block": f"{name}-capacity"}


def run_on_ecs_pool(buildah: list[str], deployment: str, parameters: dict, env: dict[str, str]) -> tuple[object, dict, str]:
    """A flow run of `deployment`, submitted by prefect-aws's ECSWorker, run as ECS would run its container.
    Returns the flow run as it ended, the RunTask request the worker made and the container's output."""
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect_aws.workers.ecs_worker import ECSWorker

    from tasks.core.aws import aws_client

    aws_client("ecs").create_cluster(clusterName=CLUSTER)  # the pool's cluster (get-or-create in ECS)
    job_variables = {"cluster": CLUSTER, "env": env,
                     "execution_role_arn": f"arn:aws:iam::{ACCOUNT}:role/ecsTaskExecutionRole",
                     "task_role_arn": f"arn:aws:iam::{ACCOUNT}:role/vllm-pipeline-flow-runner"}
    flow_run = run_deployment(f"{_flow_name(deployment)}/{deployment}", parameters=parameters, job_variables=job_variables,
                              timeout=0)
    requests: list[dict] = []

    def record_run_task(self, ecs_client, task_run_request: dict) -> dict:
        requests.append(task_run_request)
        task_id = uuid.uuid4().hex
        return {"taskArn": f"arn:aws:ecs:us-east-1:{ACCOUNT}:task/{CLUSTER}/{task_id}",
                "clusterArn": f"arn:aws:ecs:us-east-1:{ACCOUNT}:cluster/{CLUSTER}"}

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ECSWorker, "_create_task_run", record_run_task)
        asyncio.run(ECSWorker(work_pool_name=POOL).start(run_once=True, printer=lambda *a, **k: None))
    [request] = [r for r in requests if _override(r)["environment"].get("PREFECT__FLOW_RUN_ID") == str(flow_run.id)]
    task_def = aws_client("ecs").describe_task_definition(taskDefinition=request["taskDefinition"])["taskDefinition"]
    [container] = [c for c in task_def["containerDefinitions"] if c["name"] == _override(request)["name"]]
    env = {**{e["name"]: e["value"] for e in container.get("environment", [])}, **_override(request)["environment"]}
    output = run_container(buildah, container["image"], _override(request)["command"], env, label=deployment)

    async def read():
        async with get_client() as client:
            return await client.read_flow_run(flow_run.id)

    return asyncio.run(read()), request, output[-4000:]


def _flow_name(deployment: str) -> str:
    return {"deploy-model-ecs": "deploy-model", "teardown-ecs": "teardown", "pipeline-ecs": "pipeline"}[deployment]


def _override(request: dict) -> dict:
    over = request["overrides"]["containerOverrides"][0]
    return {"name": over["name"], "command": over.get("command"),
            "environment": {e["name"]: e["value"] for e in over.get("environment", [])}}


def run_container(buildah: list[str], image: str, command: list[str] | None, env: dict[str, str], label: str = "run") -> str:
    """ECS's part: a fresh container of `image`, its entrypoint + `command` (the image's CMD when there is none),
    the image's user and working directory, `env` over the image's environment, the host's network."""
    config = json.loads(_check(subprocess.run([*buildah, "inspect", "--type", "image", image], capture_output=True,
                                              text=True, timeout=120), "buildah inspect").stdout)["OCIv1"]["config"]
    argv = [*(config.get("Entrypoint") or []), *(command or config.get("Cmd") or [])]
    started = time.monotonic()
    ctr = _check(subprocess.run([*buildah, "from", "--quiet", "--pull=never", image], capture_output=True, text=True,
                                timeout=300), "buildah from").stdout.strip()
    try:
        env_args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
        done = subprocess.run([*buildah, "run", "--isolation", "chroot", "--network", "host", *env_args, ctr, "--", *argv],
                              capture_output=True, text=True, timeout=600)
    finally:
        subprocess.run([*buildah, "rm", ctr], capture_output=True, timeout=120)
    TIMINGS[label] = time.monotonic() - started
    return done.stdout + done.stderr


def _endpoints(local_aws, **more: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": local_aws.endpoint, **more}


# ------------------------------------------------------------------------------------------------ tests


def test_image_is_built_on_the_debian_base_and_starts_as_its_user(runtime_image):
    """The image's own check ran at build time (every flow module imported); it starts as user 10001 with its
    HOME writable (Prefect keeps its home and local result storage there) in the project's directory."""
    buildah, ref = runtime_image
    config = json.loads(_check(subprocess.run([*buildah, "inspect", "--type", "image", ref], capture_output=True, text=True,
                                              timeout=120), "buildah inspect").stdout)["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["/usr/bin/tini", "-g", "--"]
    assert config["WorkingDir"] == "/opt/vllm-pipeline" and "HOME=/home/prefect" in config["Env"]
    out = run_container(buildah, ref, ["sh", "-c", "id -u; echo $HOME; pwd; touch $HOME/probe && echo writable"], {},
                        label="shell")
    assert out.splitlines()[:4] == ["10001", "/home/prefect", "/opt/vllm-pipeline", "writable"], out


def test_pipeline_ecs_build_step_with_codebuild_runs_in_the_image(runtime_image, saved_blocks, bucket, hub, local_aws):
    """pipeline-ecs in the image: the stage step copies the model from the local hub, the build step (builder
    codebuild) hashes the images' contexts from the image's own copy of images/ -- the same hashes as this
    checkout's -- uploads them and starts a CodeBuild build. moto's CodeBuild runs nothing, so no image reaches
    ECR and the build step fails there, reading the pushed image back; that is as far as moto allows."""
    from tasks.build.codebuild import context_key
    from tasks.build.images import context_zip, resolve_context
    from tasks.core.aws import aws_client

    buildah, _ = runtime_image
    creds = AwsCredentials(aws_access_key_id="testing", aws_secret_access_key="testing", region_name=local_aws.region)
    build = ImageBuildSettings(builder="codebuild", codebuild_bucket=bucket, credentials=creds,
                               codebuild_project="t-runtime-image-build",
                               codebuild_service_role_arn=f"arn:aws:iam::{ACCOUNT}:role/t-codebuild")
    build.save("t-runtime-image-codebuild", overwrite=True)
    ModelSource(repo_id="acme/tiny").save("t-runtime-image-source", overwrite=True)
    run, request, output = run_on_ecs_pool(
        buildah, "pipeline-ecs",
        {"stack": "rt-pipe", "image_build_block": "t-runtime-image-codebuild", "model_source_block": "t-runtime-image-source",
         "model_store_block": saved_blocks["model_store_block"], "capacity_block": saved_blocks["capacity_block"],
         "server_settings_block": saved_blocks["server_settings_block"]},
        _endpoints(local_aws, HF_ENDPOINT=hub.endpoint))
    assert _override(request)["command"] == ["prefect", "flow-run", "execute"]
    assert run.state.is_failed(), (run.state, output)
    ctx = resolve_context(REPO, "vllm", build.build_args, build.platform)
    # the image hashed its own copy of images/vllm/ to the tag this checkout hashes it to
    assert f"image vllm: pushed {ACCOUNT}.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm:{ctx.tag} but the registry " \
           "does not list it" in run.state.message, run.state.message
    s3 = aws_client("s3")
    assert s3.get_object(Bucket=bucket, Key=context_key(build, ctx))["Body"].read() == context_zip(ctx)
    assert s3.list_objects_v2(Bucket=bucket, Prefix="models/acme/tiny/")["KeyCount"] > 0  # staged through the local hub
    cb = aws_client("codebuild")
    assert cb.list_builds_for_project(projectName="t-runtime-image-build")["ids"]


def test_deploy_model_ecs_in_the_image_fails_only_at_the_wait_and_rolls_back(runtime_image, saved_blocks, bucket, local_aws):
    """deploy-model-ecs in the image: plan, then every resource of the stack on moto, then the wait -- where it
    fails, as moto runs no containers -- and the rollback leaves nothing, not even the state record."""
    from test_capacity import SMOLLM2_135M, SMOLLM2_BYTES
    from test_ecs_target import stage_fake

    from tasks.core.aws import Aws
    from tasks.core.state import load_state
    from tasks.teardown.sweep import leftovers

    buildah, _ = runtime_image
    model = stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])
    run, _, output = run_on_ecs_pool(
        buildah, "deploy-model-ecs",
        {"stack": "rt-deploy", "model_uri": model.s3_uri, "image_uri": VLLM_IMAGE, "ready_timeout_s": 1, **saved_blocks},
        _endpoints(local_aws))
    assert run.state.is_failed(), (run.state, output)
    assert "DeployTimeout" in run.state.message and "no container instance has joined" in run.state.message, run.state.message
    assert leftovers(Aws(region=local_aws.region), "rt-deploy") == []
    assert load_state(ModelStore(bucket_name=bucket), "rt-deploy")[0] is None


def test_teardown_ecs_in_the_image_deletes_what_a_dead_deploy_left(runtime_image, saved_blocks, bucket, local_aws):
    """teardown-ecs in the image, on a stack whose deploy died before it could roll back (no state record: what
    is left is found by the tag scan alone): Completed, and nothing tagged with the stack is left."""
    from tasks.core.aws import Aws, aws_client
    from tasks.core.naming import resource_name, secret_name, tag_list
    from tasks.teardown.sweep import leftovers

    buildah, _ = runtime_image
    stack = "rt-teardown"
    aws_client("ecs").create_cluster(clusterName=resource_name(stack, "cluster"), tags=tag_list(stack, "key", "value"))
    vpc = aws_client("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    aws_client("ec2").create_security_group(
        GroupName=resource_name(stack, "alb-sg"), Description="left by a dead deploy", VpcId=vpc,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": tag_list(stack)}])
    aws_client("secretsmanager").create_secret(Name=secret_name(stack, "api-key"), SecretString="x", Tags=tag_list(stack))
    assert len(leftovers(Aws(region=local_aws.region), stack)) >= 3
    blocks = {k: saved_blocks[k] for k in ("model_store_block", "capacity_block")}
    run, _, output = run_on_ecs_pool(buildah, "teardown-ecs", {"stack": stack, **blocks}, _endpoints(local_aws))
    assert run.state.is_completed(), (run.state, output)
    assert leftovers(Aws(region=local_aws.region), stack) == []


def test_gateway_image_serves_health_from_its_secret_and_holds_no_pipeline(runtime_image, gateway_image, bucket, local_aws):
    """The gateway's image as its ECS service runs it: its entrypoint, user 10001, the host's network, tenants from a
    Secrets Manager secret and the tool set from S3 (moto); /health answers, the tenant's key lists its tools. In the
    image: the pinned libraries and nothing else pip installed, no Prefect, no flows/tasks/blocks/embedded."""
    import httpx

    from embedded.net import free_port, stop_process, wait_for_port
    from tasks.core.aws import aws_client

    buildah, _ = runtime_image
    config = json.loads(_check(subprocess.run([*buildah, "inspect", "--type", "image", gateway_image], capture_output=True,
                                              text=True, timeout=120), "buildah inspect").stdout)["OCIv1"]["config"]
    assert config["User"] == "10001:10001" and config["Entrypoint"] == ["python", "-m", "gateway"]
    assert "8001/tcp" in config["ExposedPorts"] and "Healthcheck" not in config

    key = "sk-image-test-0123456789"
    aws_client("s3").put_object(Bucket=bucket, Key="gateway/acme.yaml", Body=b"tools:\n  - builtin: calculate\n")
    tenants = {"tenants": {"acme": {"api_keys": [key], "model": "acme-tools", "toolset": f"s3://{bucket}/gateway/acme.yaml"}}}
    arn = aws_client("secretsmanager").create_secret(Name=f"t-gateway-image/{bucket}", SecretString=json.dumps(tenants))["ARN"]
    port = free_port()
    env = {"AWS_ENDPOINT_URL": local_aws.endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": local_aws.region, "GATEWAY_TENANTS_SECRET": arn, "GATEWAY_PORT": str(port),
           "GATEWAY_UPSTREAM_URL": "http://127.0.0.1:9/v1"}  # /health and /v1/tools never call the upstream
    started = time.monotonic()
    ctr = _check(subprocess.run([*buildah, "from", "--quiet", "--pull=never", gateway_image], capture_output=True, text=True,
                                timeout=300), "buildah from").stdout.strip()
    log = (Path(buildah[buildah.index("--root") + 1]).parent / "gateway.log").open("w+")
    env_args = [a for k, v in env.items() for a in ("--env", f"{k}={v}")]
    proc = subprocess.Popen([*buildah, "run", "--isolation", "chroot", "--network", "host", *env_args, ctr, "--",
                             *config["Entrypoint"]], stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_port(port, timeout=90, proc=proc)
        base = f"http://127.0.0.1:{port}"
        assert httpx.get(f"{base}/health", timeout=10).json() == {"status": "ok", "tenants": 1}
        tools = httpx.get(f"{base}/v1/tools", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()["data"]
        assert [t["function"]["name"] for t in tools] == ["calculate"]
        assert httpx.get(f"{base}/v1/tools", timeout=10).status_code == 401
        TIMINGS["gateway up"] = time.monotonic() - started
        # What the image holds, asked of its own interpreter (the server keeps running beside it).
        probe = ("import importlib.metadata as md, importlib.util as u, json, os, sys\n"
                 "print(json.dumps({'dists': sorted(f\"{d.metadata['Name']}=={d.version}\" for d in md.distributions()\n"
                 "                                  if '/usr/local/' in str(d._path)),\n"
                 "                  'modules': {m: u.find_spec(m) is not None for m in ('gateway', 'prefect', 'tasks', 'flows',\n"
                 "                                                                      'blocks', 'embedded', 'vllm')},\n"
                 "                  'cwd': sorted(os.listdir('.')), 'uid': os.getuid()}))\n")
        out = _check(subprocess.run([*buildah, "run", "--isolation", "chroot", ctr, "--", "python", "-c", probe],
                                    capture_output=True, text=True, timeout=300), "probe").stdout
        got = json.loads(out.strip().splitlines()[-1])
        assert got["modules"] == {"gateway": True, "prefect": False, "tasks": False, "flows": False, "blocks": False,
                                  "embedded": False, "vllm": False}, got
        assert got["cwd"] == ["gateway"] and got["uid"] == 10001, got
        pins = [line.split("#")[0].strip() for line in (REPO / "images" / "gateway" / "requirements.txt").read_text().splitlines()]
        norm = sorted(p.lower().replace("_", "-") for p in pins if p)
        assert sorted(d.lower().replace("_", "-") for d in got["dists"]) == norm, got["dists"]
        # ECS stops a task with SIGTERM to its process: the exec-form entrypoint makes that the gateway itself, and
        # uvicorn shuts down cleanly. (SIGTERM to `buildah run` would SIGKILL it: chroot isolation's own way.)
        servers = [pid for pid in _processes() if _cmdline(pid)[-2:] == ["-m", "gateway"] and f"GATEWAY_PORT={port}" in _environ(pid)]
        assert len(servers) == 1, [(pid, _cmdline(pid)) for pid in _processes() if "gateway" in " ".join(_cmdline(pid))]
        os.kill(servers[0], signal.SIGTERM)
        proc.wait(timeout=60)  # (buildah's own status says how its chroot child ended, not whether it was clean)
    finally:
        stop_process(proc)
        subprocess.run([*buildah, "rm", ctr], capture_output=True, timeout=120)
        log.seek(0)
        output = log.read()
        log.close()
    assert "Uvicorn running on http://0.0.0.0:" in output, output[-3000:]
    assert "Shutting down" in output and "Finished server process" in output, output[-3000:]  # a clean stop


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
    except OSError:
        return []


def _environ(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _processes() -> list[int]:
    return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
