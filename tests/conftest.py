"""Shared fixtures: one Prefect test server, one moto server, a local hub, per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def _runs_vllm(item: pytest.Item) -> bool:
    return item.get_closest_marker("e2e") is not None or item.get_closest_marker("vllm") is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs two pytest-xdist workers (`--dist loadgroup`). Each module runs whole on one
    worker (its module fixtures start once), and every test that runs vLLM is in one group, run one
    after another on one worker: two vLLM servers would only slow each other on 2 cores, and they
    share the local stacks' folders (~/.cache/vllm-pipeline). That group is the longest chain of the
    run, so under workers it is queued first; everything else runs on the other worker beside it."""
    for item in items:
        item.add_marker(pytest.mark.xdist_group("vllm" if _runs_vllm(item) else item.path.stem))
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items.sort(key=lambda item: not _runs_vllm(item))  # stable: the order within each group is kept


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
