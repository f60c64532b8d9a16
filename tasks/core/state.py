"""The stack state record: s3://<bucket>/stacks/<stack>/state.json.

Written with S3 conditional writes (If-None-Match on create, If-Match on update), so two
runs cannot silently interleave: the loser gets a clear error and re-reads.
"""

from __future__ import annotations

import json
from typing import Literal

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from blocks.model_store import ModelStore
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import s3_client, utc_now


class StateConflict(RuntimeError):
    """Someone else wrote the state record between our read and our write."""


class Resource(BaseModel):
    kind: str  # e.g. "secret", "process", "ecs-service"
    id: str  # ARN, name or pid
    region: str | None = None


class Endpoint(BaseModel):
    url: str
    served_model_name: str
    api_key_secret: str  # Secrets Manager ARN/name holding the API key (never the key itself)
    pid: int | None = None  # local target only
    log_path: str | None = None  # local target only


class ModelRef(BaseModel):
    repo_id: str
    sha: str
    s3_uri: str


class StackState(BaseModel):
    stack: str
    target: Literal["local", "ecs"]
    status: Literal["deploying", "running", "failed", "tearing-down", "deleted"] = "deploying"
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    model: ModelRef | None = None
    adapters: dict[str, ModelRef] = Field(default_factory=dict)  # LoRA adapters by served name
    endpoint: Endpoint | None = None
    resources: list[Resource] = Field(default_factory=list)
    settings: dict = Field(default_factory=dict)  # non-secret server settings, for the record
    ttl_hours: float = Field(default=24, gt=0, description="The reap flow tears the stack down after this long without a deploy.")
    history: list[str] = Field(default_factory=list)
    lock_until: str | None = None  # a deploy in progress holds the stack until then (flows/deploy.py)

    def add_resource(self, kind: str, id: str, region: str | None = None) -> None:
        if not any(r.kind == kind and r.id == id for r in self.resources):
            self.resources.append(Resource(kind=kind, id=id, region=region))

    def note(self, event: str) -> None:
        self.history.append(f"{utc_now()} {event}")


def state_key(stack: str) -> str:
    return f"stacks/{stack}/state.json"


def load_state(store: ModelStore, stack: str) -> tuple[StackState | None, str | None]:
    s3 = s3_client(store)
    try:
        obj = s3.get_object(Bucket=store.bucket_name, Key=state_key(stack))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None, None
        raise
    return StackState.model_validate(json.loads(obj["Body"].read())), obj["ETag"]


def save_state(store: ModelStore, state: StackState, etag: str | None) -> str:
    """Write the record only if it is still the version we read (etag None: only if absent)."""
    state.updated_at = utc_now()
    s3 = s3_client(store)
    cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
    try:
        resp = s3.put_object(
            Bucket=store.bucket_name, Key=state_key(state.stack), Body=state.model_dump_json(indent=2).encode(),
            ContentType="application/json", **cond,
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise StateConflict(
                f"stack {state.stack!r}: its state record changed under this run (another deploy or teardown is running?)"
            ) from None
        raise
    return resp["ETag"]


def adapter_index_key(stack: str) -> str:
    """The stack's LoRA adapter index ({served name: staged URI}) the server reads (tasks/stage/lora.py)."""
    return f"stacks/{stack}/adapters/index.json"


def delete_state(store: ModelStore, stack: str) -> None:
    """The state record and the adapter index: nothing of the stack stays under stacks/<stack>/."""
    s3 = s3_client(store)
    for key in (adapter_index_key(stack), state_key(stack)):  # the record last: it is what says the stack exists
        s3.delete_object(Bucket=store.bucket_name, Key=key)


def list_stacks(store: ModelStore) -> list[StackState]:
    """Every stack with a state record in the store."""
    s3 = s3_client(store)
    stacks = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket_name, Prefix="stacks/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/state.json"):
                state, _ = load_state(store, obj["Key"].split("/")[1])
                if state is not None:
                    stacks.append(state)
    return stacks


def require_state(store: ModelStore, stack: str) -> StackState:
    state, _ = load_state(store, stack)
    return deployed(store, stack, state)


def deployed(store: ModelStore, stack: str, state: StackState | None) -> StackState:
    """`state` if the stack has a serving endpoint, else a clear error (a record without one is
    a deploy that failed or is being torn down)."""
    if state is None or state.endpoint is None:
        raise PipelineInputError(f"stack {stack!r} is not deployed (no endpoint in s3://{store.bucket_name}/{state_key(stack)})")
    return state


def price_per_hour(state: StackState) -> float:
    """What the stack's GPU instance costs per hour: the capacity plan's figure recorded at deploy
    (price overrides included); the catalogue's for records older than that; 0 for the local target."""
    from blocks.catalogue import gpu_instances

    settings = state.settings or {}
    if settings.get("price_per_hour") is not None:
        return float(settings["price_per_hour"])
    instance = settings.get("instance_type")
    return gpu_instances()[instance].price_per_hour if instance in gpu_instances() else 0.0
