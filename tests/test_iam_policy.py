"""The flow runner's IAM policies (images/runtime/runner-iam-policy-*.json) against the code and the README (issue #22 finding 4).

- every IAM action the code calls (derived from the source by tests/iam_actions.py) is allowed, and every action
  allowed is called or needed implicitly (reason given in IMPLICIT);
- creates only with the `vllm-pipeline:managed-by` tag on the request, changes and deletes only on resources
  carrying it, except where AWS offers no such condition (reason given);
- every role the runner creates or changes carries the boundary (images/runtime/stack-role-boundary.json),
  and the boundary holds every action the stack roles' inline policies grant;
- cloudsplaining (every statement, conditions or not) and parliament, run from .venv-iamlint: zero
  privilege-escalation and resource-exposure findings beyond ALLOWED_FINDINGS, each with its mitigation checked here.
"""

from __future__ import annotations

import fnmatch
import json
import os
import subprocess
from pathlib import Path

import pytest
from iam_actions import (
    MANAGED_POLICY_MAX_CHARS, RUNNER_POLICIES, allowing_statements, called_actions, load_policy, runner_policy,
)

from tasks.core.errors import PipelineInputError
from tasks.core.naming import MANAGED_BY, TAG_MANAGED
from tasks.targets.ecs import gateway as ecs_gateway
from tasks.targets.ecs import iam as stack_iam
from tasks.targets.ecs import metrics_agent

REPO = Path(__file__).resolve().parent.parent
BOUNDARY = REPO / "images" / "runtime" / "stack-role-boundary.json"
IAMLINT = REPO / ".venv-iamlint"

REQUEST_TAG = f"aws:RequestTag/{TAG_MANAGED}"
RESOURCE_TAG = f"aws:ResourceTag/{TAG_MANAGED}"
BOUNDARY_PATTERN = f"arn:aws:iam::*:policy{stack_iam.BOUNDARY_PATH}{stack_iam.BOUNDARY_NAME}"

# Allowed, though no boto3 call in the code names them: why each is needed.
IMPLICIT = {
    "secretsmanager:TagResource": "CreateSecret with Tags also needs TagResource",
    "iam:TagRole": "CreateRole with Tags also needs TagRole",
    "iam:TagInstanceProfile": "CreateInstanceProfile with Tags also needs TagInstanceProfile",
    "iam:PassRole": "the stack roles go to ECS tasks (task definitions) and EC2 (the launch template's profile); "
                    "CreateProject passes the CodeBuild service role",
    "iam:PutRolePermissionsBoundary": "called by ensure_role on a role made before boundaries (derived too)",
    "logs:TagResource": "CreateLogGroup with tags",
    "logs:TagLogGroup": "CreateLogGroup with tags (the older tagging action)",
    "ecs:TagResource": "ECS creates with tags (cluster, capacity provider, task definition, service, RunTask)",
    "autoscaling:CreateOrUpdateTags": "CreateAutoScalingGroup with Tags",
    "elasticloadbalancing:AddTags": "ELB creates with Tags",
    "ec2:CreateTags": "TagSpecifications on CreateLaunchTemplate / CreateSecurityGroup and the hosts' launch",
    "ec2:RunInstances": "the Auto Scaling group launches the hosts from the launch template with the caller's permissions",
    "ecr:TagResource": "CreateRepository with tags",
    "cloudwatch:TagResource": "PutMetricAlarm with Tags",
    "sns:TagResource": "CreateTopic with Tags",
    "ecr:BatchGetImage": "the local builders (buildah, docker) push and read back manifests with the ECR token",
    "ecr:BatchCheckLayerAvailability": "local builders' push",
    "ecr:GetDownloadUrlForLayer": "local builders' push (cross-repository mounts, manifest read-back)",
    "ecr:InitiateLayerUpload": "local builders' push",
    "ecr:UploadLayerPart": "local builders' push",
    "ecr:CompleteLayerUpload": "local builders' push",
    "ecr:PutImage": "local builders' push",
}
# read-only wildcards the policy may use instead of listing each Describe/List call
READ_WILDCARDS = {"ec2:Describe*", "autoscaling:Describe*", "ecs:Describe*", "ecs:List*", "elasticloadbalancing:Describe*"}
# actions allowed without a tag condition: AWS offers none, or the resource is scoped by name/path and tagged on create
UNTAGGED_CHANGES = {
    "ecs:DeregisterTaskDefinition": "no resource-level permissions or condition keys in AWS's authorization reference",
    "iam:PutRolePolicy": "condition: the role's permissions boundary is ours (below)",
    "iam:DeleteRolePolicy": "condition: the role's permissions boundary is ours",
    "iam:DetachRolePolicy": "condition: the role's permissions boundary is ours",
    "iam:PutRolePermissionsBoundary": "condition: only our boundary can be put",
    "iam:CreateRole": "condition: only with our boundary (and TagRole needs the tag)",
    "iam:CreateServiceLinkedRole": "condition: only ECS's, Auto Scaling's and ELB's service-linked roles",
    "iam:PassRole": "condition: only to ECS tasks / EC2 (stack roles, all bounded) or CodeBuild (its one role)",
    "ec2:CreateSecurityGroup": "the VPC side of the request (vpc/*) has no tag; the security-group side needs it",
    "ec2:CreateTags": "condition: only as part of a create (ec2:CreateAction)",
    "ec2:RunInstances": "only from a launch template carrying the tag (the other resources: only via a launch template)",
    "s3:PutObject": "the model store bucket only", "s3:DeleteObject": "the model store bucket only",
    "s3:AbortMultipartUpload": "the model store bucket only",
    "ecr:CreateRepository": "(has the request tag)",
    "cloudwatch:PutDashboard": "dashboards have no tags; scoped by name (dashboard/vllm-*)",
    "cloudwatch:DeleteDashboards": "dashboards have no tags; scoped by name (dashboard/vllm-*)",
    "sns:Subscribe": "condition: the topic carries the tag",
    "application-autoscaling:RegisterScalableTarget": "the scalable target (the stack's ECS service) is not tagged by the code; "
                                                      "TODO tag it on register and condition these on the tag",
    "application-autoscaling:DeregisterScalableTarget": "as RegisterScalableTarget",
    "application-autoscaling:PutScalingPolicy": "as RegisterScalableTarget",
    "application-autoscaling:DeleteScalingPolicy": "as RegisterScalableTarget",
}

