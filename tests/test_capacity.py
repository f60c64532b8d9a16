"""The capacity planner (issue: plan): memory arithmetic on real public model configs, instance choices,
refusals, the markdown report, and the plan-capacity flow against the moto S3.

Configs below are the memory-relevant fields of the public config.json files, written in as data.
Weight sizes: Llama-3.1-8B's four shard sizes as the Hub lists them; the others are parameter count ×
2 bytes (bf16) + a safetensors header, the parameter count checked by hand against the published one.
"""

from __future__ import annotations

import pytest

from blocks.catalogue import GpuInstance
from blocks.ecs_capacity import EcsGpuCapacity
from blocks.vllm_server import VllmServerSettings
from tasks.capacity.choice import by_hardware, plan
from tasks.capacity.memory import (
    BLOCK_TOKENS,
    GiB,
    accounting_for,
    capture_sizes,
    cuda_visible_gib,
    evaluate,
    plan_settings,
)
from tasks.capacity.report import render_markdown
from tasks.capacity.shape import model_shape, weight_bytes_from_manifest
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import Manifest, ManifestFile

LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 128256,
    "max_position_embeddings": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
}
LLAMA_31_8B_SHARDS = [4976698672, 4999802720, 4915916176, 1168138808]

QWEN2_7B = {  # GQA 28 heads / 4 KV heads; a sliding_window that is switched off (use_sliding_window false)
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "num_hidden_layers": 28, "hidden_size": 3584,
    "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944, "vocab_size": 152064,
    "max_position_embeddings": 131072, "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 28,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
MISTRAL_7B_V01 = {  # sliding window 4096 on every layer
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "num_hidden_layers": 32, "hidden_size": 4096,
    "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336, "vocab_size": 32000,
    "max_position_embeddings": 32768, "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
LLAMA_3_70B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192,
    "num_attention_heads": 64, "num_key_value_heads": 8, "intermediate_size": 28672, "vocab_size": 128256,
    "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
SMOLLM2_135M = {  # the embedded default model
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576,
    "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "intermediate_size": 1536, "vocab_size": 49152,
    "max_position_embeddings": 8192, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
}
LLAMA_2_7B = {  # full multi-head attention: no num_key_value_heads, no head_dim (the reference notes' "7B" row)
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096,
    "num_attention_heads": 32, "intermediate_size": 11008, "vocab_size": 32000, "max_position_embeddings": 4096,
    "torch_dtype": "float16",
}


def llama_params(c: dict, qkv_bias: bool = False) -> int:
    """Parameters of a Llama-style decoder, by hand: embeddings (+ LM head unless tied), per layer q/k/v/o,
    gate/up/down and two norms, final norm."""
    h, layers, i, v = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"]
    hd = c.get("head_dim") or h // c["num_attention_heads"]
    q, kv = c["num_attention_heads"] * hd, c.get("num_key_value_heads", c["num_attention_heads"]) * hd
    attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if qkv_bias else 0)
    per_layer = attn + 3 * h * i + 2 * h
    return v * h * (1 if c.get("tie_word_embeddings") else 2) + layers * per_layer + h


HEADER = 40_000  # a safetensors JSON header, per file, roughly
QWEN2_7B_BYTES = llama_params(QWEN2_7B, qkv_bias=True) * 2 + 4 * HEADER
MISTRAL_7B_BYTES = llama_params(MISTRAL_7B_V01) * 2 + 2 * HEADER
LLAMA_3_70B_BYTES = llama_params(LLAMA_3_70B) * 2 + 30 * HEADER
SMOLLM2_BYTES = 269_060_552  # model.safetensors of SmolLM2-135M(-Instruct), "269 MB"


def settings(**kw) -> VllmServerSettings:
    return VllmServerSettings(**kw)


def cand(p, instance: str, tp: int = 1):
    return next(c for c in p.candidates if c.instance_type == instance and c.tensor_parallel_size == tp)


def test_parameter_counts_match_the_published_ones():
    # The hand count reproduces each model card's parameter count, so params × 2 bytes is the bf16 size.
    assert llama_params(LLAMA_31_8B) == 8_030_261_248
    assert llama_params(QWEN2_7B, qkv_bias=True) == 7_615_616_512
    assert llama_params(MISTRAL_7B_V01) == 7_241_732_096
    assert llama_params(LLAMA_3_70B) == 70_553_706_496
    assert llama_params(SMOLLM2_135M) == 134_515_008
    assert sum(LLAMA_31_8B_SHARDS) - 8_030_261_248 * 2 < 4 * HEADER  # the real shards: params × 2 + headers


# ------------------------------------------------------------------------------------------- Llama-3.1-8B


def test_llama31_8b_weights_and_kv_by_hand():
    p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192))
    assert p.weight_bytes == p.served_weight_bytes == 4976698672 + 4999802720 + 4915916176 + 1168138808  # 14.96 GiB
    assert round(p.weight_bytes / GiB, 2) == 14.96
    assert p.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131_072  # layers × KV heads × head_dim × (K,V) × bf16
    assert p.shape.head_dim == 4096 // 32 and p.shape.max_len == 131072  # llama3 rope type does not stretch it
    one = cand(p, "g5.xlarge")
    assert one.sequence_bytes == 8192 * 131_072 == 1 * GiB  # one 8K sequence = 1 GiB
    m = one.memory
    assert m.budget == (m.weights + m.moe_workspaces + m.activation + m.non_torch + m.cuda_graphs + m.lora + m.margin
                        + m.kv_cache)
    assert m.budget == int(int(22.20 * GiB) * 0.9)  # an A10G shows 22.20 GiB to CUDA
    # the profile run: 2048 batched tokens (vLLM's default under 70 GiB) and the sampler on max_num_seqs=32 rows
    assert one.max_num_batched_tokens == 2048
    assert m.forward == 2048 * (3 * 4096 + 3 * 14336) * 2  # 0.21 GiB: residual/norm/output + gate_up + activated half
    assert m.sampler == 32 * 128256 * 38  # 0.15 GiB
    assert m.activation == max(m.forward, m.sampler) == m.forward
    assert m.non_torch == int(0.35 * GiB) and m.moe_workspaces == 0 and m.lora == 0
    # vLLM 0.32 subtracts its CUDA-graph estimate: 11 piecewise sizes (1..64) × 33 layer pieces + 7 full sizes (1..32)
    assert m.cuda_graphs == int(0.1 * GiB + (11 * 33 + 7) * 0.4 * (1 << 20))
    assert m.margin == int(m.gpu_memory * 0.005)
    assert one.sequences_fit == m.kv_cache // GiB == 4
    assert one.kv_cache_tokens == m.kv_cache // (131_072 * 16) * 16
    # TP 4 on 4× L4: a quarter of the weights and 2 of the 8 KV heads per GPU
    four = cand(p, "g6.12xlarge", 4)
    assert four.memory.weights == -(-sum(LLAMA_31_8B_SHARDS) // 4)
    assert four.kv_bytes_per_token == 32 * 2 * 128 * 2 * 2


def test_llama31_8b_fits_one_a10g_only_with_a_reduced_max_model_len():
    full = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=131072))
    a10g = cand(full, "g5.xlarge")
    assert not a10g.fits and "holds 0 of 1 sequences of 131,072 tokens (16.00 GiB each)" in a10g.reason
    assert 32_768 < a10g.max_len_at_concurrency < 36_864  # what one 24 GB A10G holds: ~33K tokens
    assert full.chosen.instance_type == "g6e.xlarge"  # one 48 GB L40S holds the full 128K context
    assert not cand(full, "g4dn.xlarge").fits  # 16 GB T4: 14.96 GiB of weights alone exceed 0.9 × 14.75 GiB
    assert "weights 14.96 GiB" in cand(full, "g4dn.xlarge").reason

    reduced = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192))
    assert cand(reduced, "g5.xlarge").fits
    assert reduced.chosen.instance_type == "g6.xlarge"  # the same 24 GB on an L4, cheaper than the A10G
    assert reduced.chosen.tensor_parallel_size == 1 and reduced.chosen.price_per_hour == 0.805
    assert "g5.xlarge" in [c.instance_type for c in reduced.alternatives]


