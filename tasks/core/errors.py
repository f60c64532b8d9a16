"""Errors the pipeline raises on purpose, the one retry rule every task uses, and the `flow`
decorator every flow uses so that a bad parameter is a one-line PipelineInputError."""

from __future__ import annotations

from typing import Any, Callable

import httpx
import urllib3
from prefect import Flow
from prefect.exceptions import ParameterTypeError
from pydantic import ValidationError

from tasks.core.aws import is_transient_aws_error

MAX_MESSAGE = 400


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """A message that quotes a hostile value (5,000 characters of repo id) stays readable."""
    return text if len(text) <= limit else f"{text[: limit * 2 // 3]} … {text[-(limit // 3 - 3):]}"


class PipelineInputError(ValueError):
    """Bad input or configuration the user must fix; never retried. One line, names the culprit."""

    def __init__(self, message: str = ""):
        super().__init__(clip(" ".join(str(message).split())))


_SECRETISH = ("token", "password", "secret", "api_key", "credential")


def one_line(exc: ValidationError, owner: str = "") -> str:
    """pydantic's multi-line ValidationError as one line: `owner.field: what is allowed (got value)`,
    one part per error. The value is quoted only for pydantic's own type/range/choice errors, when it
    is a plain scalar of a field that holds no secret (a validator's message says what it wants)."""
    parts = []
    for err in exc.errors():
        where = "".join(f"[{x}]" if isinstance(x, int) else f".{x}" for x in (owner, *err.get("loc", ())) if x != "")
        where = where.lstrip(".") or "value"
        msg = err.get("msg", "invalid").removeprefix("Value error, ").removeprefix("Assertion failed, ")
        value = err.get("input")
        quote = (err.get("type") not in ("value_error", "assertion_error", "missing")
                 and isinstance(value, (str, int, float, bool)) and not any(s in where.lower() for s in _SECRETISH))
        parts.append(f"{where}: {msg}" + (f" (got {clip(repr(value), 60)})" if quote else ""))
    return "; ".join(parts)


class InputCheckedFlow(Flow):
    """A Prefect flow whose parameter errors are one line. Prefect validates a run's parameters
    against the signature (types, `Literal` choices, `Annotated[..., Field(ge=...)]` bounds, pydantic
    models) before the function runs, on a direct call and on a deployment's run alike, and raises
    ParameterTypeError with pydantic's multi-line text; here that becomes a PipelineInputError naming
    the flow, each bad parameter (`settings.concurrency`), what is allowed and the value given."""

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        try:
            return super().validate_parameters(parameters)
        except ParameterTypeError as exc:
            cause = exc.__context__  # Prefect raises it `from None` out of pydantic's ValidationError
            text = (one_line(cause) if isinstance(cause, ValidationError)
                    else str(exc).removeprefix("Flow run received invalid parameters:").replace("\n - ", "; ").strip("; "))
            raise PipelineInputError(f"{self.name} parameter {text}") from None

    def with_options(self, *args: Any, **kwargs: Any) -> "InputCheckedFlow":
        copy = super().with_options(*args, **kwargs)  # Prefect builds a plain Flow
        copy.__class__ = type(self)
        return copy


def flow(fn: Callable | None = None, /, **options: Any) -> Any:
    """Prefect's `@flow(name=..., ...)`, making an InputCheckedFlow: use it for every flow."""
    if fn is None:
        return lambda f: InputCheckedFlow(f, **options)
    return InputCheckedFlow(fn, **options)


class TransientHttpError(RuntimeError):
    """An HTTP answer a retry can fix: 429, 5xx, a short body."""


class IntegrityError(RuntimeError):
    """Bytes did not match their advertised size or hash; retried (a transfer can corrupt)."""


_TRANSIENT_HTTP = (
    httpx.TransportError,  # connect/read timeouts, resets, dropped connections mid-body
    urllib3.exceptions.HTTPError,  # the same, from urllib3 (streamed Hub downloads)
    TransientHttpError,
)


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, PipelineInputError):
        return False
    if isinstance(exc, (IntegrityError, *_TRANSIENT_HTTP, ConnectionError, TimeoutError)):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        return exc.response.status_code in (408, 429) or exc.response.status_code >= 500
    return is_transient_aws_error(exc)


def retry_if_transient(task, task_run, state) -> bool:
    """Prefect `retry_condition_fn`: retry throttling, 5xx, timeouts, resets and corrupt transfers only."""
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - we classify it
        return is_transient(exc)
    return False
