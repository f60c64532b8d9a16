"""The gateway's settings: where vLLM is, where the tenants are, and the limits every request runs under.

One pydantic model, read from an optional YAML/JSON file (`GATEWAY_CONFIG`) and then from `GATEWAY_<FIELD>`
environment variables, which win: a container sets a few variables, a developer keeps a file. Every
limit has a default that keeps one request from holding the process (a model that calls tools forever,
a webhook that never answers).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, model_validator

ENV_PREFIX = "GATEWAY_"


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    upstream_url: str = Field("http://127.0.0.1:8000/v1", description="the vLLM server's OpenAI base URL (ending in /v1)")
    upstream_api_key: SecretStr | None = Field(None, description="vLLM's --api-key, sent as a Bearer token")
    upstream_api_key_secret: str | None = Field(None, description="...or the Secrets Manager secret (ARN or name) holding it")
    tenants_file: Path | None = Field(None, description="a local JSON/YAML tenants document (the local target)")
    tenants_secret: str | None = Field(None, description="...or a Secrets Manager secret (ARN or name) holding it as JSON")

    max_rounds: int = Field(5, ge=1, le=50, description="tool rounds per request; then one last call with tool_choice=none")
    deadline_s: float = Field(120.0, gt=0, description="the whole request: every upstream call and tool round")
    upstream_timeout_s: float = Field(60.0, gt=0, description="one upstream call (also cut by what is left of the deadline)")
    tool_timeout_s: float = Field(10.0, gt=0, description="a tool's timeout when its tool set names none")
    max_concurrent_tools: int = Field(16, ge=1, description="tool calls running at once in this process, over all requests")
    max_tool_result_chars: int = Field(16_000, ge=256, description="a longer tool result is cut before the model sees it")

    host: str = "127.0.0.1"
    port: int = Field(8001, ge=0, le=65535)

    @model_validator(mode="after")
    def _one_of_each(self) -> "GatewaySettings":
        if self.upstream_api_key is not None and self.upstream_api_key_secret:
            raise ValueError("give upstream_api_key or upstream_api_key_secret, not both")
        if bool(self.tenants_file) == bool(self.tenants_secret):
            raise ValueError("give exactly one of tenants_file and tenants_secret")
        return self

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None) -> "GatewaySettings":
        """The file named by GATEWAY_CONFIG (if any), overridden field by field by GATEWAY_<FIELD>."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        if path := env.get(ENV_PREFIX + "CONFIG"):
            text = Path(path).read_text()
            values = (json.loads(text) if path.endswith(".json") else yaml.safe_load(text)) or {}
        for name in cls.model_fields:
            if (value := env.get(ENV_PREFIX + name.upper())) is not None:
                values[name] = value
        return cls.model_validate(values)
