"""Teardown: delete what a stack made, found from its state record and by tag, then prove nothing is left."""

from __future__ import annotations

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.aws import aws_client
from tasks.errors import retry_if_transient
from tasks.naming import TAG_STACK
from tasks.secrets import delete_secret

_RETRY = dict(retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


def tagged_arns(stack: str) -> list[str]:
    """Every resource the tagging API knows with this stack's tag."""
    api = aws_client("resourcegroupstaggingapi")
    arns = []
    for page in api.get_paginator("get_resources").paginate(TagFilters=[{"Key": TAG_STACK, "Values": [stack]}]):
        arns += [r["ResourceARN"] for r in page.get("ResourceTagMappingList", [])]
    return arns


def tagged_secrets(stack: str) -> list[str]:
    """Secrets Manager's own tag filter: a deleted secret is not listed (the tagging API may lag)."""
    sm = aws_client("secretsmanager")
    found = []
    for page in sm.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [TAG_STACK]}]):
        for s in page.get("SecretList", []):
            if any(t["Key"] == TAG_STACK and t["Value"] == stack for t in s.get("Tags", [])):
                found.append(s["ARN"])
    return found


@task(name="delete-secret", **_RETRY)
def delete_secret_task(arn: str) -> bool:
    gone = delete_secret(arn)
    get_run_logger().info("secret %s %s", arn, "deleted" if gone else "was already gone")
    return gone


@task(name="scan-stack-tags", **_RETRY)
def leftovers(stack: str) -> list[str]:
    """What still carries the stack's tag. Empty is the proof teardown is complete."""
    left = set(tagged_secrets(stack))
    try:
        for arn in tagged_arns(stack):
            if ":secretsmanager:" in arn and arn not in left:
                continue  # deleted secrets can linger in the tagging index; Secrets Manager is the authority
            left.add(arn)
    except ClientError as exc:  # the tagging API is not in every partition
        get_run_logger().warning("tagging API scan skipped: %s", exc)
    return sorted(left)
