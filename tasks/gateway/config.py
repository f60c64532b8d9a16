"""What both targets do for a stack's tool gateway before starting it: check the block against the stack,
store each tenant's tool set in the model store, and write the tenants document (one API key per tenant,
its served model, its tool set's URI) to one Secrets Manager secret, `vllm-pipeline/<stack>/gateway-tenants`.

The gateway process (local) or Fargate task (ECS) reads that secret (GATEWAY_TENANTS_SECRET) and the tool
sets from S3 with its own credentials; users read their tenant's key from the same secret. Keys are made
once: a redeploy keeps every remaining tenant's key, so clients keep working.

Validate's gateway checks run as two extra tenants, `validate-a` and `validate-b`, with the check tools of
`gateway/check_tools.py` (a tool returning a value only it knows, one that sleeps past its timeout, one that
raises, one whose schema no call can meet); the block's `checks` turns them off.
"""

from __future__ import annotations

import hashlib
import json
import secrets as pysecrets
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError
from pydantic import BaseModel, SecretStr

from blocks.model_store import ModelStore
from blocks.tool_gateway import ToolGateway
from gateway.toolset import PythonImpl, SecretHeader, ToolSet, WebhookImpl, parse_document
from tasks.core.aws import aws_client, error_code
from tasks.core.errors import PipelineInputError
from tasks.core.naming import secret_name
from tasks.core.s3 import s3_client, split_s3
from tasks.core.secrets import ensure_secret, read_secret
from tasks.core.state import gateway_prefix

REPO_ROOT = Path(__file__).resolve().parents[2]
TENANTS_SECRET = "gateway-tenants"  # vllm-pipeline/<stack>/gateway-tenants
CHECK_TENANTS = ("validate-a", "validate-b")  # validate's own tenants (tasks/validation/gateway.py)
CHECK_SEED_BYTES = 16


class GatewayConfig(BaseModel):
    """What the deploy wrote: the tenants secret and each tenant's tool set URI."""

    tenants_secret: str
    toolsets: dict[str, str]
    tenants: list[str]


def check_toolset(doc: Any, where: str, credentials=None, region: str | None = None) -> ToolSet:
    """gateway.toolset's own checks (names, schemas, entry points that import and take the schema's
    arguments), plus the header secrets read with the pipeline's credentials: a bad tool set is refused here,
    not when the gateway starts."""
    try:
        toolset = ToolSet.model_validate(doc)
        for tool in toolset.tools:
            impl = tool.implementation
            if isinstance(impl, PythonImpl):
                tool.prepare()
            elif isinstance(impl, WebhookImpl):
                for name, header in impl.headers.items():
                    if isinstance(header, SecretHeader):
                        _check_header_secret(tool.name, name, header, credentials, region)
    except ValueError as exc:  # pydantic's ValidationError is one
        raise PipelineInputError(f"gateway tool set {where}: {_first_line(exc)}") from None
    return toolset


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return " ".join(lines[:3]) if lines else type(exc).__name__


def _check_header_secret(tool: str, header: str, spec: SecretHeader, credentials, region: str | None) -> None:
    try:
        raw = read_secret(spec.secret, credentials, region).get_secret_value()
    except ClientError as exc:
        raise ValueError(f"tool {tool!r}: header {header} names secret {spec.secret!r}, which cannot be read "
                         f"({error_code(exc) or exc})") from None
    if spec.key is not None:
        try:
            json.loads(raw)[spec.key]
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"tool {tool!r}: secret {spec.secret!r} has no JSON key {spec.key!r}") from None


def _read_source(source: str | Path | dict[str, Any], store: ModelStore) -> Any:
    if isinstance(source, dict):
        return source
    text = str(source)
    try:
        if text.startswith("s3://"):
            bucket, key = split_s3(text)
            body = s3_client(store).get_object(Bucket=bucket, Key=key)["Body"].read()
        else:
            body = Path(source).read_text()
    except (OSError, ClientError) as exc:
        raise PipelineInputError(f"gateway tool set {text}: cannot be read ({error_code(exc) or exc})") from None
    try:
        return parse_document(body, text)
    except ValueError as exc:
        raise PipelineInputError(f"gateway tool set {text}: not YAML/JSON ({_first_line(exc)})") from None


def check_tools_document(seed: str) -> dict[str, dict[str, Any]]:
    """The two check tenants' tool sets (gateway/check_tools.py); `seed` is bound into the nonce tool, so
    its values are this stack's own, and validate (which reads the stored tool set) can compute them."""
    from gateway.check_tools import check_toolsets

    return check_toolsets(seed)


def resolve_gateway(gateway: ToolGateway, served_names: list[str], store: ModelStore,
                    region: str | None = None) -> dict[str, dict[str, Any]]:
    """Every tenant's tool set as a checked document, before any resource exists. A tenant's model must be
    one the stack serves (`served_names`: the base model's name, then its adapters')."""
    unknown = {n: t.model for n, t in gateway.tenants.items() if t.model not in served_names}
    if unknown:
        raise PipelineInputError(f"gateway tenants {sorted(unknown)} name models the stack does not serve "
                                 f"({', '.join(f'{n}: {m!r}' for n, m in sorted(unknown.items()))}); it serves {served_names}")
    clash = sorted(set(gateway.tenants) & set(CHECK_TENANTS)) if gateway.checks else []
    if clash:
        raise PipelineInputError(f"tenant names {clash} are validate's own (set checks=False to use them)")
    if gateway.checks and gateway.checks_model not in (None, *served_names):
        raise PipelineInputError(f"gateway checks_model {gateway.checks_model!r} is not served by the stack (it serves {served_names})")
    docs: dict[str, dict[str, Any]] = {}
    for name in gateway.tenants:
        source = gateway.toolset_source(name, REPO_ROOT)
        doc = _read_source(source, store)
        check_toolset(doc, "inline" if isinstance(source, dict) else str(source), store.credentials, region)
        docs[name] = doc
    return docs


