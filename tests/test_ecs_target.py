"""The ECS target against the moto server: shapes, idempotence, planner refusal, rollback after
every failing create, retry policy, teardown from the record and from the scan alone.

moto runs no containers, so the wait step never sees a healthy service: tests that need the
resources to stay use keep_failed, the rollback tests use the timeout as the failure."""

from __future__ import annotations

import json
import sys
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

import pytest
from botocore.exceptions import ClientError
from iam_actions import allowing_statements, runner_policy
from prefect import flow
from pydantic import SecretStr
from test_capacity import LLAMA_31_8B, LLAMA_31_8B_SHARDS, SMOLLM2_135M, SMOLLM2_BYTES

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from flows.deploy import deploy_to_ecs
from flows.teardown import teardown
from tasks.core import aws as aws_module
from tasks.core.aws import Aws, aws_client
from tasks.core.errors import PipelineInputError
from tasks.core.naming import TAG_STACK, resource_name
from tasks.core.s3 import Manifest, ManifestFile, write_manifest
from tasks.core.state import ModelRef, load_state, save_state
from tasks.targets.ecs.service import DeployTimeout
from tasks.teardown.sweep import leftovers, scan

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent

IMAGE = "123456789012.dkr.ecr.us-east-1.amazonaws.com/vllm-pipeline/vllm@sha256:" + "ab" * 32
CREATE_PREFIXES = ("Create", "Register", "Authorize", "Put", "Attach", "Add", "Modify", "Update", "Run")


def stage_fake(bucket: str, repo_id: str, config: dict, sizes: list[int]) -> ModelRef:
    """What the planner reads of a staged model: config.json and the manifest (sizes only)."""
    s3 = aws_client("s3")
    sha = "c0ffee" * 6 + "abcd"
    prefix = f"models/{repo_id}/{sha}"
    s3.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=json.dumps(config).encode())
    files = [ManifestFile(path=f"model-{i:05d}.safetensors", size=n, sha256="0" * 64) for i, n in enumerate(sizes)]
    write_manifest(s3, bucket, prefix, Manifest(repo_id=repo_id, revision="main", sha=sha, files=files,
                                                 staged_at="2026-01-01T00:00:00+00:00", source_endpoint="test"))
    return ModelRef(repo_id=repo_id, sha=sha, s3_uri=f"s3://{bucket}/{prefix}")


class CallLog:
    """Every AWS operation the product makes, through the one client factory; optionally failing some."""

    def __init__(self):
        self.calls: list[str] = []
        self.ops: set[tuple[str, str]] = set()  # (service, operation)
        self.fail: dict[int, str] = {}  # index among create calls -> error code to raise
        self.fail_ops: dict[str, list[str]] = {}  # operation -> error codes to raise, one per call
        self.creates = 0
        self.counting = True
        self.params: dict[str, list[dict]] = {}

    def capture(self, model, params, **_):
        self.params.setdefault(model.name, []).append(dict(params))

    def handler(self, model, **_):
        name = model.name
        self.calls.append(name)
        self.ops.add((model.service_model.service_name, name))
        if name == "GetSecretValue":
            self.counting = False  # the API key read right before the wait: the deploy's creates are done
        if self.counting and name.startswith(CREATE_PREFIXES):
            self.creates += 1
            code = self.fail.get(self.creates)
            if code:
                raise ClientError({"Error": {"Code": code, "Message": f"injected at create #{self.creates} ({name})"},
                                   "ResponseMetadata": {"HTTPStatusCode": 400}}, name)
        if self.fail_ops.get(name):
            code = self.fail_ops[name].pop(0)
            raise ClientError({"Error": {"Code": code, "Message": f"injected {code}"},
                               "ResponseMetadata": {"HTTPStatusCode": 400}}, name)

    def created(self) -> list[str]:
        return [c for c in self.calls if c.startswith(("Create", "Register", "RunInstances"))]


