"""Images: build contexts hashed by content, registry look-ups, and the local builders (docker, buildah).

A build context is `images/<name>/` plus every file its Dockerfile COPYs or ADDs, taken
from the context root (the project root by default). Its sha256 (sorted paths, modes and
bytes, plus the build args and platform) is the image tag, so "is this tag in the
registry?" answers "was exactly this built and pushed already?". The builder is given a
copy of exactly those files, so nothing unhashed can reach an image.
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
import re
import shutil
import stat
import subprocess
import tempfile
import threading
import zipfile
from collections import deque
from pathlib import Path

import httpx
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, SecretStr

from blocks.image_build import ImageBuildSettings, split_registry
from tasks.build.dockerfile import base_images, copy_sources, lint_dockerfile, parse_dockerfile
from tasks.build.ecr import RegistryLogin, RemoteImage, ecr_client, ecr_login_sync, find_ecr_image_sync
from tasks.core.errors import PipelineInputError, retry_if_transient

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # tasks/build/images.py -> the project root
CONTEXT_LABEL = "io.vllm-pipeline.context-sha256"
TAG_LENGTH = 32  # hex characters of the context hash used as the tag (128 bits)
_EXCLUDED_DIRS = {"__pycache__", ".git", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".venv"}
_EXCLUDED_FILES = ("*.pyc", "*.pyo", ".DS_Store", "*.swp")
MANIFEST_TYPES = ", ".join(
    [
        "application/vnd.docker.distribution.manifest.v2+json",
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
        "application/vnd.oci.image.index.v1+json",
    ]
)


# --------------------------------------------------------------------------- contexts


class BuildContext(BaseModel):
    name: str
    root: str  # the context root the paths are relative to
    dockerfile: str  # relative path, e.g. images/vllm/Dockerfile
    files: list[str]  # relative posix paths, sorted; the Dockerfile among them
    sha256: str
    base_images: list[str]
    total_bytes: int

    @property
    def tag(self) -> str:
        return self.sha256[:TAG_LENGTH]


def _excluded(rel: Path) -> bool:
    if any(part in _EXCLUDED_DIRS or part.endswith(".egg-info") for part in rel.parts[:-1]):
        return True
    return any(fnmatch.fnmatch(rel.name, pat) for pat in _EXCLUDED_FILES)


def _files_under(root: Path, path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if d not in _EXCLUDED_DIRS and not d.endswith(".egg-info"))
        for f in filenames:
            p = Path(dirpath) / f
            if p.is_file() and not _excluded(p.relative_to(root)):
                found.append(p)
    return found


def _inside(root: Path, path: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def resolve_context(root: Path, name: str, build_args: dict[str, str] | None = None, platform: str = "") -> BuildContext:
    """The files a build of images/<name>/Dockerfile reads, and their content hash."""
    root = root.resolve()
    folder = root / "images" / name
    dockerfile = folder / "Dockerfile"
    if not dockerfile.is_file():
        raise PipelineInputError(f"image {name!r}: no Dockerfile at {dockerfile}")
    instructions = parse_dockerfile(dockerfile.read_text())
    files: set[Path] = set(_files_under(root, folder))
    for src in copy_sources(instructions):
        rel = src.lstrip("/")
        if any(c in rel for c in "*?["):
            matches = sorted(root.glob(rel))
            if not matches:
                raise PipelineInputError(f"image {name!r}: COPY source {src!r} matches nothing under {root}")
        else:
            matches = [root / rel]
            if not _inside(root, matches[0]):
                raise PipelineInputError(f"image {name!r}: COPY source {src!r} is outside the build context {root}")
            if not matches[0].exists():
                raise PipelineInputError(f"image {name!r}: COPY source {src!r} is not in the build context {root}")
        for m in matches:
            if not _inside(root, m):
                raise PipelineInputError(f"image {name!r}: COPY source {src!r} is outside the build context {root}")
            files.update(_files_under(root, m))
    rels = sorted({p.relative_to(root).as_posix() for p in files})
    h = hashlib.sha256()
    h.update(b"vllm-pipeline image context v1\0")
    h.update(f"dockerfile={dockerfile.relative_to(root).as_posix()}\0platform={platform}\0".encode())
    for k in sorted(build_args or {}):
        h.update(f"arg:{k}={build_args[k]}\0".encode())
    total = 0
    for rel in rels:
        p = root / rel
        data = p.read_bytes()
        total += len(data)
        executable = bool(p.stat().st_mode & stat.S_IXUSR)
        h.update(f"file:{rel}\0{'x' if executable else '-'}\0{len(data)}\0".encode())
        h.update(data)
    return BuildContext(
        name=name, root=str(root), dockerfile=dockerfile.relative_to(root).as_posix(), files=rels,
        sha256=h.hexdigest(), base_images=base_images(instructions, build_args), total_bytes=total,
    )


def stage_context(ctx: BuildContext, dest: Path) -> Path:
    """Copy exactly the hashed files into `dest` (the directory handed to the builder)."""
    root = Path(ctx.root)
    for rel in ctx.files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / rel, target)
    return dest


def context_zip(ctx: BuildContext) -> bytes:
    """The context as a deterministic zip (sorted, fixed timestamps and modes): CodeBuild's S3 source."""
    buf = io.BytesIO()
    root = Path(ctx.root)
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for rel in ctx.files:
            p = root / rel
            info = zipfile.ZipInfo(rel, date_time=(1980, 1, 1, 0, 0, 0))
            mode = 0o755 if p.stat().st_mode & stat.S_IXUSR else 0o644
            info.external_attr = (stat.S_IFREG | mode) << 16
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, p.read_bytes())
    return buf.getvalue()


