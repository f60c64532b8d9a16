"""Where vLLM runs on AWS: ECS GPU capacity settings."""

from __future__ import annotations

import ipaddress
import math
import re
from typing import Literal

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, field_validator, model_validator

from blocks.catalogue import gpu_instances

_REGION = re.compile(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-\d$")
_SUBNET = re.compile(r"^subnet-[0-9a-f]{8,17}$")
_VPC = re.compile(r"^vpc-[0-9a-f]{8,17}$")
_CLUSTER = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
# An image reference: [registry/]repository[:tag][@sha256:digest], nothing a shell would read (user data runs it)
_IMAGE_REF = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:\d+)?(/[a-z0-9]+([._/-][a-z0-9]+)*)*(:[\w][\w.-]{0,127})?(@sha256:[0-9a-f]{64})?$")
_PRIVATE_ECR = re.compile(r"^\d{12}\.dkr\.ecr\.")
_CERT = re.compile(r"^arn:aws[a-z-]*:acm:[a-z0-9-]+:\d{12}:certificate/[0-9a-f-]+$")
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")


class ScalingSettings(BaseModel):
    """Target tracking on one signal. `requests` (no extra component): the load balancer's requests per
    task (ALBRequestCountPerTarget: requests per minute that each healthy task received); the right
    target depends on the model and the GPU: measure a replica's sustainable rate (the validate flow's
    latency check) and set it below. `queue`: vLLM's own queue, `vllm:num_requests_waiting` averaged
    over the tasks, which the CloudWatch agent sidecar publishes (needs `metrics_agent.enabled`):
    requests that wait mean the replicas are full, whatever the requests' lengths."""

    signal: Literal["requests", "queue"] = Field(default="requests", description="What the service is scaled on.")
    target_requests_per_minute: float = Field(default=30, gt=0, le=100000,
                                              description="signal=requests: requests per task per minute the service is scaled to keep.")
    target_waiting_per_task: float = Field(default=2, gt=0, le=10000,
                                           description="signal=queue: requests waiting in each task's vLLM queue the service is scaled to keep.")
    scale_out_cooldown_s: int = Field(default=300, ge=0, le=3600,
                                      description="After a scale-out, wait this long before another (a GPU host and a model load take minutes).")
    scale_in_cooldown_s: int = Field(default=1800, ge=0, le=86400,
                                     description="After a scale-in, wait this long before another: GPU replicas are slow to bring back.")


class AlarmSettings(BaseModel):
    """CloudWatch alarms per stack; thresholds with defaults for a GPU LLM service."""

    enabled: bool = True
    no_healthy_targets_minutes: int = Field(default=3, ge=1, le=60,
                                            description="No healthy target for this many minutes in a row.")
    target_5xx_percent: float = Field(default=5.0, gt=0, le=100, description="Share of requests the server answered 5xx.")
    target_5xx_minutes: int = Field(default=5, ge=1, le=60)
    p95_response_time_s: float = Field(
        default=60.0, gt=0, le=4000,
        description="p95 of TargetResponseTime: time to the response's first byte (streaming: about the time to first "
                    "token; not streaming: the whole generation).")
    p95_response_time_minutes: int = Field(default=10, ge=1, le=60)
    running_below_desired_minutes: int = Field(
        default=20, ge=1, le=1440,
        description="Running tasks below desired this long (a new GPU host plus a model load take ~10-15 min).")
    topic_subscriptions: list[str] = Field(
        default_factory=list,
        description="E-mail addresses or https:// endpoints told of every alarm; empty: no SNS topic, the alarms only show.")

    @field_validator("topic_subscriptions")
    @classmethod
    def _subscriptions(cls, value: list[str]) -> list[str]:
        bad = [v for v in value if not (_EMAIL.match(v) or (v.startswith("https://") and len(v) > len("https://")))]
        if bad:
            raise ValueError(f"not e-mail addresses or https:// endpoints: {bad}")
        if len(set(value)) != len(value):
            raise ValueError("topic_subscriptions lists an endpoint twice")
        return value


