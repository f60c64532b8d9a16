"""The house rules of tasks/__init__.py, as tests: rooms import downwards only, and no product module
imports the demo's stand-ins (embedded/). The tool gateway (gateway/) is a service with its own image:
it imports nothing of the pipeline, Prefect included (gateway/__init__.py)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("flows", "tasks", "blocks", "images", "gateway")
# what the gateway's image does not hold: the pipeline's packages and Prefect
NOT_IN_THE_GATEWAY = ("tasks", "flows", "blocks", "embedded", "images", "prefect", "prefect_aws")

# room -> the rooms it may import (besides itself, blocks and third-party packages)
CORE = {"tasks.core"}
MIDDLE = ("tasks.stage", "tasks.build", "tasks.capacity", "tasks.validation", "tasks.batch", "tasks.gateway")
ALLOWED = {
    "tasks.core": CORE,
    **{room: CORE for room in MIDDLE},
    "tasks.targets.local": CORE | set(MIDDLE),
    "tasks.targets.ecs": CORE | set(MIDDLE),
    "tasks.teardown": CORE | set(MIDDLE) | {"tasks.targets.local", "tasks.targets.ecs"},
    "blocks": CORE,
}


def _module(path: Path) -> str:
    return ".".join(path.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
    return found


def _room(module: str) -> str | None:
    rooms = sorted([*ALLOWED, "flows"], key=len, reverse=True)
    return next((r for r in rooms if module == r or module.startswith(r + ".")), None)


PACKAGES_ONLY = {"tasks", "tasks.targets"}  # docstrings that describe the rooms; no code


def _files(*tops: str) -> list[Path]:
    return sorted(p for top in tops for p in (REPO / top).rglob("*.py") if _module(p) not in PACKAGES_ONLY)


def test_every_task_module_is_in_a_room():
    homeless = [_module(p) for p in _files("tasks") if _room(_module(p)) is None]
    assert not homeless, f"modules outside the rooms of tasks/__init__.py: {homeless}"


@pytest.mark.parametrize("path", _files("tasks", "blocks"), ids=lambda p: str(p.relative_to(REPO)))
def test_rooms_import_downwards_only(path: Path):
    me = _room(_module(path))
    allowed = ALLOWED[me] | {me, "blocks"}
    wrong = sorted(m for m in _imports(path)
                   if m.split(".")[0] in ("tasks", "flows") and m != "tasks" and _room(m) not in allowed)
    assert not wrong, f"{me} may import only {sorted(allowed)}; {path.relative_to(REPO)} imports {wrong}"


@pytest.mark.parametrize("path", _files(*PRODUCT), ids=lambda p: str(p.relative_to(REPO)))
def test_product_never_imports_the_stand_ins(path: Path):
    wrong = sorted(m for m in _imports(path) if m == "embedded" or m.startswith("embedded."))
    assert not wrong, f"{path.relative_to(REPO)} imports the demo kit: {wrong} (embedded/ is for tests, the demo and scripts)"


def _pipeline_imports(path: Path) -> list[str]:
    return sorted(m for m in _imports(path) if m.split(".")[0] in NOT_IN_THE_GATEWAY)


@pytest.mark.parametrize("path", _files("gateway"), ids=lambda p: str(p.relative_to(REPO)))
def test_the_gateway_stands_alone(path: Path):
    wrong = _pipeline_imports(path)
    assert not wrong, f"{path.relative_to(REPO)} imports {wrong}: the gateway is its own image, without the pipeline or Prefect"


def test_the_gateway_rule_can_fail(tmp_path: Path):
    module = tmp_path / "m.py"
    module.write_text("import httpx\nfrom tasks.core.aws import aws_client\ndef f():\n    import prefect\n")
    assert _pipeline_imports(module) == ["prefect", "tasks.core.aws", "tasks.core.aws.aws_client"]


def test_the_rules_can_fail():
    """The checker sees a violation where there is one (a rule that cannot fail proves nothing)."""
    assert _room("tasks.targets.local.runtime") not in ALLOWED["tasks.targets.ecs"]
    assert "embedded.stack" in _imports(REPO / "embedded" / "demo.py")
    assert "tasks.targets.ecs.deploy" in _imports(REPO / "tasks" / "teardown" / "rollback.py")
