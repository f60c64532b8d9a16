"""Images: Dockerfile checks, context hashing, ECR on moto, and real buildah builds pushed to a local registry.

The registry is Debian's `docker-registry` (a real Registry v2) with htpasswd auth standing in
for ECR's token login; base images cannot be pulled here, so the tests make one with
`buildah from scratch` (a shell and its libc copied in, so RUN steps work).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import tarfile
import time
import zipfile
from io import BytesIO
from pathlib import Path

import httpx
import pytest
from prefect import flow
from prefect.artifacts import Artifact
from prefect.variables import Variable
from pydantic import SecretStr, ValidationError

from blocks.image_build import ImageBuildSettings
from tasks.core.errors import PipelineInputError

REPO = Path(__file__).resolve().parent.parent
BASE_IMAGE = "localhost/test-base:1"


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        pytest.fail(f"{binary} is not installed: run scripts/setup.sh (it installs buildah, docker-registry, apache2-utils)")
    return path


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def buildah_root(tmp_path_factory) -> Path:
    """A private container storage for the tests (buildah --root/--runroot), removed at the end."""
    _need("buildah")
    root = tmp_path_factory.mktemp("containers")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _buildah(root: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    cmd = ["buildah", "--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "vfs", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True, **kw)


@pytest.fixture(scope="session")
def base_image(buildah_root) -> str:
    """localhost/test-base:1, made from scratch: /bin/sh (dash) with its loader and libc, and a marker file."""
    ctr = _buildah(buildah_root, "from", "scratch").stdout.strip()
    libs = re.findall(r"(/\S+)\s+\(0x", subprocess.run(["ldd", "/bin/dash"], capture_output=True, text=True).stdout)
    for path in ["/bin/dash", *libs]:
        real = str(Path(path).resolve())
        dest = "/bin/sh" if path == "/bin/dash" else path
        _buildah(buildah_root, "copy", ctr, real, dest)
    _buildah(buildah_root, "config", "--env", "PATH=/bin", ctr)
    _buildah(buildah_root, "commit", ctr, BASE_IMAGE)
    _buildah(buildah_root, "rm", ctr)
    return BASE_IMAGE


class LocalRegistry:
    def __init__(self, host: str, username: str, password: str, data: Path):
        self.host, self.username, self.password, self.data = host, username, password, data

    def get(self, path: str, **kw) -> httpx.Response:
        return httpx.get(f"http://{self.host}{path}", auth=(self.username, self.password), timeout=30, **kw)


@pytest.fixture(scope="session")
def registry(tmp_path_factory) -> LocalRegistry:
    """Debian's docker-registry on 127.0.0.1:<free port>, htpasswd (bcrypt) auth, storage in a temp dir."""
    from embedded.net import free_port, wait_for_port

    binary = shutil.which("docker-registry") or ("/usr/bin/docker-registry" if Path("/usr/bin/docker-registry").exists() else None)
    if binary is None:
        _need("docker-registry")
    _need("htpasswd")
    d = tmp_path_factory.mktemp("registry")
    user, password = "pipeline", "s3cret-" + hashlib.sha256(str(d).encode()).hexdigest()[:8]
    htpasswd = subprocess.run(["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True).stdout
    (d / "htpasswd").write_text(htpasswd)
    port = free_port()
    (d / "config.yml").write_text(
        json.dumps({  # YAML is a superset of JSON
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {"filesystem": {"rootdirectory": str(d / "data")}, "delete": {"enabled": True}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": "test-only-secret"},
            "auth": {"htpasswd": {"realm": "vllm-pipeline-test", "path": str(d / "htpasswd")}},
        })
    )
    log = (d / "registry.log").open("w")
    proc = subprocess.Popen([binary, "serve", str(d / "config.yml")], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, timeout=30, proc=proc)
        yield LocalRegistry(f"127.0.0.1:{port}", user, password, d)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _context(tmp: Path, dockerfile: str, files: dict[str, str] | None = None, name: str = "hello") -> Path:
    folder = tmp / "images" / name
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "Dockerfile").write_text(dockerfile)
    for rel, text in (files or {}).items():
        p = tmp / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return tmp


HELLO = f"""\
FROM {BASE_IMAGE}
COPY images/hello/app.txt /app/app.txt
COPY shared/ /app/shared/
RUN echo built > /app/built.txt
USER 1000
ENTRYPOINT ["/bin/sh", "-c", "cat /app/app.txt"]
"""


def _settings(registry: LocalRegistry, buildah_root: Path, context: Path, **kw) -> ImageBuildSettings:
    return ImageBuildSettings(**{
        "builder": "buildah", "registry": registry.host, "registry_username": registry.username,
        "registry_password": SecretStr(registry.password), "insecure_registry": True,
        "repositories": {"hello": "test/hello"}, "context_dir": str(context), "storage_root": str(buildah_root),
        "pull_policy": "never", **kw,
    })


@pytest.fixture()
def builder_calls(monkeypatch) -> list[list[str]]:
    """Every builder command the tasks run (buildah/docker argv), recorded and then run for real."""
    import tasks.build.images as images

    calls: list[list[str]] = []
    real = images.run_command

    def recording(cmd, **kw):
        calls.append(list(cmd))
        return real(cmd, **kw)

    monkeypatch.setattr(images, "run_command", recording)
    return calls


def _subcommands(calls: list[list[str]]) -> list[str]:
    """'bud', 'push', 'login', 'inspect'... of each recorded buildah call."""
    out = []
    for c in calls:
        rest = c[1:]
        while rest and rest[0].startswith("--"):
            rest = rest[2:] if rest[0] in ("--root", "--runroot", "--storage-driver") else rest[1:]
        out.append(rest[0] if rest else "")
    return out


# --------------------------------------------------------------------------- Dockerfiles


@pytest.mark.parametrize("name", ["vllm", "runtime", "gateway"])
def test_project_dockerfiles_pass_the_production_checks(name):
    from flows.build import NEEDS_HEALTHCHECK
    from tasks.build.dockerfile import base_images, lint_dockerfile, parse_dockerfile, stages

    text = (REPO / "images" / name / "Dockerfile").read_text()
    assert lint_dockerfile(text, require_healthcheck=(name in NEEDS_HEALTHCHECK)) == []
    instructions = parse_dockerfile(text)
    # Spelled out as well, so a weakened lint cannot hide a regression:
    bases = base_images(instructions)
    assert bases and all(":" in b.rsplit("/", 1)[-1] and not b.endswith(":latest") for b in bases), bases
    final = stages(instructions)[-1].instructions
    entry = [i for i in final if i.cmd == "ENTRYPOINT"][-1]
    assert entry.json_args, "ENTRYPOINT must be the exec (JSON) form"
    user = [i for i in final if i.cmd == "USER"][-1].args.split(":")[0]
    assert user not in ("root", "0")
    if name == "vllm":
        assert bases == ["vllm/vllm-openai:v0.32.0"]
        hc = [i for i in final if i.cmd == "HEALTHCHECK"][-1].args
        assert "/health" in hc
        start = int(re.search(r"--start-period=(\d+)s", hc).group(1))
        assert start >= 600, "the start period must cover a large model's download and load"
        assert entry.json_args[-1].endswith("entrypoint.py")
    if name == "gateway":  # ECS/the ALB check /health; the port is the gateway's default, on every interface
        assert bases == ["python:3.11.14-slim-bookworm"] and name not in NEEDS_HEALTHCHECK
        assert not [i for i in final if i.cmd == "HEALTHCHECK"]
        assert entry.json_args == ["python", "-m", "gateway"]
        assert [i.args for i in final if i.cmd == "EXPOSE"] == ["8001"]
        env = " ".join(i.args for i in final if i.cmd == "ENV")
        assert "GATEWAY_HOST=0.0.0.0" in env and "GATEWAY_PORT=8001" in env
    for ins in instructions:
        if ins.cmd in ("ENV", "ARG"):
            assert not re.search(r"(TOKEN|SECRET|PASSWORD|API_KEY)\s*=\s*\S", ins.args, re.I), ins


@pytest.mark.parametrize(
    "dockerfile, problem",
    [
        ("FROM python\nUSER 1\nENTRYPOINT [\"x\"]\n", "not pinned"),
        ("FROM python:latest\nUSER 1\nENTRYPOINT [\"x\"]\n", "not pinned"),
        ("ARG BASE\nFROM $BASE\nUSER 1\nENTRYPOINT [\"x\"]\n", "build arg"),
        ("FROM python:3.11-slim\nENV HF_TOKEN=hf_abc123\nUSER 1\nENTRYPOINT [\"x\"]\n", "HF_TOKEN"),
        ("FROM python:3.11-slim\nARG API_KEY=sk-1\nUSER 1\nENTRYPOINT [\"x\"]\n", "API_KEY"),
        ("FROM python:3.11-slim\nUSER 1\nENTRYPOINT python -m server\n", "shell form"),
        ("FROM python:3.11-slim\nENTRYPOINT [\"x\"]\n", "runs as root"),
        ("FROM python:3.11-slim\nUSER root\nENTRYPOINT [\"x\"]\n", "runs as root"),
        ("FROM python:3.11-slim\nUSER 1\nENTRYPOINT [\"x\"]\n", "HEALTHCHECK"),
        ("FROM python:3.11-slim\nUSER 1\nHEALTHCHECK NONE\nENTRYPOINT [\"x\"]\n", "HEALTHCHECK"),
    ],
)
def test_dockerfile_lint_catches_what_bites(dockerfile, problem):
    from tasks.build.dockerfile import lint_dockerfile

    problems = lint_dockerfile(dockerfile, require_healthcheck=True)
    assert any(problem in p for p in problems), problems


def test_dockerfile_parser_handles_continuations_stages_and_copy_flags():
    from tasks.build.dockerfile import base_images, copy_sources, lint_dockerfile, parse_dockerfile

    text = """\
# syntax=docker/dockerfile:1
ARG PY=python:3.11.14-slim
FROM ${PY} AS deps
RUN pip install \\
    # a comment inside a continuation
    httpx
FROM deps
COPY --from=deps /usr/lib /usr/lib
COPY --chown=1000:1000 a.txt "b c.txt" /dst/
ADD https://example.invalid/x.tgz /x.tgz
ENV TOKEN_FILE=""
USER app
ENTRYPOINT ["python"]
"""
    ins = parse_dockerfile(text)
    assert [i.cmd for i in ins] == ["ARG", "FROM", "RUN", "FROM", "COPY", "COPY", "ADD", "ENV", "USER", "ENTRYPOINT"]
    assert ins[2].args == "pip install httpx"
    assert base_images(ins) == ["python:3.11.14-slim"]  # `FROM deps` is a stage, not an image
    assert copy_sources(ins) == ["a.txt", "b c.txt"]
    assert lint_dockerfile(text) == []  # an empty secret-named ENV holds no secret


# --------------------------------------------------------------------------- contexts


def test_context_hash_covers_exactly_what_the_build_reads(tmp_path):
    from tasks.build.images import context_zip, resolve_context

    root = _context(tmp_path, HELLO, {"images/hello/app.txt": "v1", "shared/lib.txt": "lib", "unrelated.txt": "x",
                                      "shared/__pycache__/m.cpython-311.pyc": "junk"})
    a = resolve_context(root, "hello")
    assert a.files == ["images/hello/Dockerfile", "images/hello/app.txt", "shared/lib.txt"]
    assert a.tag == a.sha256[:32] and re.fullmatch(r"[0-9a-f]{32}", a.tag)
    assert resolve_context(root, "hello").sha256 == a.sha256  # deterministic
    (root / "unrelated.txt").write_text("changed")
    assert resolve_context(root, "hello").sha256 == a.sha256  # not COPY'd: no rebuild
    (root / "shared" / "lib.txt").write_text("lib2")
    b = resolve_context(root, "hello")
    assert b.sha256 != a.sha256  # a COPY'd file changed
    assert resolve_context(root, "hello", build_args={"X": "1"}).sha256 != b.sha256
    assert resolve_context(root, "hello", platform="linux/arm64").sha256 != b.sha256
    (root / "images" / "hello" / "app.txt").chmod(0o755)
    assert resolve_context(root, "hello").sha256 != b.sha256  # the mode reaches the image too
    assert context_zip(b) == context_zip(b)
    assert sorted(zipfile.ZipFile(BytesIO(context_zip(b))).namelist()) == b.files

    _context(tmp_path, "FROM scratch\nCOPY missing.txt /\n", name="broken")
    with pytest.raises(PipelineInputError, match="missing.txt"):
        resolve_context(root, "broken")
    _context(tmp_path, "FROM scratch\nCOPY ../../etc/passwd /\n", name="escape")
    with pytest.raises(PipelineInputError, match="outside the build context"):
        resolve_context(root, "escape")


def test_project_contexts_resolve():
    from tasks.build.images import resolve_context

    vllm = resolve_context(REPO, "vllm")
    assert "images/vllm/entrypoint.py" in vllm.files and "images/vllm/Dockerfile" in vllm.files
    runtime = resolve_context(REPO, "runtime")
    assert {"pyproject.toml", "constraints.txt", "flows/build.py", "tasks/build/images.py", "blocks/image_build.py"} <= set(runtime.files)
    assert not [f for f in runtime.files if "__pycache__" in f or f.endswith(".pyc") or ".venv" in f]
    assert vllm.sha256 != runtime.sha256
    gateway = resolve_context(REPO, "gateway")
    # The gateway package and its pins, nothing of the pipeline.
    assert {"images/gateway/Dockerfile", "images/gateway/requirements.txt", "gateway/__main__.py", "gateway/loop.py"} <= set(gateway.files)
    assert {f.split("/", 1)[0] for f in gateway.files} == {"images", "gateway"}
    assert not [f for f in gateway.files if f.startswith("images/") and not f.startswith("images/gateway/")]
    assert gateway.sha256 not in (vllm.sha256, runtime.sha256)


def _pins(path: Path) -> dict[str, str]:
    """{normalised name: version} of a requirements/constraints file of `name==version` lines."""
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version and re.fullmatch(r"[A-Za-z0-9._-]+", name), f"{path.name}: {line!r} is not name==version"
            out[re.sub(r"[-_.]+", "-", name).lower()] = version
    return out


def test_gateway_requirements_are_the_project_pins_and_closed():
    """images/gateway/requirements.txt (installed with --no-deps): the gateway's libraries listed by name, each at the
    version constraints.txt pins, and every requirement of every listed package listed too (pip check would fail the
    build otherwise); no Prefect, nothing the pipeline alone needs."""
    from importlib.metadata import distribution

    from packaging.requirements import Requirement

    pins = _pins(REPO / "images" / "gateway" / "requirements.txt")
    direct = {"fastapi", "uvicorn", "httpx", "jsonschema", "pydantic", "prometheus-client", "pyyaml", "boto3", "tzdata"}
    assert direct <= set(pins), sorted(direct - set(pins))
    constraints = _pins(REPO / "constraints.txt")
    assert {n: v for n, v in pins.items() if constraints.get(n) != v} == {}, "pins differ from constraints.txt"
    missing = {}
    for name in pins:
        for raw in distribution(name).requires or []:
            req = Requirement(raw)
            if req.marker is None or req.marker.evaluate({"extra": "", "python_version": "3.11"}):
                norm = re.sub(r"[-_.]+", "-", req.name).lower()
                if norm not in pins:
                    missing.setdefault(name, []).append(raw)
                else:
                    assert req.specifier.contains(pins[norm], prereleases=True), (name, raw, pins[norm])
    assert missing == {}, missing
    assert not {"prefect", "prefect-aws", "huggingface-hub", "moto"} & set(pins)


def test_build_flow_builds_the_gateway_under_its_name_like_vllm(monkeypatch):
    """The default repositories include "gateway": the build flow hashes, builds, pushes and records it as it does
    the vLLM image (builder steps recorded here; the real buildah build is tests/test_runtime_image.py's)."""
    from prefect import flow as prefect_flow

    import flows.build as build
    from tasks.build.ecr import RemoteImage
    from tasks.build.images import resolve_context

    assert ImageBuildSettings().repositories["gateway"] == "vllm-pipeline/gateway"
    settings = ImageBuildSettings(builder="buildah", registry="registry.test:5000", registry_username="u",
                                  registry_password=SecretStr("p"))
    pushed: dict[str, str] = {}
    built: list[tuple[str, str]] = []

    class FakeBuilder:
        name = "buildah"

    def digest(ref: str) -> str:
        return "sha256:" + hashlib.sha256(ref.encode()).hexdigest()

    monkeypatch.setattr(build, "pick_builder", lambda s: FakeBuilder())
    monkeypatch.setattr(build, "find_remote_image", lambda s, t: RemoteImage(digest=pushed[t.ref], size_bytes=1) if t.ref in pushed else None)
    monkeypatch.setattr(build, "build_image", lambda s, b, ctx, ref: built.append((ctx.name, ref)) or True)
    monkeypatch.setattr(build, "push_image", lambda s, b, t: pushed.setdefault(t.ref, digest(t.ref)))
    report = prefect_flow(name="t-build-gateway")(lambda: build.build_all(settings))()
    assert [i.name for i in report.images] == ["vllm", "runtime", "gateway"]
    gw = report.images[-1]
    tag = resolve_context(REPO, "gateway", settings.build_args, settings.platform).tag
    assert built[-1] == ("gateway", f"registry.test:5000/vllm-pipeline/gateway:{tag}")
    assert gw.built and gw.tag == tag and gw.image_ref == f"registry.test:5000/vllm-pipeline/gateway@{digest(built[-1][1])}"
    assert gw.variable == "vllm_pipeline_image_gateway" and Variable.get(gw.variable) == gw.image_ref


# --------------------------------------------------------------------------- the block


def test_image_build_settings_validation():
    assert ImageBuildSettings().builder == "auto" and ImageBuildSettings().is_ecr
    ok = ImageBuildSettings(registry="http://127.0.0.1:5000/", registry_username="u", registry_password="p")
    assert ok.registry == "127.0.0.1:5000" and not ok.is_ecr
    assert ImageBuildSettings(registry="ghcr.io/acme-corp").registry == "ghcr.io/acme-corp"
    cases = [
        ({"registry": "not a host"}, "registry"),
        ({"registry_username": "u", "registry_password": "p"}, "get_authorization_token"),
        ({"registry": "r.example.com", "registry_username": "u"}, "go together"),
        ({"builder": "codebuild"}, "codebuild_bucket"),
        ({"builder": "codebuild", "codebuild_bucket": "b-ok", "registry": "r.example.com"}, "ECR only"),
        ({"builder": "podman"}, "builder"),
        ({"build_args": {"HF_TOKEN": "x"}}, "look like secrets"),
        ({"repositories": {"vllm": "Bad/Name"}}, "repository names"),
        ({"repositories": {}}, "at least one"),
        ({"keep_last": 0}, "keep_last"),
        ({"platform": "amd64"}, "platform"),
        ({"codebuild_service_role_arn": "role/x"}, "role"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(ValidationError) as exc:
            ImageBuildSettings(**kwargs)
        assert fragment in str(exc.value), (kwargs, str(exc.value))


def test_no_builder_available_is_a_clear_error(monkeypatch):
    import tasks.build.images as images

    monkeypatch.setattr(images.shutil, "which", lambda name: None)
    with pytest.raises(PipelineInputError, match=r"no image builder available \(docker: .*not installed; buildah: .*not installed.*codebuild"):
        images.pick_builder(ImageBuildSettings())


def test_docker_builder_without_an_engine_says_so():
    import tasks.build.images as images

    if shutil.which("docker") is None or subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0:
        pytest.skip("needs a docker CLI without a reachable engine (the case on these machines)")
    with pytest.raises(PipelineInputError, match="no Docker engine answers"):
        images.pick_builder(ImageBuildSettings(builder="docker"))


# --------------------------------------------------------------------------- buildah + a local registry


def _run_flow(settings: ImageBuildSettings, block_name: str, **params):
    from flows.build import build_images

    settings.save(block_name, overwrite=True)
    return build_images(image_build_block=block_name, **params)


@pytest.mark.integration
def test_buildah_builds_pushes_reads_back_then_skips(tmp_path, registry, buildah_root, base_image, builder_calls):
    from flows.build import image_variable
    from tasks.build.images import CONTEXT_LABEL, resolve_context

    context = _context(tmp_path, HELLO, {"images/hello/app.txt": "hello", "shared/lib.txt": "lib",
                                         "shared/__pycache__/lib.cpython-311.pyc": "junk", "unrelated.txt": "not copied"})
    settings = _settings(registry, buildah_root, context)
    ctx = resolve_context(context, "hello", platform=settings.platform)

    report = _run_flow(settings, "test-build-hello")
    [img] = report.images
    assert img.built and img.builder == "buildah"
    assert img.tag == ctx.tag and img.uri == f"{registry.host}/test/hello:{ctx.tag}"
    assert img.image_ref == f"{registry.host}/test/hello@{img.digest}" and img.digest.startswith("sha256:")
    assert "bud" in _subcommands(builder_calls) and "push" in _subcommands(builder_calls)

    # The manifest, read back over the Registry v2 API with basic auth, is the recorded one.
    assert registry.get("/v2/").status_code == 200
    assert httpx.get(f"http://{registry.host}/v2/", timeout=10).status_code == 401  # auth is really on
    resp = registry.get(f"/v2/test/hello/manifests/{ctx.tag}",
                        headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"})
    assert resp.status_code == 200
    assert resp.headers["Docker-Content-Digest"] == img.digest
    assert "sha256:" + hashlib.sha256(resp.content).hexdigest() == img.digest
    manifest = resp.json()
    assert manifest["mediaType"] == "application/vnd.docker.distribution.manifest.v2+json"  # docker format keeps HEALTHCHECK
    assert img.size_bytes == manifest["config"]["size"] + sum(layer["size"] for layer in manifest["layers"])
    config = registry.get(f"/v2/test/hello/blobs/{manifest['config']['digest']}").json()["config"]
    assert config["Labels"][CONTEXT_LABEL] == ctx.sha256
    assert config["User"] == "1000" and config["Entrypoint"] == ["/bin/sh", "-c", "cat /app/app.txt"]
    assert Variable.get(image_variable("hello")) == img.image_ref
    # The layers hold exactly the hashed files: no __pycache__ from the COPY'd folder.
    members = set()
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=BytesIO(registry.get(f"/v2/test/hello/blobs/{layer['digest']}").content)) as tar:
            members |= {m.name.lstrip("./") for m in tar.getmembers()}
    assert {"app/app.txt", "app/shared/lib.txt", "app/built.txt"} <= members
    assert not [m for m in members if "__pycache__" in m or "unrelated" in m]

    # Second run: the tag is in the registry, so no build and no push (no builder command at all).
    builder_calls.clear()
    again = _run_flow(settings, "test-build-hello")
    [img2] = again.images
    assert not img2.built and img2.builder is None
    assert img2.digest == img.digest and img2.image_ref == img.image_ref
    assert builder_calls == []
    summary = Artifact.get("build-images").data
    assert img.image_ref in summary and "| skipped |" in summary and "0 built and pushed, 1 skipped" in summary

    # A changed COPY'd file is a new tag: built and pushed again, the old tag untouched.
    (context / "shared" / "lib.txt").write_text("lib v2")
    third = _run_flow(settings, "test-build-hello").images[0]
    assert third.built and third.tag != img.tag
    assert registry.get(f"/v2/test/hello/manifests/{img.tag}").status_code == 200


@pytest.mark.integration
def test_wrong_registry_password_is_login_refused(tmp_path, registry, buildah_root, base_image, builder_calls):
    from tasks.build.images import Buildah, RegistryLogin

    context = _context(tmp_path, HELLO, {"images/hello/app.txt": "pw", "shared/lib.txt": "pw"})
    bad = _settings(registry, buildah_root, context, registry_password=SecretStr("not-the-password"))
    with pytest.raises(PipelineInputError, match=rf"registry {re.escape(registry.host)} refused the login for user 'pipeline'"):
        _run_flow(bad, "test-build-badpw")
    assert "bud" not in _subcommands(builder_calls)  # refused before building anything

    # buildah's own login step says the same when it is the one refused.
    login = RegistryLogin(host=registry.host, username=registry.username, password=SecretStr("wrong"))
    with pytest.raises(PipelineInputError, match="refused the login"):
        Buildah(bad).push(f"{registry.host}/test/hello:nope", login, tmp_path)


@pytest.mark.integration
def test_failing_build_step_quotes_its_output(tmp_path, registry, buildah_root, base_image):
    dockerfile = f"FROM {BASE_IMAGE}\nCOPY images/hello/app.txt /app.txt\nRUN echo preparing; echo 'cannot find libfoo' >&2; exit 3\nUSER 1\nENTRYPOINT [\"/bin/sh\"]\n"
    context = _context(tmp_path, dockerfile, {"images/hello/app.txt": "x"})
    with pytest.raises(PipelineInputError) as exc:
        _run_flow(_settings(registry, buildah_root, context), "test-build-fail")
    msg = str(exc.value)
    assert re.search(r"build step failed at STEP 3/\d+: RUN echo preparing", msg), msg
    assert "(exit status 3); output tail: " in msg, msg
    tail = msg.split("output tail: ", 1)[1]
    assert set(tail.split(" | ")) == {"preparing", "cannot find libfoo"}, msg  # the step's own output, stdout and stderr


@pytest.mark.integration
def test_missing_base_image_is_named(tmp_path, registry, buildah_root, base_image):
    context = _context(tmp_path, "FROM localhost/no-such-base:9\nUSER 1\nENTRYPOINT [\"/bin/sh\"]\n")
    with pytest.raises(PipelineInputError, match=r"base image not found \(localhost/no-such-base:9\)"):
        _run_flow(_settings(registry, buildah_root, context), "test-build-nobase")


# --------------------------------------------------------------------------- ECR and CodeBuild on moto


def _manifest(seed: str) -> str:
    layer = "sha256:" + hashlib.sha256(seed.encode()).hexdigest()
    return json.dumps({
        "schemaVersion": 2, "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "size": 100, "digest": layer},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.diff.tar.gzip", "size": 1000, "digest": layer}],
    })


@pytest.mark.integration
def test_ecr_repository_is_created_once_with_scan_immutable_lifecycle_and_tags(local_aws):
    from tasks.build.ecr import MANAGED_BY_KEY, ensure_repository_sync
    from tasks.core.aws import aws_client

    ecr = aws_client("ecr")
    first = ensure_repository_sync(ecr, "vllm-pipeline/t-ecr", keep_last=5)
    assert first.created and first.managed and first.uri.endswith("/vllm-pipeline/t-ecr")
    repo = ecr.describe_repositories(repositoryNames=["vllm-pipeline/t-ecr"])["repositories"][0]
    assert repo["imageTagMutability"] == "IMMUTABLE"
    assert repo["imageScanningConfiguration"]["scanOnPush"] is True
    tags = {t["Key"]: t["Value"] for t in ecr.list_tags_for_resource(resourceArn=repo["repositoryArn"])["tags"]}
    assert tags[MANAGED_BY_KEY] == "vllm-pipeline"
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName="vllm-pipeline/t-ecr")["lifecyclePolicyText"])["rules"]
    keep = [r for r in rules if r["selection"]["countType"] == "imageCountMoreThan"]
    assert keep[0]["selection"]["countNumber"] == 5 and keep[0]["selection"]["tagStatus"] == "any"

    second = ensure_repository_sync(ecr, "vllm-pipeline/t-ecr", keep_last=5)
    assert not second.created and second.arn == first.arn
    assert len(ecr.describe_repositories()["repositories"]) == len({r["repositoryName"] for r in ecr.describe_repositories()["repositories"]})
    ensure_repository_sync(ecr, "vllm-pipeline/t-ecr", keep_last=7)  # a changed keep_last is applied
    rules = json.loads(ecr.get_lifecycle_policy(repositoryName="vllm-pipeline/t-ecr")["lifecyclePolicyText"])["rules"]
    assert [r["selection"]["countNumber"] for r in rules if r["selection"]["countType"] == "imageCountMoreThan"] == [7]

    # A repository somebody else made is used as it is: no lifecycle rule expires their images.
    ecr.create_repository(repositoryName="someone/else")
    foreign = ensure_repository_sync(ecr, "someone/else", keep_last=1)
    assert not foreign.created and not foreign.managed
    with pytest.raises(ecr.exceptions.LifecyclePolicyNotFoundException):
        ecr.get_lifecycle_policy(repositoryName="someone/else")


