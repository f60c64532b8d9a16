"""The flow-runtime image's layout (issue #22 finding 3): what images/runtime/Dockerfile COPYs is what the flows
read at run time on the ECS pool -- every module, the image build contexts flows/build.py hashes -- and nothing
of the demo kit (embedded/).

The image's /opt/vllm-pipeline is rebuilt here from the Dockerfile's COPY instructions (parsed with
tasks/build/dockerfile.py, sources taken from exactly the hashed build context, as the builder gets them), and the
flows' run-time reads are done inside it by a separate interpreter whose imports come from that layout only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from tasks.build.dockerfile import _flags_and_rest, _tokens, parse_dockerfile, stages
from tasks.build.images import resolve_context

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "images" / "runtime" / "Dockerfile"


def _workdir_and_copies() -> tuple[str, list[tuple[list[str], str]]]:
    """The final stage's WORKDIR and its context COPYs as ([sources], dest)."""
    final = stages(parse_dockerfile(DOCKERFILE.read_text()))[-1]
    workdir, copies = "/", []
    for ins in final.instructions:
        if ins.cmd == "WORKDIR":
            workdir = str(PurePosixPath(workdir) / ins.args.strip())
        elif ins.cmd in ("COPY", "ADD"):
            flags, rest = _flags_and_rest(_tokens(ins))
            assert "from" not in flags, f"line {ins.line}: multi-stage copies are not expected in the runtime image"
            copies.append((rest[:-1], str(PurePosixPath(workdir) / rest[-1])))
    return workdir, copies


def _image_layout(root: Path) -> Path:
    """Apply the runtime Dockerfile's COPYs to `root` (as the image's filesystem); returns the WORKDIR in it."""
    ctx = resolve_context(REPO, "runtime")
    workdir, copies = _workdir_and_copies()
    for sources, dest in copies:
        to_dir = dest.endswith("/") or len(sources) > 1
        for src in sources:
            src = src.lstrip("/")
            is_dir = src.endswith("/") or (REPO / src).is_dir()
            prefix = src.rstrip("/") + "/"
            for rel in ctx.files:
                if is_dir and rel.startswith(prefix):
                    target = root / dest.lstrip("/") / rel[len(prefix):]
                elif not is_dir and rel == src:
                    target = root / dest.lstrip("/") / (PurePosixPath(rel).name if to_dir else "")
                else:
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / rel, target)
    return root / workdir.lstrip("/")


def test_runtime_image_copies_what_the_build_flow_reads(tmp_path):
    """pipeline-ecs builds images by default: every file of every image's build context is in the image."""
    from blocks.image_build import ImageBuildSettings

    workdir = _image_layout(tmp_path)
    have = {p.relative_to(workdir).as_posix() for p in workdir.rglob("*") if p.is_file()}
    for name in ImageBuildSettings().repositories:
        missing = sorted(set(resolve_context(REPO, name).files) - have)
        assert not missing, f"image {name!r}: the runtime image lacks {len(missing)} files of its build context: {missing[:8]}"


def test_runtime_image_carries_no_demo_kit():
    """Product code never imports embedded/ (tests/test_architecture.py), so the image does not ship it."""
    _, copies = _workdir_and_copies()
    sources = [s.lstrip("/").rstrip("/") for srcs, _ in copies for s in srcs]
    assert not [s for s in sources if s == "embedded" or s.startswith("embedded/")], sources


@pytest.mark.integration
def test_build_flow_resolves_the_same_contexts_inside_the_image(tmp_path):
    """Inside the image's layout (its own interpreter, imports from there only): every flow module imports, and the
    build flow's default context root resolves every image to the same content hash as this checkout does -- so the
    ECS pool neither fails to find a build context nor rebuilds an image a developer already pushed."""
    from blocks.image_build import ImageBuildSettings

    workdir = _image_layout(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PREFECT_"))}
    env.update(PYTHONPATH=str(workdir), PREFECT_HOME=str(tmp_path / "prefect-home"))
    check = subprocess.run([sys.executable, "images/runtime/check.py"], cwd=workdir, env=env,
                           capture_output=True, text=True, timeout=300)
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    probe = (
        "import json, tasks\n"
        "from blocks.image_build import ImageBuildSettings\n"
        "from tasks.build.images import context_root, resolve_context\n"
        "s = ImageBuildSettings()\n"
        "print(json.dumps({'tasks': tasks.__file__, 'root': str(context_root(s)),\n"
        "                  'sha': {n: resolve_context(context_root(s), n, s.build_args, s.platform).sha256 for n in s.repositories}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["tasks"].startswith(str(workdir)), f"imports came from {got['tasks']}, not the image layout"
    assert got["root"] == str(workdir)
    s = ImageBuildSettings()
    assert got["sha"] == {n: resolve_context(REPO, n, s.build_args, s.platform).sha256 for n in s.repositories}
