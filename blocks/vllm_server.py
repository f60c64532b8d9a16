"""How the vLLM OpenAI server runs: the settings turned into its command-line flags.

The same flags serve the local target (a process) and the ECS task definition, so a
setting means the same thing everywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr, field_validator

from blocks.model_source import check_served_name

# vLLM 0.32's registered tool-call parsers (ToolParserManager.list_registered()).
TOOL_CALL_PARSERS = frozenset(
    {
        "apertus", "cohere_command3", "cohere_command4", "deepseek_v3", "deepseek_v31", "deepseek_v32",
        "deepseek_v4", "deepseek_v41", "dots", "ernie45", "functiongemma", "gemma4", "gigachat3",
        "glm45", "glm47", "granite", "granite-20b-fc", "granite4", "hermes", "hf", "hunyuan_a13b",
        "hy_v3", "hy_v4", "inkling", "internlm", "jamba", "k2_horizon", "kimi_k2", "kimi_k3", "lfm2",
        "ling3", "llama3_json", "llama4_json", "llama4_pythonic", "longcat", "mimo", "minicpm5",
        "minimax_m2", "minimax_m3", "mistral", "muse_glimmer", "olmo3", "openai", "phi4_mini_json",
        "plamo3", "poolside_v1", "pythonic", "qwen3_coder", "qwen3_json", "qwen3_xml", "seed_oss",
        "step3", "step3p5", "xlam",
    }
)
TOOL_STRICT_LEVELS = frozenset({"auto", "function", "parameter"})  # vLLM ToolStrictLevel
DTYPES = frozenset({"auto", "half", "float16", "bfloat16", "float", "float32"})
QUANTIZATIONS = frozenset(
    {"awq", "awq_marlin", "gptq", "gptq_marlin", "fp8", "bitsandbytes", "gguf", "compressed-tensors", "marlin", "modelopt", "mxfp4"}
)
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)
# Flags the settings own: passing them through extra_args would fight the typed fields
# (or, for the API key, leak a secret into a process list and a task definition).
_OWNED_FLAGS = {
    "--api-key", "--model", "--served-model-name", "--host", "--port", "--max-model-len",
    "--gpu-memory-utilization", "--tensor-parallel-size", "--dtype", "--max-num-seqs",
    "--tool-call-parser", "--chat-template", "--enable-lora", "--lora-modules", "--quantization",
    "--tool-strict-level", "--enable-auto-tool-choice", "--enforce-eager", "--max-lora-rank", "--max-loras",
    "--enable-chunked-prefill", "--no-enable-chunked-prefill", "--enable-prefix-caching",
    "--no-enable-prefix-caching", "-tp", "-q", "--load-format",
}


class VllmServerSettings(Block):
    """vLLM OpenAI-server settings; defaults run the embedded default model on a CPU."""

    _block_type_name = "vLLM Server Settings"
    _block_type_slug = "vllm-server-settings"
    _description = "Flags for the vLLM OpenAI server, shared by the local and ECS targets."

    served_model_name: str = Field(default="smollm2-135m-instruct")
    port: int = Field(default=8000, ge=1, le=65535)
    max_model_len: int = Field(default=2048, ge=16, le=10_000_000)
    gpu_memory_utilization: float = Field(default=0.9, description="Fraction of GPU memory vLLM may use, in (0, 1].")
    tensor_parallel_size: int = Field(default=1, description="GPUs one model replica spans.")
    dtype: str = Field(default="auto")
    max_num_seqs: int = Field(default=32, ge=1, le=4096)
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    enforce_eager: bool = Field(default=False, description="Skip CUDA-graph/torch.compile warm-up: faster start, slower decode.")
    tool_call_parser: str | None = Field(default="hermes", description="vLLM tool-call parser; None disables tool calling.")
    tool_strict_level: str | None = Field(
        default="parameter", description="'parameter' holds tool-call arguments to the JSON schema (xgrammar)."
    )
    chat_template: str | None = Field(default=None, description="Path of a Jinja chat template; None uses the model's own.")
    quantization: str | None = None
    enable_lora: bool = Field(default=False, description="Serve LoRA adapters (the ModelSource block lists them).")
    max_lora_rank: int = Field(default=16, description="Largest adapter rank the server accepts; vLLM reserves memory for it.")
    max_loras: int = Field(default=4, ge=1, le=256)
    extra_args: list[str] = Field(default_factory=list, description="Further vLLM flags, passed as given.")
    api_key: SecretStr | None = Field(default=None, description="Bearer key clients must send; never logged.")
    cpu_kv_cache_gib: int = Field(default=2, ge=1, description="VLLM_CPU_KVCACHE_SPACE for CPU (local) runs.")
    load_format: Literal["auto", "runai_streamer"] = Field(
        default="auto",
        description="'auto': the entrypoint downloads the model into the (host) cache, verifying every sha256, then "
                    "vLLM loads it from disk. 'runai_streamer': vLLM streams the safetensors straight from S3 with the "
                    "Run:ai Model Streamer after the entrypoint checked each object's size and recorded sha256 against "
                    "the manifest (the streamed bytes are not hashed; no host cache): docs/deploy-local.md#load-straight-from-s3.")

    @field_validator("gpu_memory_utilization")
    @classmethod
    def _gmu(cls, value: float) -> float:
        if not 0 < value <= 1:
            raise ValueError(f"must be in (0, 1], got {value}")
        return value

    @field_validator("tensor_parallel_size")
    @classmethod
    def _tp(cls, value: int) -> int:
        if value < 1:
            raise ValueError(f"must be >= 1, got {value}")
        return value

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, value: str) -> str:
        if value not in DTYPES:
            raise ValueError(f"{value!r} is not one of {sorted(DTYPES)}")
        return value

    @field_validator("tool_call_parser")
    @classmethod
    def _parser(cls, value: str | None) -> str | None:
        if value is not None and value not in TOOL_CALL_PARSERS:
            raise ValueError(f"unknown tool-call parser {value!r}; vLLM knows {sorted(TOOL_CALL_PARSERS)}")
        return value

    @field_validator("tool_strict_level")
    @classmethod
    def _strict(cls, value: str | None) -> str | None:
        if value is not None and value not in TOOL_STRICT_LEVELS:
            raise ValueError(f"{value!r} is not one of {sorted(TOOL_STRICT_LEVELS)}")
        return value

    @field_validator("quantization")
    @classmethod
    def _quant(cls, value: str | None) -> str | None:
        if value is not None and value not in QUANTIZATIONS:
            raise ValueError(f"unknown quantization {value!r}; one of {sorted(QUANTIZATIONS)}")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _rank(cls, value: int) -> int:
        if value not in LORA_RANKS:
            raise ValueError(f"must be one of {LORA_RANKS}, got {value}")
        return value

    @field_validator("served_model_name")
    @classmethod
    def _served(cls, value: str) -> str:
        return check_served_name(value)

    @field_validator("extra_args")
    @classmethod
    def _extra(cls, value: list[str]) -> list[str]:
        for arg in value:
            flag = arg.split("=", 1)[0]
            if flag.startswith("--"):
                flag = "--" + flag[2:].replace("_", "-")  # vLLM's parser treats _ and - alike
            if flag in _OWNED_FLAGS:
                raise ValueError(f"{flag} is set by its own field, not through extra_args")
        return value

    def server_args(
        self, model_path: str | Path = "{model}", host: str = "0.0.0.0", port: int | None = None,
    ) -> list[str]:
        """The vLLM OpenAI server's flags. The API key is not among them: it goes through the
        environment (VLLM_API_KEY), never a command line. `{model}` is left for the image's
        entrypoint to replace with the fetched model's path; it also adds `--lora-modules` for the
        adapters it fetched (images/vllm/entrypoint.py)."""
        args = [
            "--model", str(model_path),
            "--served-model-name", self.served_model_name,
            "--host", host,
            "--port", str(port or self.port),
            "--max-model-len", str(self.max_model_len),
            "--max-num-seqs", str(self.max_num_seqs),
            "--dtype", self.dtype,
            "--gpu-memory-utilization", str(self.gpu_memory_utilization),
            "--tensor-parallel-size", str(self.tensor_parallel_size),
        ]
        args.append("--enable-chunked-prefill" if self.enable_chunked_prefill else "--no-enable-chunked-prefill")
        args.append("--enable-prefix-caching" if self.enable_prefix_caching else "--no-enable-prefix-caching")
        if self.enforce_eager:
            args.append("--enforce-eager")
        if self.tool_call_parser:
            args += ["--enable-auto-tool-choice", "--tool-call-parser", self.tool_call_parser]
            if self.tool_strict_level:
                args += ["--tool-strict-level", self.tool_strict_level]
        if self.chat_template:
            args += ["--chat-template", self.chat_template]
        if self.quantization:
            args += ["--quantization", self.quantization]
        if self.enable_lora:
            args += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--max-loras", str(self.max_loras)]
        return args + list(self.extra_args)
