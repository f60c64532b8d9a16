"""The GPU instance catalogue (blocks/gpu_instances.yaml) as typed data."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml
from pydantic import BaseModel, PositiveFloat, PositiveInt


class GpuInstance(BaseModel):
    name: str
    gpu: str
    gpus: PositiveInt
    gpu_memory_gib: PositiveInt
    vcpus: PositiveInt
    memory_gib: PositiveInt
    price_per_hour: PositiveFloat
    network_gbps: PositiveFloat | None = None  # published; the cold-start estimate's S3 bandwidth


@lru_cache(maxsize=1)
def gpu_instances() -> dict[str, GpuInstance]:
    raw = yaml.safe_load((Path(__file__).with_name("gpu_instances.yaml")).read_text())
    return {name: GpuInstance(name=name, **spec) for name, spec in raw.items()}