def test_price_overrides_change_the_choice():
    cap = EcsGpuCapacity(instance_type="g6.xlarge", price_overrides={"g5.xlarge": 0.70})
    p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192), cap)
    assert p.chosen.instance_type == "g5.xlarge" and p.chosen.price_source == "override"
    assert p.configured.instance_type == "g6.xlarge" and p.configured.fits  # the block's instance_type, evaluated
    assert plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192), EcsGpuCapacity()).configured is None


def test_concurrency_asks_for_more_room():
    p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192, max_num_seqs=64), concurrency=16)
    assert p.chosen.sequences_fit >= 16 and p.chosen.instance_type == "g6e.xlarge"  # 16 × 1 GiB needs the L40S
    assert not cand(p, "g6.xlarge").fits
    with pytest.raises(PipelineInputError, match="max_num_seqs"):
        plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_num_seqs=8), concurrency=9)


# ------------------------------------------------------------------------------------------- Qwen2-7B (GQA)


def test_qwen2_7b_gqa():
    p = plan(QWEN2_7B, QWEN2_7B_BYTES, settings(max_model_len=32768))
    assert p.kv_bytes_per_token == 28 * 4 * 128 * 2 * 2 == 57_344  # 4 KV heads for 28 query heads: 1/7 of MHA
    assert p.shape.layer_windows == [None] * 28  # use_sliding_window false: every layer full attention
    assert round(p.weight_bytes / GiB, 2) == 14.19
    assert cand(p, "g6.xlarge").sequence_bytes == 32768 * 57_344  # 1.75 GiB per 32K sequence
    # 28 heads split over 1, 2 or 4 GPUs, not 8
    assert {c.tensor_parallel_size for c in p.candidates if c.instance_type == "p4d.24xlarge"} == {1, 2, 4}
    assert any("tensor_parallel_size 8 impossible" in n for n in p.notes)
    assert p.chosen.instance_type == "g6.xlarge"  # 24 GB: weights 14.19 GiB + a 32K sequence fit