# --------------------------------------------------------------------------- registries


class Target(BaseModel):
    """Where one image goes: registry host, repository path in it, tag."""

    host: str
    repository: str  # full path inside the registry (namespace included)
    tag: str
    ecr_repository: str | None = None  # the ECR repository name, when the registry is ECR

    @property
    def ref(self) -> str:
        return f"{self.host}/{self.repository}:{self.tag}"

    def with_digest(self, digest: str) -> str:
        return f"{self.host}/{self.repository}@{digest}"


def explicit_target(settings: ImageBuildSettings, repository: str, tag: str) -> Target:
    host, namespace = split_registry(settings.registry or "")
    return Target(host=host, repository="/".join(p for p in (namespace, repository) if p), tag=tag)


def _challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, rest = header.partition(" ")
    params = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    return scheme.lower(), params


class RegistryV2:
    """Just enough of the Registry v2 HTTP API to ask for a manifest: Basic and Bearer-token auth."""

    def __init__(self, host: str, username: str | None, password: SecretStr | None, insecure: bool = False, timeout: float = 30.0):
        self.host = host
        self.base = f"{'http' if insecure else 'https'}://{host}"
        self.username = username
        self.password = password
        self.http = httpx.Client(verify=not insecure, timeout=timeout, follow_redirects=True)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "RegistryV2":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _basic(self) -> httpx.BasicAuth | None:
        if self.username is None or self.password is None:
            return None
        return httpx.BasicAuth(self.username, self.password.get_secret_value())

    def _refused(self, detail: str) -> PipelineInputError:
        who = f"user {self.username!r}" if self.username else "anonymous access"
        return PipelineInputError(f"registry {self.host} refused the login for {who}: {detail}")

    def _request(self, method: str, url: str, scope: str, **kw) -> httpx.Response:
        resp = self.http.request(method, url, **kw)
        if resp.status_code != 401:
            return resp
        scheme, params = _challenge(resp.headers.get("WWW-Authenticate", ""))
        basic = self._basic()
        if scheme == "basic":
            if basic is None:
                raise self._refused("the registry wants credentials and the settings have none")
            resp = self.http.request(method, url, auth=basic, **kw)
        elif scheme == "bearer" and params.get("realm"):
            query = {k: v for k, v in (("service", params.get("service")), ("scope", params.get("scope") or scope)) if v}
            tok = self.http.get(params["realm"], params=query, auth=basic) if basic else self.http.get(params["realm"], params=query)
            if tok.status_code in (401, 403):
                raise self._refused(f"token endpoint answered {tok.status_code}: {tok.text[:200]}")
            tok.raise_for_status()
            body = tok.json()
            token = body.get("token") or body.get("access_token")
            headers = {**kw.pop("headers", {}), "Authorization": f"Bearer {token}"}
            resp = self.http.request(method, url, headers=headers, **kw)
        else:
            raise self._refused(f"unsupported authentication challenge {resp.headers.get('WWW-Authenticate')!r}")
        if resp.status_code == 401:
            raise self._refused(f"HTTP 401 {resp.text[:200].strip()}")
        return resp

    def check_login(self) -> None:
        resp = self._request("GET", f"{self.base}/v2/", scope="")
        if resp.status_code == 403:
            raise self._refused("HTTP 403")
        if resp.status_code >= 400:
            resp.raise_for_status()

    def manifest(self, repository: str, reference: str) -> tuple[str, dict] | None:
        """(digest, manifest) of repository:reference, or None when the registry has no such tag."""
        url = f"{self.base}/v2/{repository}/manifests/{reference}"
        resp = self._request("GET", url, scope=f"repository:{repository}:pull", headers={"Accept": MANIFEST_TYPES})
        if resp.status_code == 404:
            return None
        if resp.status_code == 403:
            raise self._refused(f"HTTP 403 reading {repository}")
        resp.raise_for_status()
        digest = resp.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(resp.content).hexdigest()
        return digest, resp.json()

    def find(self, repository: str, tag: str) -> RemoteImage | None:
        got = self.manifest(repository, tag)
        if got is None:
            return None
        digest, manifest = got
        size = None
        if "layers" in manifest:
            size = manifest.get("config", {}).get("size", 0) + sum(layer.get("size", 0) for layer in manifest["layers"])
        return RemoteImage(digest=digest, size_bytes=size)


