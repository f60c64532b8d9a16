"""The capacity plan for a person: the markdown artifact (verdict, memory breakdown, candidates by cost).

Pure text from a `CapacityPlan`; every number it shows is computed in tasks.capacity.memory and .choice.
"""

from __future__ import annotations

from tasks.capacity.choice import CapacityPlan, by_hardware
from tasks.capacity.coldstart import describe
from tasks.capacity.memory import (
    CUDA_GRAPH_MAX_SIZE,
    CUDA_GRAPH_PIECE_MIB,
    CUDA_GRAPH_POOL_GIB,
    MOE_WORKSPACES,
    NON_TORCH_GIB,
    NON_TORCH_TP_GIB,
    PINNED_VLLM,
    SAFETY_MARGIN_FRACTION,
    SAMPLER_BYTES_PER_LOGIT,
    Candidate,
    _gib,
    capture_sizes,
)


def _instance_line(c: Candidate) -> str:
    return (f"`{c.instance_type}` ({c.gpus}× {c.gpu} {c.gpu_memory_gib} GB), tensor_parallel_size={c.tensor_parallel_size}, "
            f"${c.price_per_hour:.3f}/h{' (override)' if c.price_source == 'override' else ''}")


def render_markdown(p: CapacityPlan) -> str:
    """The plan for a person: verdict, memory breakdown of the chosen (or closest) candidate, candidates by cost."""
    s, sh = p.settings, p.shape
    lines = [f"# Capacity plan: `{p.model}`", ""]
    if p.chosen:
        c = p.chosen
        lines += [
            f"**Choose {_instance_line(c)}.**",
            "",
            f"- holds {c.sequences_fit:,} sequences of {s.max_model_len:,} tokens at once (requested {s.concurrency}; "
            f"vLLM runs at most max_num_seqs={s.max_num_seqs}); KV cache {c.kv_cache_tokens:,} tokens",
            f"- at concurrency {s.concurrency} the context can reach {c.max_len_at_concurrency:,} tokens",
        ]
        if c.tensor_parallel_size != s.requested_tensor_parallel_size:
            lines.append(f"- set `tensor_parallel_size={c.tensor_parallel_size}` "
                         f"(the settings say {s.requested_tensor_parallel_size})")
        if p.time_to_ready:
            lines.append(f"- time to ready: {describe(p.time_to_ready)} (a paper estimate: docs/capacity.md#time-to-ready)")
    else:
        lines += ["**Nothing fits.**", "", f"> {p.refusal}"]
    if p.configured:
        cf = p.configured
        verdict = "fits" if cf.fits else f"does not fit: {cf.reason}"
        lines.append(f"- configured instance `{cf.instance_type}` (TP {cf.tensor_parallel_size}): {verdict}")
    kv_per_elem = p.kv_bytes_per_token // max(sh.num_layers * sh.num_kv_heads * sh.head_dim * 2, 1)
    kv_line = (f"- KV cache {p.kv_bytes_per_token:,} bytes per token = {sh.num_layers} layers × {sh.num_kv_heads} KV heads"
               f" × {sh.head_dim} head_dim × 2 (K, V) × {kv_per_elem} bytes")
    if sh.mla_latent_dim:
        kv_line = f"- KV cache {p.kv_bytes_per_token:,} bytes per token (MLA latent {sh.mla_latent_dim})"
    lines += [
        "",
        "## Model and settings",
        "",
        f"- {sh.architecture} ({sh.model_type}): {sh.num_layers} layers, hidden {sh.hidden_size}, "
        f"{sh.num_attention_heads} heads, {sh.num_kv_heads} KV heads, head_dim {sh.head_dim}, "
        f"max context {sh.max_len or 'unknown'}",
        f"- weights on disk {_gib(p.weight_bytes)} GiB ({sh.checkpoint_dtype}"
        f"{', ' + sh.checkpoint_quantization if sh.checkpoint_quantization else ''}); "
        f"served {_gib(p.served_weight_bytes)} GiB{' with quantization=' + s.quantization if s.quantization else ''}",
        kv_line,
        f"- dtype {s.dtype}, KV cache dtype {s.kv_cache_dtype}, max_model_len {s.max_model_len:,}, "
        f"max_num_seqs {s.max_num_seqs}, gpu_memory_utilization {s.gpu_memory_utilization}, "
        f"concurrency {s.concurrency}, enforce_eager {s.enforce_eager}"
        + (f", LoRA {s.lora_count} × rank {s.lora_rank}" if s.lora_rank else ""),
    ]
    lines += [f"- {n}" for n in p.notes]
    shown = p.chosen or (max(p.candidates, key=lambda c: c.memory.kv_cache) if p.candidates else None)
    if shown:
        m = shown.memory
        tp = shown.tensor_parallel_size
        rows = min(s.max_num_seqs, shown.max_num_batched_tokens)
        if s.enforce_eager:
            graphs = "none: enforce_eager"
        elif m.cuda_graphs:
            largest = min(2 * s.max_num_seqs, CUDA_GRAPH_MAX_SIZE, shown.max_num_batched_tokens)
            piecewise, full = len(capture_sizes(largest)), len(capture_sizes(min(s.max_num_seqs, largest)))
            graphs = (f"vLLM >= 0.21 subtracts its graph estimate: {piecewise} piecewise sizes × {p.shape.num_layers + 1} "
                      f"layer pieces + {full} full graphs: a {CUDA_GRAPH_POOL_GIB} GiB pool + {CUDA_GRAPH_PIECE_MIB} MiB per piece")
        else:
            graphs = "not in this vLLM's budget (before 0.21)"
        lora = f"{s.lora_count} slots × rank {s.lora_rank}, preallocated" if s.lora_rank else "none: enable_lora is off"
        non_torch = ("measured outside PyTorch: workspaces" + (", NCCL / all-reduce buffers (TP)" if tp > 1 else "")
                     + f"; the largest in the calibration logs ({NON_TORCH_TP_GIB if tp > 1 else NON_TORCH_GIB} GiB)")
        lines += [
            "",
            f"## Memory per GPU on `{shown.instance_type}` (TP {tp})",
            "",
            f"How vLLM {PINNED_VLLM} sizes the KV cache: its budget is what CUDA reports × gpu_memory_utilization; "
            "from it come the weights, the peak of one profiling pass and what it measured outside PyTorch, "
            "the CUDA-graph estimate; the rest is KV cache. The CUDA context is created before vLLM measures, "
            "so it sits in the 1 − utilization headroom, not in the budget.",
            "",
            "| item | GiB | where it comes from |",
            "|---|---:|---|",
            f"| GPU memory (as CUDA reports it) | {_gib(m.gpu_memory)} | {shown.gpu} {shown.gpu_memory_gib} GB: what CUDA "
            "reports, less than the marketed size (CUDA_VISIBLE_GIB in tasks/capacity/memory.py) |",
            f"| budget | {_gib(m.budget)} | × gpu_memory_utilization {s.gpu_memory_utilization} |",
            f"| weights | {_gib(m.weights)} | safetensors sizes ÷ TP {tp} ({shown.dtype}"
            f"{', ' + s.quantization if s.quantization else ''}) |",
            f"| activation peak | {_gib(m.activation)} | vLLM's profile run, whichever is larger: its forward pass of "
            f"{shown.max_num_batched_tokens:,} batched tokens ({_gib(m.forward)}) or its sampler step, {rows} rows × "
            f"{p.shape.vocab_size:,} vocabulary × {SAMPLER_BYTES_PER_LOGIT} B ({_gib(m.sampler)}) |",
            *([f"| MoE workspaces | {_gib(m.moe_workspaces)} | kept by vLLM's workspace manager: {MOE_WORKSPACES} × "
               f"{shown.max_num_batched_tokens:,} tokens × top-{p.shape.experts_per_token} × max(2 × moe_intermediate/TP, "
               "hidden) |"] if m.moe_workspaces else []),
            *([f"| multimodal encoder | {_gib(m.encoder)} | {m.encoder_detail}; counted beyond the activation peak "
               "(vLLM profiles the encoder before the text pass, tasks/capacity/memory.py `encoder_profile`) |"]
              if m.encoder or m.encoder_detail else []),
            f"| non-torch memory | {_gib(m.non_torch)} | {non_torch} |",
            f"| CUDA graphs | {_gib(m.cuda_graphs)} | {graphs} |",
            f"| LoRA buffers | {_gib(m.lora)} | {lora} |",
            f"| safety margin | {_gib(m.margin)} | {SAFETY_MARGIN_FRACTION:.1%} of GPU memory, kept free on top of "
            "the estimates (calibrated: docs/capacity.md) |",
            f"| **KV cache** | **{_gib(m.kv_cache)}** | the rest: {shown.kv_cache_tokens:,} tokens |",
            f"| one {s.max_model_len:,}-token sequence | {_gib(shown.sequence_bytes)} | "
            f"{shown.kv_bytes_per_token:,} B/token on this GPU |",
        ]
    lines += ["", "## Candidates by cost", "",
              "Each GPU type × count at its cheapest instance (bigger CPU/RAM variants cost more and fit the same), "
              "at the smallest tensor-parallel size that fits.",
              "", "| # | instance | GPUs | TP | $/h | KV GiB/GPU | full-length seqs | max context at concurrency | fits |",
              "|---:|---|---|---:|---:|---:|---:|---:|---|"]
    for rank, c in enumerate(by_hardware(p.candidates), 1):
        chosen = p.chosen is not None and (c.instance_type, c.tensor_parallel_size) == (
            p.chosen.instance_type, p.chosen.tensor_parallel_size)
        mark = "**chosen**" if chosen else ("yes" if c.fits else f"no: {c.reason}")
        lines.append(f"| {rank} | `{c.instance_type}` | {c.gpus}× {c.gpu} {c.gpu_memory_gib} GB | {c.tensor_parallel_size} | "
                     f"{c.price_per_hour:.3f} | {_gib(max(c.memory.kv_cache, 0))} | {c.sequences_fit:,} | "
                     f"{c.max_len_at_concurrency:,} | {mark} |")
    lines += ["", "Weights from file sizes; KV exact per layer (16-token blocks, sliding windows capped as vLLM does); "
                  "activation, non-torch memory and CUDA graphs model vLLM's own profiling, checked against published "
                  "start-up logs (docs/capacity.md, tasks/capacity/memory.py)."]
    return "\n".join(lines)