# cloudsplaining findings that remain by design, each with the check that makes it safe
ALLOWED_FINDINGS = {
    "PutRolePolicy": "only on roles whose boundary is stack-role-boundary.json",
    "CreateEC2WithExistingIP": "PassRole only of /vllm-pipeline/ roles (bounded) to EC2; RunInstances only via our launch template",
    "ModifyExistingEC2LaunchTemplate": "only launch templates carrying the tag; the profile they can name is a bounded stack role",
    "PassExistingRoleToNewCodeBuildProjectThenBuild": "PassRole only of role/vllm-pipeline-codebuild* to CodeBuild",
    "PassExistingRoleToNewECSClusterServiceTask": "PassRole only of /vllm-pipeline/ roles (bounded) to ECS tasks",
    "PassExistingRoleToNewECSClusterRunTask": "as above",
    "PassExistingRoleToNewECSService": "as above",
    "PassExistingRoleToNewECSTaskViaRunTask": "as above",
}


def _policy() -> dict:
    return runner_policy()


def _conditions(statement: dict) -> dict[str, object]:
    """{condition key: value} over every operator of a statement."""
    return {k: v for op in statement.get("Condition", {}).values() for k, v in op.items()}


def _actions(statement: dict) -> list[str]:
    a = statement["Action"]
    return [a] if isinstance(a, str) else a


def test_every_called_action_is_allowed():
    called = called_actions()
    assert len(called) > 90  # the derivation sees the code (a broken walker would find nothing)
    missing = {a: where[:3] for a, where in called.items() if not allowing_statements(_policy(), a)}
    assert not missing, f"actions the code calls that the runner policy does not allow: {missing}"


def test_every_allowed_action_is_called_or_needed():
    called = set(called_actions())
    extra = []
    for st in _policy()["Statement"]:
        for action in _actions(st):
            if "*" in action:
                assert action in READ_WILDCARDS, f"wildcard {action} ({st['Sid']}): only read-only wildcards"
                assert "Condition" not in st and st["Resource"] == "*", st["Sid"]
                continue
            if action not in called and action not in IMPLICIT:
                extra.append(f"{action} ({st['Sid']})")
    assert not extra, f"allowed but never called (least privilege): {extra}"


