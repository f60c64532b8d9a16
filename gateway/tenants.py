"""Tenants: an API key maps to one tenant, which has a tool set and a served model name (a LoRA adapter
per tenant fits: vLLM serves several names on one GPU).

The tenants document is JSON (or YAML, in a local file), read from Secrets Manager on ECS or from a file
for the local target:

    {"tenants": {"acme": {"api_keys": ["sk-acme-..."], "model": "acme-adapter",
                          "toolset": "s3://bucket/gateway/acme.yaml"}}}

`toolset` is a path (relative to the tenants file), an s3:// URI or an inline tool set. Only SHA-256
digests of the keys are kept, and a key is looked up by comparing its digest with every tenant's in
constant time (hmac.compare_digest, no early exit), so the time taken says nothing about which key is
near. A tenant's requests see its own tool set and model only; nothing in a response names another.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from gateway import aws
from gateway.settings import GatewaySettings
from gateway.toolset import Tool, ToolSet, load_toolset, parse_document

TENANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MIN_KEY_CHARS = 16


class TenantSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    api_keys: list[SecretStr] = Field(min_length=1)
    model: str = Field(min_length=1, description="the served model name sent upstream (a base model or a LoRA adapter)")
    toolset: str | dict[str, Any]

    @field_validator("api_keys")
    @classmethod
    def _long_enough(cls, keys: list[SecretStr]) -> list[SecretStr]:
        if any(len(k.get_secret_value()) < MIN_KEY_CHARS for k in keys):
            raise ValueError(f"API keys must be at least {MIN_KEY_CHARS} characters")
        return keys


class TenantsDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: dict[str, TenantSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _names_and_keys(self) -> "TenantsDocument":
        if bad := sorted(n for n in self.tenants if not TENANT_NAME.match(n)):
            raise ValueError(f"tenant names must be lowercase letters, digits, _ or - (at most 63): {bad}")
        seen: dict[str, str] = {}
        for name, spec in self.tenants.items():
            for key in spec.api_keys:
                value = key.get_secret_value()
                if value in seen:
                    raise ValueError(f"an API key appears twice (tenants {seen[value]!r} and {name!r})")
                seen[value] = name
        return self


@dataclass
class Tenant:
    name: str
    model: str
    toolset: ToolSet
    tools: dict[str, Tool] = field(init=False)
    openai_tools: list[dict[str, Any]] = field(init=False)

    def __post_init__(self) -> None:
        self.tools = self.toolset.by_name()
        self.openai_tools = self.toolset.openai()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class TenantRegistry:
    def __init__(self, tenants: dict[str, Tenant], keys: dict[str, list[SecretStr]]):
        self.tenants = tenants
        self._digests = [(_digest(k.get_secret_value()), name) for name, ks in keys.items() for k in ks]

    def authenticate(self, key: str | None) -> Tenant | None:
        if not key:
            return None
        digest = _digest(key)
        found = None
        for candidate, name in self._digests:  # every comparison runs, match or not
            if hmac.compare_digest(candidate, digest):
                found = name
        return self.tenants[found] if found is not None else None

    @classmethod
    def from_document(cls, data: Any, base: Path | None = None) -> "TenantRegistry":
        doc = TenantsDocument.model_validate(data)
        tenants = {}
        for name, spec in doc.tenants.items():
            source: str | Path | dict[str, Any] = spec.toolset
            if isinstance(source, str) and not source.startswith("s3://") and base is not None:
                source = base / source  # an absolute path stays itself
            try:
                tenants[name] = Tenant(name, spec.model, load_toolset(source))
            except ValueError as exc:
                raise ValueError(f"tenant {name!r}: {exc}") from None
        return cls(tenants, {name: spec.api_keys for name, spec in doc.tenants.items()})


def load_tenants(settings: GatewaySettings) -> TenantRegistry:
    """The registry from the settings' tenants file or secret, every tool set loaded and checked."""
    if settings.tenants_file is not None:
        path = Path(settings.tenants_file)
        return TenantRegistry.from_document(parse_document(path.read_text(), str(path)), path.parent)
    assert settings.tenants_secret
    return TenantRegistry.from_document(parse_document(aws.read_secret(settings.tenants_secret), "secret.json"))