@contextmanager
def recorded(monkeypatch):
    log = CallLog()
    real = aws_module.aws_client

    def client(service, credentials=None, region=None):
        c = real(service, credentials, region)
        c.meta.events.register("before-call.*.*", log.handler)
        c.meta.events.register("before-parameter-build.*.*", log.capture)
        return c

    for module in [m for name, m in list(sys.modules.items()) if name.startswith(("tasks.", "flows."))]:
        if getattr(module, "aws_client", None) is real:
            monkeypatch.setattr(module, "aws_client", client)
    yield log


@pytest.fixture()
def store(bucket):
    return ModelStore(bucket_name=bucket)


@pytest.fixture()
def small_model(bucket):
    return stage_fake(bucket, "HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2_135M, [SMOLLM2_BYTES])


def settings(**kw) -> VllmServerSettings:
    return VllmServerSettings(served_model_name="smol", max_model_len=2048, **kw)


def run_deploy(stack, store, model, capacity=None, keep_failed=False, timeout=0.5, **kw):
    capacity = capacity or EcsGpuCapacity(ingress_cidrs=["10.1.0.0/16"])
    return flow(name="t-deploy")(deploy_to_ecs)(stack, store, kw.pop("server", settings()), capacity, model, IMAGE,
                                                ready_timeout_s=timeout, keep_failed=keep_failed, poll_s=0.1, **kw)


def run_teardown(stack, store):
    return flow(name="t-teardown")(teardown)(stack, store, "us-east-1")


def nothing_left(stack):
    return leftovers(Aws(region="us-east-1"), stack) == []


# --------------------------------------------------------------------------------------------- planner


def test_instance_too_small_fails_before_any_resource(bucket, store, monkeypatch):
    model = stage_fake(bucket, "meta-llama/Llama-3.1-8B-Instruct", LLAMA_31_8B, LLAMA_31_8B_SHARDS)
    with recorded(monkeypatch) as log:
        with pytest.raises(PipelineInputError, match=r"g4dn\.xlarge cannot serve .*Llama-3\.1-8B.*planner would choose"):
            run_deploy("too-small", store, model, EcsGpuCapacity(instance_type="g4dn.xlarge"),
                       server=VllmServerSettings(max_model_len=8192))
    assert log.created() == [] and not [c for c in log.calls if not c.startswith(("Get", "List", "Head"))]
    assert load_state(store, "too-small")[0] is None and nothing_left("too-small")


def test_fallback_that_cannot_hold_the_model_is_refused(bucket, store):
    model = stage_fake(bucket, "meta-llama/Llama-3.1-8B-Instruct", LLAMA_31_8B, LLAMA_31_8B_SHARDS)
    cap = EcsGpuCapacity(instance_type="g6e.xlarge", fallback_instance_types=["g4dn.2xlarge"])
    with pytest.raises(PipelineInputError, match="fallback instance type g4dn.2xlarge cannot serve"):
        run_deploy("bad-fallback", store, model, cap, server=VllmServerSettings(max_model_len=8192))
    assert nothing_left("bad-fallback")


def test_bad_image_uri_is_refused_first(store, small_model):
    with pytest.raises(PipelineInputError, match="image_uri"):
        flow(deploy_to_ecs)("bad-image", store, settings(), EcsGpuCapacity(), small_model, "not an image!")
    assert nothing_left("bad-image")


# ----------------------------------------------------------------------------------------------- deploy


def _tags_ok(tags: list[dict], stack: str, key="Key", value="Value") -> bool:
    return any(t[key] == TAG_STACK and t[value] == stack for t in tags)


def test_deploy_shapes_idempotent_redeploy_and_teardown(store, small_model, monkeypatch):
    stack = "shapes"
    with recorded(monkeypatch) as first, pytest.raises(DeployTimeout, match="no container instance has joined cluster"):
        run_deploy(stack, store, small_model, keep_failed=True, hf_token=SecretStr("hf_FAKE_token_for_shapes"))
    state, _ = load_state(store, stack)
    assert state.status == "failed" and state.settings["instance_type"] == "g4dn.xlarge"  # the planner's choice
    kinds = Counter(r.kind for r in state.resources)
    assert kinds == {"security-group": 2, "secret": 2, "log-group": 1, "iam-role": 3, "instance-profile": 1, "cluster": 1,
                     "launch-template": 1, "asg": 1, "capacity-provider": 1, "task-definition": 1, "load-balancer": 1,
                     "target-group": 1, "listener": 1, "service": 1, "alarm": 4, "dashboard": 1}  # operating: test_ecs_scaling
    aws = Aws(region="us-east-1")
    ecs, ec2, elb = aws.client("ecs"), aws.client("ec2"), aws.client("elbv2")

    td = ecs.describe_task_definition(taskDefinition=resource_name(stack, "server"), include=["TAGS"])
    c = td["taskDefinition"]["containerDefinitions"][0]
    assert c["resourceRequirements"] == [{"type": "GPU", "value": "1"}]
    assert {"name": "memlock", "softLimit": -1, "hardLimit": -1} in c["ulimits"]
    assert c["linuxParameters"]["sharedMemorySize"] == 8192 and c["healthCheck"]["command"][0] == "CMD-SHELL"
    assert c["image"] == IMAGE and td["taskDefinition"]["networkMode"] == "bridge"
    assert c["portMappings"] == [{"containerPort": 8000, "hostPort": 8000, "protocol": "tcp"}]
    env = {e["name"]: e["value"] for e in c["environment"]}
    assert [s["name"] for s in c["secrets"]] == ["HF_TOKEN", "VLLM_API_KEY"]
    assert all(s["valueFrom"].startswith("arn:aws:secretsmanager:") for s in c["secrets"])
    assert "hf_FAKE_token_for_shapes" not in json.dumps(td, default=str) and not {"HF_TOKEN", "VLLM_API_KEY"} & set(env)
    assert env["MODEL_URI"] == small_model.s3_uri and "--served-model-name" in json.loads(env["VLLM_ARGS"])
    assert _tags_ok(td["tags"], stack, "key", "value")

    groups = {g["GroupName"]: g for g in ec2.describe_security_groups(Filters=[{"Name": f"tag:{TAG_STACK}", "Values": [stack]}])["SecurityGroups"]}
    alb, host = groups["vllm-shapes-alb"], groups["vllm-shapes-host"]
    assert [(p["FromPort"], [r["CidrIp"] for r in p["IpRanges"]]) for p in alb["IpPermissions"]] == [(80, ["10.1.0.0/16"])]
    # the hosts (bridge mode: the container port is on the host) admit only the load balancer, only on 8000
    assert [(p["FromPort"], p["ToPort"], [g["GroupId"] for g in p["UserIdGroupPairs"]], p["IpRanges"])
            for p in host["IpPermissions"]] == [(8000, 8000, [alb["GroupId"]], [])]

    svc = ecs.describe_services(cluster=resource_name(stack, "cluster"), services=[resource_name(stack, "service")],
                                include=["TAGS"])["services"][0]
    sent = first.params["CreateService"][0]  # moto does not echo deploymentConfiguration: check the request
    assert sent["deploymentConfiguration"]["deploymentCircuitBreaker"] == {"enable": True, "rollback": True}
    assert sent["healthCheckGracePeriodSeconds"] == 900
    assert (sent["deploymentConfiguration"]["maximumPercent"], sent["deploymentConfiguration"]["minimumHealthyPercent"]) \
        == (100, 0)  # one GPU host allowed: the old task stops first instead of waiting forever for a second host
    asg_sent = first.params["CreateAutoScalingGroup"][0]
    assert asg_sent["MixedInstancesPolicy"]["LaunchTemplate"]["Overrides"] == [{"InstanceType": "g4dn.xlarge"}]
    lt_sent = first.params["CreateLaunchTemplate"][0]["LaunchTemplateData"]
    assert lt_sent["ImageId"].startswith("ami-") and lt_sent["MetadataOptions"]["HttpTokens"] == "required"
    assert lt_sent["MetadataOptions"]["HttpPutResponseHopLimit"] == 1 and lt_sent["SecurityGroupIds"] == [host["GroupId"]]
    assert svc["loadBalancers"][0]["containerPort"] == 8000 and _tags_ok(svc["tags"], stack, "key", "value")
    tg = elb.describe_target_groups(Names=["vllm-shapes-tg"])["TargetGroups"][0]
    assert tg["HealthCheckPath"] == "/health" and tg["TargetType"] == "instance"
    attrs = {a["Key"]: a["Value"] for a in elb.describe_target_group_attributes(TargetGroupArn=tg["TargetGroupArn"])["Attributes"]}
    assert attrs["load_balancing.algorithm.type"] == "least_outstanding_requests"
    assert attrs.get("slow_start.duration_seconds", "0") == "0"  # AWS refuses slow start with least outstanding requests
    lb = elb.describe_load_balancers(Names=["vllm-shapes-alb"])["LoadBalancers"][0]
    assert lb["Scheme"] == "internal"
    assert _tags_ok(aws.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["vllm-shapes-hosts"])["AutoScalingGroups"][0]["Tags"], stack)
    role = aws.client("iam").get_role(RoleName="vllm-shapes-task")["Role"]
    assert role["Path"] == "/vllm-pipeline/shapes/"
    policy = aws.client("iam").get_role_policy(RoleName="vllm-shapes-task", PolicyName="vllm-pipeline")["PolicyDocument"]
    assert small_model.s3_uri.removeprefix("s3://") + "/*" in json.dumps(policy)

    # everything recorded is also found by the scan (tags, IAM path, names): nothing escapes teardown
    found, unknown = scan(aws, stack)
    missed = {(r.kind, r.id) for r in state.resources} - {(r.kind, r.id) for r in found}
    assert {k for k, _ in missed} <= {"listener"} and unknown == []  # a listener goes with its load balancer

    # the same deploy again creates nothing
    with recorded(monkeypatch) as log, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, keep_failed=True, hf_token=SecretStr("hf_FAKE_token_for_shapes"))
    assert log.created() == []

    run_teardown(stack, store)
    assert nothing_left(stack) and load_state(store, stack)[0] is None
    run_teardown(stack, store)  # twice: still fine
    assert nothing_left(stack)


