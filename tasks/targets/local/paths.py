"""Where the local target's pieces are: the repo, the cache, the vLLM interpreter, a free port.

Standard library only: the model kit imports it from inside the vLLM environment, which has no Prefect.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[3]


def cache_root() -> Path:
    """Server logs, the model cache and batch work of local stacks (VLLM_PIPELINE_CACHE overrides)."""
    return Path(os.environ.get("VLLM_PIPELINE_CACHE", Path.home() / ".cache" / "vllm-pipeline"))


def vllm_python() -> Path:
    """The vLLM environment's interpreter, made by scripts/setup.sh (VLLM_PYTHON overrides)."""
    explicit = os.environ.get("VLLM_PYTHON")
    return Path(explicit) if explicit else REPO_ROOT / ".venv-vllm" / "bin" / "python"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True
