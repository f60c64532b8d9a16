"""The flow runner's IAM policy, enforced (issue #22): every flow that touches AWS runs, in the order of the README's
"On a real AWS account", on a moto server that checks each request against the policies of an IAM user `runner`
holding exactly the three managed policies of images/runtime/, with only its keys in the blocks and no AWS
credentials anywhere else in the process. Any refusal fails the test, naming the action, even one a caller catches.

The world it runs in (its own moto server, AWS's own acts, the vLLM container behind the load balancer, and how
the policies are widened where moto evaluates no resource) is tests/enforced_aws.py. What moto cannot evaluate
(tag conditions, the permissions boundary, iam:PassRole) is checked statically by tests/test_iam_policy.py.
A negative control proves the enforcement is on: the same runner is refused what its policy does not grant.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import contextmanager
from urllib.parse import urlsplit

import pytest
from botocore.exceptions import ClientError
from enforced_aws import ACCOUNT, REGION, AwsSide, EnforcedAws, StandInVllm, refusal, watched
from prefect_aws import AwsCredentials
from pydantic import SecretStr

from blocks.ecs_capacity import AlarmSettings, EcsGpuCapacity, MetricsAgentSettings, ScalingSettings
from blocks.image_build import ImageBuildSettings
from blocks.model_source import LoraAdapter, ModelSource
from blocks.model_store import ModelStore
from blocks.tool_gateway import GatewayTenant, ToolGateway
from blocks.vllm_server import VllmServerSettings
from embedded.adapter_kit import make_adapter
from embedded.hub_server import HubRepo, LocalHub
from embedded.tiny_model import TINY_CONFIG, make_tiny_model
from tasks.core.aws import Aws, aws_client
from tasks.core.naming import resource_name

pytestmark = pytest.mark.integration

STACK, DOOMED = "iam", "iam-idle"  # DOOMED: a failed deploy kept for debugging and forgotten, for reap
P = "t-iam-enforced"  # block names


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The enforced moto server and the runner's keys; the process's environment as on a flow runner that has only
    the blocks: no AWS credentials, config or region, HTTP_PROXY to the stand-in container."""
    server, vllm = EnforcedAws(), StandInVllm()
    server.start()
    empty = tmp_path_factory.mktemp("aws") / "empty"
    empty.write_text("")
    with pytest.MonkeyPatch.context() as mp:
        try:
            runner, aws_side = server.admin_setup()
            for k in [k for k in os.environ if k.startswith("AWS_")]:
                mp.delenv(k)
            mp.setenv("AWS_ENDPOINT_URL", server.endpoint)
            mp.setenv("AWS_CONFIG_FILE", str(empty))
            mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(empty))
            mp.setenv("AWS_EC2_METADATA_DISABLED", "true")  # a missing credential fails at once, not after IMDS
            for k in ("HTTP_PROXY", "http_proxy"):
                mp.setenv(k, vllm.url)
            for k in ("NO_PROXY", "no_proxy"):
                mp.setenv(k, "127.0.0.1,localhost")
            creds = AwsCredentials(aws_access_key_id=runner.id, aws_secret_access_key=SecretStr(runner.secret),
                                   region_name=REGION)
            yield server, creds, aws_side, vllm
        finally:
            server.stop()
            vllm.stop()


def refused(fn, *args, **kw) -> str:
    with pytest.raises(ClientError) as err:
        fn(*args, **kw)
    found = refusal(_status(err.value), err.value.response, str(err.value))
    assert found, err.value
    return found


def _status(exc: ClientError) -> int:
    return exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)


def test_enforcement_is_on(world):
    """The negative control: the runner is refused what its policy does not grant, and the admin's unchecked
    requests are spent; its own bucket is open to it."""
    server, creds, _, _ = world
    iam, s3 = aws_client("iam", creds), aws_client("s3", creds)
    assert refused(iam.create_user, UserName="intruder").startswith("iam:CreateUser")
    refused(s3.get_object, Bucket=server.other_bucket, Key="secret.txt")
    refused(s3.list_objects_v2, Bucket=server.other_bucket)
    refused(aws_client("ecs", creds).delete_account_setting, name="serviceLongArnFormat")
    refused(aws_client("ec2", creds, REGION).create_vpc, CidrBlock="10.9.0.0/16")
    refused(server.client("s3").list_buckets)  # the admin's requests are spent: nothing passes unchecked
    assert s3.list_objects_v2(Bucket=server.bucket)["KeyCount"] == 0


