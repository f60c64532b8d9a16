"""Where the model comes from: a Hugging Face Hub repo at a revision."""

from __future__ import annotations

import re

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

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


class ModelSource(Block):
    """A Hugging Face Hub model repo, pinned to a revision; the token is only needed for gated or private repos."""

    _block_type_name = "vLLM Model Source"
    _block_type_slug = "vllm-model-source"
    _description = "Hugging Face Hub repo id, revision, file patterns and (for gated repos) a token."

    repo_id: str = Field(default="HuggingFaceTB/SmolLM2-135M-Instruct", description="Hub repo id, 'owner/name'.")
    revision: str = Field(default="main", description="Branch, tag or commit sha; resolved to a sha and recorded.")
    allow_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_ALLOW_PATTERNS))
    ignore_patterns: list[str] = Field(default_factory=lambda: list(DEFAULT_IGNORE_PATTERNS))
    token: SecretStr | None = Field(default=None, description="Hub token for gated/private repos.")

    @field_validator("repo_id")
    @classmethod
    def _repo_id(cls, value: str) -> str:
        return check_repo_id(value)

    @field_validator("revision")
    @classmethod
    def _revision(cls, value: str) -> str:
        if not _REVISION.match(value) or ".." in value:
            raise ValueError(f"{value!r} is not a git revision (branch, tag or commit sha)")
        return value

    @field_validator("allow_patterns")
    @classmethod
    def _allow(cls, value: list[str]) -> list[str]:
        if not value or any(not p.strip() for p in value):
            raise ValueError("must list at least one non-empty glob pattern")
        return value
