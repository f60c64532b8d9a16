"""Errors the pipeline raises on purpose, and the one retry rule every task uses."""

from __future__ import annotations

import httpx
import urllib3

from tasks.aws import is_transient_aws_error


MAX_MESSAGE = 400


def clip(text: str, limit: int = MAX_MESSAGE) -> str:
    """A message that quotes a hostile value (5,000 characters of repo id) stays readable."""
    return text if len(text) <= limit else f"{text[: limit * 2 // 3]} … {text[-(limit // 3 - 3):]}"


class PipelineInputError(ValueError):
    """Bad input or configuration the user must fix; never retried. One line, names the culprit."""

    def __init__(self, message: str = ""):
        super().__init__(clip(" ".join(str(message).split())))


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