def registry_client(settings: ImageBuildSettings) -> RegistryV2:
    host, _ = split_registry(settings.registry or "")
    return RegistryV2(host, settings.registry_username, settings.registry_password, settings.insecure_registry)


def find_remote_sync(settings: ImageBuildSettings, target: Target) -> RemoteImage | None:
    if settings.is_ecr:
        return find_ecr_image_sync(ecr_client(settings), target.ecr_repository or target.repository, target.tag)
    with registry_client(settings) as reg:
        return reg.find(target.repository, target.tag)


def login_for(settings: ImageBuildSettings, target: Target) -> RegistryLogin | None:
    """Fresh credentials for a push: an ECR token (12 h) or the block's; None for an anonymous registry."""
    if settings.is_ecr:
        return ecr_login_sync(ecr_client(settings))
    if settings.registry_username is None or settings.registry_password is None:
        return None
    return RegistryLogin(host=target.host, username=settings.registry_username, password=settings.registry_password)


# --------------------------------------------------------------------------- running the builders


class PushInterrupted(ConnectionError):
    """A push a retry can finish (a dropped connection, a 5xx): registries resume by blob."""


_TRANSIENT_PUSH = re.compile(
    r"connection reset|broken pipe|i/o timeout|timeout|\bEOF\b|TLS handshake|50[0234]\b|Service Unavailable|too many requests|429",
    re.I,
)
_LOGIN_REFUSED = re.compile(r"unauthorized|invalid username/password|authentication required|incorrect username or password|"
                            r"\b401\b|access denied|denied: ", re.I)
_BASE_MISSING = re.compile(
    r"image not known|manifest unknown|pull access denied|repository does not exist|name unknown|"
    r"failed to resolve source metadata|no such image|not found: manifest|initializing source docker://|"
    r"reading manifest .* not found|error pulling image|unable to find image", re.I,
)
_TAG_EXISTS = re.compile(r"tag invalid.*already exists|ImageTagAlreadyExistsException|cannot be overwritten because the repository is immutable", re.I)


class RunResult(BaseModel):
    returncode: int
    tail: list[str]  # the last lines of stdout+stderr
    output: str  # all of it (bounded by the caller's use)


