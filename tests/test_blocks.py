"""Unit tests for the Prefect blocks in `blocks/`: defaults, validation rules, vLLM flags, discovery.

Pure and offline: nothing here talks to AWS, the Hugging Face Hub or a Prefect API.
"""

from __future__ import annotations

import inspect

import pydantic
import pytest
from prefect.blocks.core import Block
from prefect.utilities.importtools import load_module
from prefect_aws import AwsCredentials, S3Bucket

from blocks import EcsGpuCapacity, LoraAdapter, ModelSource, ModelStore, VllmServerSettings
from blocks.catalogue import GpuInstance, gpu_instances
from blocks.vllm_server import (
    DTYPES,
    LORA_RANKS,
    QUANTIZATIONS,
    TOOL_CALL_PARSERS,
    TOOL_STRICT_LEVELS,
)


def assert_refused(cls, field: str, **kwargs) -> pydantic.ValidationError:
    """Constructing `cls(**kwargs)` fails validation, and the error names `field`."""
    with pytest.raises(pydantic.ValidationError) as excinfo:
        cls(**kwargs)
    assert field in str(excinfo.value), str(excinfo.value)
    return excinfo.value


# --------------------------------------------------------------------------- catalogue


def test_catalogue_loads_typed_gpu_instances():
    catalogue = gpu_instances()
    assert catalogue, "gpu_instances.yaml is empty"
    for name, spec in catalogue.items():
        assert isinstance(spec, GpuInstance)
        assert spec.name == name
        assert spec.gpus >= 1 and spec.gpu_memory_gib >= 1 and spec.price_per_hour > 0
    assert {"g5.xlarge", "g6.xlarge", "p5.48xlarge"} <= set(catalogue)
    # Only GPU families: no general-purpose/burstable types sneak into the catalogue.
    assert not {n for n in catalogue if n.split(".")[0] in {"m5", "t3", "c5", "r5"}}


# --------------------------------------------------------------------------- defaults


def test_model_source_defaults_are_valid():
    source = ModelSource()
    assert source.repo_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert source.revision == "main"
    assert source.allow_patterns and all(p.strip() for p in source.allow_patterns)
    assert "*.safetensors" in source.allow_patterns
    assert source.token is None
    # The defaults survive a round trip through validation.
    assert ModelSource.model_validate(source.model_dump()).repo_id == source.repo_id


def test_model_source_default_lists_are_not_shared():
    a, b = ModelSource(), ModelSource()
    a.allow_patterns.append("*.py")
    assert "*.py" not in b.allow_patterns


def test_model_store_defaults_are_valid():
    store = ModelStore()
    assert store.bucket_name == "vllm-pipeline-models"
    assert store.bucket_folder == "models"
    assert isinstance(store.credentials, AwsCredentials)
    # The serialised block (what Prefect saves) validates back.
    again = ModelStore.model_validate(store.model_dump())
    assert again.bucket_name == store.bucket_name
    assert isinstance(again.credentials, AwsCredentials)


def test_vllm_server_settings_defaults_are_valid():
    settings = VllmServerSettings()
    assert 0 < settings.gpu_memory_utilization <= 1
    assert settings.tensor_parallel_size >= 1
    assert settings.dtype in DTYPES
    assert settings.tool_call_parser in TOOL_CALL_PARSERS
    assert settings.tool_strict_level in TOOL_STRICT_LEVELS
    assert settings.quantization is None
    assert settings.max_lora_rank in LORA_RANKS
    assert settings.enable_lora is False and ModelSource().adapters == []
    assert settings.extra_args == []
    assert settings.api_key is None


def test_ecs_gpu_capacity_defaults_are_valid():
    capacity = EcsGpuCapacity()
    assert capacity.instance_type is None  # the planner chooses
    assert capacity.region == "us-east-1"
    assert capacity.min_capacity <= capacity.max_capacity
    assert capacity.on_demand_base <= capacity.max_capacity
    assert capacity.subnets == [] and capacity.vpc_id is None and capacity.cluster is None
    assert capacity.ingress_cidrs == []  # the VPC's own CIDR
    assert capacity.price_overrides == {}


# --------------------------------------------------------------------------- VllmServerSettings rules


@pytest.mark.parametrize("value", [1.0, 0.5, 0.01])
def test_gpu_memory_utilization_good(value):
    assert VllmServerSettings(gpu_memory_utilization=value).gpu_memory_utilization == value


