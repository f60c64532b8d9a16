"""Build-time check of the flow-runtime image: every flow module imports with the installed dependencies.

Run by images/runtime/Dockerfile (`RUN python images/runtime/check.py`), so an image missing a
dependency fails its build instead of its first flow run on ECS.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

root = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(root))
modules = ["blocks"] + sorted(f"flows.{p.stem}" for p in (root / "flows").glob("*.py") if p.stem != "__init__")
failed = []
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every module, then fail
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
if failed:
    print("flow-runtime image check failed:\n  " + "\n  ".join(failed), file=sys.stderr)
    sys.exit(1)
print(f"flow-runtime image check: {len(modules)} modules import")
