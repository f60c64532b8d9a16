"""update-adapters: add LoRA adapters to, or remove them from, a running stack without restarting its base model.

Order matters, so nothing is served that the record does not know and nothing the record
lists is missing:
1. check the request against the stack (running, enable_lora, names) — nothing touched yet;
2. stage each added adapter and check it against the base model and max_lora_rank;
3. ECS: widen the task role's S3 read to the new adapters' folders;
4. write the adapter index and the state record (the new set);
5. unload removed (and replaced) names with vLLM's /v1/unload_lora_adapter;
6. load each added name: its first request makes the server's index resolver fetch and load
   it (images/vllm/entrypoint.py), then /v1/models must list exactly the new set.
An ECS stack with more than one replica is rolled (new deployment, same task definition)
after step 4 instead of 5-6, since a call through the load balancer reaches only one replica.
"""

from __future__ import annotations

import time

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from blocks.loading import load_config
from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from flows.stage import stage_adapter
from tasks.core.aws import Aws
from tasks.core.endpoint import Endpoint
from tasks.core.errors import PipelineInputError, flow, retry_if_transient
from tasks.core.markdown import code, table
from tasks.core.naming import check_stack_name, resource_name
from tasks.core.secrets import read_secret
from tasks.core.state import ModelRef, StackState, deployed, load_state, save_state
from tasks.stage.lora import check_adapters, index_uri, write_index
from tasks.stage.transfer import TransferSettings
from tasks.targets.ecs import iam
from tasks.targets.ecs.deploy import adapter_read_uris


def check_request(state: StackState, add: list[LoraAdapter], remove: list[str]) -> None:
    if state.status != "running" or state.endpoint is None:
        raise PipelineInputError(f"stack {state.stack!r} is {state.status}, not running: deploy it first")
    if not state.settings.get("enable_lora"):
        raise PipelineInputError(f"stack {state.stack!r} was deployed with enable_lora false: redeploy it with LoRA enabled")
    if not add and not remove:
        raise PipelineInputError("nothing to do: give adapters to add and/or names to remove")
    unknown = sorted(set(remove) - set(state.adapters))
    if unknown:
        raise PipelineInputError(f"stack {state.stack!r} serves no adapter {unknown}; it serves {sorted(state.adapters) or 'none'}")
    names = [a.name for a in add]
    if len(set(names)) != len(names):
        raise PipelineInputError(f"adapters to add repeat a name: {names}")
    if set(names) & set(remove):
        raise PipelineInputError(f"{sorted(set(names) & set(remove))} both added and removed")
    if state.endpoint.served_model_name in names:
        raise PipelineInputError(f"adapter {state.endpoint.served_model_name!r} clashes with the base model's served name")


