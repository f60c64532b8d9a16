"""IAM for the ECS target: three roles per stack, each with one inline policy scoped to the stack.

- execution role (ECS agent, per task): pull the image, write the stack's log group, read the
  stack's secrets (the API key, the HF token) for the task definition's `secrets`.
- task role (the vLLM container): read the staged model's S3 prefix, nothing else.
- instance role + profile (the GPU hosts): join this stack's cluster only; Session Manager for a shell.

Every role lives under the path /vllm-pipeline/<stack>/: the tagging API does not cover IAM,
so teardown finds them by listing that path. Every role carries the permissions boundary
`vllm-pipeline/vllm-pipeline-stack-boundary` (a managed policy the account owner creates once from
images/runtime/stack-role-boundary.json): the flow runner may create and change roles only with that
boundary (images/runtime/runner-iam-policy-store.json), so no role it makes can do more than the boundary allows.
"""

from __future__ import annotations

import json

from botocore.exceptions import ClientError

from tasks.core.aws import Aws, error_code, unless_gone
from tasks.core.errors import PipelineInputError
from tasks.core.naming import iam_path, resource_name, tag_list

POLICY_NAME = "vllm-pipeline"
BOUNDARY_PATH = "/vllm-pipeline/"
BOUNDARY_NAME = "vllm-pipeline-stack-boundary"


def boundary_arn(aws: Aws) -> str:
    """The permissions boundary every stack role carries (created once per account, see the module doc)."""
    return f"arn:{aws.partition()}:iam::{aws.account()}:policy{BOUNDARY_PATH}{BOUNDARY_NAME}"


def _trust(service: str) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"Service": service}, "Action": "sts:AssumeRole"}]})


def _doc(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)}, sort_keys=True)


def ecr_repository_arn(image_uri: str, partition: str) -> str | None:
    """`<account>.dkr.ecr.<region>.amazonaws.com/<repo>[:tag|@digest]` -> the repository's ARN."""
    host, _, path = image_uri.partition("/")
    parts = host.split(".")
    if len(parts) < 6 or parts[1:3] != ["dkr", "ecr"]:
        return None
    repo = path.split("@")[0]
    repo = repo.rsplit(":", 1)[0] if ":" in repo else repo
    return f"arn:{partition}:ecr:{parts[3]}:{parts[0]}:repository/{repo}"


def execution_policy(image_uri: str, log_group_arn: str, secret_arns: list[str], partition: str) -> str:
    statements = [
        {"Sid": "Logs", "Effect": "Allow", "Action": ["logs:CreateLogStream", "logs:PutLogEvents"],
         "Resource": [log_group_arn, f"{log_group_arn.removesuffix(':*')}:log-stream:*"]},
        {"Sid": "Secrets", "Effect": "Allow", "Action": ["secretsmanager:GetSecretValue"], "Resource": sorted(secret_arns)},
    ]
    repo = ecr_repository_arn(image_uri, partition)
    if repo:
        statements += [
            {"Sid": "EcrToken", "Effect": "Allow", "Action": ["ecr:GetAuthorizationToken"], "Resource": "*"},
            {"Sid": "EcrPull", "Effect": "Allow", "Resource": repo,
             "Action": ["ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer", "ecr:BatchCheckLayerAvailability"]},
        ]
    return _doc(*statements)


def task_policy(model_uri: str, partition: str, adapter_uris: list[str] = ()) -> str:
    statements = []
    for uri in [model_uri, *adapter_uris]:
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        prefix = prefix.strip("/")
        statements += [
            {"Effect": "Allow", "Action": ["s3:GetObject"], "Resource": f"arn:{partition}:s3:::{bucket}/{prefix}/*"},
            {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:{partition}:s3:::{bucket}",
             "Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*", prefix]}}},
        ]
    return _doc(*statements)


def instance_policy(cluster_arn: str, partition: str, region: str, account: str) -> str:
    return _doc(
        {"Sid": "JoinCluster", "Effect": "Allow", "Resource": cluster_arn,
         "Action": ["ecs:RegisterContainerInstance", "ecs:DeregisterContainerInstance", "ecs:Submit*"]},
        {"Sid": "AgentOnThisCluster", "Effect": "Allow",
         "Resource": f"arn:{partition}:ecs:{region}:{account}:container-instance/{cluster_arn.rsplit('/', 1)[-1]}/*",
         "Action": ["ecs:Poll", "ecs:StartTelemetrySession", "ecs:UpdateContainerInstancesState", "ecs:Submit*"]},
        {"Sid": "AgentDiscovery", "Effect": "Allow", "Resource": "*",
         "Action": ["ecs:DiscoverPollEndpoint"],
         "Condition": {"StringEquals": {"aws:RequestedRegion": region}}},
        # Session Manager instead of SSH (what AmazonSSMManagedInstanceCore grants, inline)
        {"Sid": "SessionManager", "Effect": "Allow", "Resource": "*",
         "Action": ["ssm:UpdateInstanceInformation", "ssmmessages:CreateControlChannel", "ssmmessages:CreateDataChannel",
                    "ssmmessages:OpenControlChannel", "ssmmessages:OpenDataChannel", "ec2messages:AcknowledgeMessage",
                    "ec2messages:GetMessages", "ec2messages:SendReply", "ec2messages:DeleteMessage",
                    "ec2messages:FailMessage", "ec2messages:GetEndpoint"]},
    )


