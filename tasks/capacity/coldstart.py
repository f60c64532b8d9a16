"""A paper model of the time to ready on AWS: what a user waits, on a new GPU host, before the first token.

Shown in the capacity plan ("about N minutes") so a deploy's cold start is known before it costs anything.
A new host goes through four steps one after another; each is modelled from the catalogue and a stated
constant (the constants come from published figures, quoted in docs/capacity.md#time-to-ready, and are
meant to be replaced by the deploy's own measured timeline, tasks/core/timeline.py, once one exists):

1. host: EC2 launch, the ECS GPU AMI's boot, the agent joining the cluster (HOST_BOOT_S);
2. image: pulling the vLLM image, limited by unpacking rather than by the network (IMAGE_PULL_BYTES_PER_S:
   a 10 GB image takes 7-10 minutes), or about nothing when the host already has it
   (EcsGpuCapacity.prepull_images pulls it while the host boots; a baked AMI has it);
3. model: the model's bytes from S3 at the instance's network bandwidth (catalogue `network_gbps`, capped
   at S3_CAP_GBPS, times S3_EFFICIENCY). Download-then-load (load_format 'auto') also writes them to the
   host's gp3 root volume and reads them back, at its throughput (GP3_MIB_S, the launch template's
   default), unless the page cache holds them (less than PAGE_CACHE_SHARE of host memory); the streamer
   ('runai_streamer') goes from the network to memory only;
4. vLLM: process start, engine initialisation, memory profiling, KV cache, and (unless enforce_eager)
   torch.compile and CUDA-graph capture (VLLM_START_S / VLLM_START_EAGER_S).
A host that already served the model (a restart, a rollout or a scale-out onto it) skips 1 and 2 and reads
the model from its cache (`warm_s`).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, Field

from blocks.catalogue import GpuInstance

HOST_BOOT_S = 180.0  # EC2 launch to the ECS agent registered: typically 2-4 minutes for the GPU AMI
IMAGE_BYTES = 10e9  # the vLLM image as pulled (compressed layers): the official vllm-openai image is about this
IMAGE_PULL_BYTES_PER_S = 20e6  # 10 GB in 7-10 minutes: docker's pull is bound by decompression, not the NIC
PREPULLED_PULL_S = 5.0  # the project's own layers (the entrypoint, a user) on top of a pre-pulled base
S3_CAP_GBPS = 100.0  # what one instance gets from S3 at best
S3_EFFICIENCY = 0.6  # of line rate: the Run:ai streamer's published 15 GB in 4.9 s on a 40 Gbps g5.12xlarge
DEFAULT_NETWORK_GBPS = 10.0  # an instance the catalogue gives no bandwidth for
GP3_MIB_S = 125.0  # a gp3 volume's baseline throughput, which the launch template does not raise
PAGE_CACHE_SHARE = 0.5  # model files smaller than this share of host memory are read back from the page cache
VLLM_START_S = 90.0  # vLLM start to ready with torch.compile and CUDA graphs (Modal: 96 s before snapshots)
VLLM_START_EAGER_S = 30.0  # the same with enforce_eager


class TimeToReady(BaseModel):
    """The estimate for one instance type, step by step (seconds)."""

    instance_type: str
    load_format: Literal["auto", "runai_streamer"]
    prepulled: bool
    network_gbps: float = Field(description="The bandwidth used for S3 (catalogue, capped, times the efficiency).")
    host_s: float
    image_s: float
    model_s: float
    vllm_s: float
    warm_s: float = Field(description="A restart or scale-out onto a host that has the image and the model cached.")

    @property
    def total_s(self) -> float:
        return self.host_s + self.image_s + self.model_s + self.vllm_s


def estimate(instance: GpuInstance, model_bytes: int, load_format: Literal["auto", "runai_streamer"] = "auto",
             prepulled: bool = False, enforce_eager: bool = False, image_bytes: float = IMAGE_BYTES) -> TimeToReady:
    """The time to ready on a new host of `instance` for a model of `model_bytes` (its staged weights)."""
    if model_bytes < 0 or image_bytes < 0:
        raise ValueError("model_bytes and image_bytes must be >= 0")
    gbps = min(instance.network_gbps or DEFAULT_NETWORK_GBPS, S3_CAP_GBPS) * S3_EFFICIENCY
    net_s = model_bytes * 8 / (gbps * 1e9)
    disk_s = model_bytes / (GP3_MIB_S * 2**20)
    cached = model_bytes <= PAGE_CACHE_SHARE * instance.memory_gib * 2**30
    if load_format == "runai_streamer":
        model_s = net_s
        warm_model_s = net_s  # no host cache: every start streams again
    else:
        model_s = max(net_s, disk_s) + (0.0 if cached else disk_s)  # written at the slower of the two, read back
        warm_model_s = disk_s  # a later start reads the verified copy from the volume (the page cache is gone)
    vllm_s = VLLM_START_EAGER_S if enforce_eager else VLLM_START_S
    return TimeToReady(
        instance_type=instance.name, load_format=load_format, prepulled=prepulled, network_gbps=round(gbps, 1),
        host_s=HOST_BOOT_S, image_s=PREPULLED_PULL_S if prepulled else image_bytes / IMAGE_PULL_BYTES_PER_S,
        model_s=round(model_s, 1), vllm_s=vllm_s, warm_s=round(warm_model_s + vllm_s, 1),
    )


def about(seconds: float) -> str:
    """'about N minutes' (whole minutes, rounded up; under a minute says so)."""
    if seconds < 60:
        return "under a minute"
    minutes = math.ceil(seconds / 60)
    return f"about {minutes} minute{'s' if minutes != 1 else ''}"


def describe(t: TimeToReady) -> str:
    """One line for the plan's artifact."""
    image = "pre-pulled" if t.prepulled else f"~{t.image_s / 60:.0f} min"
    how = "streamed from S3" if t.load_format == "runai_streamer" else "downloaded, verified, loaded from disk"
    return (f"{about(t.total_s)} from the deploy to the first token on a new `{t.instance_type}` host "
            f"(host boot ~{t.host_s / 60:.0f} min, image pull {image}, model {t.model_s:.0f} s {how} at "
            f"~{t.network_gbps:g} Gbps, vLLM start ~{t.vllm_s:.0f} s); {about(t.warm_s)} on a host that has it cached")
