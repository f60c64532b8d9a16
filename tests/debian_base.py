"""A stand-in for `python:3.11.14-slim-bookworm`, made from Debian's archive: the runtime Dockerfile's base
(its build arg PYTHON_IMAGE) where no registry can be pulled from.

mmdebstrap builds a bookworm `minbase` root (Essential and Priority: required packages, apt) plus exactly
what the official image gives a Dockerfile: `python` and `pip` (python3, python3-pip, python-is-python3),
`venv` and ca-certificates; no documentation, manual pages or translations, as Debian's slim images leave
them out (the dpkg path filters stay in the image, so later `apt-get install`s obey them too). One
difference is removed on purpose: Debian marks its Python EXTERNALLY-MANAGED (PEP 668), so `pip install`
refuses to install system-wide. The official image's Python is its own build in /usr/local, which apt
never touches, and `pip install` there is what the runtime Dockerfile does; the marker goes, and pip
installs into /usr/local/lib/python3.11/dist-packages, beside (never over) Debian's packages.

The image is cached as a docker-archive in ~/.cache/vllm-pipeline/images/, named by a hash of its inputs
(suite, packages, mirrors, filters, hook); each test session pulls it into its own container storage
(`buildah pull docker-archive:`, about twice as fast as `from scratch` + `add` + `commit`).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
from pathlib import Path

SUITE = "bookworm"
PACKAGES = ("python3", "python3-pip", "python3-venv", "python-is-python3", "ca-certificates")
# The point release plus its updates and security fixes, as Debian's own images have them.
MIRRORS = (
    "deb http://deb.debian.org/debian bookworm main",
    "deb http://deb.debian.org/debian bookworm-updates main",
    "deb http://deb.debian.org/debian-security bookworm-security main",
)
DPKG_FILTERS = (  # what Debian's slim images leave out
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*",
)
HOOK = 'rm -f "$1"/usr/lib/python3.11/EXTERNALLY-MANAGED'
ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")


def key() -> str:
    """The hash of everything the cached image is made from."""
    inputs = {"suite": SUITE, "packages": PACKAGES, "mirrors": MIRRORS, "dpkg": DPKG_FILTERS, "hook": HOOK,
              "variant": "minbase", "env": ENV, "format": "docker-archive, one layer"}
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


def image_ref() -> str:
    return f"localhost/vllm-pipeline-test/python:3.11-{SUITE}-{key()}"


def base_archive(cache: Path | None = None) -> Path:
    """The cached base as a docker-archive (one layer: mmdebstrap's root filesystem tarball as it is); made when
    missing: about a minute, ~45 MB of packages."""
    cache = cache or Path.home() / ".cache" / "vllm-pipeline" / "images"
    archive = cache / f"python3.11-{SUITE}-{key()}.docker-archive.tar"
    if archive.is_file():
        return archive
    if shutil.which("mmdebstrap") is None:
        raise RuntimeError("mmdebstrap is not installed: run scripts/setup.sh (it installs it with apt)")
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="debian-base-", dir=cache) as tmp:
        rootfs = Path(tmp) / "rootfs.tar"
        cmd = ["mmdebstrap", "--quiet", "--variant=minbase", "--include=" + ",".join(PACKAGES),
               *[f"--dpkgopt={f}" for f in DPKG_FILTERS], f"--customize-hook={HOOK}", SUITE, str(rootfs), *MIRRORS]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            raise RuntimeError(f"mmdebstrap failed ({done.returncode}): {(done.stdout + done.stderr)[-3000:]}")
        partial = Path(tmp) / "archive.tar"
        _docker_archive(rootfs, partial)
        os.chmod(partial, 0o644)
        os.replace(partial, archive)  # atomic: a concurrent or interrupted run never leaves half an archive
    return archive


def _docker_archive(rootfs: Path, dest: Path) -> None:
    """`docker save`'s format around one layer; no timestamps, so the image ID depends only on the layer."""
    digest = hashlib.sha256()
    with rootfs.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    config = json.dumps({
        "architecture": "amd64", "os": "linux", "config": {"Env": list(ENV), "Cmd": ["python3"]},
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + digest.hexdigest()]},
        "history": [{"created_by": f"mmdebstrap {SUITE} minbase + {' '.join(PACKAGES)} (tests/debian_base.py)"}],
    }, sort_keys=True).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = json.dumps([{"Config": config_name, "RepoTags": [image_ref()], "Layers": ["layer.tar"]}]).encode()
    with tarfile.open(dest, "w") as out:
        for name, data in ((config_name, config), ("manifest.json", manifest)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
        out.add(rootfs, arcname="layer.tar")


def import_base(buildah: list[str], archive: Path) -> str:
    """The cached base as the image image_ref() in the storage `buildah` (argv prefix) points at."""
    done = subprocess.run([*buildah, "pull", "--quiet", f"docker-archive:{archive}"], capture_output=True, text=True,
                          timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"buildah pull docker-archive:{archive} failed: {done.stderr[-2000:]}")
    return image_ref()
