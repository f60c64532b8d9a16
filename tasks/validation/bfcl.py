"""A BFCL-format data set as the tool-calling suite (the validate flow's `bfcl_suite`).

BFCL ships each category as two JSON Lines files: questions (`{"id", "question": [[messages]],
"function": [function docs with BFCL's types]}`) and possible answers (`{"id", "ground_truth":
[{function: {param: [accepted values, "" = may be left out]}}]}`). This module turns them into
the project's suite: function docs into JSON-schema tools the way BFCL converts them for
OpenAI-style models (`dict`→object, `float`→number, `tuple`→array, `any` and unknown types→
string, `.` in a function name → `_`), each question into a `ToolCase` of the matching category
(simple, multiple, parallel; parallel_multiple → parallel; irrelevance: no call), and each
ground truth into `ExpectedCall`s with the same meaning as BFCL's checker gives it (see
`expected_calls`). Files are read from local paths or s3:// URIs. A malformed line is a
`PipelineInputError` naming the file and the line.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from botocore.exceptions import ClientError
from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.core.errors import PipelineInputError
from tasks.validation.checker import ExpectedCall

HERE = Path(__file__).resolve().parent

# BFCL's GORILLA_TO_OPENAPI (bfcl_eval/constants/type_mappings.py), Python-category types.
TYPES = {"integer": "integer", "number": "number", "float": "number", "string": "string", "boolean": "boolean",
         "bool": "boolean", "array": "array", "list": "array", "dict": "object", "object": "object", "tuple": "array",
         "any": "string"}
# BFCL category (the id's prefix: "simple_python_3", "live_multiple_12-4-0") -> the project's.
CATEGORIES = {"simple": "simple", "simple_python": "simple", "live_simple": "simple",
              "multiple": "multiple", "live_multiple": "multiple",
              "parallel": "parallel", "live_parallel": "parallel",
              "parallel_multiple": "parallel", "live_parallel_multiple": "parallel",
              "irrelevance": "irrelevance", "live_irrelevance": "irrelevance"}
MODES = {"simple": ["auto", "required", "named", "none"], "multiple": ["auto", "required", "named", "none"],
         "parallel": ["auto", "required", "none"], "irrelevance": ["auto", "none"]}
_ID = re.compile(r"^(?P<category>[a-z_]+?)_[0-9][0-9-]*$")


class BfclSuite(BaseModel):
    """The validate flow's `bfcl_suite` parameter.

    Either `questions` (one file or several) with `answers` (the possible-answer files; the
    questions' ids find their answers; not needed for irrelevance), or `folder`: BFCL's data
    layout (`BFCL_v4_<category>.json` beside `possible_answer/BFCL_v4_<category>.json`), all its
    supported categories or those in `categories`. Paths are local or s3:// URIs."""

    model_config = ConfigDict(extra="forbid")
    questions: list[str] = Field(default_factory=list)
    answers: list[str] = Field(default_factory=list)
    folder: str | None = None
    categories: list[str] | None = None  # BFCL names: simple_python, live_multiple, irrelevance, ...
    category: str | None = None  # for every question, instead of reading it from the id
    limit: int | None = Field(default=None, ge=1)  # the first N questions of each file
    include_default: bool = False  # also run the repo's own suite (tasks/validation/cases/default.yaml)
    max_tokens: int = Field(default=256, ge=16)

    @model_validator(mode="before")
    @classmethod
    def _lists(cls, raw: Any) -> Any:
        if isinstance(raw, dict):
            raw = {**raw, **{k: [raw[k]] for k in ("questions", "answers") if isinstance(raw.get(k), str)}}
        return raw

    @model_validator(mode="after")
    def _one_source(self) -> "BfclSuite":
        if bool(self.questions) == bool(self.folder):
            raise ValueError("give either questions (+ answers) or folder")
        for name in [self.category, *(self.categories or [])]:
            if name is not None and name not in CATEGORIES:
                raise ValueError(f"BFCL category {name!r} is not supported (supported: {sorted(CATEGORIES)})")
        return self


# --------------------------------------------------------------------------------------------
# Function docs -> JSON schema
# --------------------------------------------------------------------------------------------

def tool_name(name: str) -> str:
    """The name an OpenAI-style server is given: BFCL replaces '.' (not allowed there) by '_'."""
    return name.replace(".", "_")


def to_schema(param: Any, where: str) -> dict:
    """One BFCL parameter schema as JSON schema (recursively; BFCL's own conversion goes two
    levels deep, which covers its data)."""
    if not isinstance(param, dict):
        raise ValueError(f"{where}: a parameter schema must be an object, got {param!r}"[:200])
    out = {k: copy.deepcopy(v) for k, v in param.items() if k not in ("optional",)}
    bfcl_type = param.get("type", "string")
    out["type"] = TYPES.get(bfcl_type, "string") if isinstance(bfcl_type, str) else "string"
    if bfcl_type == "float":  # as BFCL does for OpenAI-style models
        out["format"] = "float"
        if isinstance(out.get("description"), str):
            out["description"] += " This is a float type value."
    if "properties" in out:
        if not isinstance(out["properties"], dict):
            raise ValueError(f"{where}: properties must be an object")
        out["properties"] = {k: to_schema(v, f"{where}.{k}") for k, v in out["properties"].items()}
    if "items" in out:
        out["items"] = to_schema(out["items"], f"{where}[]")
    if "required" in out and not (isinstance(out["required"], list) and all(isinstance(r, str) for r in out["required"])):
        del out["required"]  # BFCL sometimes writes required: true on a property; not JSON schema
    return out


def to_tool(function: Any, where: str = "function") -> tuple[str, dict]:
    """(name as the server sees it, {description, parameters}) of one BFCL function doc."""
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise ValueError(f"{where} has no name")
    name = function["name"]
    params = function.get("parameters", {"type": "dict", "properties": {}})
    if not isinstance(params, dict):
        raise ValueError(f"{where} ({name}): parameters must be an object")
    schema = to_schema({**params, "type": "dict", "properties": params.get("properties", {})}, name)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as exc:
        raise ValueError(f"{where} ({name}): not a valid schema after conversion: {exc.message}") from None
    spec = {"parameters": schema}
    if isinstance(function.get("description"), str):
        spec = {"description": function["description"], **spec}
    return tool_name(name), spec


def to_tools(functions: Any) -> dict[str, dict]:
    if not isinstance(functions, list) or not functions:
        raise ValueError("'function' must be a non-empty list of function docs")
    return dict(to_tool(f, f"function {i + 1}") for i, f in enumerate(functions))


# --------------------------------------------------------------------------------------------
# Possible answers -> ExpectedCall
# --------------------------------------------------------------------------------------------

def _literal(value: Any) -> Any:
    """A value of a possible answer as a constraint that means 'equal': a dict has exactly its keys."""
    if isinstance(value, dict):
        return {"exactly": {k: _literal(v) for k, v in value.items()}}
    if isinstance(value, list):
        return [_literal(v) for v in value]
    return value


def _dict_answer(value: Any) -> Any:
    """One accepted value of a dict parameter: BFCL lists accepted values per key ("" = may be left out)."""
    if not isinstance(value, dict):
        return _literal(value)
    return {"exactly": {k: _accepted(v if isinstance(v, list) else [v], literal=True) for k, v in value.items()}}


def _accepted(alternatives: list, schema: dict | None = None, literal: bool = False) -> Any:
    """BFCL's list of accepted values for one parameter as one constraint."""
    kind = (schema or {}).get("type")
    items = (schema or {}).get("items") or {}
    values = []
    for v in alternatives:
        if v == "" and isinstance(v, str):
            continue
        if literal:
            values.append(_literal(v))
        elif kind == "dict":
            values.append(_dict_answer(v))
        elif kind in ("array", "list", "tuple") and items.get("type") == "dict" and isinstance(v, list):
            values.append([_dict_answer(x) for x in v])
        else:
            values.append(_literal(v))
    optional = "" in alternatives  # {optional: ...} also takes an explicit "", as BFCL's checker does
    if optional and not literal and kind in ("array", "list", "tuple"):
        values.append([])  # BFCL's checker also takes an empty list where "" marks an array optional
    if not values:
        return {"absent": True}
    one = values[0] if len(values) == 1 else {"one_of": values}
    return {"optional": one} if optional else one


def expected_calls(ground_truth: Any, functions: list[dict]) -> list[ExpectedCall]:
    """BFCL's ground truth as expected calls, with the meaning BFCL's AST checker gives it: each
    answered parameter must take one of its values (or be left out where "" is listed); a
    parameter of the function that the answer does not name must be left out."""
    if not isinstance(ground_truth, list) or not ground_truth:
        raise ValueError("'ground_truth' must be a non-empty list of {function: {param: [values]}}")
    docs = {f.get("name"): f for f in functions if isinstance(f, dict)}
    out = []
    for i, item in enumerate(ground_truth):
        if not isinstance(item, dict) or len(item) != 1:
            raise ValueError(f"ground_truth[{i}] must be {{function: {{param: [values]}}}}")
        (name, params), = item.items()
        if name not in docs:
            raise ValueError(f"ground_truth[{i}] calls {name!r}, which the question does not offer ({sorted(docs)})")
        if not isinstance(params, dict):
            raise ValueError(f"ground_truth[{i}] ({name}): the arguments must be an object")
        props = (docs[name].get("parameters") or {}).get("properties") or {}
        arguments = {}
        for param, alternatives in params.items():
            if not isinstance(alternatives, list):
                raise ValueError(f"ground_truth[{i}] ({name}): {param!r} must list its accepted values, got {alternatives!r}"[:200])
            arguments[param] = _accepted(alternatives, props.get(param))
        for param in props:
            arguments.setdefault(param, {"absent": True})
        out.append(ExpectedCall(name=tool_name(name), arguments=arguments))
    return out


# --------------------------------------------------------------------------------------------
# Files -> suite
# --------------------------------------------------------------------------------------------

def _read(uri: str, s3: Callable[[], Any] | None, what: str) -> str:
    if uri.startswith("s3://"):
        from tasks.core.s3 import split_s3

        bucket, key = split_s3(uri)
        if s3 is None:
            raise PipelineInputError(f"{what} {uri}: s3:// needs the model store's credentials")
        try:
            body = s3().get_object(Bucket=bucket, Key=key)["Body"].read()
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound", "NoSuchBucket"):
                raise PipelineInputError(f"{what} {uri} not found") from None
            raise
    else:
        path = Path(uri).expanduser()
        if not path.is_file():
            raise PipelineInputError(f"{what} {uri} not found")
        body = path.read_bytes()
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PipelineInputError(f"{what} {uri}: not UTF-8 text (byte {exc.start})") from None


def _lines(uri: str, s3, what: str, limit: int | None = None):
    """(line number, object) of a JSON Lines file (BFCL's .json files are JSON Lines)."""
    n = 0
    for number, line in enumerate(_read(uri, s3, what).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PipelineInputError(f"{uri} line {number}: not JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(obj, dict):
            raise PipelineInputError(f"{uri} line {number}: expected a JSON object, got {type(obj).__name__}")
        if not isinstance(obj.get("id"), str) or not obj["id"]:
            raise PipelineInputError(f"{uri} line {number}: no 'id'")
        yield number, obj
        n += 1
        if limit and n >= limit:
            return


def _list_folder(folder: str, s3) -> list[str]:
    folder = folder.rstrip("/")
    if folder.startswith("s3://"):
        from tasks.core.s3 import split_s3

        bucket, prefix = split_s3(folder + "/")
        if s3 is None:
            raise PipelineInputError(f"BFCL folder {folder}: s3:// needs the model store's credentials")
        pages = s3().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix, Delimiter="/")
        return [f"s3://{bucket}/{o['Key']}" for page in pages for o in page.get("Contents", [])]
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise PipelineInputError(f"BFCL folder {folder} not found")
    return [str(p) for p in sorted(path.iterdir()) if p.is_file()]


def _folder_files(spec: BfclSuite, s3) -> tuple[list[str], list[str]]:
    """Question and answer files of a BFCL data folder, for the supported categories (or those asked)."""
    found = {}
    for uri in _list_folder(spec.folder, s3):
        m = re.fullmatch(r"BFCL_v\d+_(?P<cat>[a-z_]+)\.jsonl?", uri.rsplit("/", 1)[-1])
        if m and m["cat"] in CATEGORIES:
            found[m["cat"]] = uri
    wanted = spec.categories or sorted(found)
    missing = sorted(set(wanted) - set(found))
    if missing or not wanted:
        raise PipelineInputError(f"BFCL folder {spec.folder}: no BFCL_v*_<category>.json for {missing or 'any supported category'}")
    questions = [found[c] for c in wanted]
    answers = [u.rsplit("/", 1)[0] + "/possible_answer/" + u.rsplit("/", 1)[1]
               for c, u in zip(wanted, questions) if CATEGORIES[c] != "irrelevance"]
    return questions, answers


def _messages(question: Any) -> list[dict]:
    if not (isinstance(question, list) and len(question) == 1 and isinstance(question[0], list) and question[0]):
        raise ValueError("'question' must be [[messages]]: one turn (multi-turn categories are not supported)")
    for m in question[0]:
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"each message needs a role and a text content, got {m!r}"[:200])
    return question[0]


class _Names:
    """One suite holds one definition per tool name, but BFCL reuses a name with different
    definitions across questions: a later, different definition is offered as `<name>_2`, ..."""

    def __init__(self, taken: dict[str, dict]):
        self.tools: dict[str, dict] = {}
        self.taken = taken

    def add(self, name: str, spec: dict) -> str:
        for n in [name] + [f"{name}_{i}" for i in range(2, 1000)]:
            have = self.tools.get(n, self.taken.get(n))
            if have is None or have == spec:
                self.tools[n] = spec
                return n
        raise ValueError(f"too many different definitions of {name!r}")


def load_bfcl_suite(spec: dict | BfclSuite, s3: Callable[[], Any] | None = None) -> dict:
    """The BFCL data set as {tools, cases, include_default}, the shape `load_suite` merges.
    `s3` makes an S3 client, for s3:// URIs. Fails on the first malformed line, naming it."""
    try:
        spec = spec if isinstance(spec, BfclSuite) else BfclSuite.model_validate(spec)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise PipelineInputError(f"bfcl_suite: {'.'.join(map(str, err['loc'])) or '(value)'}: {err['msg']}") from None
    questions, answers = (spec.questions, spec.answers) if spec.questions else _folder_files(spec, s3)
    truth: dict[str, tuple[str, int, Any]] = {}
    for uri in answers:
        for number, obj in _lines(uri, s3, "BFCL possible-answer file"):
            if obj["id"] in truth:
                raise PipelineInputError(f"{uri} line {number}: id {obj['id']!r} answered twice")
            if "ground_truth" not in obj:
                raise PipelineInputError(f"{uri} line {number}: no 'ground_truth'")
            truth[obj["id"]] = (uri, number, obj["ground_truth"])
    taken = {}
    if spec.include_default:
        taken = yaml.safe_load((HERE / "cases" / "default.yaml").read_text())["tools"]
    names, cases, seen = _Names(taken), [], {}
    for uri in questions:
        for number, obj in _lines(uri, s3, "BFCL question file", spec.limit):
            where = f"{uri} line {number}"
            if obj["id"] in seen:
                raise PipelineInputError(f"{where}: id {obj['id']!r} already on {seen[obj['id']]}")
            seen[obj["id"]] = where
            bfcl_category = spec.category or (_ID.match(obj["id"]) or {"category": None})["category"]
            if bfcl_category not in CATEGORIES:
                raise PipelineInputError(f"{where}: category {bfcl_category!r} of id {obj['id']!r} is not supported "
                                         f"(supported: {', '.join(sorted(CATEGORIES))}; or set bfcl_suite.category)")
            category = CATEGORIES[bfcl_category]
            try:
                messages = _messages(obj.get("question"))
                functions = obj.get("function")
                tools = to_tools(functions)
            except ValueError as exc:
                raise PipelineInputError(f"{where} ({obj['id']}): {exc}") from None
            if category == "irrelevance":
                expected = []
            else:
                if obj["id"] not in truth:
                    raise PipelineInputError(f"{where}: no possible answer for id {obj['id']!r} in {', '.join(answers) or 'no answer file'}")
                a_uri, a_number, ground_truth = truth[obj["id"]]
                try:
                    expected = expected_calls(ground_truth, functions)
                except ValueError as exc:
                    raise PipelineInputError(f"{a_uri} line {a_number} ({obj['id']}): {exc}") from None
            try:
                renamed = {n: names.add(n, s) for n, s in tools.items()}
            except ValueError as exc:
                raise PipelineInputError(f"{where}: {exc}") from None
            cases.append({
                "id": obj["id"], "category": category, "tools": list(renamed.values()), "messages": messages,
                "expected": [{"name": renamed[e.name], "arguments": e.arguments} for e in expected],
                "modes": MODES[category], "max_tokens": spec.max_tokens,
            })
    if not cases:
        raise PipelineInputError(f"bfcl_suite: no questions in {', '.join(questions)}")
    return {"tools": names.tools, "cases": cases, "include_default": spec.include_default}


__all__ = ["BfclSuite", "CATEGORIES", "expected_calls", "load_bfcl_suite", "to_schema", "to_tool", "to_tools", "tool_name"]
