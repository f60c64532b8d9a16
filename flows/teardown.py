"""teardown: stop and delete everything a stack made; idempotent; ends with a scan proving nothing is left.

Both targets take the same path: the state record's resources plus what the scan finds (tags, IAM
paths, names), deleted in dependency order (tasks/teardown/sweep.py), then a second scan that must come
back empty. The staged model in S3 and the images in ECR are shared and kept unless asked.
"""

from __future__ import annotations

from datetime import datetime, timezone

from botocore.exceptions import ClientError
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.loading import load_config
from blocks.model_store import ModelStore
from tasks.core.aws import Aws, error_code
from tasks.core.errors import flow
from tasks.core.markdown import code
from tasks.core.naming import check_stack_name
from tasks.core.s3 import s3_client, split_s3
from tasks.core.state import Resource, StackState, delete_state, load_state, save_state
from tasks.teardown.sweep import delete_all, leftovers, scan_task


class TeardownReport(BaseModel):
    stack: str
    had_state_record: bool
    deleted: list[str]
    left: list[str]
    lived_hours: float | None = None
    cost_estimate_usd: float | None = None


def _lifetime(state: StackState | None) -> tuple[float | None, float | None]:
    if state is None:
        return None, None
    hours = (datetime.now(timezone.utc) - datetime.fromisoformat(state.created_at)).total_seconds() / 3600
    price = float((state.settings or {}).get("price_per_hour") or 0)
    return round(hours, 3), round(state.replica_hours() * price, 2)  # each count it was set to, while it held (0 at zero)


def _delete_model(store: ModelStore, uri: str) -> int:
    s3 = s3_client(store)
    bucket, prefix = split_s3(uri)
    n = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix.rstrip("/") + "/"):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})
            n += len(keys)
    return n


def _delete_image(aws: Aws, image_uri: str) -> bool:
    host, _, path = image_uri.partition("/")
    if ".dkr.ecr." not in host:
        return False
    repo, _, digest = path.partition("@")
    image_id = {"imageDigest": digest} if digest else {"imageTag": repo.rsplit(":", 1)[1]} if ":" in repo else None
    repo = repo.rsplit(":", 1)[0]
    if image_id is None:
        return False
    try:
        return bool(aws.client("ecr").batch_delete_image(repositoryName=repo, imageIds=[image_id]).get("imageIds"))
    except ClientError as exc:
        if error_code(exc) in ("RepositoryNotFoundException", "ImageNotFoundException"):
            return False
        raise


def teardown(stack: str, store: ModelStore, region: str | None = None, keep_model: bool = True,
             keep_images: bool = True) -> TeardownReport:
    logger = get_run_logger()
    state, etag = load_state(store, stack)
    region = ((state.settings or {}).get("region") if state else None) or region
    aws = Aws(store.credentials, region)
    if state is not None:
        state.status = "tearing-down"
        state.note("teardown")
        etag = save_state(store, state, etag)
    recorded = list(state.resources) if state else []
    if state is not None and state.endpoint is not None and state.endpoint.pid:
        recorded.append(Resource(kind="process", id=str(state.endpoint.pid)))
    if state is not None and state.gateway is not None:  # the local gateway's process, its tool sets, its tenants secret
        recorded += [Resource(kind="gateway-process", id=str(state.gateway.pid))] if state.gateway.pid else []
        recorded += [Resource(kind="s3-object", id=uri) for uri in state.gateway.toolsets.values()]
        recorded.append(Resource(kind="secret", id=state.gateway.tenants_secret))
    found, unknown = scan_task(aws, stack)
    deleted = delete_all(aws, stack, [*recorded, *found])
    if state is not None and state.model is not None and not keep_model:
        deleted.append(f"model {state.model.s3_uri} ({_delete_model(store, state.model.s3_uri)} objects)")
    image = (state.settings or {}).get("image_uri") if state else None
    if image and not keep_images and _delete_image(aws, image):
        deleted.append(f"image {image}")
    left = leftovers(aws, stack)
    if left:
        raise RuntimeError(f"stack {stack!r}: still present after teardown: {left}")
    if state is not None:
        delete_state(store, stack)
    hours, cost = _lifetime(state)
    logger.info("stack %r torn down: %d resources deleted, nothing tagged with it is left", stack, len(deleted))
    report = TeardownReport(stack=stack, had_state_record=state is not None, deleted=deleted, left=left,
                            lived_hours=hours, cost_estimate_usd=cost)
    create_markdown_artifact(
        "\n".join([
            f"# Stack {code(stack)} torn down", "",
            f"- state record: {'found and deleted' if state else 'none (scan only)'}",
            f"- lived {hours:.2f} h; GPU cost estimate ${cost:.2f} (instance-hours x the plan's price)" if hours is not None else
            "- lifetime unknown (no state record)",
            f"- deleted: {len(deleted)}", *[f"  - {code(d)}" for d in deleted],
            "- scan after teardown (tags, IAM path, names): **nothing left**",
        ]),
        key=f"teardown-{stack}", description=f"Teardown of {stack}",
    )
    return report


@flow(name="teardown", log_prints=True)
def teardown_stack(stack: str, model_store_block: str | None = None, capacity_block: str | None = None,
                   keep_model: bool = True, keep_images: bool = True) -> TeardownReport:
    """Tear down stack `stack`. Safe to run twice, and on a stack whose deploy died half-way or whose
    state record is lost (the region then comes from the EcsGpuCapacity block). The staged model
    (`keep_model`) and the pushed images (`keep_images`) are kept unless asked."""
    check_stack_name(stack)
    region = load_config(EcsGpuCapacity, capacity_block).region
    return teardown(stack, load_config(ModelStore, model_store_block), region, keep_model, keep_images)
