"""Small random LoRA adapters for a Llama-shaped base, made without torch, deterministic per seed.

Used where an adapter's *shape* matters and its behaviour does not: the second tenant of the
local stack (served beside the trained tool-calling adapter), the tiny model's adapter for
staging tests, and adapters that must be refused (another base, too high a rank, a module
the base lacks). B is small, so a random adapter nudges the base model without wrecking it.
"""

from __future__ import annotations

import json
import random
import struct
from array import array
from pathlib import Path

_PARENT = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of each adaptable linear layer of a Llama-architecture config."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q, kv = config["num_attention_heads"] * head_dim, config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    return {"q_proj": (q, hidden), "k_proj": (kv, hidden), "v_proj": (kv, hidden), "o_proj": (hidden, q),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}


def _safetensors_f32(tensors: dict[str, tuple[tuple[int, ...], array]]) -> bytes:
    header, offset, blobs = {}, 0, []
    for name, (shape, values) in tensors.items():
        data = values.tobytes()
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def make_adapter(folder: Path, base_repo_id: str, config: dict, rank: int = 8, modules: tuple[str, ...] = ("q_proj", "v_proj"),
                 seed: int = 0, scale: float = 0.01, shapes: dict[str, tuple[int, int]] | None = None) -> Path:
    """A peft-format LoRA folder (adapter_config.json + adapter_model.safetensors) for `config`'s layers."""
    rng = random.Random(seed)
    shapes = shapes or module_shapes(config)
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        for m in modules:
            out_dim, in_dim = shapes[m]
            prefix = f"base_model.model.model.layers.{layer}.{_PARENT[m]}.{m}"
            tensors[f"{prefix}.lora_A.weight"] = ((rank, in_dim), array("f", (rng.uniform(-scale, scale) for _ in range(rank * in_dim))))
            tensors[f"{prefix}.lora_B.weight"] = ((out_dim, rank), array("f", (rng.uniform(-scale, scale) for _ in range(out_dim * rank))))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(_safetensors_f32(tensors))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_repo_id, "r": rank,
        "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": list(modules), "bias": "none",
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False,
    }, indent=2) + "\n")
    return folder