# ------------------------------------------------------------------------------------------- Mistral-7B (SWA)


def test_mistral_sliding_window_caps_kv_per_sequence():
    p = plan(MISTRAL_7B_V01, MISTRAL_7B_BYTES, settings(max_model_len=32768))
    assert p.shape.layer_windows == [4096] * 32
    assert p.kv_bytes_per_token == 32 * 8 * 128 * 2 * 2 == 131_072
    l4 = cand(p, "g6.xlarge")
    assert l4.max_num_batched_tokens == 2048
    # each layer keeps at most window − 1 + batched tokens = 4095 + 2048 = 6143 tokens → 384 blocks, + 1 block
    per_sequence = 32 * (384 + 1) * BLOCK_TOKENS * (8 * 128 * 2 * 2)
    assert l4.sequence_bytes == per_sequence == 807_403_520  # 0.75 GiB instead of 4 GiB for 32K tokens
    assert l4.sequences_fit == l4.memory.kv_cache // per_sequence >= 5
    assert p.chosen.instance_type == "g6.xlarge"

    no_window = plan(MISTRAL_7B_V01, MISTRAL_7B_BYTES, settings(max_model_len=32768, extra_args=["--disable-sliding-window"]))
    whole = cand(no_window, "g6.xlarge")
    assert whole.sequence_bytes == 32768 * 131_072 == 4 * GiB  # every token kept: 4 GiB per 32K sequence
    assert whole.sequences_fit == whole.memory.kv_cache // (4 * GiB) == 1 and l4.sequences_fit >= 5


