"""Prefect blocks: the user's configuration. `prefect block register -m blocks` registers them all."""

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.image_build import ImageBuildSettings
from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from blocks.tool_gateway import GatewayTenant, ToolGateway
from blocks.vllm_server import VllmServerSettings

__all__ = ["EcsGpuCapacity", "GatewayTenant", "ImageBuildSettings", "LoraAdapter", "ModelSource", "ModelStore", "ToolGateway",
           "VllmServerSettings"]
