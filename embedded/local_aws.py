"""The local AWS stand-in: a moto server on 127.0.0.1, reached through `AWS_ENDPOINT_URL`.

moto runs as its own process (a real HTTP endpoint, as AWS is), so boto3 in the flows
takes exactly the path it takes against AWS. `python -m embedded.local_aws` runs it in
the foreground and prints the environment to point a shell at it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from embedded.net import free_port, stop_process, wait_for_port

DEFAULT_BUCKET = "vllm-pipeline-models"
DEFAULT_REGION = "us-east-1"


@dataclass(frozen=True)
class LocalAws:
    endpoint: str
    bucket: str
    region: str

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
        }


def start_moto_server(port: int | None = None) -> tuple[subprocess.Popen, str]:
    port = port or free_port()
    proc = subprocess.Popen(
        [sys.executable, str(Path(__file__).with_name("moto_server.py")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port, timeout=60, proc=proc)
    except Exception:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


@contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def local_aws(bucket: str = DEFAULT_BUCKET, region: str = DEFAULT_REGION, port: int | None = None) -> Iterator[LocalAws]:
    """Start moto, point this process's boto3 at it, create the model bucket; stop it on exit."""
    proc, endpoint = start_moto_server(port)
    stack = LocalAws(endpoint=endpoint, bucket=bucket, region=region)
    try:
        with patched_env(stack.env):
            from tasks.core.aws import aws_client

            aws_client("s3").create_bucket(Bucket=bucket)
            yield stack
    finally:
        stop_process(proc)


def main() -> None:  # pragma: no cover - interactive helper
    import time

    with local_aws() as stack:
        for k, v in stack.env.items():
            print(f"export {k}={v}")
        print(f"# model bucket: s3://{stack.bucket}  (Ctrl-C stops the server)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


if __name__ == "__main__":
    main()