# An API operation -> the IAM action that allows it, where the names differ.
IAM_ACTION = {"ListObjectsV2": "s3:ListBucket", "HeadObject": "s3:GetObject", "CreateMultipartUpload": "s3:PutObject",
              "UploadPart": "s3:PutObject", "CompleteMultipartUpload": "s3:PutObject", "ListParts": "s3:ListMultipartUploadParts"}
PREFIX = {"elbv2": "elasticloadbalancing", "resourcegroupstaggingapi": "tag"}


def test_task_definition_of_a_stack_with_adapters_carries_lora_flags_and_locations(store, small_model):
    """What the entrypoint in the image needs to serve adapters: the flags, their S3 folders, the index
    (runtime additions), runtime updating on; and a task role that may read exactly those folders."""
    stack = "lora"
    adapters = {"tools": ModelRef(repo_id="acme/tools-lora", sha="a" * 40, s3_uri=f"s3://{store.bucket_name}/models/acme/tools-lora/{'a' * 40}"),
                "sql": ModelRef(repo_id="s3/other/sql", sha="b" * 40, s3_uri=f"s3://{store.bucket_name}/models/s3/other/sql/{'b' * 40}")}
    with pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, keep_failed=True, server=settings(enable_lora=True, max_lora_rank=16, max_loras=2),
                   adapters=adapters)
    try:
        aws = Aws(region="us-east-1")
        td = aws.client("ecs").describe_task_definition(taskDefinition=resource_name(stack, "server"))["taskDefinition"]
        env = {e["name"]: e["value"] for e in td["containerDefinitions"][0]["environment"]}
        args = json.loads(env["VLLM_ARGS"])
        assert "--enable-lora" in args and args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--max-loras") + 1] == "2"
        assert json.loads(env["LORA_ADAPTERS"]) == {n: r.s3_uri for n, r in adapters.items()}
        assert env["LORA_INDEX_URI"] == f"s3://{store.bucket_name}/stacks/{stack}/adapters/index.json"
        assert env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "true"
        index = json.loads(aws_client("s3").get_object(Bucket=store.bucket_name, Key=f"stacks/{stack}/adapters/index.json")["Body"].read())
        assert index == {n: r.s3_uri for n, r in adapters.items()}
        policy = json.dumps(aws.client("iam").get_role_policy(RoleName=resource_name(stack, "task"), PolicyName="vllm-pipeline")["PolicyDocument"])
        for uri in [small_model.s3_uri, *[r.s3_uri for r in adapters.values()], f"s3://{store.bucket_name}/stacks/{stack}/adapters"]:
            assert uri.removeprefix("s3://") + "/*" in policy
        assert load_state(store, stack)[0].adapters == adapters
    finally:
        run_teardown(stack, store)
    assert nothing_left(stack)
    with pytest.raises(ClientError):  # the index goes with the state record
        aws_client("s3").head_object(Bucket=store.bucket_name, Key=f"stacks/{stack}/adapters/index.json")