def test_mixed_sliding_layers():
    # Gemma-3 style layer_types (5 sliding : 1 full) and Qwen2 with use_sliding_window (layers >= max_window_layers)
    gemma = {**LLAMA_31_8B, "model_type": "gemma3_text", "num_hidden_layers": 6, "sliding_window": 1024,
             "layer_types": ["sliding_attention"] * 5 + ["full_attention"]}
    assert model_shape(gemma).layer_windows == [1024] * 5 + [None]
    qwen = {**QWEN2_7B, "use_sliding_window": True, "sliding_window": 4096, "max_window_layers": 20}
    assert model_shape(qwen).layer_windows == [None] * 20 + [4096] * 8
    p = plan(gemma, 10 * GiB, settings(max_model_len=8192))
    per_layer = 8 * 128 * 2 * 2
    full = 8192 // 16 * 16 * per_layer
    sliding = ((1024 - 1 + 2048) // 16 + 1 + 1) * 16 * per_layer  # cdiv(3071, 16) = 192, + 1
    assert cand(p, "g6.xlarge").sequence_bytes == full + 5 * sliding


# ------------------------------------------------------------------------------------------- Llama-3-70B


def test_llama3_70b_needs_several_gpus():
    p = plan(LLAMA_3_70B, LLAMA_3_70B_BYTES, settings(max_model_len=8192))
    assert p.kv_bytes_per_token == 80 * 8 * 128 * 2 * 2 == 327_680
    assert round(p.weight_bytes / GiB, 1) == 131.4  # 70.55 B params × 2 bytes
    # one 80 GB A100 is too small; two hold it (the reference notes: "70B | 2× A100-80GB")
    assert not cand(p, "p4de.24xlarge", 1).fits and cand(p, "p4de.24xlarge", 2).fits
    assert cand(p, "p4de.24xlarge", 2).kv_bytes_per_token == 80 * 4 * 128 * 2 * 2  # 4 of 8 KV heads per GPU
    # cheapest: 4× L40S at TP 4 (32.9 GiB of weights per 48 GB GPU)
    assert (p.chosen.instance_type, p.chosen.tensor_parallel_size) == ("g6e.12xlarge", 4)
    assert not cand(p, "g6.12xlarge", 4).fits and not cand(p, "g4dn.metal", 8).fits
    assert [c.price_per_hour for c in p.alternatives] == sorted(c.price_per_hour for c in p.alternatives)


def test_llama3_70b_in_fp8_fits_one_80gb_gpu():
    # notes: "70B ... With INT4 | 1× A100-80GB"; fp8 (8-bit linear layers, 16-bit embeddings) already does
    p = plan(LLAMA_3_70B, LLAMA_3_70B_BYTES, settings(max_model_len=4096, quantization="fp8"))
    embed = 128256 * 8192 * 2  # untied embedding + LM head stay bf16
    linear = LLAMA_3_70B_BYTES / 2 - embed
    assert p.served_weight_bytes == int(linear * 1 + embed * 2)  # ≈ 68 GiB
    assert cand(p, "p4de.24xlarge", 1).fits


def test_reference_notes_kv_table_is_for_full_multi_head_attention():
    # production-deployment-notes.txt, "Memory by Model Size": 7B → KV 2 GB at 4K, 16 GB at 32K.
    shape = model_shape(LLAMA_2_7B)
    assert (shape.num_kv_heads, shape.head_dim) == (32, 128)  # missing fields: MHA, hidden // heads
    p = plan(LLAMA_2_7B, llama_params(LLAMA_2_7B) * 2, settings(max_model_len=4096))
    assert p.kv_bytes_per_token == 32 * 32 * 128 * 2 * 2 == 524_288  # 0.5 MiB per token
    assert p.kv_bytes_per_token * 4096 == 2 * GiB and p.kv_bytes_per_token * 32768 == 16 * GiB
    # ...while a GQA 70B with 8 KV heads needs 1/8 of the notes' "10 GB at 4K" (which assumes 64 KV heads)
    assert 327_680 * 4096 == 80 * 64 * 128 * 2 * 2 * 4096 // 8
    # notes: "7B | 1× A10G" in fp16
    assert cand(p, "g5.xlarge").fits and not cand(p, "g4dn.xlarge").fits


def test_prequantized_awq_7b_fits_a_t4():
    # notes: "7B ... With INT4 | 1× T4". An AWQ checkpoint is served as stored.
    awq = {**LLAMA_2_7B, "quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}}
    p = plan(awq, 3_889_394_552, settings(max_model_len=4096, quantization="awq"))
    assert p.served_weight_bytes == 3_889_394_552
    assert p.chosen.instance_type == "g4dn.xlarge"
    with pytest.raises(PipelineInputError, match="needs a checkpoint quantized with awq"):
        plan(LLAMA_2_7B, llama_params(LLAMA_2_7B) * 2, settings(quantization="awq"))


# ------------------------------------------------------------------------------------------- SmolLM2 (default)


def test_smollm2_default_model_default_settings():
    p = plan(SMOLLM2_135M, SMOLLM2_BYTES, settings(), EcsGpuCapacity())
    assert p.kv_bytes_per_token == 30 * 3 * 64 * 2 * 2 == 23_040
    assert p.served_weight_bytes == SMOLLM2_BYTES and round(SMOLLM2_BYTES / GiB, 3) == 0.251
    # 9 heads / 3 KV heads: no tensor parallelism
    assert {c.tensor_parallel_size for c in p.candidates} == {1}
    # dtype auto on a T4 (no bf16) runs float16: same bytes, and the cheapest GPU wins
    assert p.chosen.instance_type == "g4dn.xlarge" and p.chosen.dtype == "float16"
    assert p.chosen.sequence_bytes == 2048 * 23_040
    assert p.chosen.sequences_fit > p.settings.max_num_seqs  # far more than vLLM will run at once
    assert p.configured is None  # the default block leaves the choice to the planner


def test_explicit_bfloat16_rules_out_the_t4():
    p = plan(SMOLLM2_135M, SMOLLM2_BYTES, settings(dtype="bfloat16"))
    assert "T4 has no bfloat16" in cand(p, "g4dn.xlarge").reason
    assert p.chosen.instance_type == "g6.xlarge"


# ------------------------------------------------------------------------------------------- settings


# ------------------------------------------------------------------------------------------- vLLM's profile run


QWEN3_30B_A3B = {  # MoE: 128 experts, 8 per token, expert MLP width 768
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "num_hidden_layers": 48, "hidden_size": 2048,
    "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
    "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8, "vocab_size": 151936,
    "max_position_embeddings": 40960, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}
QWEN3_30B_A3B_BYTES = 30_532_122_624 * 2


def test_without_chunked_prefill_the_whole_prompt_is_one_batch():
    # vllm#10517: Llama-3.1-8B on an RTX 3090, no chunked prefill, logs a PyTorch activation peak of 2.07 GiB at
    # max_model_len 20,000 and 2.99 GiB at 29,000 (peak_torch_memory 17.06 / 17.98 GiB − 14.99 GiB of weights)
    for length, logged in ((20000, 2.07), (29000, 2.99)):
        p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=length, max_num_seqs=256,
                                                                 enable_chunked_prefill=False))
        c = cand(p, "g5.xlarge")
        assert c.max_num_batched_tokens == length and c.memory.activation == c.memory.forward
        assert abs(c.memory.activation / GiB - logged) < 0.05
    chunked = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=20000))
    assert cand(chunked, "g5.xlarge").max_num_batched_tokens == 2048 and cand(chunked, "p5.48xlarge").max_num_batched_tokens == 8192
    tiny = plan(SMOLLM2_135M, SMOLLM2_BYTES, settings(max_model_len=512, max_num_seqs=2))
    assert cand(tiny, "g5.xlarge").max_num_batched_tokens == 1024  # never more than max_num_seqs × max_model_len


