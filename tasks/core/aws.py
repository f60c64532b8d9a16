"""The one place AWS clients are made.

Every boto3 client in the project comes from `aws_client`, built from prefect-aws's
`AwsCredentials` block. boto3 reads `AWS_ENDPOINT_URL` / `AWS_ENDPOINT_URL_<SERVICE>`
itself, so the local moto server and real AWS take the same code path: nothing here
knows which one it talks to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.loaders import create_loader
from prefect_aws import AwsCredentials

# Timeouts of our own: a Prefect task timeout cannot interrupt a blocking socket read.
_BASE_CONFIG = Config(
    connect_timeout=10,
    read_timeout=120,
    retries={"mode": "standard", "max_attempts": 6},
    max_pool_connections=64,
    # No SHA-256 of every request body for the SigV4 signature: over HTTPS botocore already leaves
    # streamed uploads unsigned (TLS + the CRC32 checksum cover them); this extends that to plain-HTTP
    # S3 endpoints (MinIO, the local stand-in), where the hash was a second full pass over every byte
    # on top of the CRC32, which is still sent and checked, and our own sha256 check against the Hub.
    s3={"payload_signing_enabled": False},
)

TRANSIENT_ERROR_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "SlowDown",
        "TooManyRequestsException",
        "RequestTimeout",
        "RequestTimeoutException",
        "InternalError",
        "InternalFailure",
        "ServiceUnavailable",
        "ServiceUnavailableException",
        "InsufficientInstanceCapacity",
    }
)


# One botocore data loader for every session: parsing a service's JSON model (EC2's is ~4 MB) is
# most of what making a client costs, and the loader caches the parsed models.
_LOADER = create_loader()


def aws_client(service: str, credentials: AwsCredentials | None = None, region: str | None = None) -> Any:
    """A boto3 client for `service` with the project's timeouts and retry policy."""
    creds = credentials or AwsCredentials()
    params = dict(creds.aws_client_parameters.get_params_override())
    config = _BASE_CONFIG
    if "config" in params:
        config = config.merge(params.pop("config"))
    session = creds.get_boto3_session()
    session._session.register_component("data_loader", _LOADER)  # boto3 exposes its botocore session only as _session
    if region:
        params["region_name"] = region
    return session.client(service, config=config, **params)


def is_transient_aws_error(exc: BaseException) -> bool:
    """True for errors a retry can fix: throttling, 5xx, timeouts, dropped connections."""
    if isinstance(exc, ClientError):
        err = exc.response.get("Error", {})
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return err.get("Code") in TRANSIENT_ERROR_CODES or status >= 500
    return isinstance(exc, (BotoConnectionError, HTTPClientError))


def error_code(exc: BaseException) -> str:
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code", ""))
    return ""


T = TypeVar("T")


def unless_gone(call: Callable[[], T], *codes: str, says: str = "") -> T | None:
    """call()'s answer, or None when AWS answers one of `codes` (and, for services that tell
    "not found" only in the message, `says` in it): the resource is already gone. Deletes treat
    that as done, describes as nothing to do; every other error is raised."""
    try:
        return call()
    except ClientError as exc:
        if error_code(exc) in codes and says.lower() in str(exc).lower():
            return None
        raise


class Aws:
    """Credentials + region, handed to the ECS target's tasks so each builds its clients inside
    itself (a boto3 client as a task argument breaks Prefect's cache-key hashing)."""

    def __init__(self, credentials: AwsCredentials | None = None, region: str | None = None):
        self.credentials = credentials
        self.region = region
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        """One client per service (boto3 clients are thread-safe; making one costs ~0.3 s)."""
        if service not in self._clients:
            self._clients[service] = aws_client(service, self.credentials, self.region)
        return self._clients[service]

    def account(self) -> str:
        return self.client("sts").get_caller_identity()["Account"]

    def partition(self) -> str:
        return self.client("sts").get_caller_identity()["Arn"].split(":")[1]
