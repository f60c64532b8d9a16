"""A tool set as data: what the model is told (name, description, JSON-schema parameters) and how the
gateway runs each tool (an HTTPS webhook or a Python entry point installed in the gateway's image).

A tool set is a YAML or JSON document, in a local file or at an s3:// URI:

    tools:
      - builtin: calculate                 # a definition from gateway.builtin_tools.SPECS
      - builtin: fetch
        implementation: {bind: {allowed_hosts: [api.example.com]}}
      - name: crm_lookup
        description: Look a customer up in the CRM.
        parameters: {type: object, properties: {email: {type: string}}, required: [email]}
        timeout_s: 5
        implementation:
          type: webhook
          url: https://crm.example.com/lookup
          method: POST                     # the arguments as a JSON body (GET: as query parameters)
          headers:
            Authorization: {secret: arn:aws:secretsmanager:...:secret:crm-token, template: "Bearer {value}"}

Everything that can be wrong is found at load, before the gateway serves: duplicate names, a schema that
is not a JSON schema, an entry point that does not import or cannot take the schema's arguments, a bound
argument the model could also set, a webhook that is not HTTPS, a header secret that cannot be read.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from jsonschema.exceptions import SchemaError
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretStr, field_validator, model_validator

from gateway import aws
from gateway.builtin_tools import SPECS
from gateway.urls import outbound_url

TOOL_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # what OpenAI's API accepts as a function name
ENTRY_POINT = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")


class SecretHeader(BaseModel):
    """A header value read from Secrets Manager at load; `key` picks a field of a JSON secret."""

    model_config = ConfigDict(extra="forbid")
    secret: str = Field(min_length=1, description="the secret's ARN or name")
    key: str | None = None
    template: str = Field("{value}", description="the header value, with {value} replaced by the secret")

    @field_validator("template")
    @classmethod
    def _has_value(cls, template: str) -> str:
        if "{value}" not in template:
            raise ValueError("template must contain {value}")
        return template

    def resolve(self) -> SecretStr:
        raw = aws.read_secret(self.secret)
        if self.key is not None:
            try:
                raw = json.loads(raw)[self.key]
            except (ValueError, KeyError, TypeError):
                raise ValueError(f"secret {self.secret!r} has no JSON key {self.key!r}") from None
        return SecretStr(self.template.replace("{value}", str(raw)))


class WebhookImpl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["webhook"]
    url: str
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    headers: dict[str, str | SecretHeader] = {}
    max_response_bytes: int = Field(262_144, ge=1)

    _resolved: dict[str, SecretStr] = PrivateAttr(default_factory=dict)

    @field_validator("url")
    @classmethod
    def _outbound(cls, url: str) -> str:
        outbound_url(url)
        return url

    def resolve_headers(self) -> None:
        self._resolved = {name: v.resolve() if isinstance(v, SecretHeader) else SecretStr(v) for name, v in self.headers.items()}

    def request_headers(self) -> dict[str, str]:
        return {name: value.get_secret_value() for name, value in self._resolved.items()}


class PythonImpl(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["python"]
    entry_point: str = Field(description="package.module:function, sync or async, installed in the gateway's image")
    bind: dict[str, Any] = Field({}, description="keyword arguments fixed by the tool set, never seen or set by the model")

    _function: Callable[..., Any] | None = PrivateAttr(None)

    @field_validator("entry_point")
    @classmethod
    def _shape(cls, entry_point: str) -> str:
        if not ENTRY_POINT.match(entry_point):
            raise ValueError(f"entry point {entry_point!r} is not package.module:function")
        return entry_point

    def load(self) -> Callable[..., Any]:
        module_name, attr = self.entry_point.split(":")
        try:
            function = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"entry point {self.entry_point!r} does not import: {exc}") from None
        if not callable(function):
            raise ValueError(f"entry point {self.entry_point!r} is not callable")
        self._function = function
        return function

    @property
    def function(self) -> Callable[..., Any]:
        return self._function or self.load()


Implementation = Annotated[WebhookImpl | PythonImpl, Field(discriminator="type")]


class Tool(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    description: str = ""
    parameters: dict[str, Any] = {"type": "object", "properties": {}}
    timeout_s: float | None = Field(None, gt=0, description="this tool's timeout; the gateway's tool_timeout_s when unset")
    implementation: Implementation

    _validator: Validator | None = PrivateAttr(None)

    @model_validator(mode="before")
    @classmethod
    def _builtin(cls, data: Any) -> Any:
        """`builtin: <name>` takes the definition from gateway.builtin_tools.SPECS; the keys given beside it
        override it (an implementation's keys are merged, so `implementation: {bind: ...}` is enough)."""
        if not isinstance(data, dict) or "builtin" not in data:
            return data
        data = dict(data)
        name = data.pop("builtin")
        if name not in SPECS:
            raise ValueError(f"no built-in tool {name!r} (there are: {', '.join(sorted(SPECS))})")
        spec = SPECS[name]
        return {"name": name, **spec, **data, "implementation": {**spec["implementation"], **data.get("implementation", {})}}

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not TOOL_NAME.match(name):
            raise ValueError(f"tool name {name!r}: 1-64 letters, digits, _ or -")
        return name

    @field_validator("parameters")
    @classmethod
    def _schema(cls, schema: dict[str, Any]) -> dict[str, Any]:
        try:
            validator_for(schema).check_schema(schema)
        except SchemaError as exc:
            raise ValueError(f"parameters is not a valid JSON schema: {exc.message}") from None
        if schema.get("type") != "object":
            raise ValueError("parameters must be a JSON schema of type object (tool arguments are an object)")
        return schema

    @property
    def validator(self) -> Validator:
        if self._validator is None:
            self._validator = validator_for(self.parameters)(self.parameters)
        return self._validator

    def openai(self) -> dict[str, Any]:
        """The definition the model is sent (and /v1/tools lists): never the implementation."""
        return {"type": "function", "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def prepare(self) -> None:
        """The load-time checks that need the outside world: import the entry point, read the secrets."""
        impl = self.implementation
        if isinstance(impl, WebhookImpl):
            impl.resolve_headers()
            return
        _check_signature(self.name, impl.load(), self.parameters, impl.bind)


def _check_signature(name: str, function: Callable[..., Any], schema: dict[str, Any], bind: dict[str, Any]) -> None:
    """The function can be called with what the model may send plus what the tool set binds."""
    properties = set(schema.get("properties", {}))
    if clash := sorted(properties & set(bind)):
        raise ValueError(f"tool {name!r}: {clash} are both bound by the tool set and settable by the model")
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return  # a builtin without a signature: nothing to check against
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    if not takes_any and (unknown := sorted((properties | set(bind)) - named)):
        raise ValueError(f"tool {name!r}: {function.__qualname__}() takes no argument(s) {unknown}")
    required = set(schema.get("required", [])) | set(bind)
    missing = sorted(n for n in named if params[n].default is inspect.Parameter.empty and n not in required)
    if missing:
        raise ValueError(f"tool {name!r}: {function.__qualname__}() needs {missing}, which neither the schema requires nor the tool set binds")


class ToolSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tools: list[Tool]

    @model_validator(mode="after")
    def _unique(self) -> "ToolSet":
        names = [t.name for t in self.tools]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"tool names must be unique: {dupes}")
        return self

    def by_name(self) -> dict[str, Tool]:
        return {t.name: t for t in self.tools}

    def openai(self) -> list[dict[str, Any]]:
        return [t.openai() for t in self.tools]

    def prepare(self) -> "ToolSet":
        for tool in self.tools:
            try:
                tool.prepare()
            except ValueError as exc:
                raise ValueError(f"tool {tool.name!r}: {exc}") from None
        return self


def parse_document(text: str | bytes, source: str) -> Any:
    """A YAML or JSON document (JSON is YAML, but JSON's error messages are better for .json)."""
    if source.endswith(".json"):
        return json.loads(text)
    return yaml.safe_load(text)


def load_toolset(source: str | Path | dict[str, Any]) -> ToolSet:
    """A checked, prepared tool set from a file path, an s3:// URI or an inline document."""
    if isinstance(source, dict):
        data, where = source, "inline tool set"
    elif str(source).startswith("s3://"):
        data, where = parse_document(aws.read_s3(str(source)), str(source)), str(source)
    else:
        data, where = parse_document(Path(source).read_text(), str(source)), str(source)
    try:
        return ToolSet.model_validate(data).prepare()
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise ValueError(f"{where}: {exc}") from None
