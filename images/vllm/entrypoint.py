"""The vLLM server's entrypoint, in the production image and for the local target alike.

1. Fetch the staged model (and LoRA adapters) from S3 by their `_manifest.json` into a
   local cache, verifying every file's sha256; a warm cache is checked, not re-downloaded.
   (With MODEL_LOAD_FORMAT=runai_streamer the weights stream from s3:// instead.)
   On ECS the cache is a folder of the GPU host, mounted into every task (fetch() says how
   tasks share it); see docs/ecs.md.
2. exec the vLLM OpenAI server with the flags the deploy step built from the
   VllmServerSettings block. The API key arrives as VLLM_API_KEY (a Secrets Manager
   reference on ECS), never as a flag.
3. With LORA_INDEX_URI and runtime LoRA updating on, the server runs in this process behind a
   LoRA resolver: a request naming an adapter the index lists but the server has not loaded
   fetches it from S3 (by its manifest, verified) and loads it. That is how an adapter added to
   a running stack (flows/adapters.py) reaches every replica without a restart; removal is
   vLLM's /v1/unload_lora_adapter after the index no longer lists it.
Each phase of a start (start, model fetch begin/end, verify end, exec) is one machine-readable line,
`[entrypoint] phase=<name> t=<unix seconds> ...` (phase()): the deploy's cold-start timeline
(tasks/core/timeline.py) reads them beside vLLM's own log lines.

Environment:
  MODEL_URI          s3://bucket/prefix of a staged model (the folder holding _manifest.json)
  MODEL_CACHE_DIR    where models are cached (default /models; on ECS the host's folder)
  VLLM_ARGS          JSON list of server flags; the token {model} is replaced by the model path
  LORA_ADAPTERS      JSON object {served name: s3 URI of a staged adapter}
  LORA_INDEX_URI     s3:// URI of the stack's adapter index (same JSON object); when the object
                     exists it replaces LORA_ADAPTERS, and it is read again for runtime additions
  MODEL_LOAD_FORMAT  "auto" (fetch to disk) or "runai_streamer" (stream from S3)
  ENTRYPOINT_MODE    "serve" (default) or "batch" (or the first argument: `entrypoint.py batch`)
  BATCH_INPUT_URI    batch mode: s3:// URI of an OpenAI Batch JSONL file, already validated
  BATCH_OUTPUT_URI   batch mode: s3:// URI the runner's raw output file is written to
  BATCH_WORK_DIR     batch mode: scratch folder for the input/output files (default: a temp dir)
Only the standard library and boto3: it runs before the server, in the server's environment.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import boto3
from botocore.config import Config

MANIFEST = "_manifest.json"
MARKER = ".verified.json"  # in a model's folder: the manifest it was verified against, and each file's stat then
LOCKS = ".locks"  # in the cache root: one lock file per cached model, never deleted (see cache_lock)
RESERVE_BYTES = 1 << 30  # left free on the cache's disk besides a fetch: logs, the container layer
HOST_CACHE = "/var/lib/vllm-pipeline/models"  # the GPU hosts' folder (tasks/targets/ecs/gpu_hosts.py)
_fetched: set[str] = set()  # what this process fetched: make_room never takes it from under this start


def log(msg: str) -> None:
    print(f"[entrypoint] {msg}", file=sys.stderr, flush=True)


def phase(name: str, **fields: object) -> None:
    """One machine-readable line per cold-start phase (tasks/core/timeline.py parses them, from the local
    target's log file and from CloudWatch alike): `[entrypoint] phase=<name> t=<unix seconds> key=value ...`."""
    log(" ".join([f"phase={name}", f"t={time.time():.3f}", *(f"{k}={v}" for k, v in fields.items())]))


def _split(uri: str) -> tuple[str, str]:
    u = urlparse(uri)
    if u.scheme != "s3" or not u.netloc:
        raise SystemExit(f"[entrypoint] not an s3:// URI: {uri!r}")
    return u.netloc, u.path.strip("/")


def _model_s3():
    return boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=16))


