"""plan-capacity: which GPU instance (and tensor-parallel size) runs a staged model with these vLLM
settings, what it costs, and how much context × concurrency it holds; answered before anything is created."""

from __future__ import annotations

import re

from prefect.artifacts import create_markdown_artifact
from pydantic import PositiveInt

from blocks.catalogue import gpu_instances
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.loading import load_config
from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.capacity.choice import CapacityPlan
from tasks.capacity.report import render_markdown
from tasks.capacity.task import plan_task
from tasks.core.errors import PipelineInputError, flow
from tasks.stage.models import find_staged_model


def artifact_key(repo_id: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    return "capacity-plan-" + re.sub(r"-+", "-", re.sub(r"[^a-z0-9]", "-", repo_id.lower())).strip("-")


@flow(name="plan-capacity", log_prints=True)
def plan_capacity(
    model_uri: str | None = None,
    repo_id: str | None = None,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    server_settings_block: str | None = None,
    capacity_block: str | None = None,
    concurrency: PositiveInt | None = None,
    max_model_len: int | None = None,
    quantization: str | None = None,
    instance_types: list[str] | None = None,
) -> CapacityPlan:
    """Plan capacity for the staged model (`model_uri`, or the newest staged revision of `repo_id` / the
    ModelSource block's repo) under the VllmServerSettings block (`max_model_len`, `quantization` override
    it) and the EcsGpuCapacity block's price overrides. `concurrency`: full-length sequences that must fit
    at once (default 1, what vLLM needs to start). `instance_types` narrows the catalogue. Writes a markdown
    artifact; when nothing fits, raises PipelineInputError naming what to change."""
    unknown = sorted(set(instance_types or []) - set(gpu_instances()))
    if unknown:
        raise PipelineInputError(f"instance_types: not in the catalogue (blocks/gpu_instances.yaml): {unknown}")
    store = load_config(ModelStore, model_store_block)
    settings = load_config(VllmServerSettings, server_settings_block, max_model_len=max_model_len, quantization=quantization)
    capacity = load_config(EcsGpuCapacity, capacity_block)
    if not model_uri and not repo_id:
        repo_id = load_config(ModelSource, model_source_block).repo_id
    model = find_staged_model(store, repo_id=repo_id, model_uri=model_uri)
    result = plan_task(store, model, settings, capacity, concurrency, instance_types)
    create_markdown_artifact(
        render_markdown(result), key=artifact_key(model.repo_id), description=f"Capacity plan for {model.repo_id}"
    )
    if result.refusal:
        raise PipelineInputError(result.refusal)
    return result