@contextmanager
def step(what: str, refusals: list[str], timings: dict[str, float]):
    """A flow run; a refusal it raised or swallowed fails the test here, naming the action."""
    t0, before = time.monotonic(), len(refusals)
    try:
        yield
    except Exception as exc:
        found = refusals[before:]
        if isinstance(exc, ClientError):
            found.append(refusal(_status(exc), exc.response, str(exc)))
        if any(found):  # the refusal, not what the flow made of it (a PipelineInputError naming the permission, ...)
            pytest.fail(f"{what}: refused under the runner policy:\n  " + "\n  ".join(filter(None, found)))
        raise
    finally:
        timings[what] = round(time.monotonic() - t0, 1)
    assert refusals[before:] == [], f"{what}: refused under the runner policy:\n  " + "\n  ".join(refusals[before:])


def test_every_flow_runs_under_the_runner_policy(world, monkeypatch, tmp_path):
    from flows.adapters import update_adapters
    from flows.batch import batch_inference
    from flows.build import build_images
    from flows.deploy import deploy_model
    from flows.operations import reap, status
    from flows.plan import plan_capacity
    from flows.scale import scale
    from flows.stage import stage_model
    from flows.teardown import teardown_stack
    from flows.validate import validate
    from tasks.core.state import load_state
    from tasks.targets.ecs.batch_job import EcsBatchJob
    from tasks.targets.ecs.service import DeployTimeout
    from tasks.teardown.sweep import leftovers

    server, creds, aws_keys, vllm = world
    bucket, timings = server.bucket, {}
    aws_side = AwsSide(server, aws_keys, STACK, vllm)
    model = make_tiny_model(tmp_path / "tiny")
    lora = [make_adapter(tmp_path / f"lora{i}", "acme/tiny", TINY_CONFIG, rank=8, modules=("q_proj",), seed=i) for i in (1, 2)]
    hub = LocalHub({"acme/tiny": HubRepo(model), "acme/tiny-lora": HubRepo(lora[0]), "acme/tiny-lora2": HubRepo(lora[1])})
    hub.start()
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    t0 = time.monotonic()
    try:
        with watched(monkeypatch, aws_side) as refusals:
            # 1. permissions: the fixture's admin made the runner with the three policies and the boundary
            # 2. blocks, with the runner's keys
            ModelStore(bucket_name=bucket, credentials=creds).save(f"{P}-store", overwrite=True)
            ModelSource(repo_id="acme/tiny", token=SecretStr("hf_iam_test_token"),
                        adapters=[LoraAdapter(name="tool", source="acme/tiny-lora")]).save(f"{P}-source", overwrite=True)
            VllmServerSettings(served_model_name="tiny", max_model_len=512, enable_lora=True,
                               max_lora_rank=8).save(f"{P}-server", overwrite=True)
            EcsGpuCapacity(region=REGION, ingress_cidrs=["10.1.0.0/16"], max_capacity=2, min_replicas=1, max_replicas=2,
                           alarms=AlarmSettings(topic_subscriptions=["ops@example.com"]),
                           metrics_agent=MetricsAgentSettings(enabled=True),  # its log group, role policy, alarm, queue scaling
                           scaling=ScalingSettings(signal="queue")).save(f"{P}-capacity", overwrite=True)
            ImageBuildSettings(builder="codebuild", codebuild_bucket=bucket, credentials=creds, region=REGION,
                               codebuild_service_role_arn=f"arn:aws:iam::{ACCOUNT}:role/vllm-pipeline-codebuild",
                               ).save(f"{P}-build", overwrite=True)
            blocks = dict(model_store_block=f"{P}-store")

            with step("stage-model", refusals, timings):
                staged = stage_model(model_source_block=f"{P}-source", **blocks)
            assert staged.adapters and "tool" in staged.adapters

            with step("build-images (CodeBuild -> ECR)", refusals, timings):
                built = build_images(image_build_block=f"{P}-build")
            assert {i.name for i in built.images} == {"vllm", "runtime", "gateway"} and all(i.built for i in built.images)

            with step("plan-capacity", refusals, timings):
                plan = plan_capacity(repo_id="acme/tiny", model_source_block=f"{P}-source", server_settings_block=f"{P}-server",
                                     capacity_block=f"{P}-capacity", **blocks)
            assert plan.chosen is not None

            deploy = dict(target="ecs", repo_id="acme/tiny", model_source_block=f"{P}-source",
                          server_settings_block=f"{P}-server", capacity_block=f"{P}-capacity", **blocks)
            # the tool gateway beside it (a Fargate service behind the same load balancer), with a webhook whose header
            # secret the deploy reads and the gateway's task role is given
            server.client("secretsmanager", aws_keys).create_secret(Name="vllm-pipeline/tools/crm", SecretString=json.dumps({"token": "crm-token"}))
            crm = {"name": "crm_lookup", "parameters": {"type": "object", "properties": {"email": {"type": "string"}}},
                   "implementation": {"type": "webhook", "url": "https://crm.example.com/lookup", "headers": {
                       "Authorization": {"secret": "vllm-pipeline/tools/crm", "key": "token", "template": "Bearer {value}"}}}}
            gateway = ToolGateway(tenants={"acme": GatewayTenant(model="tiny", toolset={"tools": [{"builtin": "calculate"}, crm]})},
                                  checks=False)  # validate's gateway checks need a model that calls tools, not a parrot
            with step("deploy-model (ecs, with the tool gateway)", refusals, timings):
                state = deploy_model(STACK, ready_timeout_s=120, gateway=gateway, **deploy)
            assert state.status == "running" and urlsplit(state.endpoint.url).hostname == vllm.host
            assert state.gateway is not None and urlsplit(state.gateway.url).hostname == vllm.host
            assert any(d.startswith(f"ecs placed {resource_name(STACK, 'gateway')}") for d in aws_side.done), aws_side.done

            with step("validate", refusals, timings):
                report = validate(stack=STACK, modes=["none"], warmup_requests=1, **blocks)  # a parrot calls no tools
            assert report.passed and [a.served_model_name for a in report.adapters] == ["tool"]

            lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions",
                      "body": {"messages": [{"role": "user", "content": f"Say {i}."}], "max_tokens": 4}} for i in range(3)]
            aws_client("s3", creds).put_object(Bucket=bucket, Key="jobs/in/a.jsonl",
                                               Body="".join(json.dumps(x) + "\n" for x in lines).encode())
            roles = f"arn:aws:iam::{ACCOUNT}:role/vllm-pipeline/{STACK}"  # the stack's own, at its IAM path
            job = EcsBatchJob(cluster=resource_name(STACK, "cluster"), image_uri=state.settings["image_uri"],
                              capacity_provider=resource_name(STACK, "gpu"), instance_type=state.settings["instance_type"],
                              execution_role_arn=f"{roles}/{resource_name(STACK, 'execution')}",
                              task_role_arn=f"{roles}/{resource_name(STACK, 'task')}")
            with step("batch-inference (offline, ECS task)", refusals, timings):
                [offline] = batch_inference(f"s3://{bucket}/jobs/in/a.jsonl", stack=STACK, mode="offline", target="ecs",
                                            ecs_job=job, output_uri=f"s3://{bucket}/jobs/offline/a", job_timeout_s=60,
                                            server_settings_block=f"{P}-server", **blocks)
            assert offline.ok == 3 and offline.job_exit_code == 0

            with step("update-adapters", refusals, timings):
                updated = update_adapters(STACK, add=[LoraAdapter(name="tool2", source="acme/tiny-lora2")], remove=["tool"],
                                          model_source_block=f"{P}-source", **blocks)
            assert sorted(updated.adapters) == ["tool2"]

            with step("scale (to zero)", refusals, timings):
                assert scale(STACK, 0, **blocks).after == 0
            assert vllm.down
            with step("batch-inference (online, wakes the stack from zero)", refusals, timings):
                [online] = batch_inference(f"s3://{bucket}/jobs/in/a.jsonl", stack=STACK, concurrency=2, **blocks)
            assert online.ok == 3 and online.failed == 0 and vllm.down  # served, and back at zero

            with step("deploy-model (a second stack that fails, kept)", refusals, timings), pytest.raises(DeployTimeout):
                deploy_model(DOOMED, ready_timeout_s=1, ttl_hours=0.0001, keep_failed=True, **deploy)

            with step("status", refusals, timings):
                rows = {r.stack: r for r in status(**blocks)}
            assert rows[STACK].status == "running" and rows[DOOMED].status == "failed"

            with step("reap", refusals, timings):
                assert reap(**blocks) == [DOOMED]

            with step("teardown", refusals, timings):
                report = teardown_stack(STACK, capacity_block=f"{P}-capacity", keep_model=False, keep_images=False, **blocks)
            assert report.had_state_record and report.left == []
            assert f"instance-profile {resource_name(STACK, 'instance')}" in report.deleted  # reaping the other left it
            with step("teardown scan", refusals, timings):
                assert leftovers(Aws(creds, REGION), STACK) == [] and leftovers(Aws(creds, REGION), DOOMED) == []
            assert load_state(ModelStore(bucket_name=bucket, credentials=creds), STACK)[0] is None

        assert vllm.unexpected == [], vllm.unexpected
        assert len([d for d in aws_side.done if d.startswith("codebuild")]) == 3, aws_side.done  # vllm, runtime, gateway
        refused(aws_client("iam", creds).create_user, UserName="intruder")  # enforcement was on all along
    finally:
        hub.stop()
    total = time.monotonic() - t0
    print(f"IAM-enforced flows: {total:.1f}s\n  " + "\n  ".join(f"{k}: {v}s" for k, v in timings.items())
          + "\nwidened for moto:\n  " + "\n  ".join(server.widened))

