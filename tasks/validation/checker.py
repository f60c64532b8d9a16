"""A tool-call checker in the manner of BFCL's AST checker.

For each call the server returned: the function exists among the offered tools, the
arguments are a JSON object, every required parameter is present, types and enums match
the JSON schema (nested objects and arrays included), and no unknown parameter appears.
At the `semantic` level the calls must also be the expected ones, with the expected values.
Schema validation is `jsonschema`'s (Draft 2020-12); unknown parameters are refused by
adding `additionalProperties: false` where the tool's schema does not say otherwise.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from jsonschema import Draft202012Validator
from pydantic import BaseModel, Field

Level = Literal["semantic", "structural"]


class ToolCall(BaseModel):
    name: str
    arguments: str  # as the server sent it: a JSON string


class ExpectedCall(BaseModel):
    """An expected call. Each argument constraint is a value (equal; strings case-insensitively)
    or one of {contains: str}, {one_of: [...]}, {any: true} (present, any valid value)."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)


def _closed(schema: dict) -> dict:
    """Copy of `schema` where objects refuse unknown properties unless they say otherwise."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if isinstance(v, dict) else v for k, v in schema.items()}
    if "properties" in out:
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(v) for v in out[key]]
    types = out.get("type")
    is_object = types == "object" or (isinstance(types, list) and "object" in types) or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    return out


def _path(err) -> str:
    return ".".join(str(p) for p in err.absolute_path) or "(arguments)"


def check_structure(call: ToolCall, tools: dict[str, dict]) -> list[str]:
    """Problems with one call against the offered tools' schemas ([] when it is valid)."""
    if call.name not in tools:
        return [f"called unknown function {call.name!r} (offered: {sorted(tools)})"]
    try:
        args = json.loads(call.arguments) if call.arguments.strip() else {}
    except json.JSONDecodeError as exc:
        return [f"{call.name}: arguments are not valid JSON ({exc.msg} at {exc.pos}): {call.arguments[:120]!r}"]
    if not isinstance(args, dict):
        return [f"{call.name}: arguments must be a JSON object, got {type(args).__name__}"]
    schema = _closed(tools[call.name].get("parameters") or {"type": "object", "properties": {}})
    problems = []
    for err in sorted(Draft202012Validator(schema).iter_errors(args), key=lambda e: list(e.absolute_path)):
        if err.validator == "required":
            missing = err.message.split("'")[1] if "'" in err.message else err.message
            problems.append(f"{call.name}: missing required argument {missing!r}" + (f" in {_path(err)}" if err.absolute_path else ""))
        elif err.validator == "additionalProperties":
            problems.append(f"{call.name}: unknown argument(s) in {_path(err)}: {err.message.split('(')[-1].rstrip(')')}")
        elif err.validator == "enum":
            problems.append(f"{call.name}: {_path(err)}={err.instance!r} is not one of {err.validator_value}")
        elif err.validator == "type":
            problems.append(f"{call.name}: {_path(err)}={err.instance!r} is not of type {err.validator_value!r}")
        else:
            problems.append(f"{call.name}: {_path(err)}: {err.message}")
    return problems


def _value_ok(want: Any, got: Any) -> bool:
    if isinstance(want, dict) and set(want) <= {"contains", "one_of", "any"} and want:
        if "any" in want:
            return bool(want["any"])
        if "contains" in want:
            return isinstance(got, str) and str(want["contains"]).casefold() in got.casefold()
        return any(_value_ok(w, got) for w in want["one_of"])
    if isinstance(want, str) and isinstance(got, str):
        return want.casefold() == got.casefold()
    if isinstance(want, dict) and isinstance(got, dict):
        return all(k in got and _value_ok(v, got[k]) for k, v in want.items())
    if isinstance(want, list) and isinstance(got, list):
        return len(want) == len(got) and all(_value_ok(w, g) for w, g in zip(want, got))
    return want == got


def check_semantics(call: ToolCall, expected: ExpectedCall) -> list[str]:
    if call.name != expected.name:
        return [f"called {call.name!r}, expected {expected.name!r}"]
    args = json.loads(call.arguments) if call.arguments.strip() else {}
    problems = []
    for key, want in expected.arguments.items():
        if key not in args:
            problems.append(f"{call.name}: expected argument {key!r} = {want!r}, it is missing")
        elif not _value_ok(want, args[key]):
            problems.append(f"{call.name}: {key}={args[key]!r}, expected {want!r}")
    return problems


def check_calls(calls: list[ToolCall], tools: dict[str, dict], expected: list[ExpectedCall], level: Level) -> list[str]:
    """All problems with a turn's calls. An empty `expected` means: no call should be made."""
    if not expected:
        return [f"no tool call expected, got {[c.name for c in calls]}"] if calls else []
    if not calls:
        return [f"expected a call to {[e.name for e in expected]}, got none"]
    problems = [p for c in calls for p in check_structure(c, tools)]
    if level == "structural" or problems:
        return problems
    if len(calls) != len(expected):
        problems.append(f"expected {len(expected)} call(s) {[e.name for e in expected]}, got {len(calls)} {[c.name for c in calls]}")
    if _match_all(list(expected), list(calls)):
        return problems
    # No full matching: explain each expected call by its closest returned call.
    for exp in expected:
        if any(not check_semantics(c, exp) for c in calls):
            continue
        closest = next((c for c in calls if c.name == exp.name), calls[0])
        problems += check_semantics(closest, exp)
    return problems or [f"calls {[c.arguments for c in calls]} cannot be matched one-to-one with the expected ones"]


def _match_all(expected: list[ExpectedCall], calls: list[ToolCall]) -> bool:
    """Order-insensitive one-to-one matching, with backtracking (a turn has a handful of calls)."""
    if not expected:
        return True
    first, rest = expected[0], expected[1:]
    for i, call in enumerate(calls):
        if not check_semantics(call, first) and _match_all(rest, calls[:i] + calls[i + 1:]):
            return True
    return False
