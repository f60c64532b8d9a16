"""teardown: stop and delete everything a stack made; idempotent; ends with a tag scan proving nothing is left."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel

from blocks.loading import load_config
from blocks.model_store import ModelStore
from tasks.local_target import stop_local_server
from tasks.naming import check_stack_name
from tasks.state import delete_state, load_state, save_state
from tasks.teardown import delete_secret_task, leftovers


class TeardownReport(BaseModel):
    stack: str
    had_state_record: bool
    deleted: list[str]
    left: list[str]


def teardown(stack: str, store: ModelStore) -> TeardownReport:
    logger = get_run_logger()
    state, etag = load_state(store, stack)
    deleted: list[str] = []
    if state is not None:
        state.status = "tearing-down"
        state.note("teardown")
        save_state(store, state, etag)
        if state.endpoint is not None and state.endpoint.pid and stop_local_server(state.endpoint.pid):
            deleted.append(f"process {state.endpoint.pid}")
        for res in state.resources:
            if res.kind == "process" and stop_local_server(int(res.id)):
                deleted.append(f"process {res.id}")
            elif res.kind == "secret" and delete_secret_task(res.id):
                deleted.append(res.id)
    # The state record may be lost or a run may have died before recording: the tag scan finds the rest.
    for arn in leftovers(stack):
        if ":secretsmanager:" in arn and delete_secret_task(arn):
            deleted.append(arn)
    left = leftovers(stack)
    if left:
        raise RuntimeError(f"stack {stack!r}: still tagged after teardown: {left}")
    if state is not None:
        delete_state(store, stack)
    logger.info("stack %r torn down: %d resources deleted, nothing tagged with it is left", stack, len(deleted))
    report = TeardownReport(stack=stack, had_state_record=state is not None, deleted=deleted, left=left)
    create_markdown_artifact(
        "\n".join([f"# Stack `{stack}` torn down", "", f"- state record: {'found and deleted' if state else 'none (tag scan only)'}",
                   f"- deleted: {len(deleted)}", *[f"  - `{d}`" for d in deleted], "- tag scan after teardown: **nothing left**"]),
        key=f"teardown-{stack}", description=f"Teardown of {stack}",
    )
    return report


@flow(name="teardown", log_prints=True)
def teardown_stack(stack: str, model_store_block: str | None = None) -> TeardownReport:
    """Tear down stack `stack`. Safe to run twice, and on a stack whose deploy died half-way."""
    check_stack_name(stack)
    return teardown(stack, load_config(ModelStore, model_store_block))
