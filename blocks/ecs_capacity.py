"""Where vLLM runs on AWS: ECS GPU capacity settings."""

from __future__ import annotations

import ipaddress
import math
import re

from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from blocks.catalogue import gpu_instances

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_VPC = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_CLUSTER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")


class EcsGpuCapacity(Block):
    """ECS cluster and GPU capacity for the `ecs` target."""

    _block_type_name = "vLLM ECS GPU Capacity"
    _block_type_slug = "vllm-ecs-gpu-capacity"
    _description = "Region, cluster, GPU instance type, subnets and scaling for the ECS target."

    region: str = Field(default="us-east-1")
    cluster: str | None = Field(default=None, description="An existing ECS cluster to use; None creates one per stack.")
    instance_type: str = Field(default="g6.xlarge", description="EC2 GPU instance type (see blocks/gpu_instances.yaml).")
    vpc_id: str | None = Field(default=None, description="None uses the default VPC.")
    subnets: list[str] = Field(default_factory=list, description="None/empty uses the VPC's default subnets.")
    ingress_cidrs: list[str] = Field(default_factory=lambda: ["10.0.0.0/8"], description="Who may reach the load balancer.")
    min_capacity: int = Field(default=0, ge=0, le=100)
    max_capacity: int = Field(default=1, ge=1, le=100)
    desired_count: int = Field(default=1, ge=0, le=100)
    use_spot: bool = False
    on_demand_base: int = Field(default=0, ge=0)
    price_overrides: dict[str, float] = Field(default_factory=dict, description="USD per hour by instance type.")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"{value!r} is not an AWS region name (e.g. us-east-1)")
        return value

    @field_validator("instance_type")
    @classmethod
    def _instance(cls, value: str) -> str:
        if value not in gpu_instances():
            families = sorted({name.split(".")[0] for name in gpu_instances()})
            raise ValueError(f"{value!r} is not a GPU instance type this pipeline knows; use one of the families {families}")
        return value

    @field_validator("subnets")
    @classmethod
    def _subnets(cls, value: list[str]) -> list[str]:
        bad = [s for s in value if not _SUBNET.match(s)]
        if bad:
            raise ValueError(f"not subnet ids: {bad}")
        return value

    @field_validator("vpc_id")
    @classmethod
    def _vpc(cls, value: str | None) -> str | None:
        if value is not None and not _VPC.match(value):
            raise ValueError(f"{value!r} is not a VPC id")
        return value

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, value: str | None) -> str | None:
        if value is not None and not _CLUSTER.match(value):
            raise ValueError(f"{value!r} is not an ECS cluster name")
        return value

    @field_validator("ingress_cidrs")
    @classmethod
    def _cidrs(cls, value: list[str]) -> list[str]:
        bad = []
        for c in value:
            try:
                if "/" not in c:
                    raise ValueError(c)
                ipaddress.IPv4Network(c, strict=False)
            except ValueError:
                bad.append(c)
        if bad:
            raise ValueError(f"not IPv4 CIDR blocks: {bad}")
        return value

    @field_validator("price_overrides")
    @classmethod
    def _prices(cls, value: dict[str, float]) -> dict[str, float]:
        bad = {k: v for k, v in value.items() if not (math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"prices must be positive numbers: {bad}")
        unknown = sorted(set(value) - set(gpu_instances()))
        if unknown:
            raise ValueError(f"not instance types in the catalogue: {unknown}")
        return value

    @model_validator(mode="after")
    def _scaling(self) -> "EcsGpuCapacity":
        if self.min_capacity > self.max_capacity:
            raise ValueError(f"min_capacity ({self.min_capacity}) exceeds max_capacity ({self.max_capacity})")
        if self.desired_count > self.max_capacity:
            raise ValueError(f"desired_count ({self.desired_count}) exceeds max_capacity ({self.max_capacity})")
        if self.on_demand_base > self.max_capacity:
            raise ValueError(f"on_demand_base ({self.on_demand_base}) exceeds max_capacity ({self.max_capacity})")
        return self