def test_failed_wait_rolls_back_to_nothing_and_names_the_cause(store, small_model, monkeypatch):
    """...and every AWS operation the deploy and its rollback make is allowed by the policy the
    README gives for the flow runner (images/runtime/runner-iam-policy-*.json)."""
    with recorded(monkeypatch) as log:
        with pytest.raises(DeployTimeout, match="not ready after .* no container instance has joined"):
            run_deploy("timeout", store, small_model, EcsGpuCapacity())
    assert nothing_left("timeout") and load_state(store, "timeout")[0] is None
    vpc_cidr = aws_client("ec2").describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["CidrBlock"]
    alb_rule = log.params["AuthorizeSecurityGroupIngress"][0]["IpPermissions"][0]
    assert [r["CidrIp"] for r in alb_rule["IpRanges"]] == [vpc_cidr]  # default ingress: the VPC itself, not the world
    policy = runner_policy()
    used = {IAM_ACTION.get(op) or f"{PREFIX.get(svc, svc)}:{op}" for svc, op in log.ops} - {"sts:GetCallerIdentity"}
    assert {a for a in used if not allowing_statements(policy, a)} == set()  # wildcards (ec2:Describe*) match as IAM does
    assert len(used) > 40


def test_update_in_place_new_revision_and_rollback_of_a_failed_update(store, small_model, monkeypatch):
    stack = "update"
    with pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, keep_failed=True)
    state, etag = load_state(store, stack)
    state.status = "running"  # as if the first deploy had become healthy
    save_state(store, state, etag)
    ecs = Aws(region="us-east-1").client("ecs")
    first = ecs.describe_services(cluster="vllm-update-cluster", services=["vllm-update-service"])["services"][0]["taskDefinition"]
    with recorded(monkeypatch) as log, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, server=settings(max_num_seqs=64))
    assert log.created() == ["RegisterTaskDefinition"]  # only a new revision
    assert "UpdateService" in log.calls
    # the failed update was rolled back: the service is on the first revision, the new one deregistered
    svc = ecs.describe_services(cluster="vllm-update-cluster", services=["vllm-update-service"])["services"][0]
    assert svc["taskDefinition"] == first
    assert ecs.describe_task_definition(taskDefinition=first.replace(":1", ":2"))["taskDefinition"]["status"] == "INACTIVE"
    state, _ = load_state(store, stack)
    assert state.status == "running" and "update rolled back" in state.history[-1]
    run_teardown(stack, store)
    assert nothing_left(stack)


