"""A tool-call checker in the manner of BFCL's AST checker.

For each call the server returned: the function exists among the offered tools, the
arguments are a JSON object, every required parameter is present, types and enums match
the JSON schema (nested objects and arrays included), and no unknown parameter appears.
At the `semantic` level the calls must also be the expected ones, with the expected values.
Schema validation is `jsonschema`'s (Draft 2020-12) with three choices made to agree with
BFCL: an `integer` is an integer literal (`5.0` is refused, as BFCL refuses it); unknown
parameters are refused by adding `additionalProperties: false` to every object schema that
lists its `properties` (an object without `properties` is a free-form dict: any keys); and a
string parameter the schema does not require, given as the empty string "", counts as not
given (BFCL's "no value"): it is not held to an `enum`, and `semantic` treats it as left out.
String values are compared as BFCL compares them (`normalise`). Where this checker and BFCL's
still differ, on purpose, is listed with the reasons in docs/validation-bfcl.md.
"""

from __future__ import annotations

import json
import re
from typing import Any, Literal

from jsonschema import Draft202012Validator, validators
from pydantic import BaseModel, Field, field_validator

Level = Literal["semantic", "structural"]

CONSTRAINTS = ("contains", "one_of", "any", "absent", "optional", "exactly")


class ToolCall(BaseModel):
    name: str
    arguments: str  # as the server sent it: a JSON string


class ExpectedCall(BaseModel):
    """An expected call: the function's name and constraints on some of its arguments
    (an argument not named here may be given or not, with any schema-valid value).

    Each constraint is one of:
    - a value: equal. Strings are compared normalised, as BFCL does (case, spaces and the
      punctuation `,./-_*^` ignored; `'` same as `"`); numbers by value (`100 == 100.0`);
      a list element by element; a dict by the keys it names (others ignored).
    - `{contains: s}`: a string containing `s` (both normalised).
    - `{one_of: [c, ...]}`: any of these constraints.
    - `{any: true}`: present, with any (schema-valid) value.
    - `{absent: true}`: not given.
    - `{optional: c}`: not given (or given as "", BFCL's "no value"), or matching `c`; this is
      what BFCL's possible answer `["x", ""]` means.
    - `{exactly: {key: c, ...}}`: an object with these keys and no others; a key whose
      constraint allows absence (`optional`, `absent`) may be left out.
    Inside a dict value or `exactly`, keys take the same constraints."""

    name: str
    arguments: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arguments")
    @classmethod
    def _well_formed(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        for key, want in arguments.items():
            _check_constraint(want, key)
        return arguments


def _constraint(want: Any) -> str | None:
    """The constraint kind of `want`, or None when it is a plain value."""
    if isinstance(want, dict) and want and set(want) <= set(CONSTRAINTS):
        return next(iter(want)) if len(want) == 1 else "mixed"
    return None


def _check_constraint(want: Any, where: str) -> None:
    kind = _constraint(want)
    if kind == "mixed":
        raise ValueError(f"argument {where}: one constraint per value, got {sorted(want)} (use one_of to combine)")
    if kind == "one_of" and not isinstance(want["one_of"], list):
        raise ValueError(f"argument {where}: one_of takes a list, got {want['one_of']!r}")
    if kind == "exactly" and not isinstance(want["exactly"], dict):
        raise ValueError(f"argument {where}: exactly takes an object, got {want['exactly']!r}")
    if kind == "absent" and want["absent"] is not True:
        raise ValueError(f"argument {where}: write absent as {{absent: true}}")
    if kind == "one_of":
        for i, alt in enumerate(want["one_of"]):
            _check_constraint(alt, f"{where}.one_of[{i}]")
    elif kind == "optional":
        _check_constraint(want["optional"], f"{where}.optional")
    elif kind == "exactly":
        for k, v in want["exactly"].items():
            _check_constraint(v, f"{where}.{k}")
    elif kind is None and isinstance(want, dict):
        for k, v in want.items():
            _check_constraint(v, f"{where}.{k}")
    elif kind is None and isinstance(want, list):
        for i, v in enumerate(want):
            _check_constraint(v, f"{where}[{i}]")


def _is_integer(checker, instance) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


# JSON Schema counts 5.0 as an integer; BFCL does not, nor does a tool that does range(n).
_Validator = validators.extend(
    Draft202012Validator, type_checker=Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer))


