"""prefect.yaml: `prefect deploy --all` works against a Prefect server and creates what the README says."""

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