def test_the_sampler_step_dominates_with_many_sequences():
    # llm-d-benchmark's H100 logs: 4.76 GiB peak for Llama-3.1-8B and 5.56 GiB for Qwen3-0.6B at max_num_seqs 1024
    p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=16000, max_num_seqs=1024))
    m = cand(p, "p5.48xlarge").memory
    assert m.sampler == 1024 * 128256 * 38 and m.activation == m.sampler > m.forward
    assert abs(m.sampler / GiB - 4.76) < 0.15
    few = cand(plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=16000, max_num_seqs=32)), "p5.48xlarge")
    assert few.memory.activation == few.memory.forward  # at this project's max_num_seqs the forward pass is the peak
    assert few.memory.kv_cache - m.kv_cache == m.sampler - few.memory.forward + (m.cuda_graphs - few.memory.cuda_graphs)


def test_moe_workspaces_are_kept_by_the_pinned_vllm():
    shape = model_shape(QWEN3_30B_A3B)
    assert (shape.num_experts, shape.experts_per_token, shape.moe_intermediate_size, shape.intermediate_size) == (128, 8, 768, 6144)
    p = plan(QWEN3_30B_A3B, QWEN3_30B_A3B_BYTES, settings(max_model_len=32768))
    four = cand(p, "g6e.12xlarge", 4)
    width = max(2 * 768 // 4, 2048)  # gate_up per expert on one GPU vs hidden
    assert four.memory.moe_workspaces == 2 * 2048 * 8 * width * 2  # kept between steps in 0.32: not transient
    assert four.memory.forward == 2048 * 3 * 2048 * 2  # what is left transient: residual, norm, output
    assert "| MoE workspaces |" in render_markdown(p)
    # vLLM 0.8.5 (the calibration's MoE log) allocated them per call: inside the transient forward peak instead
    old = evaluate(shape, QWEN3_30B_A3B_BYTES, plan_settings(settings(max_model_len=32768), 1), gpu_instances_by("g6e.12xlarge"),
                   4, 1.0, accounting=accounting_for("0.8.5"))
    assert old.memory.moe_workspaces == 0 and old.memory.forward == 2048 * (3 * 2048 + 2 * 8 * width) * 2


def gpu_instances_by(name: str) -> GpuInstance:
    from blocks.catalogue import gpu_instances
    return gpu_instances()[name]


def test_cuda_graphs_come_out_of_the_budget_from_vllm_021():
    s = plan_settings(settings(max_model_len=8192, max_num_seqs=256), 1)
    shape, inst = model_shape(LLAMA_31_8B), gpu_instances_by("p5.48xlarge")
    pinned = evaluate(shape, sum(LLAMA_31_8B_SHARDS), s, inst, 1, 1.0)
    before = evaluate(shape, sum(LLAMA_31_8B_SHARDS), s, inst, 1, 1.0, accounting=accounting_for("0.11.0"))
    assert before.memory.cuda_graphs == 0 and before.memory.kv_cache - pinned.memory.kv_cache == pinned.memory.cuda_graphs
    # vLLM 0.32's sizes at max_num_seqs 256: "PIECEWISE=51 (largest=512), FULL=35 (largest=256)" in its logs
    assert (len(capture_sizes(512)), len(capture_sizes(256))) == (51, 35)
    assert pinned.memory.cuda_graphs == int(0.1 * GiB + (51 * 33 + 35) * 0.4 * (1 << 20))  # 0.78 GiB
    eager = evaluate(shape, sum(LLAMA_31_8B_SHARDS), plan_settings(settings(max_model_len=8192, enforce_eager=True), 1),
                     inst, 1, 1.0)
    assert eager.memory.cuda_graphs == 0
    assert accounting_for("0.21.0").cudagraphs_in_budget and not accounting_for("0.20.2").cudagraphs_in_budget


def test_gpu_memory_is_what_cuda_reports():
    assert cuda_visible_gib(gpu_instances_by("g4dn.xlarge")) == 14.74  # T4: "total_gpu_memory (14.74GiB)"
    assert cuda_visible_gib(gpu_instances_by("p5.48xlarge")) == 79.10
    b200 = GpuInstance(name="x", gpu="B200", gpus=8, gpu_memory_gib=180, vcpus=1, memory_gib=1, price_per_hour=1.0)
    # not in the table: 180 decimal GB → 167.64 GiB × 0.985, not the old 92 % of 180
    assert cuda_visible_gib(b200) == round(180e9 / GiB * 0.985, 2) == 165.12
    c = evaluate(model_shape(LLAMA_31_8B), sum(LLAMA_31_8B_SHARDS), plan_settings(settings(), 1), b200, 1, 1.0)
    assert c.max_num_batched_tokens == 16384  # vLLM's default on GPUs with >= 160 GiB
    measured = evaluate(model_shape(LLAMA_31_8B), sum(LLAMA_31_8B_SHARDS), plan_settings(settings(), 1), b200, 1, 1.0,
                        visible_gib=178.36)
    assert measured.memory.gpu_memory == int(178.36 * GiB)


def test_breakdown_in_the_artifact_adds_up_to_the_budget():
    for p in (plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192, enable_lora=True)),
              plan(QWEN3_30B_A3B, QWEN3_30B_A3B_BYTES, settings(max_model_len=32768)),
              plan(QWEN25_VL_7B, QWEN25_VL_7B_BYTES, settings(max_model_len=4096))):
        md = render_markdown(p)
        section = md.split("## Memory per GPU")[1].split("## Candidates")[0]
        rows = {r.split("|")[1].strip().strip("*"): r for r in section.splitlines() if r.startswith("| ")}
        value = {k: float(r.split("|")[2].strip().strip("*")) for k, r in rows.items() if k not in ("item", "---")}
        terms = ["weights", "MoE workspaces", "activation peak", "multimodal encoder", "non-torch memory", "CUDA graphs",
                 "LoRA buffers", "safety margin", "KV cache"]
        assert abs(sum(value.get(t, 0.0) for t in terms) - value["budget"]) <= 0.05
        for t in terms:
            if t in rows:
                assert len(rows[t].split("|")[3].strip()) > 10  # every term says where it comes from


