"""Where vLLM runs on AWS: ECS GPU capacity settings."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, field_validator, model_validator

from blocks.catalogue import gpu_instances

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_VPC = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_CLUSTER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
_CERT = re.compile(r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/[0-9a-f-]+$")


class EcsGpuCapacity(Block):
    """ECS cluster and GPU capacity for the `ecs` target."""

    _block_type_name = "vLLM ECS GPU Capacity"
    _block_type_slug = "vllm-ecs-gpu-capacity"
    _description = "Region, cluster, GPU instance type, subnets and scaling for the ECS target."

    region: str = Field(default="us-east-1")
    cluster: str | None = Field(default=None, description="An existing ECS cluster to use; None creates one per stack.")
    instance_type: str | None = Field(
        default=None,
        description="EC2 GPU instance type (see blocks/gpu_instances.yaml); None lets the capacity planner choose the cheapest that fits.",
    )
    fallback_instance_types: list[str] = Field(
        default_factory=list,
        description="Tried in order by the Auto Scaling group when the first type has no capacity (same GPU count or more).",
    )
    vpc_id: str | None = Field(default=None, description="None uses the default VPC.")
    subnets: list[str] = Field(default_factory=list, description="None/empty uses the VPC's default subnets.")
    ingress_cidrs: list[str] = Field(
        default_factory=list, description="Who may reach the load balancer; empty: the VPC's own CIDR block."
    )
    min_capacity: int = Field(default=0, ge=0, le=100)
    max_capacity: int = Field(default=1, ge=1, le=100)
    desired_count: int = Field(default=1, ge=0, le=100)
    use_spot: bool = False
    on_demand_base: int = Field(default=0, ge=0, description="With use_spot: this many instances stay on-demand.")
    load_balancer_scheme: Literal["internal", "internet-facing"] = Field(
        default="internal", description="internal: reachable only inside the VPC (and peered networks)."
    )
    certificate_arn: str | None = Field(default=None, description="ACM certificate: the listener speaks HTTPS on 443.")
    container_port: int = Field(default=8000, ge=1024, le=65535)
    log_retention_days: Literal[1, 3, 5, 7, 14, 30, 60, 90, 180, 365] = 14
    root_volume_gib: int = Field(default=200, ge=30, le=16384, description="GPU host disk: the image and the model cache.")
    shared_memory_mib: int = Field(default=8192, ge=64, description="/dev/shm for NCCL with tensor parallelism.")
    health_check_grace_s: int = Field(default=900, ge=0, le=7200, description="Model load time ECS waits before health checks count.")
    deregistration_delay_s: int = Field(default=60, ge=0, le=3600)
    ami_parameter: str = Field(
        default="/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id",
        description="Public SSM parameter naming the ECS GPU-optimized AMI.",
    )
    price_overrides: dict[str, float] = Field(default_factory=dict, description="USD per hour by instance type.")

    @field_validator("region")
    @classmethod
    def _region(cls, value: str) -> str:
        if not _REGION.match(value):
            raise ValueError(f"{value!r} is not an AWS region name (e.g. us-east-1)")
        return value

    @field_validator("instance_type")
    @classmethod
    def _instance(cls, value: str | None) -> str | None:
        if value is not None and value not in gpu_instances():
            families = sorted({name.split(".")[0] for name in gpu_instances()})
            raise ValueError(f"{value!r} is not a GPU instance type this pipeline knows; use one of the families {families}")
        return value

    @field_validator("fallback_instance_types")
    @classmethod
    def _fallbacks(cls, value: list[str]) -> list[str]:
        unknown = [v for v in value if v not in gpu_instances()]
        if unknown:
            raise ValueError(f"not GPU instance types in the catalogue: {unknown}")
        if len(set(value)) != len(value):
            raise ValueError("fallback_instance_types lists a type twice")
        return value

    @field_validator("certificate_arn")
    @classmethod
    def _certificate(cls, value: str | None) -> str | None:
        if value is not None and not _CERT.match(value):
            raise ValueError(f"{value!r} is not an ACM certificate ARN")
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
        if self.instance_type is None and self.fallback_instance_types:
            raise ValueError("fallback_instance_types needs instance_type: the planner chooses only one type")
        if self.instance_type in self.fallback_instance_types:
            raise ValueError(f"fallback_instance_types repeats instance_type {self.instance_type!r}")
        if self.instance_type is not None:
            gpus = gpu_instances()[self.instance_type].gpus
            fewer = [t for t in self.fallback_instance_types if gpu_instances()[t].gpus < gpus]
            if fewer:
                raise ValueError(f"fallback_instance_types {fewer} have fewer GPUs than {self.instance_type} ({gpus})")
        return self
