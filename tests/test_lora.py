"""LoRA adapters without a server: staging (Hub and S3 sources) and the pre-deploy checks, on moto and the local hub."""

from __future__ import annotations

import hashlib
import json

import pytest
from prefect import flow

from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from embedded.adapter_kit import make_adapter, module_shapes
from embedded.hub_server import HubRepo
from embedded.tiny_model import TINY_CONFIG
from flows.deploy import deploy_model
from flows.stage import stage_all
from tasks.core.aws import aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.s3 import read_manifest, split_s3
from tasks.core.state import load_state
from tasks.stage.lora import adapter_problems, check_adapters, find_staged_adapters
from tasks.stage.models import find_staged_model
from tasks.stage.transfer import TransferSettings

pytestmark = pytest.mark.integration
TINY_SHAPES = {"q_proj": (64, 64), "up_proj": (128, 64)}  # the tiny model's two weight kinds


def tiny_adapter(folder, base="acme/tiny", rank=8, modules=("q_proj", "up_proj"), seed=1, shapes=TINY_SHAPES):
    return make_adapter(folder, base, TINY_CONFIG, rank=rank, modules=modules, seed=seed, shapes=shapes)


def put_folder(bucket: str, prefix: str, folder) -> str:
    for p in folder.iterdir():
        aws_client("s3").put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=p.read_bytes())
    return f"s3://{bucket}/{prefix}"


def run_stage(source: ModelSource, store: ModelStore):
    return flow(name="t-stage-all")(stage_all)(source, store, TransferSettings())


def object_bytes(uri: str, name: str) -> bytes:
    bucket, prefix = split_s3(uri)
    return aws_client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{name}")["Body"].read()


# ---------------------------------------------------------------------------------------- the checks

SHAPES = {f"model.layers.{i}.self_attn.q_proj.weight": [64, 64] for i in range(2)} | \
         {f"model.layers.{i}.mlp.up_proj.weight": [128, 64] for i in range(2)}


def _lora_shapes(rank=8, module="self_attn.q_proj", a_in=64, b_out=64):
    return {f"base_model.model.model.layers.0.{module}.lora_A.weight": [rank, a_in],
            f"base_model.model.model.layers.0.{module}.lora_B.weight": [b_out, rank]}


def _config(**kw):
    return {"peft_type": "LORA", "base_model_name_or_path": "acme/tiny", "r": 8, "target_modules": ["q_proj"], **kw}


def test_a_fitting_adapter_has_no_problems():
    assert adapter_problems(_config(), _lora_shapes(), "acme/tiny", SHAPES, 16) == []
    assert adapter_problems(_config(base_model_name_or_path="ACME/Tiny/"), _lora_shapes(), "acme/tiny", SHAPES, 8) == []


@pytest.mark.parametrize("config,shapes,needle", [
    (_config(base_model_name_or_path="other/model"), _lora_shapes(), "trained on 'other/model', not on the deployed base 'acme/tiny'"),
    (_config(r=32), _lora_shapes(rank=32), "rank 32 exceeds the server's max_lora_rank 16"),
    (_config(rank_pattern={"q_proj": 64}), _lora_shapes(), "rank 64 exceeds"),
    (_config(), _lora_shapes(module="self_attn.v_proj"), "target modules ['v_proj'] are not in the base model"),
    (_config(), _lora_shapes(a_in=96), "shapes do not fit the base model: model.layers.0.self_attn.q_proj (A [8, 96] vs base [64, 64])"),
    (_config(), _lora_shapes(b_out=32), "(B [32, 8] vs base [64, 64])"),
    (_config(modules_to_save=["lm_head"]), _lora_shapes(), "modules_to_save ['lm_head']"),
    (_config(peft_type="IA3"), _lora_shapes(), "peft_type is 'IA3', not LORA"),
    (None, _lora_shapes(), "no adapter_config.json"),
    (_config(), {}, "holds no LoRA weights"),
])
def test_adapter_problems_name_what_does_not_fit(config, shapes, needle):
    problems = adapter_problems(config, shapes, "acme/tiny", SHAPES, 16)
    assert any(needle in p for p in problems), problems


def test_module_shapes_of_the_default_model():
    smollm2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64}
    s = module_shapes(smollm2)
    assert s["q_proj"] == (576, 576) and s["k_proj"] == (192, 576) and s["down_proj"] == (576, 1536)


# ------------------------------------------------------------------------------------ staging (moto + hub)

def test_adapters_stage_next_to_the_base_verified_and_only_once(bucket, hub, tmp_path):
    hub.repos["acme/tiny-lora"] = HubRepo(tiny_adapter(tmp_path / "hub-lora"))
    s3_src = put_folder(bucket, "incoming/sql-lora", tiny_adapter(tmp_path / "s3-lora", seed=2))
    store = ModelStore(bucket_name=bucket)
    source = ModelSource(repo_id="acme/tiny", adapters=[LoraAdapter(name="chat", source="acme/tiny-lora"),
                                                        LoraAdapter(name="sql", source=s3_src + "/")])
    first = run_stage(source, store)
    assert set(first.adapters) == {"chat", "sql"}
    assert first.adapters["chat"].startswith(f"s3://{bucket}/models/acme/tiny-lora/")  # next to acme/tiny/<sha>
    assert first.adapters["sql"].startswith(f"s3://{bucket}/models/s3/{bucket}/incoming/sql-lora/")
    for name, folder in (("chat", tmp_path / "hub-lora"), ("sql", tmp_path / "s3-lora")):
        bucket_, prefix = split_s3(first.adapters[name])
        manifest = read_manifest(aws_client("s3"), bucket_, prefix)
        assert sorted(f.path for f in manifest.files) == ["adapter_config.json", "adapter_model.safetensors"]
        for f in manifest.files:
            data = (folder / f.path).read_bytes()
            assert object_bytes(first.adapters[name], f.path) == data and f.sha256 == hashlib.sha256(data).hexdigest()

    def objects():
        return {o["Key"]: o["LastModified"] for o in aws_client("s3").list_objects_v2(Bucket=bucket)["Contents"]}

    before = objects()
    again = run_stage(source, store)
    assert again.adapters == first.adapters and objects() == before  # nothing written the second time

    @flow(name="t-find-and-check")
    def find_and_check():
        found = find_staged_adapters(store, source.adapters)
        check_adapters(store, find_staged_model(store, repo_id="acme/tiny"), found, "tiny", True, 8)  # they fit: no error
        return found

    assert {n: r.s3_uri for n, r in find_and_check().items()} == first.adapters

    # a changed S3 source is staged anew (its own revision), the old copy stays until teardown of the store
    put_folder(bucket, "incoming/sql-lora", tiny_adapter(tmp_path / "s3-lora-v2", seed=3))
    third = run_stage(source, store)
    assert third.adapters["sql"] != first.adapters["sql"] and third.adapters["chat"] == first.adapters["chat"]