@pytest.mark.integration
def test_ecr_login_token_is_decoded(local_aws):
    from tasks.build.ecr import ecr_login_sync
    from tasks.core.aws import aws_client

    login = ecr_login_sync(aws_client("ecr"))
    assert login.username == "AWS"
    assert login.password.get_secret_value() and "AWS:" not in login.password.get_secret_value()
    assert re.fullmatch(r"\d{12}\.dkr\.ecr\.us-east-1\.amazonaws\.com", login.host)
    assert "AWS" not in repr(login.password)


@pytest.mark.integration
def test_ecr_tag_lookup_and_the_flow_skips_a_tag_ecr_has(local_aws, tmp_path, builder_calls):
    from tasks.build.ecr import ensure_repository_sync, find_ecr_image_sync
    from tasks.build.images import resolve_context
    from tasks.core.aws import aws_client

    ecr = aws_client("ecr")
    ensure_repository_sync(ecr, "test/ecr-hello", keep_last=3)
    assert find_ecr_image_sync(ecr, "test/ecr-hello", "nope") is None
    assert find_ecr_image_sync(ecr, "test/never-made", "x") is None

    context = _context(tmp_path, HELLO, {"images/hello/app.txt": "ecr", "shared/lib.txt": "ecr"})
    settings = ImageBuildSettings(builder="buildah", repositories={"hello": "test/ecr-hello"}, context_dir=str(context))
    ctx = resolve_context(context, "hello", platform=settings.platform)
    manifest = _manifest("ecr-hello")
    digest = ecr.put_image(repositoryName="test/ecr-hello", imageManifest=manifest, imageTag=ctx.tag)["image"]["imageId"]["imageDigest"]
    assert digest.startswith("sha256:")
    found = find_ecr_image_sync(ecr, "test/ecr-hello", ctx.tag)
    assert found is not None and found.digest == digest
    assert find_ecr_image_sync(ecr, "test/ecr-hello", ctx.tag) == found  # a look-up changes nothing

    report = _run_flow(settings, "test-build-ecr")
    [img] = report.images
    assert not img.built and img.digest == digest
    assert re.fullmatch(rf"\d{{12}}\.dkr\.ecr\.us-east-1\.amazonaws\.com/test/ecr-hello@{digest}", img.image_ref)
    assert builder_calls == []  # nothing built or pushed