def run_command(cmd: list[str], *, input_text: str | None = None, env: dict[str, str] | None = None,
                timeout: float | None = None, log_prefix: str | None = None, tail_lines: int = 40) -> RunResult:
    """Run a builder command, streaming its lines to the Prefect log (a prefix names the image), keeping a tail."""
    try:
        logger = get_run_logger()
    except Exception:  # noqa: BLE001 - outside a flow/task run: plain output is enough
        logger = None
    tail: deque[str] = deque(maxlen=tail_lines)
    out: list[str] = []
    proc = subprocess.Popen(
        cmd, stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}, text=True, errors="replace",
    )
    if input_text is not None:
        proc.stdin.write(input_text)
        proc.stdin.close()
    killer = threading.Timer(timeout, proc.kill) if timeout else None  # a silent hang is ended too
    if killer:
        killer.daemon = True
        killer.start()
    for line in proc.stdout:
        line = line.rstrip("\n")
        tail.append(line)
        if len(out) < 20000:
            out.append(line)
        if logger and log_prefix is not None:
            important = line.startswith(("STEP ", "#", "Step ", "Error", "ERROR", "Successfully", "Writing manifest", "Copying"))
            (logger.info if important else logger.debug)("%s%s", log_prefix, line)
    rc = proc.wait()
    if killer:
        killer.cancel()
    return RunResult(returncode=rc, tail=list(tail), output="\n".join(out))


def _quote_tail(lines: list[str], n: int = 15) -> str:
    keep = [ln for ln in lines if ln.strip()][-n:]
    return " | ".join(keep)


def build_failure(name: str, result: RunResult, bases: list[str]) -> PipelineInputError:
    """The clearest one-line reading of a failed build: base image missing, or which step failed and its output."""
    text = result.output
    if _BASE_MISSING.search(text) and (re.search(r"creating build container|FROM|pull|resolve", text, re.I)):
        line = next((ln for ln in reversed(result.tail) if _BASE_MISSING.search(ln)), result.tail[-1] if result.tail else "")
        return PipelineInputError(
            f"image {name!r}: base image not found ({', '.join(bases) or 'unknown'}): {line.strip()} "
            "(check the FROM tag/digest, the registry login, or pull it first)"
        )
    lines = result.output.splitlines() or result.tail
    steps = [i for i, ln in enumerate(lines) if re.match(r"^(STEP \d+/\d+:|Step \d+/\d+ :|#\d+ \[)", ln)]
    failing = lines[steps[-1]].strip() if steps else "(no step line)"
    m = re.search(r'building at STEP "[^"]*": (.*)|did not complete successfully: (.*)|returned a non-zero code: (\d+)', text)
    why = next((g for g in m.groups() if g), "") if m else ""
    why = why.strip() or f"exit code {result.returncode}"
    # The failing step's own output (buildah: the lines after its STEP header), duplicates dropped.
    after = lines[steps[-1] + 1:] if steps and failing.startswith("STEP") else result.tail
    seen: list[str] = []
    for ln in after:
        if ln.strip() and ln not in seen and not re.match(r"^(Error: building at STEP|subprocess exited with status)", ln):
            seen.append(ln)
    return PipelineInputError(f"image {name!r}: build step failed at {failing} ({why}); output tail: {_quote_tail(seen)}")


class Builder:
    """A local image builder. Subclasses: buildah, docker."""

    name = "?"

    def __init__(self, settings: ImageBuildSettings):
        self.settings = settings

    def unavailable(self) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError

    def has_local(self, ref: str) -> bool:  # pragma: no cover - overridden
        raise NotImplementedError

    def build(self, ctx: BuildContext, ref: str, workdir: Path) -> RunResult:  # pragma: no cover - overridden
        raise NotImplementedError

    def push(self, ref: str, login: RegistryLogin | None, workdir: Path) -> str | None:  # pragma: no cover - overridden
        raise NotImplementedError