def _manifest(s3, uri: str) -> dict:
    """The staged model's manifest; its absence means the stage flow has not finished (it writes it last)."""
    bucket, prefix = _split(uri)
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}")["Body"].read())
    except s3.exceptions.NoSuchKey:
        raise SystemExit(f"[entrypoint] {uri} has no {MANIFEST}: the model is not (completely) staged") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _stat(path: Path) -> list[int] | None:
    """What changes when a file is written, replaced or truncated: size, mtime and inode."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino]


def lock_path(cache_root: Path, key: str) -> Path:
    return cache_root / LOCKS / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".lock")


_in_use: list[int] = []  # descriptors of the "in use" locks this process (and the server it execs) holds


def hold_in_use(cache_root: Path, key: str) -> None:
    """A shared lock on the model's "in use" file for the life of this process and of the vLLM server
    it execs (the descriptor is inheritable, and flock locks belong to the open file, so they outlive
    exec): vLLM reads weight shards during a load that can take minutes and opens LoRA adapters when
    first used, so make_room must not delete a folder a server on this host still reads. Other
    starts share it; only make_room asks for it exclusively, without waiting."""
    path = lock_path(cache_root, key).with_suffix(".use")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    os.set_inheritable(fd, True)
    _in_use.append(fd)


@contextmanager
def cache_lock(cache_root: Path, key: str, uri: str) -> Iterator[None]:
    """Hold the model's lock (flock: other tasks on the host, and other threads here, wait). Every task
    on a GPU host mounts the same host folder, and two may start together (a rollout's new task, the
    offline batch task beside the service): one fetches and verifies, the others wait and then find the
    verified copy, instead of downloading it twice and racing on its marker. The kernel drops the lock
    of a task that dies. Lock files stay (unlinking one while another task waits on it would let two
    tasks hold "the" lock); each holds its folder's key, and its mtime is when a start last used it."""
    path = lock_path(cache_root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{uri}: another task on this host is fetching it; waiting for its copy")
            fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        f.truncate()
        f.write(key)
        f.flush()
        yield


def make_room(cache_root: Path, need: int, keep: str, free: Callable[[], int] | None = None) -> list[str]:
    """Free `need` bytes (and RESERVE_BYTES) on the cache's disk by deleting the least recently used other
    models, so a host that serves revision after revision never fills its disk (the deploy sizes it for two
    copies of the model: tasks/targets/ecs/gpu_hosts.py). Never `keep` (the model being fetched), nothing
    this process fetched, nothing another task is fetching now (its lock is held), nothing a server on this
    host started with (hold_in_use: it may still read weight shards or open adapters). Returns the keys deleted."""
    free = free or (lambda: shutil.disk_usage(cache_root).free)
    deleted: list[str] = []
    root = cache_root.resolve()
    for lock in sorted((cache_root / LOCKS).glob("*.lock"), key=lambda p: p.stat().st_mtime):
        if free() >= need + RESERVE_BYTES:
            break
        try:
            f = open(lock, "r+")
        except OSError:
            continue
        with f:
            key = f.read().strip()
            folder = (cache_root / key).resolve()
            if not key or key == keep or key in _fetched or not folder.is_relative_to(root) or folder == root:
                continue
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue
            use = os.open(lock.with_suffix(".use"), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(use, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a server on this host still reads it (hold_in_use)
            except BlockingIOError:
                continue
            finally:
                os.close(use)  # closing drops the lock: this start holds the model's fetch lock meanwhile
            shutil.rmtree(folder, ignore_errors=True)
            f.seek(0)
            f.truncate()  # no folder to guard any more, until a start fetches it again
            deleted.append(key)
            log(f"cache: deleted {key} (least recently used) to make room for {keep}")
    return deleted


def fetch(uri: str, cache_root: Path, s3=None, phases: bool = False) -> Path:
    """Copy a staged model/adapter to cache_root/<bucket>/<prefix>, verified against its manifest.

    The folder is per model and revision (a staged prefix ends in the commit sha or the adapter's
    digest), so two models, or two revisions of one, on one host never share files. Under the model's
    lock (cache_lock): a file whose size, mtime and inode are what they were when it was verified is
    trusted without hashing it again (re-hashing a large model would cost most of what the cache saves,
    at the disk's read rate); any other file is hashed, and fetched again when it does not match. A file
    damaged in place without a new mtime (bit rot) is not noticed here. Downloads land in temporary
    files renamed into place, and the marker is replaced whole, so a task killed mid-fetch leaves files
    that are either verified or absent. `phases`: log the cold-start phase lines (the served model's fetch)."""
    if phases:
        phase("fetch-begin", uri=uri)
    s3 = s3 or _model_s3()
    bucket, prefix = _split(uri)
    manifest = _manifest(s3, uri)
    key = f"{bucket}/{prefix}"
    target = cache_root / bucket / prefix
    files = manifest["files"]
    total = sum(f["size"] for f in files)
    fetched: list[int] = []  # sizes of the files downloaded (list.append is atomic across the pool's threads)
    with cache_lock(cache_root, key, uri):
        _fetched.add(key)
        hold_in_use(cache_root, key)
        target.mkdir(parents=True, exist_ok=True)
        marker = target / MARKER
        try:
            seen = json.loads(marker.read_text())
        except (OSError, ValueError):
            seen = {}
        verified = seen.get("files", {}) if seen.get("manifest") == manifest else {}
        if verified and all(verified.get(f["path"]) == _stat(target / f["path"]) for f in files):
            log(f"{uri}: cached copy verified earlier and unchanged since, using {target}")
            if phases:
                phase("fetch-end", fetched_bytes=0, reused_bytes=total, files=len(files))
                phase("verify-end", how="marker")
            return target

        def one(entry: dict) -> None:
            dest = target / entry["path"]
            now = _stat(dest)
            if now is not None and (verified.get(entry["path"]) == now
                                    or (now[0] == entry["size"] and _sha256(dest) == entry["sha256"])):
                return
            dest.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
            os.close(fd)
            try:
                s3.download_file(bucket, f"{prefix}/{entry['path']}", tmp)
                fetched.append(entry["size"])
                got = _sha256(Path(tmp))
                if got != entry["sha256"]:
                    raise SystemExit(f"[entrypoint] {entry['path']}: sha256 {got} != manifest {entry['sha256']}")
                os.replace(tmp, dest)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)

        missing = sum(f["size"] for f in files if (_stat(target / f["path"]) or [None])[0] != f["size"])
        make_room(cache_root, missing, keep=key)
        log(f"{uri}: fetching {missing / 1e6:.1f} MB, checking the rest of {len(files)} files "
            f"({sum(f['size'] for f in files) / 1e6:.1f} MB in all)")
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(one, files))
        if phases:  # downloads are hashed as they land: most of the verifying is inside this phase
            phase("fetch-end", fetched_bytes=sum(fetched), reused_bytes=total - sum(fetched), files=len(files))
        fd, tmp = tempfile.mkstemp(dir=target, prefix=".part-")
        with os.fdopen(fd, "w") as f:
            json.dump({"manifest": manifest, "files": {e["path"]: _stat(target / e["path"]) for e in files}}, f)
        os.replace(tmp, marker)
    if phases:
        phase("verify-end", how="sha256")
    return target


def usable_cache_root(path: Path) -> Path:
    """MODEL_CACHE_DIR, or a folder inside the container when this user cannot write it. On ECS it is the
    host's folder, which the stack's hosts make for the image's user (user data); a shared cluster's hosts
    may lack it, and then Docker makes it root's. That costs the warm cache, not the start: said in the log."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=path).close()
        return path
    except OSError as exc:
        fallback = Path(tempfile.gettempdir()) / "vllm-pipeline-models"
        log(f"MODEL_CACHE_DIR {path} is not writable by uid {os.getuid()} ({exc.strerror}): caching in {fallback}, "
            f"inside this container, lost with it. On ECS make the host folder {HOST_CACHE} belong to uid {os.getuid()}.")
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def read_index(uri: str, s3=None) -> dict[str, str] | None:
    """The adapter index, or None when the object does not exist (yet)."""
    s3 = s3 or boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}))
    bucket, key = _split(uri)
    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except s3.exceptions.NoSuchKey:
        return None


def startup_adapters(env: dict[str, str]) -> dict[str, str]:
    index = read_index(env["LORA_INDEX_URI"]) if env.get("LORA_INDEX_URI") else None
    return index if index is not None else json.loads(env.get("LORA_ADAPTERS", "{}"))


def runtime_lora(env: dict[str, str]) -> bool:
    return bool(env.get("LORA_INDEX_URI")) and env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")


def register_index_resolver(index_uri: str, cache_root: Path) -> None:
    """A vLLM LoRA resolver backed by the stack's adapter index in S3 (vLLM's own resolvers read a
    local folder or the Hub). Runs in the API server's process, so it must be registered before
    the server builds its model registry."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class S3IndexResolver(LoRAResolver):
        async def resolve_lora(self, base_model_name: str, lora_name: str):
            try:
                uri = ((await asyncio.to_thread(read_index, index_uri)) or {}).get(lora_name)
                if uri is None:
                    return None
                path = await asyncio.to_thread(fetch, uri, cache_root)
            except (Exception, SystemExit) as exc:  # noqa: BLE001 - a failed fetch is "not found", logged
                log(f"adapter {lora_name!r}: cannot fetch it ({exc})")
                return None
            log(f"adapter {lora_name!r}: fetched {uri} for loading")
            return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))

    LoRAResolverRegistry.register_resolver("s3-adapter-index", S3IndexResolver())


SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


class Preimport:
    """Import vLLM's API server in a thread while the model downloads, so the server starts in this process
    as soon as the model is verified, without paying the import again (~10 s on 2 cores, more on a busy host).

    Why only the import, not vLLM's start: the API server reads the model's config.json and tokenizer at
    once, and the engine-core process it forks opens every weight file as soon as its worker is up; vLLM
    has no hook to wait for a file, nor to load only what was verified. Starting it before the fetch ends
    would load files that are partly written or not yet checked. The import reads no model file, takes no
    signal handler and starts no process, so it runs beside the fetch; it is joined before the server
    starts, so vLLM forks its engine from a process with one thread, as after an exec."""

    def __init__(self, module: str = SERVER_MODULE) -> None:
        self.module = module
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="vllm-preimport", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            __import__(self.module)
        except BaseException as exc:  # noqa: BLE001 - reported by ready(); the start falls back to exec
            self.error = exc

    def ready(self) -> bool:
        self.thread.join()
        if self.error is not None:
            log(f"importing vLLM beside the fetch failed ({self.error!r}): starting it by exec instead")
        return self.error is None


def preimport_wanted(env: dict[str, str]) -> bool:
    """ENTRYPOINT_PREIMPORT (default on) and the model is fetched here: streamed, there is nothing to overlap."""
    return env.get("ENTRYPOINT_PREIMPORT", "1") not in ("0", "false") and env.get("MODEL_LOAD_FORMAT", "auto") == "auto"