# ------------------------------------------------------------------------------------------ fault injection


def _count_creates(store, model, monkeypatch) -> list[str]:
    """The create-type operations of one deploy, in call order (tasks run concurrently: the order
    between independent resources varies from run to run)."""
    with recorded(monkeypatch) as log, pytest.raises(DeployTimeout):
        run_deploy("count", store, model)
    names = [c for c in log.calls if c.startswith(CREATE_PREFIXES)][:log.creates]
    assert len(names) >= 20 and nothing_left("count")
    return names


def test_a_failing_create_of_each_kind_is_rolled_back_to_nothing(store, small_model, monkeypatch):
    """The first call of each create operation fails (AccessDenied: not retried): the injected error
    is what the user sees, and rollback from that point leaves nothing. The slow test below fails
    every create call in turn (about twice as many deploys); test_failed_wait_rolls_back_to_nothing
    covers the rollback of everything before the wait."""
    for i, op in enumerate(dict.fromkeys(_count_creates(store, small_model, monkeypatch))):
        stack = f"fail-{i}"
        with recorded(monkeypatch) as log:
            log.fail_ops = {op: ["AccessDenied"]}
            with pytest.raises((ClientError, DeployTimeout)) as err:
                run_deploy(stack, store, small_model)
        if isinstance(err.value, DeployTimeout):  # made once per account (the ECS service-linked role): not called again
            assert op not in log.calls, op
        else:
            assert err.value.operation_name == op and "injected AccessDenied" in str(err.value), (op, err.value)
        assert nothing_left(stack), (op, leftovers(Aws(region="us-east-1"), stack))
        assert load_state(store, stack)[0] is None, op