def checks_model(gateway: ToolGateway, base_name: str) -> str:
    """The served name validate's gateway checks run under: the block's, else the first tenant's model."""
    if gateway.checks_model:
        return gateway.checks_model
    return next(iter(gateway.tenants.values())).model if gateway.tenants else base_name


def config_digest(gateway: ToolGateway, docs: dict[str, dict[str, Any]], upstream: str) -> str:
    """What the running gateway was started with (the local target restarts it when this changes)."""
    plain = gateway.model_dump(mode="json", exclude={"block_document_id", "block_document_name", "block_type_slug"})
    return hashlib.sha256(json.dumps({"gateway": plain, "docs": docs, "upstream": upstream}, sort_keys=True,
                                     default=str).encode()).hexdigest()


def _existing_keys(stack: str, credentials, region: str | None) -> dict[str, list[str]]:
    try:
        raw = read_secret(secret_name(stack, TENANTS_SECRET), credentials, region).get_secret_value()
    except ClientError as exc:
        if error_code(exc) == "ResourceNotFoundException":
            return {}
        raise
    try:
        tenants = json.loads(raw)["tenants"]
        return {name: list(spec["api_keys"]) for name, spec in tenants.items()}
    except (ValueError, KeyError, TypeError):
        return {}  # not ours to keep: new keys


def toolset_uri(store: ModelStore, stack: str, tenant: str) -> str:
    return f"s3://{store.bucket_name}/{gateway_prefix(stack)}{tenant}.json"


def publish_gateway(stack: str, gateway: ToolGateway, docs: dict[str, dict[str, Any]], store: ModelStore, base_name: str,
                    region: str | None = None, record=None) -> GatewayConfig:
    """Store the tool sets under the stack's prefix and write the tenants secret. `record(kind, id)` is
    called the moment each thing exists (the caller's state record), so an interrupted deploy leaves
    nothing unknown. Validate's check tenants are added when `gateway.checks`."""
    record = record or (lambda kind, id: None)
    tenants = {name: {"model": t.model, "doc": docs[name]} for name, t in gateway.tenants.items()}
    if gateway.checks:
        model = checks_model(gateway, base_name)
        seed = _existing_seed(store, stack) or pysecrets.token_hex(CHECK_SEED_BYTES)
        for name, doc in check_tools_document(seed).items():
            tenants[name] = {"model": model, "doc": doc}
    s3 = s3_client(store)
    uris: dict[str, str] = {}
    for name, t in tenants.items():
        uri = toolset_uri(store, stack, name)
        bucket, key = split_s3(uri)
        s3.put_object(Bucket=bucket, Key=key, Body=json.dumps(t["doc"], indent=2).encode(), ContentType="application/json")
        record("s3-object", uri)
        uris[name] = uri
    stale = _stale_toolsets(store, stack, set(uris.values()))
    keys = _existing_keys(stack, store.credentials, region)
    document = {"tenants": {name: {"api_keys": keys.get(name) or ["sk-gw-" + pysecrets.token_urlsafe(24)],
                                   "model": t["model"], "toolset": uris[name]} for name, t in tenants.items()}}
    arn = ensure_secret(stack, TENANTS_SECRET, SecretStr(json.dumps(document)), store.credentials, region)
    record("secret", arn)
    for uri in stale:  # a tenant removed since the last deploy
        bucket, key = split_s3(uri)
        s3.delete_object(Bucket=bucket, Key=key)
    return GatewayConfig(tenants_secret=arn, toolsets=uris, tenants=sorted(tenants))


def _existing_seed(store: ModelStore, stack: str) -> str | None:
    """The check tools' seed of an earlier deploy (kept: a redeploy changes nothing it does not have to)."""
    from gateway.check_tools import seed_of

    try:
        body = s3_client(store).get_object(Bucket=store.bucket_name, Key=f"{gateway_prefix(stack)}{CHECK_TENANTS[0]}.json")["Body"]
    except ClientError as exc:
        if error_code(exc) in ("NoSuchKey", "404"):
            return None
        raise
    return seed_of(json.loads(body.read()))


def _stale_toolsets(store: ModelStore, stack: str, keep: set[str]) -> list[str]:
    s3 = s3_client(store)
    found = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket_name, Prefix=gateway_prefix(stack)):
        found += [f"s3://{store.bucket_name}/{o['Key']}" for o in page.get("Contents", [])]
    return sorted(set(found) - keep)


def read_tenants(secret_arn: str, credentials=None, region: str | None = None) -> dict[str, dict[str, Any]]:
    """The tenants document the deploy wrote: tenant -> {api_keys, model, toolset}."""
    return json.loads(read_secret(secret_arn, credentials, region).get_secret_value())["tenants"]


def delete_toolset(uri: str, credentials=None, region: str | None = None) -> bool:
    """Teardown's deleter for a stored tool set (kind `s3-object`); a missing object counts as deleted."""
    bucket, key = split_s3(uri)
    s3 = aws_client("s3", credentials, region)
    try:
        s3.head_object(Bucket=bucket, Key=key)
    except ClientError as exc:
        if error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return False
        raise
    s3.delete_object(Bucket=bucket, Key=key)
    return True