@pytest.mark.parametrize("value", [0, -0.1, 1.01, float("nan")])
def test_gpu_memory_utilization_bad(value):
    assert_refused(VllmServerSettings, "gpu_memory_utilization", gpu_memory_utilization=value)


@pytest.mark.parametrize("value", [1, 2, 8])
def test_tensor_parallel_size_good(value):
    assert VllmServerSettings(tensor_parallel_size=value).tensor_parallel_size == value


@pytest.mark.parametrize("value", [0, -1])
def test_tensor_parallel_size_bad(value):
    assert_refused(VllmServerSettings, "tensor_parallel_size", tensor_parallel_size=value)


@pytest.mark.parametrize("value", sorted(DTYPES))
def test_dtype_good(value):
    assert VllmServerSettings(dtype=value).dtype == value


@pytest.mark.parametrize("value", ["fp16", "int8", "BFLOAT16", ""])
def test_dtype_bad(value):
    assert_refused(VllmServerSettings, "dtype", dtype=value)


@pytest.mark.parametrize("value", ["hermes", "llama3_json", "mistral", "granite-20b-fc", None])
def test_tool_call_parser_good(value):
    assert VllmServerSettings(tool_call_parser=value).tool_call_parser == value


@pytest.mark.parametrize("value", ["hermes2", "llama3", "HERMES", ""])
def test_tool_call_parser_bad(value):
    assert_refused(VllmServerSettings, "tool_call_parser", tool_call_parser=value)


@pytest.mark.parametrize("value", ["auto", "function", "parameter", None])
def test_tool_strict_level_good(value):
    assert VllmServerSettings(tool_strict_level=value).tool_strict_level == value


@pytest.mark.parametrize("value", ["strict", "Parameter", ""])
def test_tool_strict_level_bad(value):
    assert_refused(VllmServerSettings, "tool_strict_level", tool_strict_level=value)


@pytest.mark.parametrize("value", ["awq", "gptq", "fp8", "compressed-tensors", None])
def test_quantization_good(value):
    assert value is None or value in QUANTIZATIONS
    assert VllmServerSettings(quantization=value).quantization == value


@pytest.mark.parametrize("value", ["int4", "AWQ", "q4_k_m", ""])
def test_quantization_bad(value):
    assert_refused(VllmServerSettings, "quantization", quantization=value)


@pytest.mark.parametrize("value", list(LORA_RANKS))
def test_max_lora_rank_good(value):
    assert VllmServerSettings(max_lora_rank=value).max_lora_rank == value


@pytest.mark.parametrize("value", [0, 4, 15, 24, 100, 1024])
def test_max_lora_rank_bad(value):
    assert_refused(VllmServerSettings, "max_lora_rank", max_lora_rank=value)


@pytest.mark.parametrize("value", ["my-model", "org/model:v1", "Qwen2.5-7B", "a"])
def test_served_model_name_good(value):
    assert VllmServerSettings(served_model_name=value).served_model_name == value


@pytest.mark.parametrize("value", ["", "-leading-dash", "has space", "semi;colon", "x" * 129, "/abs"])
def test_served_model_name_bad(value):
    assert_refused(VllmServerSettings, "served_model_name", served_model_name=value)


@pytest.mark.parametrize(
    "value",
    [
        [],
        ["--disable-log-requests"],
        ["--kv-cache-dtype", "fp8"],
        ["--swap-space=4"],
    ],
)
def test_extra_args_good(value):
    assert VllmServerSettings(extra_args=value).extra_args == value


@pytest.mark.parametrize(
    "value",
    [
        ["--api-key", "sk-x"],
        ["--api-key=sk-x"],
        ["--model=x"],
        ["--model", "x"],
        ["--served-model-name=foo"],
        ["--port=9000"],
        ["--disable-log-requests", "--gpu-memory-utilization=0.5"],
        ["--enable-lora"],
        ["--quantization", "awq"],
    ],
)
def test_extra_args_owned_flag_refused(value):
    assert_refused(VllmServerSettings, "extra_args", extra_args=value)


def test_model_source_adapters_good():
    source = ModelSource(
        adapters=[LoraAdapter(name="sql", source="org/sql-lora"), {"name": "chat", "source": "s3://b/k/", "revision": "v1"}],
    )
    assert [a.name for a in source.adapters] == ["sql", "chat"]
    assert source.adapters[1].source == "s3://b/k" and source.adapters[1].is_s3 and not source.adapters[0].is_s3


