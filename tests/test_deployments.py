"""prefect.yaml: `prefect deploy --all` works against a Prefect server and creates what docs/blocks-and-deployments.md says."""

from __future__ import annotations

import asyncio
import json
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
    working directory, the vllm-local ones into the worker's own directory (`working_dir` "." and a "." pull step,
    both resolved by the worker: tests/test_worker_e2e.py runs them). Then each vllm-ecs deployment as the ECS
    worker renders it for a flow run (prefect-aws's job configuration on the pool's template): no path of the
    deployer's checkout, the default command, no environment that overrides the image's, and its pull steps and
    entrypoint loading the flow from the runtime image's layout (rebuilt from images/runtime/Dockerfile) with
    that command's environment and the image's PYTHONPATH."""
    import shutil

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL
    from prefect_aws.workers.ecs_worker import ECSJobConfiguration
    from test_runtime_layout import _image_layout, _workdir_and_copies

    checkout = tmp_path / "somebody" / "vllm-pipeline"
    shutil.copytree(REPO, checkout, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "__pycache__", "*.egg-info", ".pytest_cache", "tests", "bench", "node_modules"))
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PWD": str(checkout)}
    prefect = [sys.executable, "-m", "prefect"]
    subprocess.run([*prefect, "work-pool", "create", "vllm-local", "--type", "process"], env=env, cwd=checkout,
                   capture_output=True, text=True, timeout=120)
    subprocess.run([*prefect, "work-pool", "create", "vllm-ecs", "--type", "ecs", "--base-job-template",
                    "images/runtime/ecs-base-job-template.json", "--overwrite"], env=env, cwd=checkout, capture_output=True,
                   text=True, timeout=120)
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
        ecs = d["work_pool"]["name"] == "vllm-ecs"
        assert dirs == [RUNTIME_WORKDIR if ecs else "."], f"{d['name']} (pool {d['work_pool']['name']}): pull steps {stored.pull_steps}"
        if not ecs:
            assert stored.job_variables == {"working_dir": "."}, f"{d['name']}: job variables {stored.job_variables}"

    # the ECS worker's view of each vllm-ecs deployment
    workdir, _ = _workdir_and_copies()
    assert workdir == RUNTIME_WORKDIR
    ecs_names = [d["name"] for d in spec if d["work_pool"]["name"] == "vllm-ecs"]

    roles = {"execution_role_arn": "arn:aws:iam::123456789012:role/ecsTaskExecutionRole",
             "task_role_arn": "arn:aws:iam::123456789012:role/vllm-pipeline-flow-runner"}

    async def render():
        from prefect.exceptions import PrefectHTTPStatusError

        async with get_client() as client:
            pool = await client.read_work_pool("vllm-ecs")
            # only the account has the two roles: without them no ECS flow run is created (prefect-aws would refuse
            # every run in the worker instead: CloudWatch logs need the execution role)
            with pytest.raises(PrefectHTTPStatusError, match="execution_role_arn"):
                await client.create_flow_run_from_deployment(deployments[ecs_names[0]].id)
            rendered = {}
            for name in ecs_names:
                dep = deployments[name]
                config = await ECSJobConfiguration.from_template_and_values(pool.base_job_template,
                                                                              {**(dep.job_variables or {}), **roles})
                flow_run = await client.create_flow_run_from_deployment(dep.id, job_variables=roles)
                config.prepare_for_flow_run(flow_run, deployment=dep, flow=await client.read_flow(dep.flow_id), work_pool=pool)
                rendered[name] = (config, flow_run.id)
                await client.delete_flow_run(flow_run.id)
            return rendered

    probes = []
    for name, (config, run_id) in asyncio.run(render()).items():
        dump = json.dumps(config.model_dump(mode="json", exclude={"aws_credentials"}))
        assert str(checkout) not in dump and str(checkout.parent) not in dump, f"{name}: the deployer's checkout in {dump[:500]}"
        assert config.command == "prefect flow-run execute", f"{name}: command {config.command!r}"
        assert config.env["PREFECT__FLOW_RUN_ID"] == str(run_id)
        assert not {"PYTHONPATH", "HOME", "PWD", "PATH"} & set(config.env), f"{name}: overrides the image's ENV: {sorted(config.env)}"
        [container] = config.task_definition["containerDefinitions"]
        assert container["image"] == "example/runtime:1" and "workingDirectory" not in container, container
        assert config.task_definition["executionRoleArn"] == roles["execution_role_arn"]
        probes.append([name, deployments[name].pull_steps, deployments[name].entrypoint])

    image_root = tmp_path / "image"
    layout = _image_layout(image_root)
    probe = (
        "import asyncio, json, os, sys\n"
        "from prefect.deployments.steps.core import run_steps\n"
        "from prefect.flows import load_flow_from_entrypoint\n"
        "out = {}\n"
        "for name, steps, entrypoint in json.loads(sys.argv[1]):\n"
        "    os.chdir('/')\n"
        "    asyncio.run(run_steps(steps))\n"
        "    flow = load_flow_from_entrypoint(entrypoint)\n"
        "    out[name] = [os.getcwd(), flow.name, sys.modules[flow.fn.__module__].__file__]\n"
        "print(json.dumps(out))\n"
    )
    # the image's /opt/vllm-pipeline is the rebuilt layout here; the command's environment plus the image's ENV
    mapped = json.dumps(probes).replace(json.dumps(RUNTIME_WORKDIR)[1:-1], str(layout))
    run_env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PREFECT_"))}
    run_env.update(config.env, PYTHONPATH=str(layout), HOME=str(tmp_path / "home"))
    got = subprocess.run([sys.executable, "-c", probe, mapped], cwd="/", env=run_env, capture_output=True, text=True, timeout=300)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-3000:]
    loaded = json.loads(got.stdout.strip().splitlines()[-1])
    for name, _, entrypoint in probes:
        cwd, flow_name, module_file = loaded[name]
        assert cwd == str(layout), (name, cwd)
        assert module_file == str(layout / entrypoint.partition(":")[0]), (name, module_file)
    cli = subprocess.run([sys.executable, "-m", *config.command.split(), "--help"], cwd=layout, env=run_env,
                         capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0 and "Usage" in cli.stdout, cli.stdout[-1000:] + cli.stderr[-1000:]