class MetricsAgentSettings(BaseModel):
    """The CloudWatch agent as a sidecar in each vLLM task (tasks/targets/ecs/metrics_agent.py): it scrapes
    the server's Prometheus `/metrics` and publishes vLLM's queue and KV-cache usage as embedded metric
    format logs, and reads the GPUs' utilisation and memory with nvidia-smi. Off by default: one more
    image to pull, and CloudWatch bills each custom metric series (~$0.30 a month); on, it feeds the
    `queue` scaling signal, the GPU memory alarm and the dashboard's queue and GPU widgets."""

    enabled: bool = False
    image: str = Field(default="public.ecr.aws/cloudwatch-agent/cloudwatch-agent:1.300059.0b1207",
                       description="The agent's image (ECR Public needs no credentials); pin a digest to freeze it.")
    interval_s: int = Field(default=15, ge=10, le=300, description="Scrape and GPU sampling interval.")
    gpu_memory_percent: float = Field(
        default=98.0, gt=0, le=100,
        description="Alarm when any GPU's memory use is above this share. vLLM takes gpu_memory_utilization of "
                    "each GPU at start and keeps it, so this must be above that: past it is memory vLLM did not plan for.")
    gpu_memory_minutes: int = Field(default=5, ge=1, le=60)


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
    min_replicas: int | None = Field(
        default=None, ge=0, le=100,
        description="Autoscaling: the fewest vLLM tasks; None: desired_count. Autoscaling is on when max_replicas > min_replicas. "
                    "0 lets the scale flow and the batch keep the stack at zero between jobs (a request does not wake it).")
    max_replicas: int | None = Field(
        default=None, ge=1, le=100,
        description="Autoscaling: the most vLLM tasks (one per GPU host, so at most max_capacity); None: desired_count.")
    scaling: ScalingSettings = Field(default_factory=ScalingSettings)
    alarms: AlarmSettings = Field(default_factory=AlarmSettings)
    metrics_agent: MetricsAgentSettings = Field(default_factory=MetricsAgentSettings)
    dashboard: bool = Field(default=True, description="A CloudWatch dashboard per stack; its URL is in the deploy artifact and `status`.")
    use_spot: bool = False
    on_demand_base: int = Field(default=0, ge=0, description="With use_spot: this many instances stay on-demand.")
    load_balancer_scheme: Literal["internal", "internet-facing"] = Field(
        default="internal", description="internal: reachable only inside the VPC (and peered networks)."
    )
    certificate_arn: str | None = Field(default=None, description="ACM certificate: the listener speaks HTTPS on 443.")
    container_port: int = Field(default=8000, ge=1024, le=65535)
    log_retention_days: Literal[1, 3, 5, 7, 14, 30, 60, 90, 180, 365] = 14
    root_volume_gib: int = Field(
        default=200, ge=30, le=16384,
        description="GPU host disk, at least: the images and the model cache. The deploy makes it larger when two copies "
                    "of the model (and its adapters) and 60 GiB for the OS and two images need more.")
    shared_memory_mib: int = Field(default=8192, ge=64, description="/dev/shm for NCCL with tensor parallelism.")
    health_check_grace_s: int = Field(default=900, ge=0, le=7200, description="Model load time ECS waits before health checks count.")
    request_timeout_s: int = Field(
        default=900, ge=60, le=3600,
        description="The longest request the stack must finish: the load balancer's idle timeout and (by default) the "
                    "target group's deregistration delay, so a task leaving (scale-in, update) finishes what it serves.")
    deregistration_delay_s: int | None = Field(
        default=None, ge=0, le=3600,
        description="None: request_timeout_s. With autoscaling it may not be shorter (scale-in would cut requests).")
    ami_parameter: str = Field(
        default="/aws/service/ecs/optimized-ami/amazon-linux-2023/gpu/recommended/image_id",
        description="Public SSM parameter naming the ECS GPU-optimized AMI.",
    )
    price_overrides: dict[str, float] = Field(default_factory=dict, description="USD per hour by instance type.")
    prepull_images: list[str] = Field(
        default_factory=list,
        description="Public images each new GPU host pulls in the background while it boots (user data), e.g. the "
                    "vLLM base image the project image is built FROM, pinned by digest: the task then pulls only the "
                    "project's small layers. Not private ECR (the hosts' role has no ECR rights; the ECS agent pulls "
                    "the task's image with the execution role). Once per AMI instead of per host: bake an AMI and "
                    "name it in ami_parameter (docs/ecs.md#image-pre-pull).")

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

    @field_validator("prepull_images")
    @classmethod
    def _prepull(cls, value: list[str]) -> list[str]:
        for ref in value:
            if not _IMAGE_REF.match(ref):
                raise ValueError(f"{ref!r} is not an image reference ([registry/]repository[:tag][@sha256:digest])")
            if _PRIVATE_ECR.match(ref):
                raise ValueError(f"{ref!r} is in a private ECR registry, which the GPU hosts' instance role cannot pull "
                                 "from: pre-pull its public base image instead (the project image's FROM)")
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

    @property
    def replicas(self) -> tuple[int, int]:
        """(min, max) vLLM tasks; equal when the service does not autoscale."""
        lo = self.desired_count if self.min_replicas is None else self.min_replicas
        hi = self.desired_count if self.max_replicas is None else self.max_replicas
        return lo, hi

    @property
    def autoscaling(self) -> bool:
        lo, hi = self.replicas
        return hi > lo

    @property
    def drain_s(self) -> int:
        """The target group's deregistration delay: in-flight requests finish for this long before ECS stops a task."""
        return self.request_timeout_s if self.deregistration_delay_s is None else self.deregistration_delay_s

    @model_validator(mode="after")
    def _scaling(self) -> "EcsGpuCapacity":
        lo, hi = self.replicas
        if not lo <= self.desired_count <= hi:
            raise ValueError(f"desired_count ({self.desired_count}) is outside min_replicas..max_replicas ({lo}..{hi})")
        if self.max_replicas is not None and hi > self.max_capacity:
            raise ValueError(f"max_replicas ({hi}) exceeds max_capacity ({self.max_capacity}): one vLLM task per GPU host")
        if self.autoscaling and self.drain_s < self.request_timeout_s:
            raise ValueError(f"deregistration_delay_s ({self.drain_s}) is shorter than request_timeout_s "
                             f"({self.request_timeout_s}): scale-in would stop tasks with requests in flight")
        if self.scaling.signal == "queue" and not self.metrics_agent.enabled:
            raise ValueError("scaling.signal 'queue' needs metrics_agent.enabled: the CloudWatch agent publishes vLLM's queue")
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
