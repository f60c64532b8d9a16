"""The whole embedded default in one context manager: moto (AWS), a local hub serving the
default model under its real repo id, and the environment pointing the flows at both."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from embedded.hub_server import HubRepo, LocalHub
from embedded.local_aws import LocalAws, local_aws, patched_env
from embedded.model_kit import ensure_default_model

DEFAULT_REPO_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class EmbeddedStack:
    aws: LocalAws
    hub: LocalHub
    model_folder: Path
    repo_id: str = DEFAULT_REPO_ID


@contextmanager
def embedded_stack(model_folder: Path | None = None) -> Iterator[EmbeddedStack]:
    folder = model_folder or ensure_default_model()
    with local_aws() as aws, LocalHub({DEFAULT_REPO_ID: HubRepo(folder)}) as hub, patched_env({"HF_ENDPOINT": hub.endpoint}):
        yield EmbeddedStack(aws=aws, hub=hub, model_folder=folder)
