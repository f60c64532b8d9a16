"""The README's first command: the demo runs the whole pipeline on the embedded default and leaves nothing behind."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e


def _vllm_servers() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if b"vllm.entrypoints.openai.api_server" in (proc / "cmdline").read_bytes():
                    pids.append(int(proc.name))
            except OSError:
                pass
    return pids


def test_demo_runs_the_pipeline_and_leaves_nothing_running():
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    from prefect.settings import PREFECT_API_URL

    before = set(_vllm_servers())
    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value()}
    env.pop("AWS_ENDPOINT_URL", None)
    out = subprocess.run([sys.executable, "-m", "embedded.demo"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    text = out.stdout
    assert "validated PASSED" in text
    assert "batch     40 ok, 0 failed" in text
    assert "tag scan after teardown: nothing left" in text
    assert "planned   on AWS this model would run on g4dn.xlarge" in text
    assert set(_vllm_servers()) - before == set()  # no server left behind

    wanted = ["pipeline-demo", "validate-demo", "validate-demo-cases", "deploy-demo", "batch-demo", "teardown-demo",
              "stage-huggingfacetb-smollm2-135m-instruct"]

    async def artifacts():  # by key: the whole session's artifacts outnumber one page
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=wanted)))

    keys = {a.key for a in asyncio.run(artifacts())}
    for key in wanted:
        assert key in keys, key