@pytest.mark.integration
def test_codebuild_uploads_context_starts_build_and_waits(local_aws, bucket, tmp_path):
    from tasks.build.codebuild import codebuild_image, context_key
    from tasks.build.images import Target, context_zip, resolve_context
    from tasks.core.aws import aws_client

    context = _context(tmp_path, HELLO, {"images/hello/app.txt": "cb", "shared/lib.txt": "cb"})
    settings = ImageBuildSettings(
        builder="codebuild", codebuild_bucket=bucket, repositories={"hello": "test/cb-hello"}, context_dir=str(context),
        codebuild_project="t-image-build", codebuild_service_role_arn="arn:aws:iam::123456789012:role/t-codebuild",
    )
    ctx = resolve_context(context, "hello", platform=settings.platform)
    target = Target(host="123456789012.dkr.ecr.us-east-1.amazonaws.com", repository="test/cb-hello", tag=ctx.tag)

    @flow
    def run():
        return codebuild_image(settings, ctx, target)

    first = run()
    assert first.status == "SUCCEEDED" and first.source == f"s3://{bucket}/{context_key(settings, ctx)}"
    body = aws_client("s3").get_object(Bucket=bucket, Key=context_key(settings, ctx))["Body"].read()
    assert body == context_zip(ctx)
    cb = aws_client("codebuild")
    project = cb.batch_get_projects(names=["t-image-build"])["projects"][0]
    assert project["environment"]["privilegedMode"] is True
    assert {"key": "vllm-pipeline:managed-by", "value": "vllm-pipeline"} in project["tags"]
    assert first.build_id in cb.list_builds_for_project(projectName="t-image-build")["ids"]
    run()  # again: the project and the uploaded context are reused
    assert len(cb.list_projects()["projects"]) == len(set(cb.list_projects()["projects"]))

    missing = settings.model_copy(update={"codebuild_project": "t-absent", "codebuild_service_role_arn": None})

    @flow
    def run_missing():
        return codebuild_image(missing, ctx, target)

    with pytest.raises(PipelineInputError, match="CodeBuild project 't-absent' does not exist"):
        run_missing()