def test_creates_need_the_tag_and_changes_need_it_on_the_resource():
    wrong = []
    for action in set(called_actions()) | set(IMPLICIT):
        verb = action.split(":", 1)[1]
        if verb.startswith(("Describe", "List", "Get", "BatchGet", "BatchCheck", "Head")) or action in UNTAGGED_CHANGES:
            continue
        for st in allowing_statements(_policy(), action):
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            if all(r.startswith("arn:aws:s3:::MODEL-STORE-BUCKET") for r in resources):
                continue
            keys = _conditions(st)
            is_create = (verb.startswith(("Create", "Register", "Tag", "AddTags", "CreateOrUpdateTags"))
                         and action != "ec2:CreateLaunchTemplateVersion") or action == "cloudwatch:PutMetricAlarm"
            want = REQUEST_TAG if is_create else RESOURCE_TAG
            if keys.get(want) != MANAGED_BY:
                wrong.append(f"{action} in {st['Sid']}: needs {want}={MANAGED_BY}")
    assert not wrong, "\n".join(sorted(wrong))


def test_every_stack_role_is_bounded_and_only_stack_roles_are_passed():
    policy = _policy()
    for action in ("iam:CreateRole", "iam:PutRolePolicy", "iam:PutRolePermissionsBoundary", "iam:DeleteRolePolicy",
                   "iam:DetachRolePolicy", "iam:AttachRolePolicy", "iam:DeleteRolePermissionsBoundary"):
        for st in allowing_statements(policy, action):
            assert _conditions(st).get("iam:PermissionsBoundary") == BOUNDARY_PATTERN, f"{action} in {st['Sid']}"
    assert not allowing_statements(policy, "iam:AttachRolePolicy") and not allowing_statements(policy, "iam:CreatePolicyVersion")
    for st in allowing_statements(policy, "iam:PassRole"):
        services = _conditions(st).get("iam:PassedToService")
        assert services, f"PassRole without iam:PassedToService in {st['Sid']}"
        resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
        assert all(r in ("arn:aws:iam::*:role/vllm-pipeline/*", "arn:aws:iam::*:role/vllm-pipeline-codebuild*") for r in resources)
    # the roles the runner may create are exactly where ensure_role puts them, with the boundary it names
    for st in allowing_statements(policy, "iam:CreateRole"):
        assert st["Resource"] == "arn:aws:iam::*:role/vllm-pipeline/*"
    assert stack_iam.iam_path("x").startswith("/vllm-pipeline/")


def test_boundary_holds_what_the_stack_roles_are_given():
    boundary = load_policy(BOUNDARY)
    granted = set()
    for doc in (stack_iam.execution_policy("1.dkr.ecr.us-east-1.amazonaws.com/r@sha256:" + "a" * 64,
                                           "arn:aws:logs:us-east-1:1:log-group:/vllm-pipeline/s/server:*", ["arn:x"], "aws"),
                stack_iam.task_policy("s3://b/models/m/sha", "aws", ["s3://b/models/a/sha"]),
                stack_iam.instance_policy("arn:aws:ecs:us-east-1:1:cluster/c", "aws", "us-east-1", "1"),
                metrics_agent.task_policy("s", "aws", "us-east-1", "1"),
                ecs_gateway.task_policy(["s3://b/stacks/s/gateway/acme.json"], [
                    "arn:aws:secretsmanager:us-east-1:1:secret:vllm-pipeline/s/gateway-tenants-AbCdEf",
                    ecs_gateway.secret_resource("vllm-pipeline/tools/crm", "aws", "us-east-1", "1")], "aws")):
        for st in json.loads(doc)["Statement"]:
            granted.update(_actions(st))
    missing = sorted(a for a in granted if not any(fnmatch.fnmatchcase(a, b) for st in boundary["Statement"] for b in _actions(st)))
    assert not missing, f"the boundary would cut what the stack roles need: {missing}"
    assert not [st for st in boundary["Statement"] if any(a.startswith(("iam:", "sts:")) for a in _actions(st))]
    # the gateway's task role reads secrets the tool sets name: the deploy admits only those the boundary lets it read
    readable = [r for st in boundary["Statement"] if "secretsmanager:GetSecretValue" in _actions(st)
                for r in (st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]])]
    for name in ("vllm-pipeline/tools/crm", "arn:aws:secretsmanager:us-east-1:1:secret:vllm-pipeline/x-AbCdEf"):
        ecs_gateway.check_header_secrets([name])
        assert any(fnmatch.fnmatchcase(ecs_gateway.secret_resource(name, "aws", "us-east-1", "1"), r) for r in readable), name
    with pytest.raises(PipelineInputError, match="not under"):
        ecs_gateway.check_header_secrets(["arn:aws:secretsmanager:us-east-1:1:secret:crm-AbCdEf"])


