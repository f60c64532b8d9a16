"""Where the model comes from: a Hugging Face Hub repo at a revision, and the LoRA adapters served with it."""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import BaseModel, Field, SecretStr, field_validator, model_validator

DEFAULT_ALLOW_PATTERNS = [
    "*.safetensors",
    "*.json",
    "tokenizer.model",
    "*.tiktoken",
    "*.jinja",
    "merges.txt",
    "vocab.txt",
]
DEFAULT_IGNORE_PATTERNS = ["original/*", "*.bin", "*.pth", "*.pt", "*.gguf"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")
_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,199}$")


def check_repo_id(value: str) -> str:
    if not _REPO_ID.match(value) or ".." in value or value.endswith((".git", ".")):
        raise ValueError(f"{value!r} is not a Hugging Face repo id (expected 'owner/name', letters, digits, '._-')")
    return value


# A served model name: what a request's `model` field picks (vLLM's --served-model-name / LoRA name).
SERVED_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
# What an adapter folder needs: peft's config and weights (README and tokenizer files are not read).
ADAPTER_PATTERNS = ["adapter_config.json", "adapter_model.safetensors"]


def check_served_name(value: str) -> str:
    if not SERVED_NAME.match(value):
        raise ValueError(f"{value!r} is not a usable served model name")
    return value


def check_revision(value: str) -> str:
    if not _REVISION.match(value) or ".." in value:
        raise ValueError(f"{value!r} is not a git revision (branch, tag or commit sha)")
    return value


class LoraAdapter(BaseModel):
    """One LoRA adapter, served beside the base model under its own name."""

    name: str = Field(description="Served model name a request picks the adapter by.")
    source: str = Field(description="Hub repo id ('owner/name') or an s3:// URI of a peft adapter folder.")
    revision: str = Field(default="main", description="Hub revision (ignored for s3:// sources).")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return check_served_name(value)

    @field_validator("source")
    @classmethod
    def _source(cls, value: str) -> str:
        if value.startswith("s3://"):
            bucket, _, key = value[5:].partition("/")
            if not bucket or not key.strip("/") or any(ord(c) < 32 for c in value):
                raise ValueError(f"{value!r} is not an s3://bucket/folder URI")
            return value.rstrip("/")
        return check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        return check_revision(value)

    @property
    def is_s3(self) -> bool:
        return self.source.startswith("s3://")


class ModelSource(Block):
    """A Hugging Face Hub model repo, pinned to a revision; the token is only needed for gated or private repos."""

    _block_type_name = "vLLM Model Source"
    _block_type_slug = "vllm-model-source"
    _description = "Hugging Face Hub repo id, revision, file patterns and (for gated repos) a token."

    repo_id: str = Field(default="HuggingFaceTB/SmolLM2-135M-Instruct", description="Hub repo id, 'owner/name'.")
    revision: str = Field(default="main", description="Branch, tag or commit sha; resolved to a sha and recorded.")
    allow_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOW_PATTERNS))
    ignore_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE_PATTERNS))
    token: SecretStr | None = Field(default=None, description="Hub token for gated/private repos (adapters' too).")
    adapters: list[LoraAdapter] = Field(
        default_factory=list, description="LoRA adapters staged next to the model and served with it (needs enable_lora)."
    )

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        return check_revision(value)

    @field_validator("allow_patterns")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        if not value or any(not p.strip() for p in value):
            raise ValueError("must list at least one non-empty glob pattern")
        return value

    @model_validator(mode="after")
    def _unique_adapters(self) -> "ModelSource":
        names = [a.name for a in self.adapters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"adapters: served names must be unique, {dupes} repeat")
        return self
