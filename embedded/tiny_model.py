"""A tiny random-weight Llama folder, made without torch, for tests that only need bytes
shaped like a model (hub server, hashing, staging). Deterministic for a given seed."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 1,
    "num_key_value_heads": 1,
    "head_dim": 64,
    "vocab_size": 256,
    "max_position_embeddings": 512,
    "torch_dtype": "bfloat16",
}


def _safetensors(tensors: dict[str, tuple[int, ...]], rng: random.Random) -> bytes:
    header, offset, blobs = {}, 0, []
    for name, shape in tensors.items():
        n = 2
        for d in shape:
            n *= d
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        blobs.append(rng.randbytes(n))
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return struct.pack("<Q", len(head)) + head + b"".join(blobs)


def make_tiny_model(folder: Path, seed: int = 0, shards: int = 2, extra_bytes: int = 0) -> Path:
    """Write config, tokenizer files and `shards` safetensors files (plus `extra_bytes` of
    padding tensors, to make bigger payloads) into `folder`."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    c = TINY_CONFIG
    (folder / "config.json").write_text(json.dumps(c, indent=2) + "\n")
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 512}) + "\n")
    vocab = {f"t{i}": i for i in range(c["vocab_size"])}
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "WordLevel", "vocab": vocab}}) + "\n")
    (folder / "pytorch_model.bin").write_bytes(b"legacy weights the default patterns skip")
    (folder / "original").mkdir(exist_ok=True)
    (folder / "original" / "consolidated.pth").write_bytes(b"original checkpoint the default patterns skip")
    layers = list(range(c["num_hidden_layers"]))
    per_shard = [layers[i::shards] for i in range(shards)]
    weight_map = {}
    pad_each = extra_bytes // max(shards, 1)
    for s, shard_layers in enumerate(per_shard):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        tensors: dict[str, tuple[int, ...]] = {}
        if s == 0:
            tensors["model.embed_tokens.weight"] = (c["vocab_size"], c["hidden_size"])
        for layer in shard_layers:
            tensors[f"model.layers.{layer}.self_attn.q_proj.weight"] = (c["hidden_size"], c["hidden_size"])
            tensors[f"model.layers.{layer}.mlp.up_proj.weight"] = (c["intermediate_size"], c["hidden_size"])
        if pad_each:
            tensors[f"padding.{s}"] = (pad_each // 2,)
        for t in tensors:
            weight_map[t] = name
        (folder / name).write_bytes(_safetensors(tensors, rng))
    index = {"metadata": {"total_size": sum((folder / n).stat().st_size for n in set(weight_map.values()))}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return folder