# ------------------------------------------------------------------------------------- static linters


@pytest.fixture(scope="module")
def iamlint() -> Path:
    """The linters' own environment, made by scripts/setup.sh (cloudsplaining pins old click/policy_sentry)."""
    python = IAMLINT / "bin" / "python"
    assert python.exists(), "no .venv-iamlint: run scripts/setup.sh (make test does)"
    return python


def _lint(iamlint: Path, path: Path) -> dict:
    out = subprocess.run([str(iamlint), str(REPO / "tests" / "iam_lint.py"), str(path)], capture_output=True, text=True,
                         timeout=300, env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def _strict(doc: dict, name: str, tmp_path: Path) -> Path:
    """cloudsplaining skips statements with a condition or a resource ARN; give it every statement as unconditioned
    '*' so it judges the action set, and let the checks above judge the conditions that answer each finding."""
    for st in doc["Statement"]:
        st.pop("Condition", None)
        st["Resource"] = "*"
    out = tmp_path / name
    out.write_text(json.dumps(doc))
    return out


def test_cloudsplaining_finds_no_escalation_or_exposure_beyond_the_justified(iamlint, tmp_path):
    found = _lint(iamlint, _strict(runner_policy(), "runner.json", tmp_path))["cloudsplaining"]
    unexplained = sorted({f["type"] for f in found["privilege_escalation"]} - set(ALLOWED_FINDINGS))
    assert not unexplained, f"privilege escalation paths: {unexplained}"
    # resource exposure = permission management: only IAM writes on /vllm-pipeline/ roles and profiles (checked above)
    exposure = sorted(set(found["resource_exposure"]))
    # sns:CreateTopic counts as permission management (a topic policy can be set on create): the stack's alarm topic only
    assert all(a.startswith("iam:") or a == "sns:CreateTopic" for a in exposure), exposure
    for action in exposure:
        for st in allowing_statements(_policy(), action):
            resources = st["Resource"] if isinstance(st["Resource"], list) else [st["Resource"]]
            assert all("/vllm-pipeline" in r or r.endswith(("/aws-service-role/*", "vllm-pipeline-codebuild*", ":sns:*:*:vllm-*"))
                       for r in resources), f"{action} in {st['Sid']} reaches {resources}"
            assert "Condition" in st or action in ("iam:GetRole", "iam:GetInstanceProfile"), f"{action} in {st['Sid']} unconditioned"
    # the boundary itself grants nothing that manages permissions or escalates
    boundary = _lint(iamlint, _strict(load_policy(BOUNDARY), "boundary.json", tmp_path))["cloudsplaining"]
    assert boundary["privilege_escalation"] == [] and boundary["resource_exposure"] == []


def test_parliament_finds_nothing_but_deliberate_shapes(iamlint):
    findings = [f for path in RUNNER_POLICIES for f in _lint(iamlint, path)["parliament"]]
    for f in findings:
        if f["issue"] == "RESOURCE_STAR":  # reads, and actions whose statement carries a tag condition
            continue
        if f["issue"] == "RESOURCE_MISMATCH":  # one statement per resource type of RunInstances/CreateSecurityGroup
            assert {d["action"] for d in f["detail"]} <= {"ec2:RunInstances", "ec2:CreateSecurityGroup"}, f
            continue
        pytest.fail(f"parliament: {f}")
    star = runner_policy()["Statement"]
    for st in star:
        if st["Resource"] == "*":
            reads = all(a.split(":")[1].startswith(("Describe", "List", "Get")) or a in READ_WILDCARDS
                        or a in ("ecs:DeregisterTaskDefinition",) for a in _actions(st))
            assert reads or "Condition" in st, f"{st['Sid']}: writes on * without a condition"


def test_each_runner_policy_fits_one_managed_policy():
    """AWS caps a managed policy at 6,144 characters (whitespace not counted) and a role at 10 managed policies by
    default; the runner's permissions are split by what they govern (store and identity, the stack, images)."""
    assert 1 < len(RUNNER_POLICIES) <= 10
    sizes = {p.name: len(json.dumps(load_policy(p), separators=(",", ":"))) for p in RUNNER_POLICIES}
    assert all(n <= MANAGED_POLICY_MAX_CHARS for n in sizes.values()), sizes
    sids = [st["Sid"] for st in runner_policy()["Statement"]]
    assert len(sids) == len(set(sids)), "a statement id in two of the runner's policies"