@task(name="unload-adapter", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def unload_adapter(url: str, api_key: str, name: str) -> bool:
    """vLLM's runtime unload; False when the server had not loaded it (nothing to do)."""
    with Endpoint(url, api_key, name, timeout=60) as ep:
        resp = ep.post_raw("/v1/unload_lora_adapter", {"lora_name": name})
    if resp.status_code == 404:
        return False
    if resp.status_code != 200:
        raise RuntimeError(f"unloading adapter {name!r} failed: HTTP {resp.status_code} {resp.text[:300]}")
    return True


@task(name="load-adapter", retries=2, retry_delay_seconds=[5, 15], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def load_adapter(url: str, api_key: str, name: str) -> float:
    """One one-token request naming the adapter: the server's index resolver fetches and loads it.
    Returns the seconds that took (the cost a tenant's first request pays on each replica)."""
    started = time.monotonic()
    with Endpoint(url, api_key, name, timeout=300) as ep:
        reply = ep.completion({"model": name, "prompt": "Hello", "max_tokens": 1})
    if reply.status != 200:
        raise RuntimeError(f"adapter {name!r} did not load: HTTP {reply.status} {str(reply.body)[:300]}")
    return time.monotonic() - started


@task(name="served-models", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_if_transient,
      cache_policy=NO_CACHE)
def served_models(url: str, api_key: str) -> list[str]:
    with Endpoint(url, api_key, "", timeout=30) as ep:
        resp = ep.get("/v1/models")
    resp.raise_for_status()
    return sorted(m["id"] for m in resp.json()["data"])


def _grant_task_role(store: ModelStore, state: StackState) -> None:
    """The ECS task role reads the model, each adapter and the index: widen it to the new set."""
    aws = Aws(store.credentials, state.settings["region"])
    policy = iam.task_policy(state.model.s3_uri, aws.partition(),
                             adapter_read_uris(state.adapters, index_uri(store, state.stack)))
    aws.client("iam").put_role_policy(RoleName=resource_name(state.stack, "task"), PolicyName=iam.POLICY_NAME,
                                      PolicyDocument=policy)


def _roll_service(store: ModelStore, state: StackState) -> None:
    aws = Aws(store.credentials, state.settings["region"])
    cluster = state.settings.get("cluster") or resource_name(state.stack, "cluster")
    aws.client("ecs").update_service(cluster=cluster, service=resource_name(state.stack, "service"), forceNewDeployment=True)


@flow(name="update-adapters", log_prints=True)
def update_adapters(
    stack: str,
    add: list[LoraAdapter] | None = None,
    remove: list[str] | None = None,
    model_source_block: str | None = None,
    model_store_block: str | None = None,
    transfer: TransferSettings = TransferSettings(),
) -> StackState:
    """Add adapters (`add`: served name + Hub repo id/revision or s3:// folder; an existing name is
    replaced) and remove adapters (`remove`: served names) on running stack `stack`. The Hub token,
    if any, comes from the ModelSource block."""
    logger = get_run_logger()
    check_stack_name(stack)
    add, remove = list(add or []), list(remove or [])
    store = load_config(ModelStore, model_store_block)
    source = load_config(ModelSource, model_source_block)
    state, etag = load_state(store, stack)  # the etag: the record is saved back only if nobody changed it meanwhile
    state = deployed(store, stack, state)
    check_request(state, add, remove)

    added: dict[str, ModelRef] = {a.name: stage_adapter(source, a, store, transfer) for a in add}
    check_adapters(store, state.model, added, state.endpoint.served_model_name, True, int(state.settings["max_lora_rank"]))
    replaced = sorted(n for n in added if n in state.adapters and state.adapters[n].s3_uri != added[n].s3_uri)
    unchanged = sorted(n for n in added if n in state.adapters and n not in replaced)
    before = dict(state.adapters)
    state.adapters = {n: r for n, r in {**state.adapters, **added}.items() if n not in remove}
    if state.target == "ecs":
        _grant_task_role(store, state)
    write_index(store, stack, state.adapters)
    state.note(f"adapters: added {sorted(set(added) - set(unchanged))}, removed {sorted(remove)}"
               + (f", replaced {replaced}" if replaced else ""))
    save_state(store, state, etag)

    url, key = state.endpoint.url, read_secret(state.endpoint.api_key_secret, store.credentials, state.settings.get("region")).get_secret_value()
    load_s: dict[str, float] = {}
    # with autoscaling, as many as max_replicas may be serving: a run-time load would reach only one of them
    replicas = int(state.settings.get("max_replicas") or state.settings.get("desired_count", 1)) if state.target == "ecs" else 1
    if replicas > 1:
        _roll_service(store, state)
        logger.info("stack %r has %d replicas: rolled the service so every replica reads the new adapter index", stack, replicas)
    else:
        for name in [*remove, *replaced]:
            logger.info("adapter %r %s", name, "unloaded" if unload_adapter(url, key, name) else "was not loaded")
        for name in sorted(added):
            load_s[name] = load_adapter(url, key, name)
            logger.info("adapter %r loaded in %.1fs", name, load_s[name])
        served = served_models(url, key)
        expected = sorted([state.endpoint.served_model_name, *state.adapters])
        if served != expected:
            raise RuntimeError(f"stack {stack!r} serves {served} after the update, not {expected}")
    rows = []
    for name in sorted(set(before) | set(state.adapters)):
        change = ("removed" if name in remove else "replaced" if name in replaced else
                  "unchanged" if name in unchanged or (name in before and name not in added) else "added")
        where = (state.adapters.get(name) or before[name]).s3_uri
        extra = f" (loaded in {load_s[name]:.1f} s)" if name in load_s else ""
        rows.append([code(name), code(where), change + extra])
    lines = [f"# Adapters of stack {code(stack)}", "", table(["adapter", "staged at", "change"], rows)]
    create_markdown_artifact("\n".join(lines), key=f"adapters-{stack}", description=f"Adapters of stack {stack}")
    return state
