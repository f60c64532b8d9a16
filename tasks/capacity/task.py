"""The Prefect task `plan-capacity`: reads the staged model's config.json and manifest from S3 and plans.

The only part of tasks.capacity that does I/O; the planning itself (tasks.capacity.choice.plan) is pure.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.capacity.choice import CapacityPlan, plan
from tasks.capacity.shape import weight_bytes_from_manifest
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.core.s3 import MANIFEST, read_json, read_manifest, s3_client
from tasks.core.state import ModelRef


def _split(uri: str) -> tuple[str, str]:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


@task(name="plan-capacity", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def plan_task(
    store: ModelStore, model: ModelRef, settings: VllmServerSettings, capacity: EcsGpuCapacity | None = None,
    concurrency: int | None = None, instance_types: list[str] | None = None,
) -> CapacityPlan:
    """Read the staged model's config.json and manifest from S3 and plan. Reads only."""
    s3 = s3_client(store)
    bucket, prefix = _split(model.s3_uri)
    manifest = read_manifest(s3, bucket, prefix)
    if manifest is None:
        raise PipelineInputError(f"{model.s3_uri} has no {MANIFEST}: stage the model first (stage-model flow)")
    config = read_json(s3, bucket, f"{prefix}/config.json")
    if config is None:
        raise PipelineInputError(f"{model.s3_uri} has no config.json: the planner needs the model's architecture")
    result = plan(config, weight_bytes_from_manifest(manifest), settings, capacity, concurrency,
                  instance_types=instance_types, model_name=f"{model.repo_id}@{model.sha[:12]}")
    logger = get_run_logger()
    if result.chosen:
        c = result.chosen
        logger.info("%s: choose %s (TP %d, $%.3f/h): %d x %d-token sequences fit", result.model, c.instance_type,
                    c.tensor_parallel_size, c.price_per_hour, c.sequences_fit, result.settings.max_model_len)
    else:
        logger.warning("%s", result.refusal)
    return result