def serve_in_process(args: list[str], env: dict[str, str], cache_root: Path) -> None:
    """The vLLM OpenAI server in this process, with the index resolver registered first (runtime LoRA)."""
    if runtime_lora(env):
        register_index_resolver(env["LORA_INDEX_URI"], cache_root)
    from vllm.entrypoints.launchers.api_server.entry import main as serve

    sys.argv = ["vllm-openai-api-server", *args]
    serve()


def check_objects(uri: str, s3=None, phases: bool = False) -> dict[str, str]:
    """MODEL_LOAD_FORMAT=runai_streamer: vLLM reads the model from S3 itself (the Run:ai streamer for the
    safetensors, its pull_files for config and tokenizer) and hashes nothing, so this is what is checked
    before it starts, against the manifest the stage flow wrote after hashing every byte it uploaded:
    - every file the manifest lists is an object under the prefix, with the manifest's size and with the
      sha256 the stage flow recorded on the object (`x-amz-meta-sha256`, set only once it had hashed the
      bytes; tasks/stage/transfer.py) equal to the manifest's;
    - the prefix holds no `*.safetensors` the manifest does not list (vLLM loads every one it lists there).
    Not verified: the bytes vLLM then streams. A HEAD does not read them, and the streamer sends no
    If-Match, so an object overwritten between this check and the load, or overwritten by someone who
    also copied its metadata, is loaded as it is; the default load format ('auto') hashes what it loads.
    Returns {path: ETag} of what was checked (logged, so a later change of an object can be told)."""
    s3 = s3 or _model_s3()
    bucket, prefix = _split(uri)
    manifest = _manifest(s3, uri)
    files = manifest["files"]

    def one(entry: dict) -> tuple[str, str]:
        key = f"{prefix}/{entry['path']}"
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except s3.exceptions.ClientError as exc:
            raise SystemExit(f"[entrypoint] {entry['path']}: not in S3 ({exc.response['Error'].get('Code')}): "
                             f"the staged model is incomplete") from None
        recorded = head.get("Metadata", {}).get("sha256")
        if head["ContentLength"] != entry["size"]:
            raise SystemExit(f"[entrypoint] {entry['path']}: {head['ContentLength']} bytes in S3 != manifest {entry['size']}")
        if recorded != entry["sha256"]:
            raise SystemExit(f"[entrypoint] {entry['path']}: sha256 recorded on the object {recorded} != manifest "
                             f"{entry['sha256']}: it was not written by the stage flow that wrote this manifest")
        return entry["path"], head["ETag"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        etags = dict(pool.map(one, files))
    listed = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        listed |= {o["Key"][len(prefix) + 1:] for o in page.get("Contents", []) if o["Key"].endswith(".safetensors")}
    extra = sorted(listed - set(etags))
    if extra:
        raise SystemExit(f"[entrypoint] {uri}: safetensors not in the manifest, which vLLM would load too: {extra}")
    log(f"{uri}: {len(files)} objects match the manifest by size and recorded sha256 "
        f"({sum(f['size'] for f in files) / 1e6:.1f} MB, streamed by vLLM, not hashed here)")
    if phases:
        phase("verify-end", how="s3-head", files=len(files))
    return etags


STAND_IN_STREAMER = {  # streamer_environment: for an S3 stand-in at AWS_ENDPOINT_URL
    "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
    "RUNAI_STREAMER_CONCURRENCY": "2",
    "RUNAI_STREAMER_CHUNK_BYTESIZE": str(64 << 20),
}


def streamer_environment(env: dict[str, str], region: str | None) -> dict[str, str]:
    """What the Run:ai streamer's C++ S3 client needs beyond the environment, for vLLM's process. It reads
    AWS_ENDPOINT_URL itself (moto, an S3-compatible store) but addresses buckets virtual-hosted by default
    (`bucket.host`), which such endpoints rarely resolve: path-style there. And its CRT HTTP client drops a
    connection whose throughput stays under a minimum (aws-c-http AWS_ERROR_HTTP_CHANNEL_THROUGHPUT_FAILURE),
    which a one-process stand-in (moto on 2 cores) serving its default 8 ranged GETs of 8 MiB at once does
    not meet: it retried forever there. Two streams of 64 MiB ranges load; S3 itself keeps the defaults.
    Its region comes from AWS_REGION (it cannot ask the instance metadata from a container on the GPU hosts:
    hop limit 1), so the one boto3 found is passed on. A value already set wins."""
    out: dict[str, str] = {}
    if "RUNAI_STREAMER_LOG_TO_STDERR" not in env:  # its load time reaches the log (the cold-start timeline)
        out["RUNAI_STREAMER_LOG_TO_STDERR"] = "1"
    if env.get("AWS_ENDPOINT_URL"):
        out.update({k: v for k, v in STAND_IN_STREAMER.items() if k not in env})
    if region and not env.get("AWS_REGION"):
        out["AWS_REGION"] = region
    return out


def vllm_args(env: dict[str, str], cache_root: Path) -> list[str]:
    """VLLM_ARGS with the model (and LoRA adapters) fetched and put in place. With the streamer, the
    objects are checked (check_objects) and the streamer's environment is set in this process, which
    vLLM inherits (exec or subprocess)."""
    args = json.loads(env.get("VLLM_ARGS", "[]"))
    uri = env["MODEL_URI"]
    load_format = env.get("MODEL_LOAD_FORMAT", "auto")
    if load_format == "runai_streamer":
        s3 = boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}, max_pool_connections=16))
        check_objects(uri, s3, phases=True)
        os.environ.update(streamer_environment(env, s3.meta.region_name))
        model = uri.rstrip("/") + "/"
        args += ["--load-format", "runai_streamer"]
    elif load_format == "auto":
        model = str(fetch(uri, cache_root, phases=True))
    else:
        raise SystemExit(f"[entrypoint] MODEL_LOAD_FORMAT must be 'auto' or 'runai_streamer', not {load_format!r}")
    args = [a.replace("{model}", model) for a in args]
    adapters = startup_adapters(env)
    if adapters:
        args += ["--lora-modules", *[f"{name}={fetch(a_uri, cache_root)}" for name, a_uri in adapters.items()]]
    return args


