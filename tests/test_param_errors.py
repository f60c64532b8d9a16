"""Every bad parameter is one line: for each flow's numeric, enum and bool parameters (and those
fields of its pydantic-model parameters), a value out of range, not a choice or of the wrong type
fails the run with a one-line PipelineInputError naming the parameter and the value, and nothing
is written to S3.

The cases come from the flows' own parameter schemas (what Prefect validates a run's parameters
against, on a direct call and on a deployment's run alike), so a new parameter is covered the day
it is added; the few checks that live outside the schema (block fields, the GPU catalogue) are
listed by hand in EXTRA."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest
import yaml
from prefect import Flow
from test_hardening import s3_snapshot

from tasks.core.errors import InputCheckedFlow, PipelineInputError

REPO = Path(__file__).resolve().parent.parent

# a valid value for each required parameter / model field, so that only the bad value is wrong
REQUIRED = {"stack": "ok", "input_uri": "s3://b/in/x.jsonl", "replicas": 1}
VALID_MODELS = {
    "EcsBatchJob": {"cluster": "c", "image_uri": "1.dkr.ecr.us-east-1.amazonaws.com/vllm:t", "capacity_provider": "gpu",
                    "execution_role_arn": "arn:aws:iam::123456789012:role/exec",
                    "task_role_arn": "arn:aws:iam::123456789012:role/task"},
}

# checks that live outside the parameter schema: (flow, parameters, what the message must name, the bad value)
EXTRA = [
    ("plan-capacity", {"max_model_len": 8}, "max_model_len", 8),  # VllmServerSettings' bounds, via load_config
    ("plan-capacity", {"quantization": "q3"}, "quantization", "q3"),  # the block's list of quantizations
    ("plan-capacity", {"instance_types": ["p9.huge"]}, "instance_types", "p9.huge"),  # the GPU catalogue
    ("build-images", {"builder": "podman"}, "builder", "podman"),  # ImageBuildSettings' choices
    ("build-images", {"keep_last": 0}, "keep_last", 0),
    ("batch-inference", {"ecs_job": {**VALID_MODELS["EcsBatchJob"], "instance_type": "t3.micro"}}, "ecs_job.instance_type",
     "t3.micro"),  # EcsBatchJob's validator: the GPU catalogue
]


def _flows() -> dict[str, object]:
    """Every flow: the deployments' entrypoints plus any other flow object in flows/*.py."""
    found = {}
    for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]:
        module, _, name = d["entrypoint"].partition(":")
        fl = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), name)
        found[fl.name] = fl
    for path in sorted((REPO / "flows").glob("*.py")):
        if path.stem != "demo":  # a script, not flows
            found |= {obj.name: obj for obj in vars(importlib.import_module(f"flows.{path.stem}")).values()
                      if isinstance(obj, Flow)}
    return found


def _bad(schema: dict, defs: dict) -> list[tuple[str, object, object]]:
    """(path below the parameter, the whole bad value, the bad leaf) for one schema."""
    branches = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    if len(branches) != 1:
        return []
    s = branches[0]
    if "$ref" in s:
        name = s["$ref"].rsplit("/", 1)[-1]
        base = VALID_MODELS.get(name, {})
        return [(f".{field}{path}", {**base, field: value}, leaf)
                for field, sub in defs[name].get("properties", {}).items() for path, value, leaf in _bad(sub, defs)]
    if s.get("type") == "array":
        return [(f"[0]{path}", [value], leaf) for path, value, leaf in _bad(s.get("items", {}), defs)]
    cases: list[object] = []
    if "enum" in s:
        cases.append("bogus")
    elif s.get("type") in ("integer", "number"):
        cases.append("many")
        if "minimum" in s:
            cases.append(s["minimum"] - 1)
        if "exclusiveMinimum" in s:
            cases.append(s["exclusiveMinimum"])
        if "maximum" in s:
            cases.append(s["maximum"] + 1)
    elif s.get("type") == "boolean":
        cases.append("maybe")
    return [("", v, v) for v in cases]


def _cases():
    cases = []
    for name, fl in sorted(_flows().items()):
        schema = fl.parameters.model_dump()
        for param, sub in schema["properties"].items():
            for path, value, leaf in _bad(sub, schema.get("definitions", {})):
                cases.append(pytest.param(name, {param: value}, param + path, leaf, id=f"{name}:{param}{path}={leaf!r}"))
    cases += [pytest.param(f, p, named, value, id=f"{f}:{named}={value!r}") for f, p, named, value in EXTRA]
    return cases


CASES = _cases()


def test_every_flow_turns_its_parameter_errors_into_one_line():
    flows = _flows()
    assert {"stage-model", "plan-capacity", "build-images", "deploy-model", "validate", "update-adapters",
            "batch-inference", "teardown", "pipeline", "status", "reap"} <= set(flows)
    plain = sorted(n for n, fl in flows.items() if not isinstance(fl, InputCheckedFlow))
    assert not plain, f"flows made with prefect's @flow instead of tasks.core.errors.flow: {plain}"
    covered = {c.values[0] for c in CASES}
    assert set(flows) - covered == {"status"}  # status takes only a block name


@pytest.mark.integration
@pytest.mark.parametrize(("flow_name", "params", "named", "value"), CASES)
def test_bad_parameter_is_one_line_naming_it_and_creates_nothing(flow_name, params, named, value, local_aws):
    fl = _flows()[flow_name]
    before = s3_snapshot()
    with pytest.raises(PipelineInputError) as err:
        fl(**{k: v for k, v in REQUIRED.items() if k in fl.parameters.properties} | params)
    message = str(err.value)
    assert "\n" not in message and len(message) <= 400, message
    assert named in message and repr(value) in message, message  # the parameter, and the value given
    assert s3_snapshot() == before, "a bad parameter wrote to S3"


def test_a_deployment_run_validates_the_same_way():
    """A deployment's run gets its parameters as JSON and Prefect validates them with the flow's
    `validate_parameters` before the function runs: the same one-line error."""
    from flows.batch import batch_inference

    with pytest.raises(PipelineInputError, match=r"^batch-inference parameter settings\.shard_lines: .*\(got 0\)$"):
        batch_inference.validate_parameters({"input_uri": "s3://b/in/x.jsonl", "settings": {"shard_lines": 0}})
    assert batch_inference.validate_parameters({"input_uri": "s3://b/in/x.jsonl", "settings": {"shard_lines": 5}})
    with pytest.raises(PipelineInputError, match=r"^batch-inference parameter concurrency: .*\(got 0\)$"):
        batch_inference.with_options(retries=0).validate_parameters({"input_uri": "s3://b/in/x.jsonl", "concurrency": 0})


def test_one_line_quotes_plain_values_but_no_secret_and_no_validator_input():
    from pydantic import BaseModel, Field, ValidationError, field_validator

    from tasks.core.errors import one_line

    class Settings(BaseModel):
        replicas: int = Field(default=1, ge=1)
        hf_token: str = Field(default="x", min_length=8)
        extra: str = ""

        @field_validator("extra")
        @classmethod
        def _extra(cls, value: str) -> str:
            if "--api-key" in value:
                raise ValueError("extra: pass the key through the block, not as a flag")
            return value

    with pytest.raises(ValidationError) as err:
        Settings(replicas=0, hf_token="hf_abc", extra="--api-key sk-leaked")
    text = one_line(err.value, "Settings")
    assert text == ("Settings.replicas: Input should be greater than or equal to 1 (got 0); "
                    "Settings.hf_token: String should have at least 8 characters; "
                    "Settings.extra: extra: pass the key through the block, not as a flag")