def test_model_source_adapters_duplicate_names_refused():
    assert_refused(ModelSource, "adapters", adapters=[{"name": "sql", "source": "org/a"}, {"name": "sql", "source": "org/b"}])


@pytest.mark.parametrize("value", ["s3://", "s3://bucket", "s3://bucket/", "not a repo", "../x", "s3://b/k\x01x"])
def test_lora_adapter_source_bad(value):
    assert_refused(LoraAdapter, "source", name="a", source=value)


@pytest.mark.parametrize("value", ["", "bad name", "-x"])
def test_lora_adapter_name_bad(value):
    assert_refused(LoraAdapter, "name", name=value, source="org/adapter")


# --------------------------------------------------------------------------- VllmServerSettings.server_args()


def _flag_value(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def test_server_args_defaults():
    settings = VllmServerSettings()
    args = settings.server_args("/models/smol")
    assert _flag_value(args, "--model") == "/models/smol"
    assert _flag_value(args, "--served-model-name") == "smollm2-135m-instruct"
    assert _flag_value(args, "--port") == "8000"
    assert "--enable-auto-tool-choice" in args
    assert _flag_value(args, "--tool-call-parser") == "hermes"
    assert _flag_value(args, "--tool-strict-level") == "parameter"
    # The three appear together, in order.
    i = args.index("--enable-auto-tool-choice")
    assert args[i : i + 5] == [
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes", "--tool-strict-level", "parameter",
    ]
    assert "--enforce-eager" not in args
    assert "--enable-lora" not in args
    assert "--api-key" not in args
    assert all(isinstance(a, str) for a in args)


def test_server_args_without_tool_parser_drops_tool_flags():
    args = VllmServerSettings(tool_call_parser=None).server_args("/m")
    assert "--enable-auto-tool-choice" not in args
    assert "--tool-call-parser" not in args
    assert "--tool-strict-level" not in args


def test_server_args_without_strict_level_keeps_parser():
    args = VllmServerSettings(tool_strict_level=None).server_args("/m")
    assert _flag_value(args, "--tool-call-parser") == "hermes"
    assert "--tool-strict-level" not in args


def test_server_args_enforce_eager():
    assert "--enforce-eager" in VllmServerSettings(enforce_eager=True).server_args("/m")


def test_server_args_lora():
    settings = VllmServerSettings(enable_lora=True, max_lora_rank=64)
    args = settings.server_args("/m")
    assert "--enable-lora" in args
    assert _flag_value(args, "--max-lora-rank") == "64"
    assert _flag_value(args, "--max-loras") == str(settings.max_loras)


def test_server_args_lora_enabled_without_paths_has_no_modules():
    args = VllmServerSettings(enable_lora=True).server_args("/m")
    assert "--enable-lora" in args
    assert "--lora-modules" not in args


def test_server_args_quantization_chat_template_and_extra_args():
    settings = VllmServerSettings(
        quantization="awq", chat_template="/t/chat.jinja", extra_args=["--disable-log-requests"]
    )
    args = settings.server_args("/m")
    assert _flag_value(args, "--quantization") == "awq"
    assert _flag_value(args, "--chat-template") == "/t/chat.jinja"
    assert args[-1] == "--disable-log-requests"


def test_server_args_never_contain_api_key():
    secret = "sk-secret-123"
    settings = VllmServerSettings(
        api_key=secret,
        enable_lora=True,
        enforce_eager=True,
    )
    assert settings.api_key.get_secret_value() == secret
    args = settings.server_args("/m")
    assert "--api-key" not in args
    assert not any(secret in a for a in args)
    # Nor does it leak through the block's repr or a plain dump.
    assert secret not in repr(settings)
    assert secret not in str(settings.model_dump())


# --------------------------------------------------------------------------- ModelSource rules


@pytest.mark.parametrize(
    "value", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "meta-llama/Llama-3.1-8B", "org/name_v1.5"]
)
def test_repo_id_good(value):
    assert ModelSource(repo_id=value).repo_id == value


@pytest.mark.parametrize(
    "value", ["", "../x", "a/b/c", "a b", "x.git", "org/x.git", "org/", "/name", "org/..", "org/name."]
)
def test_repo_id_bad(value):
    assert_refused(ModelSource, "repo_id", repo_id=value)


