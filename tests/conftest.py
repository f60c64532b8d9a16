"""Shared fixtures: one Prefect test server, one moto server, a local hub, per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Modules whose tests run vLLM (marked `e2e` or `vllm`; tests/test_setup.py checks this list).
VLLM_MODULES = frozenset({
    "test_batch", "test_batch_offline", "test_embedded", "test_entrypoint", "test_gate_numerics_e2e",
    "test_hardening_e2e", "test_local_target_e2e", "test_lora_e2e", "test_pipeline_e2e", "test_ui_artifacts_e2e",
    "test_worker_e2e",
})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under `make test`'s workers the vLLM tests come first: they are the longest chain (see below)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: item.path.stem not in VLLM_MODULES)  # stable: the order within each is kept


def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """`make test` runs two pytest-xdist workers. Each module runs whole on one worker (its module
    fixtures start once), and the modules that run vLLM are one unit, run one after another on one
    worker: two vLLM servers would only slow each other on 2 cores, and they share the local stacks'
    folders (~/.cache/vllm-pipeline). That unit is queued first; the other modules, which mostly wait
    on the moto, Prefect or buildah servers, run on the other worker beside it. (xdist's own
    `xdist_group` marks do nothing under pytest 9: xdist 3.8 renames a node id pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class VllmFirst(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "vllm" if Path(module).stem in VLLM_MODULES else module

    return VllmFirst(config, log)


@pytest.fixture(scope="session", autouse=True)
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def local_aws():
    from embedded.local_aws import local_aws as start

    with start() as stack:
        yield stack


@pytest.fixture()
def bucket(local_aws, request):
    """A fresh bucket per test, so tests never see each other's objects."""
    from tasks.core.aws import aws_client

    name = "t-" + request.node.name.lower().replace("_", "-").replace("[", "-").replace("]", "")[:40].strip("-") + "-" + os.urandom(3).hex()
    aws_client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    from embedded.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", extra_bytes=48 * 1024 * 1024)


@pytest.fixture()
def hub(tiny_model, monkeypatch):
    from embedded.hub_server import HubRepo, LocalHub

    with LocalHub({"acme/tiny": HubRepo(tiny_model)}) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.endpoint)
        yield server
