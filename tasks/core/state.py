"""The stack state record: s3://<bucket>/stacks/<stack>/state.json.

Written with S3 conditional writes (If-None-Match on create, If-Match on update), so two
runs cannot silently interleave: the loser gets a clear error and re-reads.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Literal

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field

from blocks.model_store import ModelStore
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import s3_client, utc_now
from tasks.core.timeline import Timeline


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
    pid: int | None = None  # local target only; None while the stack is scaled to zero
    log_path: str | None = None  # local target only
    started_at: str | None = None  # local target: when this server process started (its request counters start at 0)
    own_requests: int = 0  # local target: completions the deploy itself sent (the first-token probe): not traffic


class GatewayEndpoint(BaseModel):
    """The stack's tool gateway (docs/gateway.md): where clients reach it and where their keys are."""

    url: str  # the gateway's base URL (clients POST {url}/v1/chat/completions)
    tenants_secret: str  # Secrets Manager ARN of the tenants document: each tenant's api_keys, model and tool set URI
    tenants: list[str] = Field(default_factory=list)
    toolsets: dict[str, str] = Field(default_factory=dict)  # tenant -> the s3:// URI of its tool set in the model store
    pid: int | None = None  # local target only
    log_path: str | None = None  # local target only
    started_at: str | None = None
    digest: str | None = None  # of the configuration it runs (tasks/gateway/config.py): a redeploy with the same is a no-op


class ModelRef(BaseModel):
    repo_id: str
    sha: str
    s3_uri: str


class Scale(BaseModel):
    """How many replicas the stack is set to run, since when and by whom (the deploy, the scale flow,
    the batch waking it). Kept so that status, reap and teardown know a stack scaled to zero by design,
    and what it ran so far (replica-hours). Autoscaling's own moves between min and max are not tracked."""

    replicas: int = Field(ge=0)
    since: str = Field(default_factory=utc_now)
    by: str = "deploy"
    active_at: str = Field(default_factory=utc_now, description="The last deploy, or scale to a non-zero count.")
    replica_hours: float = Field(default=0.0, ge=0, description="Replica-hours run before `since`.")
    zero_ttl_hours: float = Field(
        default=168, gt=0,
        description="At zero by design, the reap flow removes the stack after this long without a request (or a wake).")


class Sample(BaseModel):
    """One reading of a local server's request counter (vLLM's Prometheus vllm:request_success_total)."""

    at: str
    pid: int
    served: int  # requests the process had finished at `at`; its counter starts at 0 with the process
    started_at: str | None = None  # when that process started


class Traffic(BaseModel):
    """Requests the stack served, as sampled by the status and reap flows and before a scale to zero
    (tasks/teardown/idle.py). `last_request_at` is the time of the first sample that saw a request the
    previous one had not: at most one sampling interval late, never early. Kept beside the state record
    (traffic_key), not in it: the hourly sampling must not change the record under a flow that holds
    its etag (update-adapters, the scale flow) and make that flow's conditional write fail."""

    last_request_at: str | None = None
    sampled_at: str | None = None
    samples: list[Sample] = Field(default_factory=list)  # local target: the last few hours of counter readings