@pytest.mark.parametrize("value", ["main", "v1.0", "refs/pr/1", "a" * 40])
def test_revision_good(value):
    assert ModelSource(revision=value).revision == value


@pytest.mark.parametrize("value", ["..", "", "main/../x", "-main", "has space"])
def test_revision_bad(value):
    assert_refused(ModelSource, "revision", revision=value)


@pytest.mark.parametrize("value", [["*.safetensors"], ["*.json", "tokenizer.model"]])
def test_allow_patterns_good(value):
    assert ModelSource(allow_patterns=value).allow_patterns == value


@pytest.mark.parametrize("value", [[], [""], ["*.json", "   "]])
def test_allow_patterns_bad(value):
    assert_refused(ModelSource, "allow_patterns", allow_patterns=value)


# --------------------------------------------------------------------------- ModelStore rules


@pytest.mark.parametrize(
    "value",
    ["vllm-pipeline-models", "abc", "my.bucket.name", "a1-b2", "x" * 63, "0bucket9"],
)
def test_bucket_name_good(value):
    assert ModelStore(bucket_name=value).bucket_name == value


@pytest.mark.parametrize(
    "value",
    [
        "AB",
        "a",
        "a..b",
        "192.168.1.1",
        "xn--abc",
        "foo-s3alias",
        "x" * 64,
        "my_bucket",
        "MyBucket",
        "-bucket",
        "bucket-",
        "a.-b",
        "sthree-bucket",
        "foo--ol-s3",
    ],
)
def test_bucket_name_bad(value):
    assert_refused(ModelStore, "bucket_name", bucket_name=value)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("models", "models"), ("/models/", "models"), ("a/b/c", "a/b/c"), ("", ""), ("v1..2", "v1..2")],
)
def test_bucket_folder_good(value, expected):
    assert ModelStore(bucket_folder=value).bucket_folder == expected


@pytest.mark.parametrize("value", ["..", "../x", "a/../b", "a/..", "/../", "a\\b", "a\nb"])
def test_bucket_folder_bad(value):
    assert_refused(ModelStore, "bucket_folder", bucket_folder=value)


# --------------------------------------------------------------------------- EcsGpuCapacity rules


@pytest.mark.parametrize("value", ["g5.xlarge", "p5.48xlarge", "g6.xlarge", "g4dn.xlarge", "p4d.24xlarge"])
def test_instance_type_gpu_accepted(value):
    assert EcsGpuCapacity(instance_type=value).instance_type == value


@pytest.mark.parametrize("value", ["m5.xlarge", "t3.micro", "c5.large", "g5", "G5.XLARGE", ""])
def test_instance_type_without_gpu_refused(value):
    assert_refused(EcsGpuCapacity, "instance_type", instance_type=value)


@pytest.mark.parametrize("value", ["us-east-1", "eu-west-2", "ap-southeast-1", "us-gov-west-1"])
def test_region_good(value):
    assert EcsGpuCapacity(region=value).region == value


@pytest.mark.parametrize("value", ["", "US-EAST-1", "us-east", "useast1", "us-east-1a", "us_east_1"])
def test_region_bad(value):
    assert_refused(EcsGpuCapacity, "region", region=value)


@pytest.mark.parametrize(
    "value", [[], ["subnet-0123abcd"], ["subnet-0123456789abcdef0", "subnet-89abcdef"]]
)
def test_subnets_good(value):
    assert EcsGpuCapacity(subnets=value).subnets == value


@pytest.mark.parametrize(
    "value",
    [
        ["subnet-123"],
        ["sub-0123abcd"],
        ["subnet-0123ABCD"],
        ["subnet-0123456789abcdef0", "vpc-0123abcd"],
        [""],
    ],
)
def test_subnets_bad(value):
    assert_refused(EcsGpuCapacity, "subnets", subnets=value)


@pytest.mark.parametrize("value", [None, "vpc-0123abcd", "vpc-0123456789abcdef0"])
def test_vpc_id_good(value):
    assert EcsGpuCapacity(vpc_id=value).vpc_id == value


@pytest.mark.parametrize("value", ["", "vpc-123", "subnet-0123abcd", "vpc-0123ABCD", "vpc-0123abcdz"])
def test_vpc_id_bad(value):
    assert_refused(EcsGpuCapacity, "vpc_id", vpc_id=value)


@pytest.mark.parametrize("value", [[], ["10.0.0.0/8"], ["0.0.0.0/0", "192.168.1.0/24"]])
def test_ingress_cidrs_good(value):
    assert EcsGpuCapacity(ingress_cidrs=value).ingress_cidrs == value