def test_fp8_kv_cache_and_float32_and_lora():
    base = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192))
    fp8 = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192, extra_args=["--kv-cache-dtype", "fp8"]))
    assert fp8.kv_bytes_per_token == base.kv_bytes_per_token // 2 == 32 * 8 * 128 * 2 * 1
    assert cand(fp8, "g5.xlarge").sequences_fit == cand(fp8, "g5.xlarge").memory.kv_cache // (GiB // 2)
    fp32 = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(dtype="float32", max_model_len=8192))
    assert fp32.served_weight_bytes == sum(LLAMA_31_8B_SHARDS) * 2 and fp32.kv_bytes_per_token == 2 * base.kv_bytes_per_token
    lora = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS),
                settings(max_model_len=8192, enable_lora=True, max_lora_rank=16, max_loras=4))
    # per layer Σ(in + out) over q, k, v, o, gate, up, down
    per_layer = (4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 2 * (4096 + 14336) + (14336 + 4096)
    assert cand(lora, "g5.xlarge").memory.lora == 4 * 16 * 32 * per_layer * 2  # ≈ 0.31 GiB
    eager = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192, enforce_eager=True))
    assert cand(eager, "g5.xlarge").memory.cuda_graphs == 0 < cand(base, "g5.xlarge").memory.cuda_graphs