@pytest.mark.slow
def test_every_failing_create_is_rolled_back_to_nothing(store, small_model, monkeypatch):
    """Fail the k-th create call for every k."""
    total = len(_count_creates(store, small_model, monkeypatch))
    for k in range(1, total + 1):
        stack = f"fail-{k}"
        with recorded(monkeypatch) as log:
            log.fail = {k: "AccessDenied"}
            with pytest.raises(ClientError, match=f"injected at create #{k} ") as err:
                run_deploy(stack, store, small_model)
        failed_op = err.value.operation_name
        assert log.calls.count(failed_op) >= 1 and nothing_left(stack), (k, failed_op, leftovers(Aws(region="us-east-1"), stack))
        assert load_state(store, stack)[0] is None, (k, failed_op)


def test_throttling_is_retried_access_denied_is_not(store, small_model, monkeypatch):
    with recorded(monkeypatch) as log:
        log.fail_ops = {"CreateSecurityGroup": ["Throttling", "ThrottlingException"], "CreateLoadBalancer": ["RequestLimitExceeded"]}
        with pytest.raises(DeployTimeout):  # got past both, to the wait
            run_deploy("throttled", store, small_model)
    assert log.calls.count("CreateLoadBalancer") == 2
    assert nothing_left("throttled")
    with recorded(monkeypatch) as log:
        log.fail_ops = {"CreateCluster": ["AccessDeniedException"]}
        with pytest.raises(ClientError, match="AccessDenied"):
            run_deploy("denied", store, small_model)
    assert log.calls.count("CreateCluster") == 1 and nothing_left("denied")


# ---------------------------------------------------------------------------------------------- teardown


def test_teardown_after_partial_teardown_and_without_a_record(store, small_model):
    aws = Aws(region="us-east-1")
    with pytest.raises(DeployTimeout):
        run_deploy("partial", store, small_model, keep_failed=True)
    # someone deleted the load balancer and the service by hand, and the state record is lost
    lb = aws.client("elbv2").describe_load_balancers(Names=["vllm-partial-alb"])["LoadBalancers"][0]
    aws.client("elbv2").delete_load_balancer(LoadBalancerArn=lb["LoadBalancerArn"])
    aws.client("ecs").delete_service(cluster="vllm-partial-cluster", service="vllm-partial-service", force=True)
    aws_client("s3").delete_object(Bucket=store.bucket_name, Key="stacks/partial/state.json")
    report = run_teardown("partial", store)
    assert not report.had_state_record and len(report.deleted) >= 12 and nothing_left("partial")
    run_teardown("partial", store)
    assert nothing_left("partial")


# ---------------------------------------------------------------------------------------------- pipeline


