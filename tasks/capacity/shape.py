"""The model's shape: what of a Hugging Face config.json and the staged manifest decides GPU memory.

Read once per plan; everything downstream (tasks.capacity.memory, .choice) works on a `ModelShape` and
the checkpoint's weight bytes, never on the raw config. Kept apart because config quirks (multimodal nesting,
rope scaling, sliding-window conventions, MoE and MLA fields) are their own subject, tested against real
public configs.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from tasks.core.errors import PipelineInputError
from tasks.core.s3 import Manifest

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}

# Vision towers whose profiling pass tasks.capacity.memory models from the config (`encoder_profile`), by model_type.
MODELLED_VISION = frozenset({"qwen2_5_vl"})
# The largest image the Qwen2-VL / Qwen2.5-VL processors accept: `max_pixels` in the Qwen/Qwen2.5-VL-*-Instruct
# and Qwen2-VL-*-Instruct preprocessor_config.json (12,845,056 = 16,384 merged tokens of 28 × 28 pixels). It lives
# in the processor's config, not config.json; vLLM logs "a budget of 16384 tokens" for it.
QWEN_VL_MAX_PIXELS = 12_845_056


class VisionTower(BaseModel):
    """What of config.json's `vision_config` decides the encoder's profiling peak. `modelled`: False for towers
    the planner has no formula for (tasks.capacity.memory then takes a stated allowance)."""

    model_type: str
    modelled: bool
    depth: int = 0
    hidden_size: int = 0
    intermediate_size: int = 0
    num_heads: int = 0
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    in_channels: int = 3
    out_hidden_size: int = 0
    max_pixels: int = QWEN_VL_MAX_PIXELS


class ModelShape(BaseModel):
    """What of config.json decides memory (text part of a multimodal config)."""

    model_type: str
    architecture: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int = Field(description="Dense MLP width (per token, before TP).")
    vocab_size: int
    tie_word_embeddings: bool
    max_len: int | None = Field(description="Longest context the model allows (max_position_embeddings, rope scaling).")
    checkpoint_dtype: str
    checkpoint_quantization: str | None = None
    layer_windows: list[int | None] = Field(description="Per layer: its sliding window, or None for full attention.")
    mla_latent_dim: int | None = Field(default=None, description="MLA (DeepSeek): kv_lora_rank + qk_rope_head_dim.")
    num_experts: int = Field(default=0, description="MoE: routed experts per layer (0: dense).")
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_expert_intermediate_size: int = 0
    vision: VisionTower | None = Field(default=None, description="The vision tower (config has `vision_config`).")

    @property
    def sliding_layers(self) -> int:
        return sum(1 for w in self.layer_windows if w)


# --------------------------------------------------------------------------------------------- config


def _text_config(config: dict) -> dict:
    """The language model's part of a config: multimodal configs nest it (text_config, llm_config)."""
    for key in ("text_config", "llm_config", "language_config"):
        sub = config.get(key)
        if isinstance(sub, dict) and sub.get("num_hidden_layers"):
            inherited = {k: config[k] for k in ("torch_dtype", "dtype", "quantization_config") if k in config}
            return {**inherited, **{k: v for k, v in sub.items() if v is not None}}
    return config