QWEN25_VL_7B = {  # Qwen/Qwen2.5-VL-7B-Instruct config.json (fields that decide memory)
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "num_hidden_layers": 28,
    "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "intermediate_size": 18944,
    "vocab_size": 152064, "max_position_embeddings": 128000, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "sliding_window": 32768, "use_sliding_window": False, "max_window_layers": 28,
    "vision_config": {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "patch_size": 14,
                      "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112, "out_hidden_size": 3584,
                      "fullatt_block_indexes": [7, 15, 23, 31]},
}
QWEN25_VL_7B_BYTES = 16_584_333_312


def test_vision_encoder_profile_term():
    from tasks.capacity.memory import ENCODER_ALLOWANCE_GIB, encoder_profile, max_image_tokens, plan_settings

    shape = model_shape(QWEN25_VL_7B)
    v = shape.vision
    assert v is not None and v.modelled and model_shape(LLAMA_31_8B).vision is None
    # max_pixels 12,845,056 / (14 × 2)² = 16,384 merged tokens = 65,536 patches: vLLM's "budget of 16384 tokens"
    assert max_image_tokens(v) == 16384
    s = plan_settings(VllmServerSettings(max_model_len=4096, max_num_seqs=32), 1)
    e = encoder_profile(v, s, 2048, 2, 1)
    assert (e.items, e.patches) == (1, 65536)
    # per patch: max(attention 3H + 8H, MLP 3H + 3I) = max(14,080, 14,100) elements + 1,176 pixel values, in bf16
    assert e.peak == 65536 * (3 * 1280 + 3 * 3420 + 3 * 2 * 14 * 14) * 2  # 1.87 GiB
    assert e.output == 16384 * 3584 * 2
    # TP 2 splits the heads and the MLP: the peak falls below the single-GPU one
    assert encoder_profile(v, s, 2048, 2, 2).peak < e.peak
    # in the plan: a text config has no encoder term, the VL config one that lifts the profile peak to the tower's
    vl = cand(plan(QWEN25_VL_7B, QWEN25_VL_7B_BYTES, settings(max_model_len=4096)), "g6.xlarge")
    text = cand(plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=4096)), "g6.xlarge")
    assert text.memory.encoder == 0 and text.memory.encoder_detail == ""
    assert vl.memory.encoder == e.peak - vl.memory.activation > 0.4 * GiB
    assert "16,384-token image" in vl.memory.encoder_detail
    # a vision tower the planner has no formula for: the stated allowance, and the breakdown says so
    pixtral = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "torch_dtype": "bfloat16",
               "text_config": {**MISTRAL_7B_V01, "sliding_window": None, "torch_dtype": None},
               "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24}}
    other = cand(plan(pixtral, 15_000_000_000, settings(max_model_len=4096)), "g6.xlarge")
    assert other.memory.encoder == int(ENCODER_ALLOWANCE_GIB * GiB) and "not modelled" in other.memory.encoder_detail
    skipped = cand(plan(QWEN25_VL_7B, QWEN25_VL_7B_BYTES, settings(max_model_len=4096,
                                                                   extra_args=["--skip-mm-profiling"])), "g6.xlarge")
    assert skipped.memory.encoder == 0


def test_multimodal_text_config_is_read():
    vlm = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3", "torch_dtype": "bfloat16",
           "text_config": {**MISTRAL_7B_V01, "sliding_window": None, "torch_dtype": None},
           "vision_config": {"hidden_size": 1024, "num_hidden_layers": 24}}
    shape = model_shape(vlm)
    assert (shape.num_layers, shape.num_kv_heads, shape.head_dim, shape.checkpoint_dtype) == (32, 8, 128, "bfloat16")
    assert shape.architecture == "Mistral3ForConditionalGeneration" and shape.sliding_layers == 0


# ------------------------------------------------------------------------------------------- refusals


def test_refusal_names_what_to_change():
    too_long = plan(LLAMA_3_70B, LLAMA_3_70B_BYTES, settings(max_model_len=32768))
    assert too_long.chosen is None and "lower max_model_len to <= 8,192" in too_long.refusal

    crowd = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=131072, max_num_seqs=256), concurrency=256)
    assert crowd.chosen is None
    assert "lower max_model_len to <= " in crowd.refusal and "lower concurrency to <= " in crowd.refusal
    assert "quantization='fp8'" in crowd.refusal and "--kv-cache-dtype fp8" in crowd.refusal
    assert "\n" not in crowd.refusal

    huge = {**LLAMA_3_70B, "num_hidden_layers": 126, "hidden_size": 16384, "num_attention_heads": 128,
            "intermediate_size": 53248}  # a Llama-3.1-405B shape: 810 GB of bf16 weights
    refused = plan(huge, 405_000_000_000 * 2, settings(max_model_len=4096))
    assert refused.chosen is None and "the weights alone do not fit" in refused.refusal
    assert "quantize" in refused.refusal and "more GPUs" in refused.refusal


