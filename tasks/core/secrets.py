"""Secrets Manager: the stack's API key (and HF token) live here, referenced by ARN everywhere else."""

from __future__ import annotations

import secrets as pysecrets

from botocore.exceptions import ClientError
from pydantic import SecretStr

from tasks.core.aws import aws_client, unless_gone
from tasks.core.naming import secret_name, tag_list


def ensure_secret(stack: str, what: str, value: SecretStr | None, credentials=None, region: str | None = None) -> str:
    """Get-or-create the secret `vllm-pipeline/<stack>/<what>`; a None value gets a random key.
    An existing secret keeps its value unless a new one is given. Returns the ARN."""
    sm = aws_client("secretsmanager", credentials, region)
    name = secret_name(stack, what)
    try:
        arn = sm.describe_secret(SecretId=name)["ARN"]
        if value is not None:
            sm.put_secret_value(SecretId=arn, SecretString=value.get_secret_value())
        return arn
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") != "ResourceNotFoundException":
            raise
    secret = value.get_secret_value() if value is not None else "sk-" + pysecrets.token_urlsafe(24)
    return sm.create_secret(
        Name=name, SecretString=secret, Tags=tag_list(stack), Description=f"vllm-pipeline stack {stack}: {what}"
    )["ARN"]


def _region_of(secret_id: str, region: str | None) -> str | None:
    """A secret's ARN names its region; Secrets Manager answers only there."""
    return secret_id.split(":")[3] if secret_id.startswith("arn:") and secret_id.count(":") >= 6 else region


def read_secret(secret_id: str, credentials=None, region: str | None = None) -> SecretStr:
    sm = aws_client("secretsmanager", credentials, _region_of(secret_id, region))
    return SecretStr(sm.get_secret_value(SecretId=secret_id)["SecretString"])


def delete_secret(secret_id: str, credentials=None, region: str | None = None) -> bool:
    """Delete now (no recovery window: a torn-down stack leaves nothing). Gone already counts as done."""
    sm = aws_client("secretsmanager", credentials, _region_of(secret_id, region))
    return unless_gone(lambda: sm.delete_secret(SecretId=secret_id, ForceDeleteWithoutRecovery=True),
                       "ResourceNotFoundException") is not None
