"""Operations a user runs from the UI: `status` (live stacks, age, endpoint, cost so far) and
`reap` (tear down stacks past their TTL, so a forgotten GPU service does not bill for days)."""

from __future__ import annotations

from datetime import datetime, timezone

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact
from pydantic import BaseModel

from blocks.loading import load_config
from blocks.model_store import ModelStore
from flows.teardown import teardown
from tasks.core.errors import flow
from tasks.core.state import StackState, list_stacks, price_per_hour


class StackStatus(BaseModel):
    stack: str
    target: str
    status: str
    age_hours: float
    idle_hours: float
    ttl_hours: float
    endpoint: str | None
    instance_type: str | None
    price_per_hour: float
    cost_so_far_usd: float
    dashboard: str | None = None


def _hours_since(ts: str) -> float:
    return (datetime.now(timezone.utc) - datetime.fromisoformat(ts)).total_seconds() / 3600


def describe(state: StackState) -> StackStatus:
    instance = (state.settings or {}).get("instance_type")
    price = price_per_hour(state) * int((state.settings or {}).get("desired_count") or 1)
    age = _hours_since(state.created_at)
    return StackStatus(
        stack=state.stack, target=state.target, status=state.status, age_hours=round(age, 2),
        idle_hours=round(_hours_since(state.updated_at), 2), ttl_hours=state.ttl_hours,
        endpoint=state.endpoint.url if state.endpoint else None, instance_type=instance, price_per_hour=price,
        cost_so_far_usd=round(age * price, 2), dashboard=(state.settings or {}).get("dashboard_url"),
    )


@flow(name="status", log_prints=True)
def status(model_store_block: str | None = None) -> list[StackStatus]:
    """Every live stack with its age, endpoint, instance type and cost so far."""
    rows = [describe(s) for s in list_stacks(load_config(ModelStore, model_store_block))]
    create_table_artifact([r.model_dump() for r in rows] or [{"stack": "(none)"}], key="stacks-status",
                          description="Live stacks")
    for r in rows:
        print(f"{r.stack:24} {r.target:5} {r.status:12} age {r.age_hours:6.1f} h  {r.endpoint or '-'}  ${r.cost_so_far_usd}"
              + (f"  {r.dashboard}" if r.dashboard else ""))
    return rows


@flow(name="reap", log_prints=True)
def reap(model_store_block: str | None = None, dry_run: bool = False) -> list[str]:
    """Tear down every stack idle (no deploy) for longer than its TTL. Schedule it hourly."""
    logger = get_run_logger()
    store = load_config(ModelStore, model_store_block)
    expired = [s for s in list_stacks(store) if _hours_since(s.updated_at) > s.ttl_hours]
    for s in expired:
        logger.warning("stack %r idle %.1f h > TTL %.1f h: %s", s.stack, _hours_since(s.updated_at), s.ttl_hours,
                       "would tear down (dry run)" if dry_run else "tearing down")
        if not dry_run:
            teardown(s.stack, store)
    return [s.stack for s in expired]