def ensure_service_linked_role(aws: Aws, service: str) -> bool:
    """ECS needs its service-linked role before the first capacity provider or service in an
    account; AWS makes it on some first uses but not on all. True when this call created it.
    Account-wide and shared: never tagged, never deleted by teardown."""
    iam = aws.client("iam")
    if iam.list_roles(PathPrefix=f"/aws-service-role/{service}/")["Roles"]:
        return False
    try:
        iam.create_service_linked_role(AWSServiceName=service)
    except ClientError as exc:
        if (error_code(exc) == "InvalidInput" and "taken" in str(exc)) or error_code(exc) == "EntityAlreadyExists":
            return False  # exists already (AWS says "has been taken"; moto, naming it differently, "already exists")
        raise
    return True


def ensure_role(aws: Aws, stack: str, kind: str, service: str, policy: str) -> tuple[str, bool]:
    """Get-or-create the role, then put its inline policy (idempotent: a changed policy is replaced)."""
    iam = aws.client("iam")
    name = resource_name(stack, kind)
    boundary = boundary_arn(aws)
    created = False
    try:
        role = iam.get_role(RoleName=name)["Role"]
        arn = role["Arn"]
        if role.get("PermissionsBoundary", {}).get("PermissionsBoundaryArn") != boundary:  # a role made before boundaries
            iam.put_role_permissions_boundary(RoleName=name, PermissionsBoundary=boundary)
    except ClientError as exc:
        if error_code(exc) != "NoSuchEntity":
            raise
        try:
            arn = iam.create_role(
                RoleName=name, Path=iam_path(stack), AssumeRolePolicyDocument=_trust(service), Tags=tag_list(stack),
                Description=f"vllm-pipeline stack {stack}: {kind}", MaxSessionDuration=3600, PermissionsBoundary=boundary,
            )["Role"]["Arn"]
        except ClientError as exc2:
            if error_code(exc2) == "NoSuchEntity":
                raise PipelineInputError(
                    f"IAM policy {boundary} does not exist: create it once from images/runtime/stack-role-boundary.json "
                    f"(path {BOUNDARY_PATH}, name {BOUNDARY_NAME}); every role a stack creates carries it as its permissions boundary"
                ) from None
            raise
        created = True
        iam.get_waiter("role_exists").wait(RoleName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    iam.put_role_policy(RoleName=name, PolicyName=POLICY_NAME, PolicyDocument=policy)
    return arn, created


def ensure_instance_profile(aws: Aws, stack: str, role_name: str) -> tuple[str, bool]:
    iam = aws.client("iam")
    name = role_name
    created = False
    try:
        profile = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]
    except ClientError as exc:
        if error_code(exc) != "NoSuchEntity":
            raise
        profile = iam.create_instance_profile(InstanceProfileName=name, Path=iam_path(stack), Tags=tag_list(stack))["InstanceProfile"]
        created = True
    if not any(r["RoleName"] == role_name for r in profile.get("Roles", [])):
        iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=role_name)
    iam.get_waiter("instance_profile_exists").wait(InstanceProfileName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    return profile["Arn"], created


def delete_instance_profile(aws: Aws, name: str) -> bool:
    iam = aws.client("iam")
    found = unless_gone(lambda: iam.get_instance_profile(InstanceProfileName=name), "NoSuchEntity")
    if found is None:
        return False
    for role in found["InstanceProfile"].get("Roles", []):
        iam.remove_role_from_instance_profile(InstanceProfileName=name, RoleName=role["RoleName"])
    iam.delete_instance_profile(InstanceProfileName=name)
    return True


def put_inline_policy(aws: Aws, role: str, name: str, policy: str | None) -> bool:
    """A second inline policy on a stack role, for a part that may come and go (the metrics agent's on
    the task role): put when given, deleted when not. Its own name keeps it out of the way of the role's
    main policy, which other flows put again (update-adapters widens the task role's reads). True when
    it changed something."""
    iam = aws.client("iam")
    if policy is not None:
        iam.put_role_policy(RoleName=role, PolicyName=name, PolicyDocument=policy)
        return True
    return unless_gone(lambda: iam.delete_role_policy(RoleName=role, PolicyName=name), "NoSuchEntity") is not None


def delete_role(aws: Aws, name: str) -> bool:
    """Inline policies and attached managed policies first: IAM refuses to delete a role that has any."""
    iam = aws.client("iam")

    def strip_and_delete() -> bool:
        for page in iam.get_paginator("list_role_policies").paginate(RoleName=name):
            for policy in page["PolicyNames"]:
                iam.delete_role_policy(RoleName=name, PolicyName=policy)
        for page in iam.get_paginator("list_attached_role_policies").paginate(RoleName=name):
            for policy in page["AttachedPolicies"]:
                iam.detach_role_policy(RoleName=name, PolicyArn=policy["PolicyArn"])
        for page in iam.get_paginator("list_instance_profiles_for_role").paginate(RoleName=name):
            for profile in page["InstanceProfiles"]:
                iam.remove_role_from_instance_profile(InstanceProfileName=profile["InstanceProfileName"], RoleName=name)
        iam.delete_role(RoleName=name)
        return True

    return unless_gone(strip_and_delete, "NoSuchEntity") is not None


def stack_roles(aws: Aws, stack: str) -> tuple[list[str], list[str]]:
    """(role names, instance profile names) at the stack's IAM path. The path is checked again on each
    answer: a listing that ignores PathPrefix (moto's list_instance_profiles does) must never hand a
    teardown another stack's roles."""
    iam, path = aws.client("iam"), iam_path(stack)
    roles = [r["RoleName"] for page in iam.get_paginator("list_roles").paginate(PathPrefix=path) for r in page["Roles"]
             if r["Path"] == path]
    profiles = [p["InstanceProfileName"] for page in iam.get_paginator("list_instance_profiles").paginate(PathPrefix=path)
                for p in page["InstanceProfiles"] if p["Path"] == path]
    return roles, profiles