class StackState(BaseModel):
    stack: str
    target: Literal["local", "ecs"]
    status: Literal["deploying", "running", "failed", "tearing-down", "deleted"] = "deploying"
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)
    model: ModelRef | None = None
    adapters: dict[str, ModelRef] = Field(default_factory=dict)  # LoRA adapters by served name
    endpoint: Endpoint | None = None
    gateway: GatewayEndpoint | None = None  # the tool gateway, when the stack was deployed with one
    resources: list[Resource] = Field(default_factory=list)
    settings: dict = Field(default_factory=dict)  # non-secret server settings, for the record
    ttl_hours: float = Field(default=24, gt=0, description="The reap flow tears the stack down after this long without a "
                                                           "request (or a deploy, or a wake).")
    history: list[str] = Field(default_factory=list)
    lock_until: str | None = None  # a deploy in progress holds the stack until then (flows/deploy.py)
    scale: Scale | None = None  # None: a record from before scale to zero (it runs desired_count replicas)
    cold_start: Timeline | None = None  # the last deploy's start, phase by phase (tasks/core/timeline.py)

    def add_resource(self, kind: str, id: str, region: str | None = None) -> None:
        if not any(r.kind == kind and r.id == id for r in self.resources):
            self.resources.append(Resource(kind=kind, id=id, region=region))

    def note(self, event: str) -> None:
        self.history.append(f"{utc_now()} {event}")

    @property
    def replicas(self) -> int:
        """The replicas it is set to run: the last deploy's or scale's count (0: scaled to zero)."""
        if self.scale is not None:
            return self.scale.replicas
        return int(self.settings.get("desired_count") or 1) if self.target == "ecs" else 1

    @property
    def at_zero(self) -> bool:
        """Scaled to zero by design (the scale flow or the batch), not a server that died."""
        return self.scale is not None and self.scale.replicas == 0

    def replica_hours(self, now: datetime | None = None) -> float:
        """Replica-hours run so far: each count the deploy or the scale flow set, for as long as it held."""
        now = now or datetime.now(timezone.utc)
        if self.scale is None:
            return max(0.0, (now - datetime.fromisoformat(self.created_at)).total_seconds() / 3600) * self.replicas
        held = max(0.0, (now - datetime.fromisoformat(self.scale.since)).total_seconds() / 3600)
        return self.scale.replica_hours + held * self.scale.replicas

    def set_replicas(self, replicas: int, by: str, zero_ttl_hours: float | None = None, now: datetime | None = None) -> None:
        """Record a new desired count (the cloud call is the caller's): replica-hours so far are kept."""
        now = now or datetime.now(timezone.utc)
        stamp = now.isoformat(timespec="seconds")
        before = self.scale
        self.scale = Scale(
            replicas=replicas, since=stamp, by=by, replica_hours=self.replica_hours(now),
            active_at=stamp if replicas > 0 else (before.active_at if before else self.created_at),
            zero_ttl_hours=zero_ttl_hours or (before.zero_ttl_hours if before else Scale.model_fields["zero_ttl_hours"].default),
        )


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


def update_state(store: ModelStore, stack: str, change: Callable[[StackState], None], attempts: int = 4) -> StackState:
    """Load the record, apply `change`, save; when another run wrote it meanwhile (a status or reap
    status or reap flow's, or a batch's), load it again and re-apply `change`, so a small change is never lost."""
    for attempt in range(attempts):
        state, etag = load_state(store, stack)
        if state is None:
            raise PipelineInputError(f"stack {stack!r} has no state record")
        change(state)
        try:
            save_state(store, state, etag)
            return state
        except StateConflict:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def traffic_key(stack: str) -> str:
    return f"stacks/{stack}/traffic.json"


def load_traffic(store: ModelStore, stack: str) -> tuple[Traffic, str | None]:
    """The stack's sampled traffic (empty before the first sample) and its etag."""
    try:
        obj = s3_client(store).get_object(Bucket=store.bucket_name, Key=traffic_key(stack))
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return Traffic(), None
        raise
    return Traffic.model_validate(json.loads(obj["Body"].read())), obj["ETag"]


def update_traffic(store: ModelStore, stack: str, change: Callable[[Traffic], Traffic], attempts: int = 4) -> Traffic:
    """Merge a reading into the stack's traffic with a conditional write; two samplers at once: the
    loser reads the winner's and merges again."""
    s3 = s3_client(store)
    for attempt in range(attempts):
        traffic, etag = load_traffic(store, stack)
        traffic = change(traffic)
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            s3.put_object(Bucket=store.bucket_name, Key=traffic_key(stack), Body=traffic.model_dump_json(indent=2).encode(),
                          ContentType="application/json", **cond)
            return traffic
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in ("PreconditionFailed", "ConditionalRequestConflict") \
                    or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


def adapter_index_key(stack: str) -> str:
    """The stack's LoRA adapter index ({served name: staged URI}) the server reads (tasks/stage/lora.py)."""
    return f"stacks/{stack}/adapters/index.json"


def gateway_prefix(stack: str) -> str:
    """Where the stack's gateway tool sets live in the model store (tasks/gateway/config.py)."""
    return f"stacks/{stack}/gateway/"


def delete_state(store: ModelStore, stack: str) -> None:
    """The state record, the adapter index, the traffic and the gateway's tool sets: nothing of the stack stays
    under stacks/<stack>/."""
    s3 = s3_client(store)
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=store.bucket_name, Prefix=gateway_prefix(stack)):
        if keys := [{"Key": o["Key"]} for o in page.get("Contents", [])]:
            s3.delete_objects(Bucket=store.bucket_name, Delete={"Objects": keys, "Quiet": True})
    for key in (adapter_index_key(stack), traffic_key(stack), state_key(stack)):  # the record last: it says the stack exists
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
