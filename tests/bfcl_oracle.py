"""BFCL's own AST checker as an oracle: run by the oracle virtualenv's python (.venv-bfcl,
made by scripts/setup.sh), never imported by the project's tests.

stdin:  {"model": "<BFCL model name>", "cases": [{"id", "category", "functions",
         "possible_answer", "model_output"}, ...]} in BFCL's own formats (function docs with
         BFCL's types, ground truth lists, decoded calls as [{name: {arg: value}}]).
stdout: {"<id>": {"valid": bool, "error_type": str, "error": str}, ...}

Importing `bfcl_eval.eval_checker.ast_eval.ast_checker` imports every model handler through
`bfcl_eval/constants/model_config.py`, and the handlers import their vendors' SDKs at module
level. The checker never calls a handler (it reads one flag, `underscore_to_dot`, from
MODEL_CONFIG_MAPPING), so those SDK packages are stood in for here by permissive empty modules
(STUBBED below): no network client, torch or compiled code is needed. Everything the checker
itself runs is BFCL's, installed unmodified (`pip install --no-deps bfcl-eval==...`).
`python bfcl_oracle.py --self-check` judges two calls and exits non-zero if BFCL disagrees.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import sys
import types

# Top-level packages imported by BFCL's model handlers only (found by importing the checker
# with nothing else installed; tenacity, overrides, filelock and tree-sitter run code at import
# time and are installed for real).
STUBBED = ("anthropic", "boto3", "cohere", "datamodel_code_generator", "google", "httpx", "mistralai", "openai",
           "qwen_agent", "requests", "writerai")


class _AnyMeta(type):
    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return cls

    def __getitem__(cls, key):
        return cls

    def __or__(cls, other):
        return cls

    __ror__ = __or__


class _Any(metaclass=_AnyMeta):
    """Stands for any class, function or constant of a stubbed SDK."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return self

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any


def _module_getattr(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _Any


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        if name.partition(".")[0] in STUBBED:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []
        module.__getattr__ = _module_getattr
        return module

    def exec_module(self, module):
        pass


sys.meta_path.insert(0, _StubFinder())

from bfcl_eval.constants.enums import Language  # noqa: E402
from bfcl_eval.eval_checker.ast_eval.ast_checker import ast_checker  # noqa: E402

DEFAULT_MODEL = "gpt-4o-2024-11-20-FC"  # an OpenAI-style function-calling model: '.' in names becomes '_'


def judge(case: dict, model: str = DEFAULT_MODEL) -> dict:
    try:
        result = ast_checker(case["functions"], case["model_output"], case["possible_answer"], Language.PYTHON,
                             case["category"], model)
    except Exception as exc:  # noqa: BLE001 - a crash inside BFCL's checker is a verdict too
        return {"valid": False, "error_type": f"crash:{type(exc).__name__}", "error": str(exc)[:300]}
    return {"valid": bool(result["valid"]), "error_type": result.get("error_type", ""),
            "error": json.dumps(result.get("error", []), default=str)[:300]}


def _self_check() -> int:
    fn = [{"name": "math.factorial", "description": "", "parameters": {
        "type": "dict", "properties": {"number": {"type": "integer", "description": ""}}, "required": ["number"]}}]
    answer = [{"math.factorial": {"number": [5]}}]
    good = judge({"category": "simple", "functions": fn, "possible_answer": answer, "model_output": [{"math_factorial": {"number": 5}}]})
    bad = judge({"category": "simple", "functions": fn, "possible_answer": answer, "model_output": [{"math_factorial": {"number": 5.0}}]})
    ok = good["valid"] and not bad["valid"]
    print("bfcl oracle self-check:", "ok" if ok else f"FAILED {good} {bad}")
    return 0 if ok else 1


def main() -> int:
    if sys.argv[1:] == ["--self-check"]:
        return _self_check()
    request = json.load(sys.stdin)
    model = request.get("model") or DEFAULT_MODEL
    json.dump({case["id"]: judge(case, model) for case in request["cases"]}, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
