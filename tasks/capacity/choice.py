"""Capacity planning: which GPU instance runs these vLLM settings, at what cost, before anything is created.

The most common first failure with vLLM is CUDA out-of-memory (or "max seq len is larger than the KV
cache") at start-up, found only after paying for the instance, the image pull and the model load. The
planner answers from the staged model's `config.json` and manifest and the server settings alone.

This module evaluates every catalogue instance × tensor-parallel size (tasks.capacity.memory.evaluate),
orders the candidates by cost and chooses, or refuses in one line naming what to change.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from blocks.catalogue import gpu_instances
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.vllm_server import VllmServerSettings
from tasks.capacity.coldstart import TimeToReady, estimate
from tasks.capacity.memory import (
    BLOCK_TOKENS,
    Candidate,
    PlanSettings,
    _gib,
    evaluate,
    kv_bytes_per_token_layer,
    plan_settings,
    resolve_dtype,
    served_weight_bytes,
    tp_allowed,
)
from tasks.capacity.shape import DTYPE_BYTES, ModelShape, model_shape
from tasks.core.errors import PipelineInputError

TP_SIZES = (1, 2, 4, 8)


class CapacityPlan(BaseModel):
    model: str
    shape: ModelShape
    settings: PlanSettings
    weight_bytes: int = Field(description="Checkpoint weights on disk (sum of the safetensors files).")
    served_weight_bytes: int = Field(description="Weights in GPU memory on a bf16-capable GPU, all GPUs together.")
    kv_bytes_per_token: int = Field(description="Whole model, all layers, on a bf16-capable GPU.")
    candidates: list[Candidate] = Field(default_factory=list, description="Every instance × TP evaluated, by cost.")
    chosen: Candidate | None = None
    alternatives: list[Candidate] = Field(
        default_factory=list,
        description="Other fitting hardware: per GPU type × count, its cheapest instance at the smallest TP that fits; by cost.",
    )
    configured: Candidate | None = Field(default=None, description="The capacity block's instance_type, evaluated.")
    refusal: str | None = Field(default=None, description="Why nothing fits and what to change (one line).")
    notes: list[str] = Field(default_factory=list)
    time_to_ready: TimeToReady | None = Field(
        default=None, description="The chosen instance's cold start on a new host, on paper (tasks/capacity/coldstart.py).")


# --------------------------------------------------------------------------------------------- plan


def _order(c: Candidate) -> tuple:
    return (c.price_per_hour, c.tensor_parallel_size, c.instance_type)


def by_hardware(candidates: list[Candidate]) -> list[Candidate]:
    """One candidate per GPU type × count, by cost: its cheapest instance at the smallest TP that fits;
    when none fits, the cheapest instance at the TP that leaves the most KV room (the nearest miss)."""
    groups: dict[tuple, list[Candidate]] = {}
    for c in sorted(candidates, key=_order):
        groups.setdefault(c.hardware, []).append(c)
    picked = []
    for group in groups.values():
        fit = next((c for c in group if c.fits), None)
        if fit is None:
            cheapest = [c for c in group if c.instance_type == group[0].instance_type]
            fit = max(cheapest, key=lambda c: c.memory.kv_cache)
        picked.append(fit)
    return sorted(picked, key=_order)


def plan(
    config: dict, weight_bytes: int, settings: VllmServerSettings, capacity: EcsGpuCapacity | None = None,
    concurrency: int | None = None, *, instance_types: list[str] | None = None, model_name: str = "the model",
) -> CapacityPlan:
    """Evaluate every catalogue instance (or `instance_types`) at every tensor-parallel size it allows
    (1, 2, 4, 8 up to its GPU count, heads divisible) and choose the cheapest that fits `concurrency`
    full-length sequences; ties go to the smaller TP (no NCCL traffic when one GPU suffices). Prices come
    from the catalogue unless `capacity.price_overrides` names the type. settings.tensor_parallel_size is
    not a constraint: the plan says which TP to set. Nothing fitting is not an exception here: the plan
    carries a one-line `refusal` naming what to change, and the flow raises it."""
    shape = model_shape(config)
    s = plan_settings(settings, concurrency)
    if weight_bytes <= 0:
        raise PipelineInputError(f"{model_name}: no weight bytes (empty manifest?)")
    catalogue = gpu_instances()
    names = list(instance_types) if instance_types else list(catalogue)
    unknown = sorted(set(names) - set(catalogue))
    if unknown:
        raise PipelineInputError(f"instance_types: not in the catalogue (blocks/gpu_instances.yaml): {unknown}")
    dtype16, dtype_error = resolve_dtype(shape, s.dtype, "H100")
    if dtype_error:
        raise PipelineInputError(f"VllmServerSettings.dtype: {dtype_error}")
    kv16 = 1 if s.kv_cache_dtype.startswith("fp8") else DTYPE_BYTES[dtype16]
    result = CapacityPlan(
        model=model_name, shape=shape, settings=s, weight_bytes=weight_bytes,
        served_weight_bytes=served_weight_bytes(shape, weight_bytes, dtype16, s.quantization),
        kv_bytes_per_token=kv_bytes_per_token_layer(shape, kv16) * shape.num_layers,
    )
    if shape.sliding_layers and not s.sliding_window_disabled:
        result.notes.append(f"{shape.sliding_layers} of {shape.num_layers} layers use a sliding window of "
                            f"{max(w for w in shape.layer_windows if w):,} tokens: their KV per sequence is capped")
    if shape.checkpoint_quantization:
        result.notes.append(f"checkpoint is quantized ({shape.checkpoint_quantization}): weights as stored")
    if shape.max_len is not None and s.max_model_len > shape.max_len:
        result.refusal = (f"max_model_len {s.max_model_len:,} exceeds {model_name}'s limit of {shape.max_len:,} tokens "
                          f"(max_position_embeddings): lower max_model_len to <= {shape.max_len:,}")
        return result
    blocked = [tp for tp in TP_SIZES if not tp_allowed(shape, tp)]
    if blocked:
        result.notes.append(f"tensor_parallel_size {', '.join(map(str, blocked))} impossible: {shape.num_attention_heads} "
                            f"attention heads / {shape.num_kv_heads} KV heads do not split that way")
    overrides = capacity.price_overrides if capacity else {}
    for name in names:
        inst = catalogue[name]
        price, source = (overrides[name], "override") if name in overrides else (inst.price_per_hour, "catalogue")
        for tp in TP_SIZES:
            if tp <= inst.gpus and tp_allowed(shape, tp):
                result.candidates.append(evaluate(shape, weight_bytes, s, inst, tp, price, source))
    result.candidates.sort(key=_order)
    fitting = [c for c in by_hardware(result.candidates) if c.fits]
    if fitting:
        result.chosen, result.alternatives = fitting[0], fitting[1:]
        result.time_to_ready = estimate(catalogue[result.chosen.instance_type], weight_bytes, settings.load_format,
                                        prepulled=bool(capacity and capacity.prepull_images), enforce_eager=s.enforce_eager)
    else:
        result.refusal = _refusal(result, model_name)
    if capacity is not None:
        mine = [c for c in result.candidates if c.instance_type == capacity.instance_type]
        result.configured = next((c for c in mine if c.fits), None) or next(
            (c for c in mine if c.tensor_parallel_size == s.requested_tensor_parallel_size), mine[-1] if mine else None)
    return result


def _refusal(result: CapacityPlan, model_name: str) -> str:
    s, cands = result.settings, result.candidates
    head = (f"nothing in the catalogue fits {model_name} ({_gib(result.served_weight_bytes)} GiB weights, "
            f"{result.kv_bytes_per_token / 1024:.0f} KiB KV per token) with max_model_len={s.max_model_len:,} "
            f"and concurrency={s.concurrency}")
    if not cands:
        return head + ": no instance type allows a tensor-parallel size these attention heads split into"
    usable = [c for c in cands if c.memory.kv_cache > 0 and "bfloat16" not in (c.reason or "")]
    parts = []
    if usable:
        best = max(usable, key=lambda c: (c.max_len_at_concurrency, -c.price_per_hour))
        if best.max_len_at_concurrency >= BLOCK_TOKENS:
            parts.append(f"lower max_model_len to <= {best.max_len_at_concurrency:,} ({best.instance_type}, "
                         f"TP {best.tensor_parallel_size}, ${best.price_per_hour:.3f}/h)")
        roomiest = max(usable, key=lambda c: (c.sequences_fit, -c.price_per_hour))
        if s.concurrency > 1 and roomiest.sequences_fit >= 1:
            parts.append(f"lower concurrency to <= {roomiest.sequences_fit} ({roomiest.instance_type})")
    else:
        biggest = max(cands, key=lambda c: c.memory.kv_cache)
        parts.append(f"the weights alone do not fit: even {biggest.instance_type} at TP {biggest.tensor_parallel_size} "
                     f"is {_gib(-biggest.memory.kv_cache)} GiB per GPU short")
    if not s.quantization and not result.shape.checkpoint_quantization:
        parts.append("quantize (quantization='fp8' about halves the weights)")
    if usable and not s.kv_cache_dtype.startswith("fp8"):
        parts.append("use an fp8 KV cache (extra_args --kv-cache-dtype fp8 halves it)")
    if s.gpu_memory_utilization < 0.9:
        parts.append(f"raise gpu_memory_utilization (now {s.gpu_memory_utilization})")
    parts.append("or use more GPUs than one instance holds (multi-node serving is not supported here)")
    return head + ": " + "; ".join(parts)