@pytest.mark.parametrize(
    "value",
    [
        ["10.0.0.0"],
        ["10.0.0/8"],
        ["example.com/8"],
        ["::/0"],
        ["10.0.0.0/8", "nope"],
        [""],
    ],
)
def test_ingress_cidrs_bad(value):
    assert_refused(EcsGpuCapacity, "ingress_cidrs", ingress_cidrs=value)


@pytest.mark.parametrize("value", [["300.1.1.1/8"], ["10.0.0.0/40"]])
def test_ingress_cidrs_out_of_range_refused(value):
    assert_refused(EcsGpuCapacity, "ingress_cidrs", ingress_cidrs=value)


@pytest.mark.parametrize(("lo", "hi"), [(0, 1), (1, 1), (2, 5)])
def test_capacity_range_good(lo, hi):
    capacity = EcsGpuCapacity(min_capacity=lo, max_capacity=hi)
    assert (capacity.min_capacity, capacity.max_capacity) == (lo, hi)


@pytest.mark.parametrize(("lo", "hi"), [(2, 1), (5, 4), (100, 1)])
def test_min_capacity_above_max_refused(lo, hi):
    assert_refused(EcsGpuCapacity, "min_capacity", min_capacity=lo, max_capacity=hi)


def test_on_demand_base_above_max_refused():
    assert_refused(EcsGpuCapacity, "on_demand_base", on_demand_base=3, max_capacity=2)


@pytest.mark.parametrize("value", [{}, {"g5.xlarge": 0.9}, {"g6.xlarge": 0.01, "p5.48xlarge": 40}])
def test_price_overrides_good(value):
    assert EcsGpuCapacity(price_overrides=value).price_overrides == value


@pytest.mark.parametrize("value", [{"g5.xlarge": 0}, {"g5.xlarge": -1.0}, {"g6.xlarge": 0.5, "g5.xlarge": 0.0}])
def test_price_overrides_non_positive_refused(value):
    assert_refused(EcsGpuCapacity, "price_overrides", price_overrides=value)


# --------------------------------------------------------------------------- discovery (`prefect block register -m blocks`)

EXPECTED_SLUGS = {
    "ImageBuildSettings": "vllm-image-build-settings",
    "EcsGpuCapacity": "vllm-ecs-gpu-capacity",
    "ModelSource": "vllm-model-source",
    "ModelStore": "vllm-model-store",
    "VllmServerSettings": "vllm-server-settings",
    "ToolGateway": "vllm-tool-gateway",
}


def _discovered_blocks():
    """What `prefect block register -m blocks` walks: the module's Block classes."""
    module = load_module("blocks")
    return {name: cls for name, cls in inspect.getmembers(module) if Block.is_block_class(cls)}


def test_block_discovery_finds_every_block_with_vllm_slug():
    found = _discovered_blocks()
    assert set(found) == set(EXPECTED_SLUGS)
    for name, cls in found.items():
        assert cls.get_block_type_slug() == EXPECTED_SLUGS[name]
        assert cls.get_block_type_name().startswith("vLLM ")
    # LoraAdapter is nested data, not a block of its own.
    assert not Block.is_block_class(LoraAdapter)


@pytest.mark.parametrize("name", sorted(EXPECTED_SLUGS))
def test_block_schema_builds_offline(name):
    cls = _discovered_blocks()[name]
    block_type = cls._to_block_type()
    assert block_type.slug == EXPECTED_SLUGS[name]
    schema = cls._to_block_schema()
    assert schema.fields["properties"], f"{name} has an empty schema"
    assert schema.checksum


def test_model_store_is_an_s3_bucket():
    assert issubclass(ModelStore, S3Bucket)
    assert isinstance(ModelStore(), S3Bucket)
    # Distinct slug, so it registers beside prefect-aws's own s3-bucket type.
    assert ModelStore.get_block_type_slug() != S3Bucket.get_block_type_slug()


def test_model_store_accepts_credentials_block_instance():
    creds = AwsCredentials(region_name="eu-west-1")
    assert ModelStore(credentials=creds).credentials.region_name == "eu-west-1"


def test_model_store_accepts_credentials_as_plain_dict():
    assert ModelStore(credentials={"region_name": "eu-west-1"}).credentials.region_name == "eu-west-1"
