"""The tools validate's gateway checks call (tasks/validation/gateway.py), installed in the gateway's image so
the same checks run against a local gateway and a Fargate one. Two tenants' tool sets:

    validate-a   get_pickup_code  returns a code made from the tool set's bound seed: a value the model
                                  cannot guess, so an answer that quotes it used the real tool result
                 slow_lookup      sleeps past its 1 s timeout (async: the sleep is cancelled, no thread left)
                 broken_lookup    raises
                 strict_lookup    a schema no call can meet (`not: {required: [query]}` beside
                                  `required: [query]`): guided decoding (xgrammar) ignores `not`, the
                                  gateway's JSON-schema check does not, so every call is rejected unrun
    validate-b   get_vault_code   tenant B's own tool, for the isolation check

The seed is bound by the tool set (never the model's to set) and stored with it in the model store, so
validate reads it back and knows the code to look for.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

SLOW_TIMEOUT_S = 1.0
SLOW_SLEEP_S = 30.0
PICKUP_CODE_TOOL = "get_pickup_code"


def pickup_code(seed: str, scope: str = "a") -> str:
    """Six digits from the seed: one in a million to guess."""
    return f"{int(hashlib.sha256(f'{scope}:{seed}'.encode()).hexdigest(), 16) % 1_000_000:06d}"


def get_pickup_code(order_id: str, seed: str) -> dict[str, Any]:
    return {"order_id": order_id, "pickup_code": pickup_code(seed, "a")}


def get_vault_code(vault: str, seed: str) -> dict[str, Any]:
    return {"vault": vault, "code": pickup_code(seed, "b")}


async def slow_lookup(query: str) -> dict[str, Any]:
    await asyncio.sleep(SLOW_SLEEP_S)
    return {"query": query, "result": "too late"}


def broken_lookup(query: str) -> dict[str, Any]:
    raise RuntimeError(f"the lookup service is down (check tool, query {query!r})")


def strict_lookup(query: str) -> dict[str, Any]:
    raise AssertionError("strict_lookup ran: the gateway executed a call its schema refuses")


def _string(description: str) -> dict[str, Any]:
    return {"type": "string", "description": description}


def _python(name: str, description: str, param: str, param_description: str, bind: dict[str, Any] | None = None,
            **extra: Any) -> dict[str, Any]:
    schema = {"type": "object", "properties": {param: _string(param_description)}, "required": [param]}
    return {"name": name, "description": description, "parameters": {**schema, **extra.pop("schema_extra", {})},
            "implementation": {"type": "python", "entry_point": f"gateway.check_tools:{name}", "bind": bind or {}}, **extra}


def check_toolsets(seed: str) -> dict[str, dict[str, Any]]:
    """The two check tenants' tool set documents, with `seed` bound into the code tools."""
    return {
        "validate-a": {"tools": [
            _python(PICKUP_CODE_TOOL, "Get the pickup code of an order.", "order_id", "Order number, e.g. A-100", {"seed": seed}),
            _python("slow_lookup", "Look something up in the archive.", "query", "What to look up", timeout_s=SLOW_TIMEOUT_S),
            _python("broken_lookup", "Look something up in the directory.", "query", "What to look up"),
            _python("strict_lookup", "Look something up in the registry.", "query", "What to look up",
                    schema_extra={"not": {"required": ["query"]}}),
        ]},
        "validate-b": {"tools": [
            _python("get_vault_code", "Get the code of a vault.", "vault", "Vault name", {"seed": seed}),
        ]},
    }


def seed_of(toolset: dict[str, Any]) -> str | None:
    """The seed a stored check tool set binds (None if it is not one)."""
    for tool in toolset.get("tools", []):
        if tool.get("name") in (PICKUP_CODE_TOOL, "get_vault_code"):
            return (tool.get("implementation") or {}).get("bind", {}).get("seed")
    return None
