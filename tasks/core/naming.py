"""Stack names, the resource names derived from them, and the tags every resource carries.

A name is a pure function of the stack name, so a retry (or a second run) finds what the
first one made, and teardown can find everything by tag even when the state record is lost.
"""

from __future__ import annotations

import hashlib
import re

from tasks.core.errors import PipelineInputError

TAG_STACK = "vllm-pipeline:stack"
TAG_MANAGED = "vllm-pipeline:managed-by"
MANAGED_BY = "vllm-pipeline"
_STACK = re.compile(r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$")


def check_stack_name(stack: str) -> str:
    if not isinstance(stack, str) or not _STACK.match(stack) or "--" in stack:
        raise PipelineInputError(
            f"stack name {stack!r} is invalid: 2-32 lowercase letters, digits and single hyphens, starting with a letter"
        )
    return stack


def resource_name(stack: str, kind: str) -> str:
    return f"vllm-{stack}-{kind}"


def secret_name(stack: str, what: str) -> str:
    return f"vllm-pipeline/{stack}/{what}"


def tags(stack: str) -> dict[str, str]:
    return {TAG_STACK: stack, TAG_MANAGED: MANAGED_BY}


def tag_list(stack: str, key: str = "Key", value: str = "Value") -> list[dict[str, str]]:
    return [{key: k, value: v} for k, v in tags(stack).items()]


def short_name(stack: str, kind: str, limit: int = 32) -> str:
    """`vllm-<stack>-<kind>`, or, where AWS caps the length (load balancers and target groups: 32),
    a truncated stack name plus a hash of the whole one: still deterministic, still unique per stack."""
    name = resource_name(stack, kind)
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(stack.encode()).hexdigest()[:6]
    head = stack[: limit - len(kind) - len(digest) - 2].rstrip("-")
    return f"{head}-{digest}-{kind}"


def iam_path(stack: str) -> str:
    """IAM has no place in the tagging API: a per-stack path makes its roles findable by listing."""
    return f"/vllm-pipeline/{stack}/"


def log_group_name(stack: str) -> str:
    return f"/vllm-pipeline/{stack}/server"


def metrics_log_group_name(stack: str) -> str:
    """Where the CloudWatch agent sidecar writes vLLM's metrics as embedded metric format logs."""
    return f"/vllm-pipeline/{stack}/metrics"