class Buildah(Builder):
    name = "buildah"

    def base(self) -> list[str]:
        cmd = ["buildah"]
        if self.settings.storage_root:
            root = Path(self.settings.storage_root)
            cmd += ["--root", str(root / "storage"), "--runroot", str(root / "run")]
        return cmd + ["--storage-driver", self.settings.buildah_storage_driver]

    def _tls(self) -> list[str]:
        return ["--tls-verify=false"] if self.settings.insecure_registry else []

    def unavailable(self) -> str | None:
        if shutil.which("buildah") is None:
            return "buildah is not installed (Debian/Ubuntu: apt-get install buildah)"
        r = run_command([*self.base(), "images", "--quiet"], timeout=60)
        if r.returncode != 0:
            return f"buildah cannot use its storage: {_quote_tail(r.tail, 3)}"
        return None

    def has_local(self, ref: str) -> bool:
        return run_command([*self.base(), "inspect", "--type", "image", ref], timeout=60).returncode == 0

    def build(self, ctx: BuildContext, ref: str, workdir: Path) -> RunResult:
        s = self.settings
        cmd = [*self.base(), "bud", "--isolation", "chroot", "--format", "docker", f"--pull={s.pull_policy}",
               "--platform", s.platform, "-f", str(workdir / ctx.dockerfile), "-t", ref,
               "--label", f"{CONTEXT_LABEL}={ctx.sha256}"]
        for k in sorted(s.build_args):
            cmd += ["--build-arg", f"{k}={s.build_args[k]}"]
        return run_command([*cmd, str(workdir)], log_prefix=f"[{ctx.name}] ")

    def push(self, ref: str, login: RegistryLogin | None, workdir: Path) -> str | None:
        authfile = workdir / "auth.json"
        host = ref.split("/", 1)[0]
        if login is not None:
            r = run_command([*self.base(), "login", "--authfile", str(authfile), "--username", login.username,
                             "--password-stdin", *self._tls(), host], input_text=login.password.get_secret_value(), timeout=120)
            if r.returncode != 0:
                _raise_push_problem(r, host, login)
        digest_file = workdir / "digest"
        cmd = [*self.base(), "push", "--digestfile", str(digest_file), *self._tls()]
        if login is not None:
            cmd += ["--authfile", str(authfile)]
        r = run_command([*cmd, ref, f"docker://{ref}"], log_prefix=f"[push {ref}] ")
        if r.returncode != 0:
            if _TAG_EXISTS.search(r.output):
                return None
            _raise_push_problem(r, host, login)
        return digest_file.read_text().strip() if digest_file.exists() else None


class Docker(Builder):
    name = "docker"

    def unavailable(self) -> str | None:
        if shutil.which("docker") is None:
            return "the docker CLI is not installed"
        r = run_command(["docker", "info", "--format", "{{.ServerVersion}}"], timeout=30)
        if r.returncode != 0:
            return f"the docker CLI is installed but no Docker engine answers ({_quote_tail(r.tail, 2)})"
        return None

    def has_local(self, ref: str) -> bool:
        return run_command(["docker", "image", "inspect", ref], timeout=60).returncode == 0

    def build(self, ctx: BuildContext, ref: str, workdir: Path) -> RunResult:
        s = self.settings
        cmd = ["docker", "build", "--platform", s.platform, "-f", str(workdir / ctx.dockerfile), "-t", ref,
               "--label", f"{CONTEXT_LABEL}={ctx.sha256}"]
        if s.pull_policy == "always":
            cmd.append("--pull")
        for k in sorted(s.build_args):
            cmd += ["--build-arg", f"{k}={s.build_args[k]}"]
        return run_command([*cmd, str(workdir)], env={"DOCKER_BUILDKIT": "1", "BUILDKIT_PROGRESS": "plain"},
                           log_prefix=f"[{ctx.name}] ")

    def push(self, ref: str, login: RegistryLogin | None, workdir: Path) -> str | None:
        host = ref.split("/", 1)[0]
        env = {"DOCKER_CONFIG": str(workdir / "docker-config")}  # credentials never land in ~/.docker
        if login is not None:
            r = run_command(["docker", "login", "--username", login.username, "--password-stdin", host],
                            input_text=login.password.get_secret_value(), env=env, timeout=120)
            if r.returncode != 0:
                _raise_push_problem(r, host, login)
        r = run_command(["docker", "push", ref], env=env, log_prefix=f"[push {ref}] ")
        if r.returncode != 0:
            if _TAG_EXISTS.search(r.output):
                return None
            _raise_push_problem(r, host, login)
        m = re.search(r"digest: (sha256:[0-9a-f]{64})", r.output)
        return m.group(1) if m else None


def _raise_push_problem(r: RunResult, host: str, login: RegistryLogin | None) -> None:
    tail = _quote_tail(r.tail, 4)
    if _LOGIN_REFUSED.search(r.output) and not _TRANSIENT_PUSH.search(tail):
        who = f"user {login.username!r}" if login else "anonymous access"
        raise PipelineInputError(f"registry {host} refused the login for {who}: {tail}")
    if _TRANSIENT_PUSH.search(r.output):
        raise PushInterrupted(f"push to {host} interrupted: {tail}")
    raise RuntimeError(f"push to {host} failed (exit {r.returncode}): {tail}")