def test_adapter_sources_that_are_not_adapters_are_clear_errors(bucket, hub, tmp_path):
    store = ModelStore(bucket_name=bucket)
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "adapter_config.json").write_text(json.dumps(_config()))
    (tmp_path / "bin" / "adapter_model.bin").write_bytes(b"pickle")
    hub.repos["acme/bin-only"] = HubRepo(tmp_path / "bin")
    with pytest.raises(PipelineInputError, match=r"adapter 'old': acme/bin-only@main has no adapter_model.safetensors"):
        run_stage(ModelSource(repo_id="acme/tiny", adapters=[{"name": "old", "source": "acme/bin-only"}]), store)
    with pytest.raises(PipelineInputError, match=r"adapter 'gone': .*lacks \['adapter_config.json', 'adapter_model.safetensors'\]"):
        run_stage(ModelSource(repo_id="acme/tiny", adapters=[{"name": "gone", "source": f"s3://{bucket}/nothing/here"}]), store)
    with pytest.raises(PipelineInputError, match=r"adapter 'nope': .*not found"):
        run_stage(ModelSource(repo_id="acme/tiny", adapters=[{"name": "nope", "source": "acme/no-such-adapter"}]), store)


def test_unfit_adapters_are_refused_before_anything_is_created(bucket, hub, tmp_path):
    """Another base, a rank above max_lora_rank, a module the base lacks: one line each, naming the
    adapter; no state record, no secret, no server."""
    hub.repos["acme/other-lora"] = HubRepo(tiny_adapter(tmp_path / "other", base="acme/other-model"))
    hub.repos["acme/big-lora"] = HubRepo(tiny_adapter(tmp_path / "big", rank=32))
    hub.repos["acme/v-lora"] = HubRepo(tiny_adapter(tmp_path / "v", modules=("q_proj", "v_proj"),
                                                    shapes={**TINY_SHAPES, "v_proj": (64, 64)}))
    source = ModelSource(repo_id="acme/tiny", adapters=[{"name": "other", "source": "acme/other-lora"},
                                                        {"name": "big", "source": "acme/big-lora"},
                                                        {"name": "vee", "source": "acme/v-lora"}])
    store = ModelStore(bucket_name=bucket)
    run_stage(source, store)
    names = {"source": f"t-{bucket[-6:]}-src", "store": f"t-{bucket[-6:]}-store", "server": f"t-{bucket[-6:]}-server"}
    source.save(names["source"], overwrite=True)
    store.save(names["store"], overwrite=True)
    VllmServerSettings(enable_lora=True, max_lora_rank=16).save(names["server"], overwrite=True)
    secrets_before = aws_client("secretsmanager").list_secrets()["SecretList"]
    with pytest.raises(PipelineInputError) as err:
        deploy_model("refused", model_source_block=names["source"], model_store_block=names["store"],
                     server_settings_block=names["server"])
    lines = str(err.value).split(" | ")
    assert any(line.startswith("adapter 'other' (acme/other-lora): it was trained on 'acme/other-model'") for line in lines)
    assert any(line.startswith("adapter 'big' (acme/big-lora): rank 32 exceeds the server's max_lora_rank 16") for line in lines)
    assert any(line.startswith("adapter 'vee' (acme/v-lora): target modules ['v_proj'] are not in the base model")
               for line in lines)
    assert load_state(store, "refused") == (None, None)
    assert aws_client("secretsmanager").list_secrets()["SecretList"] == secrets_before

    VllmServerSettings(enable_lora=False).save(names["server"], overwrite=True)
    with pytest.raises(PipelineInputError, match="lists adapters .* but VllmServerSettings.enable_lora is false"):
        deploy_model("refused", model_source_block=names["source"], model_store_block=names["store"],
                     server_settings_block=names["server"])


def test_update_adapters_refuses_a_stack_without_an_endpoint(bucket, hub):
    """No state record, or a record left by a deploy that never got an endpoint: one clear line, nothing staged."""
    from flows.adapters import update_adapters
    from tasks.core.state import StackState, save_state

    store = ModelStore(bucket_name=bucket)
    name = f"t-{bucket[-6:]}-store"
    store.save(name, overwrite=True)
    save_state(store, StackState(stack="halfway", target="local", status="failed"), None)
    for stack in ("halfway", "nowhere"):
        with pytest.raises(PipelineInputError, match=f"stack '{stack}' is not deployed"):
            update_adapters(stack, add=[LoraAdapter(name="x", source="acme/tiny")], model_store_block=name)
    assert [r for r in hub.requests if "/resolve/" in r[1]] == []
