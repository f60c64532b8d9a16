"""The vLLM server's entrypoint, in the production image and for the local target alike.

1. Fetch the staged model (and LoRA adapters) from S3 by their `_manifest.json` into a
   local cache, verifying every file's sha256; a warm cache is checked, not re-downloaded.
   (With MODEL_LOAD_FORMAT=runai_streamer the weights stream from s3:// instead.)
2. exec the vLLM OpenAI server with the flags the deploy step built from the
   VllmServerSettings block. The API key arrives as VLLM_API_KEY (a Secrets Manager
   reference on ECS), never as a flag.

Environment:
  MODEL_URI          s3://bucket/prefix of a staged model (the folder holding _manifest.json)
  MODEL_CACHE_DIR    where models are cached (default /models)
  VLLM_ARGS          JSON list of server flags; the token {model} is replaced by the model path
  LORA_ADAPTERS      JSON object {served name: s3 URI of a staged adapter}
  MODEL_LOAD_FORMAT  "auto" (fetch to disk) or "runai_streamer" (stream from S3)
Only the standard library and boto3: it runs before the server, in the server's environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config

MANIFEST = "_manifest.json"


def log(msg: str) -> None:
    print(f"[entrypoint] {msg}", file=sys.stderr, flush=True)


def _split(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise SystemExit(f"[entrypoint] not an s3:// URI: {uri!r}")
    return u.netloc, u.path.strip("/")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(uri: str, cache_root: Path, s3=None) -> Path:
    """Copy a staged model/adapter to cache_root/<bucket>/<prefix>, verified against its manifest."""
    s3 = s3 or boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=16))
    bucket, prefix = _split(uri)
    try:
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except s3.exceptions.NoSuchKey:
        raise SystemExit(f"[entrypoint] {uri} has no {MANIFEST}: the model is not (completely) staged") from None
    target = cache_root / bucket / prefix
    target.mkdir(parents=True, exist_ok=True)
    marker = target / ".verified.json"
    if marker.exists() and json.loads(marker.read_text()) == manifest:
        log(f"{uri}: cached copy verified earlier, using {target}")
        return target

    def one(entry: dict) -> None:
        dest = target / entry["path"]
        if dest.exists() and dest.stat().st_size == entry["size"] and _sha256(dest) == entry["sha256"]:
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
        os.close(fd)
        try:
            s3.download_file(bucket, f"{prefix}/{entry['path']}", tmp)
            got = _sha256(Path(tmp))
            if got != entry["sha256"]:
                raise SystemExit(f"[entrypoint] {entry['path']}: sha256 {got} != manifest {entry['sha256']}")
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    files = manifest["files"]
    log(f"{uri}: fetching {len(files)} files, {sum(f['size'] for f in files) / 1e6:.1f} MB")
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(one, files))
    marker.write_text(json.dumps(manifest))
    return target


def build_command(env: dict[str, str], cache_root: Path) -> list[str]:
    args = json.loads(env.get("VLLM_ARGS", "[]"))
    uri = env["MODEL_URI"]
    if env.get("MODEL_LOAD_FORMAT", "auto") == "runai_streamer":
        model = uri.rstrip("/") + "/"
        args += ["--load-format", "runai_streamer"]
    else:
        model = str(fetch(uri, cache_root))
    args = [a.replace("{model}", model) for a in args]
    adapters = json.loads(env.get("LORA_ADAPTERS", "{}"))
    if adapters:
        args += ["--lora-modules", *[f"{name}={fetch(a_uri, cache_root)}" for name, a_uri in adapters.items()]]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args]


def main() -> None:
    cache_root = Path(os.environ.get("MODEL_CACHE_DIR", "/models"))
    cmd = build_command(dict(os.environ), cache_root)
    log("exec " + " ".join(cmd))
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
