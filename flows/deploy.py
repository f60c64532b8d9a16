"""deploy-model: bring a staged model up as a vLLM endpoint for a stack, and record it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Literal

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from blocks.loading import load_config
from blocks.model_source import ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from tasks.errors import PipelineInputError
from tasks.local_target import endpoint_alive, ensure_api_key, start_local_server, stop_local_server, wait_local_ready
from tasks.models import find_staged_model
from tasks.naming import check_stack_name
from tasks.state import ModelRef, StackState, load_state, save_state

DEPLOY_LOCK_TTL = timedelta(minutes=30)


def _recent(ts: str) -> bool:
    return datetime.now(timezone.utc) - datetime.fromisoformat(ts) < DEPLOY_LOCK_TTL


def deploy(
    stack: str, store: ModelStore, settings: VllmServerSettings, model: ModelRef, target: str = "local",
    ready_timeout_s: float = 900, ttl_hours: float = 24,
) -> StackState:
    logger = get_run_logger()
    state, etag = load_state(store, stack)
    if state is not None and state.target == "local" and state.status == "running" and endpoint_alive(state.endpoint):
        if state.model and state.model.s3_uri == model.s3_uri:
            logger.info("stack %r already serves %s at %s: nothing to do", stack, model.s3_uri, state.endpoint.url)
            return state
    if state is not None and state.status in ("deploying", "tearing-down") and _recent(state.updated_at):
        raise PipelineInputError(
            f"stack {stack!r} is {state.status} by another run since {state.updated_at}; wait for it or tear the stack down"
        )
    old_endpoint = state.endpoint if state else None
    state = state or StackState(stack=stack, target="local")
    state.status, state.model, state.ttl_hours = "deploying", model, ttl_hours
    state.settings = settings.model_dump(mode="json", exclude={"api_key"})
    state.note(f"deploy {model.s3_uri}")
    etag = save_state(store, state, etag)  # the lock: a concurrent deploy's conditional write fails
    if old_endpoint is not None and old_endpoint.pid:
        stop_local_server(old_endpoint.pid)  # a dead or outdated server is replaced
    secret_arn = ensure_api_key(stack, settings)
    state.add_resource("secret", secret_arn)
    etag = save_state(store, state, etag)
    state.endpoint = start_local_server(stack, settings, model, secret_arn)
    state.add_resource("process", str(state.endpoint.pid))
    etag = save_state(store, state, etag)  # recorded before the wait: an interrupted deploy leaves nothing unknown
    try:
        wait_local_ready(state.endpoint, ready_timeout_s)
    except BaseException as exc:
        stop_local_server(state.endpoint.pid)
        state.status = "failed"
        state.endpoint = None
        state.note(f"deploy failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
        save_state(store, state, etag)
        raise
    state.status = "running"
    state.note(f"running at {state.endpoint.url}")
    save_state(store, state, etag)
    create_markdown_artifact(
        "\n".join([
            f"# Stack `{stack}` deployed ({target})",
            "",
            f"- model `{model.repo_id}` @ `{model.sha}` from `{model.s3_uri}`",
            f"- endpoint `{state.endpoint.url}` serving `{state.endpoint.served_model_name}`",
            f"- API key in Secrets Manager `{secret_arn}`",
            f"- server log `{state.endpoint.log_path}`",
        ]),
        key=f"deploy-{stack}",
        description=f"Stack {stack} deployed",
    )
    return state


@flow(name="deploy-model", log_prints=True)
def deploy_model(
    stack: str,
    target: Literal["local"] = "local",
    model_uri: str | None = None,
    repo_id: str | None = None,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    server_settings_block: str | None = None,
    ready_timeout_s: int = 900,
    ttl_hours: float = 24,
) -> StackState:
    """Deploy the staged model (`model_uri`, or the newest staged revision of `repo_id` /
    the ModelSource block's repo) as stack `stack`. A running stack serving the same model is a no-op.
    The `reap` flow tears the stack down `ttl_hours` after its last deploy."""
    check_stack_name(stack)
    store = load_config(ModelStore, model_store_block)
    settings = load_config(VllmServerSettings, server_settings_block)
    if not model_uri and not repo_id:
        repo_id = load_config(ModelSource, model_source_block).repo_id
    model = find_staged_model(store, repo_id=repo_id, model_uri=model_uri)
    return deploy(stack, store, settings, model, target, ready_timeout_s, ttl_hours)
