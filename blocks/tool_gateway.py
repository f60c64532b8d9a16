"""The tool gateway of a stack: its tenants (who may call which tools, through which served model) and its
limits, deployed beside the vLLM server by `deploy_model(..., gateway=...)` (docs/gateway.md).

The block holds no keys: the deploy makes one API key per tenant and writes them, with each tenant's model
and tool set, to the stack's Secrets Manager secret `vllm-pipeline/<stack>/gateway-tenants`. What can be
checked without the stack is checked here (names, limits, Fargate sizes, the shape of an inline tool
set); what needs the stack (a tenant's model is one it serves) or the outside world (a tool set in S3,
an entry point that imports, a header secret that can be read) is checked by the deploy before it makes
anything (tasks/gateway/config.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect.blocks.core import Block
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blocks.model_source import check_served_name
from gateway.tenants import TENANT_NAME
from gateway.toolset import ToolSet

# Fargate's allowed task sizes: CPU units -> the memory (MiB) each allows.
FARGATE_SIZES: dict[int, frozenset[int]] = {
    256: frozenset({512, 1024, 2048}),
    512: frozenset(range(1024, 4097, 1024)),
    1024: frozenset(range(2048, 8193, 1024)),
    2048: frozenset(range(4096, 16385, 1024)),
    4096: frozenset(range(8192, 30721, 1024)),
    8192: frozenset(range(16384, 61441, 4096)),
    16384: frozenset(range(32768, 122881, 8192)),
}
VLLM_LISTENER_PORTS = (80, 443)  # the stack's load balancer already listens there for vLLM (443 with a certificate)


class GatewayTenant(BaseModel):
    """One tenant: the served model its requests go to and the tools it may call."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(description="The served model name: the base model's or one of the stack's LoRA adapters.")
    toolset: str | dict[str, Any] = Field(
        description="The tool set: a path (absolute, or relative to the repository), an s3:// URI, or the document inline.")

    @field_validator("model")
    @classmethod
    def _model(cls, value: str) -> str:
        return check_served_name(value)

    @field_validator("toolset")
    @classmethod
    def _toolset(cls, value: str | dict[str, Any]) -> str | dict[str, Any]:
        if isinstance(value, dict):
            try:
                ToolSet.model_validate(value)  # the shape now; entry points and secrets at deploy
            except ValidationError as exc:
                first = exc.errors()[0]
                where = ".".join(str(p) for p in first["loc"])
                raise ValueError(f"inline tool set: {where + ': ' if where else ''}{first['msg']}") from None
        elif not value.strip():
            raise ValueError("toolset is empty: give a path, an s3:// URI or the tool set inline")
        return value


class ToolGateway(Block):
    """The stack's tool-calling gateway (the orchestration tier of the two-tier pattern)."""

    _block_type_name = "vLLM Tool Gateway"
    _block_type_slug = "vllm-tool-gateway"
    _description = "Tenants, tool sets and limits of the tool-calling gateway deployed beside a stack's vLLM server."

    tenants: dict[str, GatewayTenant] = Field(min_length=1, description="Tenant name -> its model and tool set.")
    max_rounds: int = Field(default=5, ge=1, le=50, description="Tool rounds per request; then one answer without tools.")
    deadline_s: float = Field(default=120, gt=0, le=3600, description="The whole request, every upstream call and tool.")
    tool_timeout_s: float = Field(default=10, gt=0, le=3600, description="A tool's timeout when its tool set names none.")
    upstream_timeout_s: float = Field(default=60, gt=0, le=3600, description="One call to the vLLM server.")
    checks: bool = Field(default=True, description="Add validate's two check tenants (validate-a, validate-b) with the "
                                                   "check tools of gateway/check_tools.py: validate runs the gateway checks.")
    checks_model: str | None = Field(default=None, description="The served name the checks run under (a tool-calling "
                                                                "adapter fits); None: the first tenant's model.")
    port: int = Field(default=8001, ge=1024, le=65535, description="Local target: the port it listens on (another if taken).")
    cpu: int = Field(default=512, description="ECS: the Fargate task's CPU units.")
    memory_mib: int = Field(default=1024, description="ECS: the Fargate task's memory (MiB); a pair Fargate allows with cpu.")
    listener_port: int = Field(default=8080, ge=1, le=65535,
                               description="ECS: the load balancer listener the gateway gets (vLLM has 80, or 443).")
    image_uri: str | None = Field(default=None, description="ECS: the gateway image; None: the one build-images last built.")

    @field_validator("tenants")
    @classmethod
    def _names(cls, tenants: dict[str, GatewayTenant]) -> dict[str, GatewayTenant]:
        if bad := sorted(n for n in tenants if not TENANT_NAME.match(n)):
            raise ValueError(f"tenant names must be lowercase letters, digits, _ or - (at most 63), starting with a letter "
                             f"or digit: {bad}")
        return tenants

    @field_validator("checks_model")
    @classmethod
    def _checks_model(cls, value: str | None) -> str | None:
        return value if value is None else check_served_name(value)

    @field_validator("listener_port")
    @classmethod
    def _listener(cls, value: int) -> int:
        if value in VLLM_LISTENER_PORTS:
            raise ValueError(f"{value} is the vLLM listener's port on the stack's load balancer: pick another (e.g. 8080)")
        return value

    @model_validator(mode="after")
    def _fargate(self) -> "ToolGateway":
        if self.cpu not in FARGATE_SIZES:
            raise ValueError(f"cpu {self.cpu} is not a Fargate size ({', '.join(map(str, FARGATE_SIZES))})")
        if self.memory_mib not in FARGATE_SIZES[self.cpu]:
            allowed = sorted(FARGATE_SIZES[self.cpu])
            takes = ", ".join(map(str, allowed)) if len(allowed) <= 4 else \
                f"{allowed[0]}..{allowed[-1]} in steps of {allowed[1] - allowed[0]}"
            raise ValueError(f"memory_mib {self.memory_mib} is not allowed with cpu {self.cpu}: Fargate takes {takes} MiB")
        return self

    def toolset_source(self, tenant: str, root: Path) -> str | Path | dict[str, Any]:
        """Where a tenant's tool set is read from: a relative path is taken from `root` (the repository)."""
        source = self.tenants[tenant].toolset
        if isinstance(source, dict) or source.startswith("s3://"):
            return source
        path = Path(source).expanduser()
        return path if path.is_absolute() else root / path
