# DRAFT, NOT RUN (issue #22): written in the last session's final half hour; its flow scenario has never run
# under enforcement (the admin setup and the negative control did). Not collected by pytest (no test_ prefix).
# Next step: `mv tests/drafts/iam_enforced.py tests/test_iam_enforced.py`, run it alone, fix what moto refuses.
"""The flow runner's IAM policy, enforced (issue #22): the product's flows run on a moto server of their own that
checks every request against the policies of an IAM user `runner`, holding only runner_policy()'s three managed
policies, with no other credentials anywhere in the process.

moto enforces IAM when the server starts with INITIAL_NO_AUTH_ACTION_COUNT=n: the first n requests are the admin's
(unchecked), every later one is signature-checked and authorized against the caller's policies. What moto checks,
and what the policies are widened to on that account (`for_moto`):
- actions: every service.
- resources: S3 (bucket / object ARNs) and IAM calls naming an existing role (RoleName -> that role's ARN). Every
  other request is evaluated against the resource "*", so the statements of other services get Resource "*";
  IAM statements keep their resources, plus one pattern matching only that unresolved "*" (`UNRESOLVED`), so an
  IAM call on an existing role is still checked against the role path; the instance-profile statements also get
  the stack-role path, since moto resolves AddRoleToInstanceProfile/RemoveRoleFromInstanceProfile (they carry a
  RoleName) to the role's ARN, not the instance profile's.
- conditions: evaluated without request context (tag, boundary, PassedToService conditions pass unchecked), so
  they are kept as written; iam:PassRole is never requested by moto.
A negative control proves the enforcement is on: the same runner is refused what its policy does not grant.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import time
from contextlib import contextmanager

import boto3
import pytest
from botocore.exceptions import ClientError
from iam_actions import RUNNER_POLICIES, load_policy
from prefect import flow
from prefect_aws import AwsCredentials
from pydantic import SecretStr
from test_capacity import SMOLLM2_135M, SMOLLM2_BYTES

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.image_build import ImageBuildSettings
from blocks.model_store import ModelStore
from blocks.vllm_server import VllmServerSettings
from embedded.net import free_port, stop_process, wait_for_port
from tasks.core.aws import aws_client
from tasks.core.s3 import Manifest, ManifestFile, write_manifest
from tasks.core.state import ModelRef, load_state

pytestmark = pytest.mark.integration

REGION = "us-east-1"
ACCOUNT = "123456789012"
IMAGE = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com/vllm-pipeline/vllm@sha256:" + "ab" * 32
BOUNDARY = json.loads((RUNNER_POLICIES[0].parent / "stack-role-boundary.json").read_text())
DENIED_CODES = ("AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
                "InvalidClientTokenId", "SignatureDoesNotMatch", "NotAuthorized")
# A Resource entry that, under moto's matcher (`^` + pattern with * -> .* + `$`, unescaped), matches the unresolved
# resource "*" and nothing else an IAM request could name; it passes moto's policy validator as an IAM ARN.
UNRESOLVED = "arn:aws:iam::*:role/moto-unresolved|^[*]"
STACK_ROLES = "arn:aws:iam::*:role/vllm-pipeline/*"
ROLE_NAME_ACTIONS = {"iam:addroletoinstanceprofile", "iam:removerolefrominstanceprofile"}  # moto resolves RoleName


def _as_list(v) -> list:
    return v if isinstance(v, list) else [v]


def for_moto(policy: dict, bucket: str) -> tuple[dict, list[str]]:
    """The policy with the bucket filled in and its resources widened where moto evaluates none; what was widened."""
    doc = json.loads(json.dumps(policy).replace("MODEL-STORE-BUCKET", bucket))
    widened = []
    for st in doc["Statement"]:
        services = {a.split(":")[0] for a in _as_list(st["Action"])}
        if services <= {"s3"}:
            continue
        if services <= {"iam"}:
            extra = [UNRESOLVED]
            if ROLE_NAME_ACTIONS & {a.lower() for a in _as_list(st["Action"])}:
                extra.append(STACK_ROLES)
            st["Resource"] = _as_list(st["Resource"]) + extra
            widened.append(f"{st.get('Sid')}: + {extra}")
            continue
        if st["Resource"] != "*":
            assert not services & {"s3", "iam"}, f"statement {st.get('Sid')} mixes services moto checks differently"
            widened.append(f"{st.get('Sid')}: {st['Resource']} -> *")
            st["Resource"] = "*"
    return doc, widened


class EnforcedAws:
    """A moto server enforcing IAM after `n` admin requests; the admin's setup is `admin_setup`'s n requests."""

    ADMIN_REQUESTS = 13  # must equal the requests admin_setup makes (checked: the next admin request is refused)

    def __init__(self):
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.bucket = "vllm-iam-models-" + os.urandom(3).hex()
        self.other_bucket = "someone-elses-" + os.urandom(3).hex()
        self.widened: list[str] = []

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        env["INITIAL_NO_AUTH_ACTION_COUNT"] = str(self.ADMIN_REQUESTS)
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for_port(self.port, timeout=60, proc=self.proc)

    def admin(self, service):
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id="admin", aws_secret_access_key="admin")

    def admin_setup(self) -> AwsCredentials:
        s3, iam = self.admin("s3"), self.admin("iam")
        s3.create_bucket(Bucket=self.bucket)  # 1
        s3.create_bucket(Bucket=self.other_bucket)  # 2
        s3.put_object(Bucket=self.other_bucket, Key="secret.txt", Body=b"not yours")  # 3
        iam.create_user(UserName="runner")  # 4
        for path in RUNNER_POLICIES:  # 5-10
            doc, widened = for_moto(load_policy(path), self.bucket)
            self.widened += widened
            arn = iam.create_policy(PolicyName=path.stem, PolicyDocument=json.dumps(doc))["Policy"]["Arn"]
            iam.attach_user_policy(UserName="runner", PolicyArn=arn)
        iam.create_policy(PolicyName="vllm-pipeline-stack-boundary", Path="/vllm-pipeline/",  # 11
                          PolicyDocument=json.dumps(BOUNDARY))
        key = iam.create_access_key(UserName="runner")["AccessKey"]  # 12
        assert len(iam.list_attached_user_policies(UserName="runner")["AttachedPolicies"]) == 3  # 13
        return AwsCredentials(aws_access_key_id=key["AccessKeyId"], aws_secret_access_key=SecretStr(key["SecretAccessKey"]),
                              region_name=REGION)

    def stop(self):
        stop_process(self.proc)


@contextmanager
def enforced(monkeypatch):
    server = EnforcedAws()
    server.start()
    try:
        creds = server.admin_setup()
        for k in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(k)
        monkeypatch.setenv("AWS_ENDPOINT_URL", server.endpoint)
        monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield server, creds
    finally:
        server.stop()


def denied(exc: ClientError) -> bool:
    """An authorization refusal. moto answers JSON-protocol services (ECS, Secrets Manager, ...) with an XML 403 that
    botocore cannot parse, so the code is "403" and only the message names the action."""
    return (exc.response.get("Error", {}).get("Code") in DENIED_CODES or "403" == exc.response.get("Error", {}).get("Code")
            or "not authorized to perform" in str(exc))


def refused_action(exc: ClientError) -> str:
    found = re.search(r"not authorized to perform:? ([\w:-]+)", str(exc))
    return found.group(1) if found else exc.operation_name


@contextmanager
def no_access_denied(what: str):
    """Fail naming the action on any AccessDenied-like error, wherever it surfaces (Prefect re-raises task errors)."""
    try:
        yield
    except ClientError as exc:
        if denied(exc):
            pytest.fail(f"{what}: {refused_action(exc)} ({exc.operation_name}) refused under the runner policy: {exc}")
        raise


@contextmanager
def watched(monkeypatch):
    """Every AWS response the product gets, through its one client factory: the refusals among them, even those a
    caller catches (a swallowed 403 must fail the test too)."""
    from tasks.core import aws as aws_module

    refusals: list[str] = []
    real = aws_module.aws_client

    def after(http_response, parsed, model, **_):
        err = (parsed or {}).get("Error", {})
        if http_response.status_code == 403 or err.get("Code") in DENIED_CODES:
            msg = err.get("Message") or http_response.text[:300]
            found = re.search(r"not authorized to perform:? ([\w:-]+)", msg or "")
            refusals.append(f"{found.group(1) if found else model.name} ({model.name}): {msg}")

    def client(service, credentials=None, region=None):
        c = real(service, credentials, region)
        c.meta.events.register("after-call.*.*", after)
        return c

    for module in [m for name, m in list(sys.modules.items()) if name.startswith(("tasks.", "flows."))]:
        if getattr(module, "aws_client", None) is real:
            monkeypatch.setattr(module, "aws_client", client)
    yield refusals


def stage_fake(creds: AwsCredentials, bucket: str) -> ModelRef:
    """What the planner reads of a staged model (config.json and the manifest), written as the runner."""
    s3 = aws_client("s3", creds)
    repo_id, sha = "HuggingFaceTB/SmolLM2-135M-Instruct", "c0ffee" * 6 + "abcd"
    prefix = f"models/{repo_id}/{sha}"
    s3.put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=json.dumps(SMOLLM2_135M).encode())
    files = [ManifestFile(path="model.safetensors", size=SMOLLM2_BYTES, sha256="0" * 64)]
    write_manifest(s3, bucket, prefix, Manifest(repo_id=repo_id, revision="main", sha=sha, files=files,
                                                 staged_at="2026-01-01T00:00:00+00:00", source_endpoint="test"))
    return ModelRef(repo_id=repo_id, sha=sha, s3_uri=f"s3://{bucket}/{prefix}")


def refused(fn, *args, **kw) -> str:
    with pytest.raises(ClientError) as err:
        fn(*args, **kw)
    assert denied(err.value), err.value
    return err.value.response["Error"]["Code"]


def test_the_flows_run_under_the_runner_policy_enforced(monkeypatch, tmp_path):
    from flows.deploy import deploy_to_ecs
    from flows.operations import status
    from flows.plan import plan_capacity
    from flows.teardown import teardown_stack
    from tasks.build.codebuild import codebuild_image
    from tasks.build.ecr import ecr_login_sync, ensure_repository_sync
    from tasks.build.images import Target, resolve_context
    from tasks.targets.ecs.service import DeployTimeout
    from tasks.teardown.sweep import leftovers
    from test_images import HELLO, _context

    from tasks.core.aws import Aws

    t0 = time.monotonic()
    with enforced(monkeypatch) as (server, creds):
        bucket = server.bucket
        # ---- the negative control: enforcement is on, for this runner and for the admin's spent allowance
        iam, s3 = aws_client("iam", creds), aws_client("s3", creds)
        refused(iam.create_user, UserName="intruder")
        refused(s3.get_object, Bucket=server.other_bucket, Key="secret.txt")
        refused(s3.list_objects_v2, Bucket=server.other_bucket)
        refused(aws_client("ecs", creds).delete_account_setting, name="serviceLongArnFormat")
        refused(server.admin("s3").list_buckets)  # the admin's n requests are spent: nothing passes unchecked
        assert s3.list_objects_v2(Bucket=bucket)["KeyCount"] == 0  # ... and the runner's own bucket is open to it

        with watched(monkeypatch) as refusals:
            stack, prefix = "iam-enforced", "t-iam-enforced"
            store = ModelStore(bucket_name=bucket, credentials=creds)
            capacity = EcsGpuCapacity(ingress_cidrs=["10.1.0.0/16"], region=REGION)
            server_settings = VllmServerSettings(served_model_name="smol", max_model_len=2048)
            store.save(f"{prefix}-store", overwrite=True)
            capacity.save(f"{prefix}-capacity", overwrite=True)
            server_settings.save(f"{prefix}-server", overwrite=True)

            with no_access_denied("stage (fake)"):
                model = stage_fake(creds, bucket)
            with no_access_denied("plan-capacity"):
                plan = plan_capacity(model_uri=model.s3_uri, model_store_block=f"{prefix}-store",
                                     server_settings_block=f"{prefix}-server", capacity_block=f"{prefix}-capacity")
            assert plan.refusal is None

            # deploy as test_ecs_target does: moto runs no containers, so the wait times out; keep_failed keeps the stack
            with no_access_denied("deploy"), pytest.raises(DeployTimeout, match="no container instance has joined"):
                flow(name="t-iam-deploy")(deploy_to_ecs)(stack, store, server_settings, capacity, model, IMAGE,
                                                         hf_token=SecretStr("hf_FAKE_iam_token"), ready_timeout_s=0.5,
                                                         keep_failed=True, poll_s=0.1)
            state, _ = load_state(store, stack)
            assert state.status == "failed" and len(state.resources) >= 20, state

            with no_access_denied("status"):
                rows = status(model_store_block=f"{prefix}-store")
            assert [r.stack for r in rows] == [stack]

            # a rolled-back deploy (the default): the rollback's deletes under the policy too
            with no_access_denied("deploy + rollback"), pytest.raises(DeployTimeout):
                flow(name="t-iam-deploy-rb")(deploy_to_ecs)("iam-rollback", store, server_settings, capacity, model, IMAGE,
                                                            ready_timeout_s=0.5, poll_s=0.1)
            assert load_state(store, "iam-rollback")[0] is None

            with no_access_denied("teardown"):
                report = teardown_stack(stack, model_store_block=f"{prefix}-store", capacity_block=f"{prefix}-capacity")
            assert report.had_state_record and load_state(store, stack)[0] is None
            with no_access_denied("teardown scan"):
                assert leftovers(Aws(creds, REGION), stack) == [] and leftovers(Aws(creds, REGION), "iam-rollback") == []

            # images: the ECR repository and login the build flow uses, and the CodeBuild path moto drives
            with no_access_denied("ecr"):
                ecr = aws_client("ecr", creds)
                repo = ensure_repository_sync(ecr, "vllm-pipeline/iam-enforced", keep_last=3)
                assert repo.created and ensure_repository_sync(ecr, "vllm-pipeline/iam-enforced", keep_last=3).arn == repo.arn
                assert ecr_login_sync(ecr).username == "AWS"
            context = _context(tmp_path, HELLO, {"images/hello/app.txt": "iam", "shared/lib.txt": "iam"})
            build = ImageBuildSettings(builder="codebuild", codebuild_bucket=bucket, repositories={"hello": "vllm-pipeline/hello"},
                                       context_dir=str(context), credentials=creds, region=REGION,
                                       codebuild_service_role_arn=f"arn:aws:iam::{ACCOUNT}:role/vllm-pipeline-codebuild")
            ctx = resolve_context(context, "hello", platform=build.platform)
            target = Target(host=f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com", repository="vllm-pipeline/hello", tag=ctx.tag)
            with no_access_denied("codebuild"):
                run = flow(name="t-iam-codebuild")(lambda: codebuild_image(build, ctx, target))()
            assert run.status == "SUCCEEDED"

        assert refusals == [], "refused under the runner policy:\n  " + "\n  ".join(refusals)

        # and enforcement was on all along
        refused(iam.create_user, UserName="intruder")
    print(f"IAM-enforced run: {time.monotonic() - t0:.1f}s; widened for moto:\n  " + "\n  ".join(server.widened))