def build_command(env: dict[str, str], cache_root: Path) -> list[str]:
    if runtime_lora(env):
        return [sys.executable, str(Path(__file__).resolve()), "api-server", *vllm_args(env, cache_root)]
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *vllm_args(env, cache_root)]


def build_batch_command(env: dict[str, str], cache_root: Path, input_path: Path, output_path: Path) -> list[str]:
    return [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(input_path), "-o", str(output_path),
            *vllm_args(env, cache_root)]


def run_batch(env: dict[str, str], cache_root: Path, s3=None) -> int:
    """Batch mode: input from S3 -> vLLM's batch runner -> output to S3. Returns the exit code."""
    s3 = s3 or boto3.client("s3", config=Config(retries={"mode": "standard", "max_attempts": 8}))
    for name in ("MODEL_URI", "BATCH_INPUT_URI", "BATCH_OUTPUT_URI"):
        if not env.get(name):
            log(f"batch mode needs {name}")
            return 2
    in_bucket, in_key = _split(env["BATCH_INPUT_URI"])
    out_bucket, out_key = _split(env["BATCH_OUTPUT_URI"])
    work = Path(env.get("BATCH_WORK_DIR") or tempfile.mkdtemp(prefix="vllm-batch-"))
    work.mkdir(parents=True, exist_ok=True)
    input_path, output_path = work / "input.jsonl", work / "output.jsonl"
    output_path.unlink(missing_ok=True)
    try:
        s3.download_file(in_bucket, in_key, str(input_path))
    except Exception as exc:  # noqa: BLE001 - one clear line, whatever boto3 raised
        log(f"cannot download the batch input {env['BATCH_INPUT_URI']}: {exc}")
        return 3
    if not input_path.read_bytes().strip():  # the runner cannot take an empty file: the output is empty too
        output_path.write_bytes(b"")
    else:
        cmd = build_batch_command(env, cache_root, input_path, output_path)
        log("run " + " ".join(cmd))
        rc = subprocess.run(cmd).returncode
        if rc != 0:
            log(f"vLLM's batch runner exited with code {rc}; no output was uploaded")
            return rc if rc > 0 else 128 - rc
        if not output_path.exists():
            log("vLLM's batch runner exited 0 but wrote no output file")
            return 4
    try:
        s3.upload_file(str(output_path), out_bucket, out_key)
    except Exception as exc:  # noqa: BLE001
        log(f"cannot upload the batch output to {env['BATCH_OUTPUT_URI']}: {exc}")
        return 5
    with output_path.open("rb") as f:
        lines = sum(1 for raw in f if raw.strip())
    log(f"batch done: {lines} result lines -> {env['BATCH_OUTPUT_URI']}")
    return 0


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("ENTRYPOINT_MODE", "serve")  # `entrypoint.py batch`
    if mode != "api-server":  # that one is this process again, exec'd by build_command: the same start
        phase("start", pid=os.getpid(), utc_offset=time.localtime().tm_gmtoff, mode=mode)
    cache_root = usable_cache_root(Path(os.environ.get("MODEL_CACHE_DIR", "/models")))
    if mode == "batch":
        sys.exit(run_batch(dict(os.environ), cache_root))
    if mode == "api-server":  # what build_command execs when adapters can change at run time
        serve_in_process(sys.argv[2:], dict(os.environ), cache_root)
        return
    if mode != "serve":
        raise SystemExit(f"[entrypoint] ENTRYPOINT_MODE must be 'serve' or 'batch', not {mode!r}")
    env = dict(os.environ)
    early = Preimport() if preimport_wanted(env) else None
    cmd = build_command(env, cache_root)
    if early is not None and early.ready():
        args = cmd[3:]  # after [python, -m, module] or [python, entrypoint, api-server]
        log("serve in this process (vLLM imported while the model was fetched): " + " ".join(args))
        phase("exec", how="in-process")
        serve_in_process(args, env, cache_root)
        return
    log("exec " + " ".join(cmd))
    phase("exec")
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main()