def _max_len(cfg: dict) -> int | None:
    """vLLM's derived max model length (vllm/config/model.py `_get_and_verify_max_len`, simplified)."""
    base = next((cfg[k] for k in ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length") if cfg.get(k)), None)
    if base is None:
        return None
    rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
    kind = rope.get("rope_type") or rope.get("type") if isinstance(rope, dict) else None
    if kind in ("yarn", "dynamic", "linear") and rope.get("factor"):
        base = rope.get("original_max_position_embeddings", base) if kind == "yarn" else base
        return int(base * float(rope["factor"]))
    return int(base)


def _layer_windows(cfg: dict, layers: int) -> list[int | None]:
    """Sliding window per layer. Mistral-7B-v0.1: `sliding_window` on every layer. Qwen2/3: only when
    `use_sliding_window`, and then only layers >= `max_window_layers`. Gemma-2/3, gpt-oss and newer
    configs: `layer_types` ('sliding_attention' / 'full_attention'); older Gemma-3 `sliding_window_pattern`
    N (every N-th layer full); Gemma-2 without layer_types alternates, sliding first."""
    window = cfg.get("sliding_window")
    if not window or cfg.get("use_sliding_window") is False:
        return [None] * layers
    window = int(window)
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == layers:
        return [window if t == "sliding_attention" else None for t in types]
    if cfg.get("max_window_layers") is not None:
        return [window if i >= int(cfg["max_window_layers"]) else None for i in range(layers)]
    if cfg.get("sliding_window_pattern"):
        n = int(cfg["sliding_window_pattern"])
        return [window if (i + 1) % n else None for i in range(layers)]
    if cfg.get("model_type") == "gemma2":
        return [window if (i + 1) % 2 else None for i in range(layers)]
    return [window] * layers


def _vision(config: dict, text_hidden: int) -> VisionTower | None:
    """The vision tower of a multimodal config (`vision_config`), or None for a text model."""
    vc = config.get("vision_config")
    if not isinstance(vc, dict):
        return None
    model_type = str(config.get("model_type") or "unknown")
    if model_type not in MODELLED_VISION or not all(vc.get(k) for k in ("depth", "hidden_size", "intermediate_size")):
        return VisionTower(model_type=model_type, modelled=False)
    return VisionTower(
        model_type=model_type, modelled=True, depth=int(vc["depth"]), hidden_size=int(vc["hidden_size"]),
        intermediate_size=int(vc["intermediate_size"]), num_heads=int(vc.get("num_heads") or 16),
        patch_size=int(vc.get("patch_size") or 14), spatial_merge_size=int(vc.get("spatial_merge_size") or 2),
        temporal_patch_size=int(vc.get("temporal_patch_size") or 2), in_channels=int(vc.get("in_channels") or 3),
        out_hidden_size=int(vc.get("out_hidden_size") or text_hidden),
        max_pixels=int(vc.get("max_pixels") or QWEN_VL_MAX_PIXELS),
    )


def model_shape(config: dict) -> ModelShape:
    """Read what decides memory from a Hugging Face config.json. Missing `num_key_value_heads` means
    multi-head attention (KV heads = heads); missing `head_dim` means hidden_size // heads."""
    cfg = _text_config(config)
    missing = [k for k in ("num_hidden_layers", "hidden_size", "num_attention_heads") if not cfg.get(k)]
    if missing:
        raise PipelineInputError(f"config.json lacks {', '.join(missing)}: not a decoder model the planner knows")
    layers, hidden, heads = int(cfg["num_hidden_layers"]), int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    intermediate = int(cfg.get("intermediate_size") or 4 * hidden)
    experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    top_k = int(cfg.get("num_experts_per_tok") or 0) if experts else 0
    moe_width = int(cfg.get("moe_intermediate_size") or (intermediate if experts else 0))
    shared = int(cfg.get("shared_expert_intermediate_size") or 0)
    if experts and not shared and cfg.get("n_shared_experts"):
        shared = int(cfg["n_shared_experts"]) * moe_width  # DeepSeek: shared experts as one wider MLP
    quant = cfg.get("quantization_config") or cfg.get("compression_config")
    dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
    if dtype not in DTYPE_BYTES:
        dtype = "bfloat16"  # e.g. fp8 checkpoints that name their storage type; quantized sizes come from the files
    mla = None
    if cfg.get("kv_lora_rank"):
        mla = int(cfg["kv_lora_rank"]) + int(cfg.get("qk_rope_head_dim") or 0)
    return ModelShape(
        model_type=str(cfg.get("model_type") or config.get("model_type") or "unknown"),
        architecture=str((config.get("architectures") or cfg.get("architectures") or ["unknown"])[0]),
        num_layers=layers, hidden_size=hidden, num_attention_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
        intermediate_size=intermediate, vocab_size=int(cfg.get("vocab_size") or 32000),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        max_len=_max_len(cfg), checkpoint_dtype=dtype,
        checkpoint_quantization=(quant.get("quant_method") or "quantized") if isinstance(quant, dict) else None,
        layer_windows=_layer_windows(cfg, layers), mla_latent_dim=mla,
        num_experts=experts if top_k else 0, experts_per_token=top_k, moe_intermediate_size=moe_width if top_k else 0,
        shared_expert_intermediate_size=shared if top_k else 0, vision=_vision(config, hidden),
    )


def weight_bytes_from_manifest(manifest: Manifest) -> int:
    """Sum of the top-level `*.safetensors` sizes vLLM loads. Mistral repos ship the same weights twice
    (`consolidated.safetensors` and HF shards): vLLM loads the shards, so `consolidated*` is dropped when
    shards exist. Subfolders (`original/`, other components) are not the served model."""
    top = [f for f in manifest.files if "/" not in f.path]
    tensors = [f for f in top if f.path.endswith(".safetensors")]
    shards = [f for f in tensors if not f.path.startswith("consolidated")]
    chosen = shards or tensors or [f for f in top if f.path.endswith((".bin", ".pt", ".pth"))]
    if not chosen:
        raise PipelineInputError(f"the manifest of {manifest.repo_id} lists no *.safetensors (or *.bin) weights")
    return sum(f.size for f in chosen)