BUILDERS: dict[str, type[Builder]] = {"docker": Docker, "buildah": Buildah}


def pick_builder(settings: ImageBuildSettings) -> Builder:
    """The configured builder, or for 'auto' the first that works (Docker engine, then buildah); a clear error if none."""
    names = ["docker", "buildah"] if settings.builder == "auto" else [settings.builder]
    reasons = {}
    for name in names:
        builder = BUILDERS[name](settings)
        why = builder.unavailable()
        if why is None:
            return builder
        reasons[name] = why
    detail = "; ".join(f"{k}: {v}" for k, v in reasons.items())
    raise PipelineInputError(
        f"no image builder available ({detail}): install buildah, start a Docker engine, or set ImageBuildSettings.builder='codebuild'"
    )


# --------------------------------------------------------------------------- tasks


def context_root(settings: ImageBuildSettings) -> Path:
    """The folder holding images/<name>/: the block's context_dir, else this project's root (in the runtime image too)."""
    return Path(settings.context_dir) if settings.context_dir else PROJECT_ROOT


@task(cache_policy=NO_CACHE)
def prepare_context(settings: ImageBuildSettings, name: str, require_healthcheck: bool = False) -> BuildContext:
    """Resolve and hash images/<name>'s context; log what the Dockerfile lint finds."""
    root = context_root(settings)
    ctx = resolve_context(root, name, settings.build_args, settings.platform)
    for problem in lint_dockerfile((root / ctx.dockerfile).read_text(), require_healthcheck=require_healthcheck):
        get_run_logger().warning("%s: %s", ctx.dockerfile, problem)
    get_run_logger().info("image %s: %d files, %.1f kB, context sha256 %s -> tag %s",
                          name, len(ctx.files), ctx.total_bytes / 1e3, ctx.sha256, ctx.tag)
    return ctx


@task(retries=3, retry_delay_seconds=[2, 10, 30], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def find_remote_image(settings: ImageBuildSettings, target: Target) -> RemoteImage | None:
    """Does the registry already hold target's tag? (ECR: DescribeImages; others: the Registry v2 API.)"""
    return find_remote_sync(settings, target)


@task(cache_policy=NO_CACHE)
def build_image(settings: ImageBuildSettings, builder_name: str, ctx: BuildContext, ref: str) -> bool:
    """Build ctx into the local image `ref` with a local builder; False when that image is already there."""
    builder = BUILDERS[builder_name](settings)
    if builder.has_local(ref):
        get_run_logger().info("image %s: %s already built locally (same context hash): not rebuilt", ctx.name, ref)
        return False
    with tempfile.TemporaryDirectory(prefix=f"ctx-{ctx.name}-") as tmp:
        workdir = stage_context(ctx, Path(tmp))
        result = builder.build(ctx, ref, workdir)
    if result.returncode != 0:
        raise build_failure(ctx.name, result, ctx.base_images)
    return True


@task(retries=3, retry_delay_seconds=[5, 20, 60], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)
def push_image(settings: ImageBuildSettings, builder_name: str, target: Target) -> str | None:
    """Log in (ECR token fetched now, or the block's credentials) and push; the pushed manifest digest.
    None when the tag appeared in the registry meanwhile (immutable tags: another run pushed it)."""
    builder = BUILDERS[builder_name](settings)
    login = login_for(settings, target)
    with tempfile.TemporaryDirectory(prefix="push-") as tmp:
        os.chmod(tmp, 0o700)
        return builder.push(target.ref, login, Path(tmp))


_IMAGE_REF = re.compile(
    r"^(?:[a-z0-9](?:[a-z0-9.-]*[a-z0-9])?(?::\d+)?/)?[a-z0-9]+(?:[._/-][a-z0-9]+)*(?::[\w][\w.-]{0,127})?(?:@sha256:[0-9a-f]{64})?$"
)


def check_image_uri(uri: str | None) -> str:
    """An image reference ECS can pull: `registry/repo[:tag][@sha256:digest]`. Checked before anything is created."""
    if not uri or not isinstance(uri, str) or len(uri) > 1024 or not _IMAGE_REF.match(uri):
        raise PipelineInputError(f"image_uri {uri!r} is not an image reference (registry/repository:tag or @sha256:digest); "
                                 "run the build-images flow or pass one")
    return uri