def _closed(schema: dict) -> dict:
    """Copy of `schema` where objects that list their properties refuse unknown ones,
    unless they say otherwise. An object with no `properties` is a free-form dict."""
    if not isinstance(schema, dict):
        return schema
    out = {k: _closed(v) if isinstance(v, dict) else v for k, v in schema.items()}
    if isinstance(out.get("properties"), dict):
        out["properties"] = {k: _closed(v) for k, v in out["properties"].items()}
    for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
        if isinstance(out.get(key), list):
            out[key] = [_closed(v) for v in out[key]]
    if "properties" in out and "additionalProperties" not in out:
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
    args = {k: v for k, v in args.items() if not _no_value(k, v, schema)}
    for err in sorted(_Validator(schema).iter_errors(args), key=lambda e: list(e.absolute_path)):
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


def _no_value(key: str, value: Any, schema: dict) -> bool:
    """An argument the schema does not require, of type string, given as "": BFCL's 'no value'."""
    prop = (schema.get("properties") or {}).get(key)
    return (value == "" and isinstance(prop, dict) and prop.get("type") == "string"
            and key not in (schema.get("required") or []))


def _without_no_values(call: ToolCall, tools: dict[str, dict]) -> ToolCall:
    """The call without its "" for optional string parameters (a schema-valid call)."""
    args = json.loads(call.arguments) if call.arguments.strip() else {}
    schema = tools[call.name].get("parameters") or {}
    kept = {k: v for k, v in args.items() if not _no_value(k, v, schema)}
    return call if len(kept) == len(args) else ToolCall(name=call.name, arguments=json.dumps(kept, ensure_ascii=False))


_IGNORED = re.compile(r"[ ,./\-_*^]")


def normalise(text: str) -> str:
    """A string as BFCL's checker compares it (`standardize_string`): without spaces and
    `,./-_*^`, lower-cased, `'` as `"`. ("April 1, 2024" = "april 1 2024"; "New York" = "new-york".)"""
    return _IGNORED.sub("", text).lower().replace("'", '"')


def admits_absence(want: Any) -> bool:
    """Whether the constraint is met by the argument not being given at all."""
    kind = _constraint(want)
    if kind in ("absent", "optional"):
        return True
    return kind == "one_of" and any(admits_absence(w) for w in want["one_of"])


def _keys_ok(want: dict, got: dict) -> bool:
    return all(_value_ok(v, got[k]) if k in got else admits_absence(v) for k, v in want.items())


def _value_ok(want: Any, got: Any) -> bool:
    """Whether a given value `got` meets the constraint `want`."""
    kind = _constraint(want)
    if kind == "any":
        return bool(want["any"])
    if kind == "absent":
        return False
    if kind == "optional":
        return got == "" or _value_ok(want["optional"], got)
    if kind == "contains":
        return isinstance(got, str) and normalise(str(want["contains"])) in normalise(got)
    if kind == "one_of":
        return any(_value_ok(w, got) for w in want["one_of"])
    if kind == "exactly":
        return isinstance(got, dict) and set(got) <= set(want["exactly"]) and _keys_ok(want["exactly"], got)
    if isinstance(want, str) and isinstance(got, str):
        return normalise(want) == normalise(got)
    if isinstance(want, dict) and isinstance(got, dict):
        return _keys_ok(want, got)
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
            if not admits_absence(want):
                problems.append(f"{call.name}: expected argument {key!r} = {want!r}, it is missing")
        elif _constraint(want) == "absent":
            problems.append(f"{call.name}: {key}={args[key]!r} given, expected it left out")
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
    calls = [_without_no_values(c, tools) for c in calls]
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