def test_input_errors():
    with pytest.raises(PipelineInputError, match="num_hidden_layers"):
        plan({"model_type": "bert"}, 1000, settings())
    with pytest.raises(PipelineInputError, match="not in the catalogue"):
        plan(SMOLLM2_135M, SMOLLM2_BYTES, settings(), instance_types=["x9.huge"])
    only = plan(SMOLLM2_135M, SMOLLM2_BYTES, settings(), instance_types=["g5.xlarge", "g6e.xlarge"])
    assert {c.instance_type for c in only.candidates} == {"g5.xlarge", "g6e.xlarge"}


def test_weight_bytes_from_manifest():
    files = [("model-00001-of-00002.safetensors", 5), ("model-00002-of-00002.safetensors", 7),
             ("consolidated.safetensors", 12), ("original/consolidated.00.pth", 12), ("config.json", 1),
             ("tokenizer.json", 3)]
    manifest = Manifest(repo_id="a/b", revision="main", sha="0" * 40, staged_at="t", source_endpoint="e",
                        files=[ManifestFile(path=p, size=s, sha256="x") for p, s in files])
    assert weight_bytes_from_manifest(manifest) == 12  # the HF shards; consolidated duplicate and original/ skipped
    manifest.files = [f for f in manifest.files if not f.path.startswith("model-")]
    assert weight_bytes_from_manifest(manifest) == 12  # only consolidated: that is the model
    manifest.files = [ManifestFile(path="config.json", size=1, sha256="x")]
    with pytest.raises(PipelineInputError, match="no \\*.safetensors"):
        weight_bytes_from_manifest(manifest)


def test_markdown_report():
    p = plan(LLAMA_31_8B, sum(LLAMA_31_8B_SHARDS), settings(max_model_len=8192))
    md = render_markdown(p)
    assert "**Choose `g6.xlarge`" in md and "| **KV cache** |" in md and "| weights | 14.96 |" in md
    rows = [line for line in md.splitlines() if line.startswith("| ") and "`" in line.split("|")[2]]
    prices = [float(r.split("|")[5]) for r in rows]
    assert prices == sorted(prices) and len(rows) == len(by_hardware(p.candidates))
    assert "**chosen**" in rows[1] and rows[0].endswith("|") and "no: weights" in rows[0]  # the T4 row comes first
    refused = render_markdown(plan(LLAMA_3_70B, LLAMA_3_70B_BYTES, settings(max_model_len=32768)))
    assert "**Nothing fits.**" in refused and "lower max_model_len" in refused


# ------------------------------------------------------------------------------------------- the flow


@pytest.mark.integration
def test_plan_capacity_flow_end_to_end(bucket):
    import json

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from blocks.model_store import ModelStore
    from flows.plan import artifact_key, plan_capacity
    from tasks.core.aws import aws_client
    from tasks.core.s3 import model_prefix, write_manifest

    store = ModelStore(bucket_name=bucket)
    store.save(f"{bucket}-store", overwrite=True)
    repo, sha = "HuggingFaceTB/SmolLM2-135M-Instruct", "a" * 40
    prefix = model_prefix(store, repo, sha)
    s3 = aws_client("s3")
    s3.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=json.dumps(SMOLLM2_135M).encode())
    write_manifest(s3, bucket, prefix, Manifest(
        repo_id=repo, revision="main", sha=sha, staged_at="2025-01-01T00:00:00+00:00", source_endpoint="http://hub",
        files=[ManifestFile(path="model.safetensors", size=SMOLLM2_BYTES, sha256="0" * 64),
               ManifestFile(path="config.json", size=900, sha256="1" * 64)],
    ))

    result = plan_capacity(repo_id=repo, model_store_block=f"{bucket}-store")
    assert result.chosen.instance_type == "g4dn.xlarge" and result.weight_bytes == SMOLLM2_BYTES
    assert result.model == f"{repo}@{sha[:12]}"
    key = artifact_key(repo)
    assert key == "capacity-plan-huggingfacetb-smollm2-135m-instruct"
    with get_client(sync_client=True) as client:
        arts = client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert arts and "| **KV cache** |" in arts[0].data and "g4dn.xlarge" in arts[0].data

    with pytest.raises(PipelineInputError, match="lower max_model_len to <= 8,192"):
        plan_capacity(model_uri=f"s3://{bucket}/{prefix}", model_store_block=f"{bucket}-store", max_model_len=65536)
