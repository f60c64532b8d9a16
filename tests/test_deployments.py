"""prefect.yaml: `prefect deploy --all` works against a Prefect server and creates what docs/blocks-and-deployments.md says."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def test_every_deployment_entrypoint_is_a_flow():
    import importlib

    from prefect import Flow

    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    for d in spec["deployments"]:
        module, _, name = d["entrypoint"].partition(":")
        obj = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        assert isinstance(obj, Flow), d["name"]
        unknown = set(d.get("parameters", {})) - set(obj.parameters.properties)
        assert not unknown, f"{d['name']}: parameters the flow does not take: {unknown}"


def test_prefect_deploy_all(tmp_path):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(REPO)}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "vllm-local", "--type", "process"], env=env, cwd=REPO,
                   capture_output=True, text=True, timeout=120)
    ecs_pool = subprocess.run([*prefect, "work-pool", "create", "vllm-ecs", "--type", "ecs", "--base-job-template",
                               "images/runtime/ecs-base-job-template.json", "--overwrite"],
                              env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert ecs_pool.returncode == 0, ecs_pool.stdout[-2000:] + ecs_pool.stderr[-2000:]
    image = "123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/runtime@sha256:" + "cd" * 32
    subprocess.run([*prefect, "variable", "set", "vllm_pipeline_image_runtime", image, "--overwrite"], env=env, cwd=REPO,
                   capture_output=True, text=True, timeout=120, check=True)
    out = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    async def read():
        async with get_client() as client:
            return await client.read_deployments()

    deployments = {d.name: d for d in asyncio.run(read())}
    expected = {d["name"] for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert expected <= set(deployments)
    batch = deployments["batch-inference"]
    assert [s.schedule.cron for s in batch.schedules] == ["0 2 * * *"]
    assert deployments["teardown"].parameters == {"stack": "demo"}
    # the AWS deployments run on the ECS pool, in the flow-runtime image the build recorded
    ecs = deployments["deploy-model-ecs"]
    assert ecs.work_pool_name == "vllm-ecs" and ecs.parameters["target"] == "ecs"
    assert ecs.job_variables["image"] == image
    assert deployments["pipeline-ecs"].parameters["target"] == "ecs"

    async def pool():
        async with get_client() as client:
            return await client.read_work_pool("vllm-ecs")

    props = asyncio.run(pool()).base_job_template["variables"]["properties"]
    assert props["launch_type"]["default"] == "FARGATE" and props["configure_cloudwatch_logs"]["default"] is True


# Project paths the runtime image carries (images/runtime/Dockerfile WORKDIR); the ECS work pool's
# flow runs start there, whatever directory `prefect deploy` was run from.
RUNTIME_WORKDIR = "/opt/vllm-pipeline"


def test_ecs_pull_steps_do_not_depend_on_the_deployers_checkout(tmp_path):
    """Issue #22 finding 2: deploy from a copy elsewhere; the vllm-ecs deployments must pull into the image's
    working directory, the vllm-local ones into the checkout `prefect deploy` ran from."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    checkout = tmp_path / "somebody" / "vllm-pipeline"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "tests", "bench", "node_modules"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(checkout)}
    prefect = [sys.executable, "-m", "prefect"]
    for pool, kind in (("vllm-local", "process"), ("vllm-ecs", "ecs")):
        subprocess.run([*prefect, "work-pool", "create", pool, "--type", kind], env=env, cwd=checkout,
                       capture_output=True, text=True, timeout=120)
    subprocess.run([*prefect, "variable", "set", "vllm_pipeline_image_runtime", "example/runtime:1", "--overwrite"],
                   env=env, cwd=checkout, capture_output=True, text=True, timeout=120, check=True)
    out = subprocess.run([*prefect, "--no-prompt", "deploy", "--all"], env=env, cwd=checkout,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]

    async def read():
        async with get_client() as client:
            return await client.read_deployments()

    deployments = {d.name: d for d in asyncio.run(read())}
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]
    for d in spec:
        stored = deployments[d["name"]]
        dirs = [step["prefect.deployments.steps.set_working_directory"]["directory"]
                for step in stored.pull_steps or [] if "prefect.deployments.steps.set_working_directory" in step]
        want = RUNTIME_WORKDIR if d["work_pool"]["name"] == "vllm-ecs" else str(checkout)
        assert dirs == [want], f"{d['name']} (pool {d['work_pool']['name']}): pull steps {stored.pull_steps}"