def test_pipeline_on_ecs_stages_plans_deploys_and_rolls_back_to_nothing(bucket, hub):
    """The pipeline with target ecs on moto: stage through the local hub, plan, deploy with the image
    the build step recorded; the wait fails (moto runs no containers), so the deploy rolls back, the
    pipeline's teardown runs, and the flow fails with the cause."""
    from prefect.variables import Variable

    from blocks.model_source import ModelSource
    from flows.build import image_variable
    from flows.pipeline import pipeline

    ModelStore(bucket_name=bucket).save("t-ecs-store", overwrite=True)
    ModelSource(repo_id="acme/tiny").save("t-ecs-source", overwrite=True)
    EcsGpuCapacity(ingress_cidrs=["10.2.0.0/16"]).save("t-ecs-capacity", overwrite=True)
    VllmServerSettings(max_model_len=512).save("t-ecs-server", overwrite=True)  # the tiny model's limit
    Variable.set(image_variable("vllm"), IMAGE, overwrite=True)
    with pytest.raises(DeployTimeout, match="no container instance has joined"):
        pipeline(stack="pipe-ecs", target="ecs", build=False, model_source_block="t-ecs-source",
                 model_store_block="t-ecs-store", capacity_block="t-ecs-capacity", server_settings_block="t-ecs-server",
                 ready_timeout_s=1)
    assert nothing_left("pipe-ecs") and load_state(ModelStore(bucket_name=bucket), "pipe-ecs")[0] is None
    assert aws_client("s3").list_objects_v2(Bucket=bucket, Prefix="models/acme/tiny/")["KeyCount"] > 0  # the model is kept


# ------------------------------------------------------------------------------------------------ prices


def test_status_and_teardown_use_the_plans_price():
    from datetime import datetime, timedelta, timezone

    from flows.operations import describe
    from flows.teardown import _lifetime
    from tasks.core.state import StackState, price_per_hour

    two_hours_ago = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    state = StackState(stack="priced", target="ecs", created_at=two_hours_ago, updated_at=two_hours_ago,
                       settings={"instance_type": "g5.xlarge", "price_per_hour": 0.70, "desired_count": 2})
    assert price_per_hour(state) == 0.70  # the plan's (overridden) price, not the catalogue's 1.006
    row = describe(state)
    assert row.price_per_hour == 1.40 and row.cost_so_far_usd == pytest.approx(2.80, abs=0.01)
    hours, cost = _lifetime(state)
    assert hours == pytest.approx(2, abs=0.01) and cost == pytest.approx(2.80, abs=0.01)
    old = StackState(stack="old", target="ecs", settings={"instance_type": "g5.xlarge"})  # a record from before plans
    assert price_per_hour(old) == 1.006
    assert price_per_hour(StackState(stack="local", target="local")) == 0.0


def test_a_terminated_hosts_interface_goes_with_it_and_a_stuck_one_is_named_not_retried(local_aws):
    """The stand-in deletes a terminated instance's primary interface, as EC2 does (moto kept it, and a
    test's teardown waited 85 minutes for its security group); an interface that truly stays makes the
    group's delete fail once, naming it, instead of six retries of a 15-minute wait."""
    from types import SimpleNamespace

    from tasks.targets.ecs.network import StillAttachedError, wait_for_enis_released
    from tasks.teardown.sweep import _retry_delete

    ec2 = aws_client("ec2")
    vpc = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"][0]["VpcId"]
    subnet = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"][0]["SubnetId"]
    group = ec2.create_security_group(GroupName="t-eni-" + subnet[-6:], Description="t", VpcId=vpc)["GroupId"]
    image = ec2.describe_images()["Images"][0]["ImageId"]
    host = ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=subnet, SecurityGroupIds=[group])
    ec2.terminate_instances(InstanceIds=[host["Instances"][0]["InstanceId"]])
    wait_for_enis_released(ec2, group, timeout_s=0)  # nothing left: returns at once

    stuck = ec2.create_network_interface(SubnetId=subnet, Groups=[group], Description="someone else's")
    with pytest.raises(StillAttachedError, match="someone else's") as raised:
        wait_for_enis_released(ec2, group, timeout_s=0)
    assert stuck["NetworkInterface"]["NetworkInterfaceId"] in str(raised.value)

    def failed(exc):
        return SimpleNamespace(result=lambda: (_ for _ in ()).throw(exc))

    assert not _retry_delete(None, None, failed(raised.value))
    assert _retry_delete(None, None, failed(TimeoutError("a slow call")))  # what stays retried
    ec2.delete_network_interface(NetworkInterfaceId=stuck["NetworkInterface"]["NetworkInterfaceId"])
    ec2.delete_security_group(GroupId=group)