@pytest.mark.integration
def test_codebuild_log_lines_stream_incrementally(local_aws):
    from tasks.build.codebuild import log_lines
    from tasks.core.aws import aws_client

    logs = aws_client("logs")
    logs.create_log_group(logGroupName="/aws/codebuild/t-stream")
    logs.create_log_stream(logGroupName="/aws/codebuild/t-stream", logStreamName="b1")
    now = int(time.time() * 1000)
    logs.put_log_events(logGroupName="/aws/codebuild/t-stream", logStreamName="b1",
                        logEvents=[{"timestamp": now, "message": "STEP 1/2: FROM x\n"}, {"timestamp": now + 1, "message": "STEP 2/2: RUN y"}])
    first, token = log_lines(logs, "/aws/codebuild/t-stream", "b1", None)
    assert first == ["STEP 1/2: FROM x", "STEP 2/2: RUN y"]
    logs.put_log_events(logGroupName="/aws/codebuild/t-stream", logStreamName="b1",
                        logEvents=[{"timestamp": now + 2, "message": "done"}])
    second, _ = log_lines(logs, "/aws/codebuild/t-stream", "b1", token)
    assert second == ["done"]
    assert log_lines(logs, "/aws/codebuild/t-stream", "absent", None) == ([], None)


def test_codebuild_failure_reading_and_buildspec():
    import yaml

    from tasks.build.codebuild import buildspec, failure_message
    from tasks.build.images import BuildContext, RunResult, Target, build_failure

    build = {"buildStatus": "FAILED", "phases": [
        {"phaseType": "PRE_BUILD", "phaseStatus": "SUCCEEDED"},
        {"phaseType": "BUILD", "phaseStatus": "FAILED",
         "contexts": [{"statusCode": "COMMAND_EXECUTION_ERROR", "message": "Error while executing command: docker build. Reason: exit status 1"}]},
    ]}
    assert failure_message(build, []) == "phase BUILD FAILED: Error while executing command: docker build. Reason: exit status 1"
    docker_log = ["#5 [2/3] RUN make", "#5 0.3 make: *** No rule to make target", 'ERROR: failed to solve: process "/bin/sh -c make" did not complete successfully: exit code: 2']
    err = build_failure("vllm", RunResult(returncode=1, tail=docker_log, output="\n".join(docker_log)), ["vllm/vllm-openai:v0.32.0"])
    assert "build step failed at #5 [2/3] RUN make (exit code: 2)" in str(err), str(err)
    assert "No rule to make target" in str(err)
    pull_log = ["#2 [internal] load metadata for docker.io/vllm/vllm-openai:v9.9.9",
                "ERROR: failed to solve: vllm/vllm-openai:v9.9.9: failed to resolve source metadata for docker.io/vllm/vllm-openai:v9.9.9: not found"]
    err = build_failure("vllm", RunResult(returncode=1, tail=pull_log, output="\n".join(pull_log)), ["vllm/vllm-openai:v9.9.9"])
    assert "base image not found (vllm/vllm-openai:v9.9.9)" in str(err)

    ctx = BuildContext(name="vllm", root="/x", dockerfile="images/vllm/Dockerfile", files=[], sha256="ab" * 32,
                       base_images=[], total_bytes=0)
    target = Target(host="1.dkr.ecr.us-east-1.amazonaws.com", repository="vllm-pipeline/vllm", tag=ctx.tag)
    spec = yaml.safe_load(buildspec(ImageBuildSettings(build_args={"VLLM_IMAGE": "vllm/vllm-openai:v0.32.0"}), ctx, target))
    cmds = spec["phases"]["build"]["commands"]
    assert spec["env"]["exported-variables"] == ["IMAGE_DIGEST"]
    assert cmds[0].startswith("docker build --platform linux/amd64 -f images/vllm/Dockerfile -t " + target.ref)
    assert "--build-arg VLLM_IMAGE=vllm/vllm-openai:v0.32.0" in cmds[0]
    assert cmds[1] == f"docker push {target.ref}"
    assert "get-login-password" in spec["phases"]["pre_build"]["commands"][0]
