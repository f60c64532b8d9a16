"""The IAM actions the product code calls, derived from its source, and a small evaluator of Allow statements.

`called_actions()` walks flows/, tasks/ and blocks/ (AST): every call of a boto3 client method -- an operation of
a service the code makes clients for, `get_paginator("op")`, `get_waiter("name")` (its operation from botocore's
waiter model) -- with the client's service found from the receiver: `aws.client("svc")` / `aws_client("svc", ...)`
/ `s3_client(..)` / `ecr_client(..)` inline, a variable assigned from one of those in the same function, or the
project's client variable names (`ecs`, `ec2`, `elb`, `asg`, ...). A call whose service cannot be told fails loudly
(name the client variable after its service), so a new call can never slip past the policy check.
Operations map to IAM actions by `IAM_ACTIONS` where AWS names them differently (S3 mostly), else `prefix:Operation`.
"""

from __future__ import annotations

import ast
import fnmatch
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import botocore.session

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("flows", "tasks", "blocks")

# IAM service prefix where it differs from the botocore service name
PREFIX = {"elbv2": "elasticloadbalancing", "resourcegroupstaggingapi": "tag"}
# client variable names used in the code -> service
VARIABLES = {"ecs": "ecs", "ec2": "ec2", "elb": "elbv2", "asg": "autoscaling", "iam": "iam", "logs": "logs",
             "sm": "secretsmanager", "cb": "codebuild", "ecr": "ecr", "s3": "s3", "ssm": "ssm", "sts": "sts",
             "tagging": "resourcegroupstaggingapi"}
# argument-less methods of other objects that share an operation's name
NOT_BOTO3 = {"get_secret_value": "pydantic's SecretStr"}
CLIENT_FACTORIES = {"s3_client": "s3", "ecr_client": "ecr"}  # helpers that return one service's client
# operations whose IAM action is named differently (service authorization reference)
IAM_ACTIONS = {
    ("s3", "ListObjectsV2"): ["s3:ListBucket"],
    ("s3", "ListObjects"): ["s3:ListBucket"],
    ("s3", "HeadBucket"): ["s3:ListBucket"],
    ("s3", "HeadObject"): ["s3:GetObject"],
    ("s3", "CreateMultipartUpload"): ["s3:PutObject"],
    ("s3", "UploadPart"): ["s3:PutObject"],
    ("s3", "CompleteMultipartUpload"): ["s3:PutObject"],
    ("s3", "DeleteObjects"): ["s3:DeleteObject"],
    ("s3", "CopyObject"): ["s3:GetObject", "s3:PutObject"],
    ("s3", "ListParts"): ["s3:ListMultipartUploadParts"],
    ("s3", "ListMultipartUploads"): ["s3:ListBucketMultipartUploads"],
    ("s3", "ListObjectVersions"): ["s3:ListBucketVersions"],
    ("sts", "GetCallerIdentity"): [],  # needs no permission
}


@dataclass(frozen=True)
class Call:
    service: str
    operation: str  # botocore's CamelCase operation name
    where: str  # path:line

    @property
    def actions(self) -> list[str]:
        key = (self.service, self.operation)
        if key in IAM_ACTIONS:
            return IAM_ACTIONS[key]
        return [f"{PREFIX.get(self.service, self.service)}:{self.operation}"]


@lru_cache(maxsize=None)
def _model(service: str):
    return botocore.session.get_session().get_service_model(service)


@lru_cache(maxsize=None)
def _operations(service: str) -> dict[str, str]:
    """snake_case method name -> CamelCase operation name."""
    from botocore import xform_name

    return {xform_name(op): op for op in _model(service).operation_names}


@lru_cache(maxsize=None)
def _waiter_operation(service: str, waiter: str) -> str:
    session = botocore.session.get_session()
    client = session.create_client(service, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x")
    return client.get_waiter(waiter).config.operation


def _literal_service(call: ast.Call) -> str | None:
    """aws.client("svc") / aws_client("svc", ...) / s3_client(..) / ecr_client(..) -> svc."""
    f = call.func
    name = f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None
    if name in ("client", "aws_client") and call.args and isinstance(call.args[0], ast.Constant) \
            and isinstance(call.args[0].value, str):
        return call.args[0].value
    return CLIENT_FACTORIES.get(name)


def _services_used() -> set[str]:
    found = set(CLIENT_FACTORIES.values())
    for path in _files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and (svc := _literal_service(node)):
                found.add(svc)
    return found


def _files() -> list[Path]:
    return sorted(p for top in PRODUCT for p in (REPO / top).rglob("*.py"))


def _assignments(scope: ast.AST) -> dict[str, str]:
    """Variables assigned a client of a known service in this scope."""
    out: dict[str, str] = {}
    for node in ast.walk(scope):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and (svc := _literal_service(node.value)):
            for t in node.targets:
                if isinstance(t, ast.Name):
                    out[t.id] = svc
    return out


def _receiver_service(receiver: ast.AST, scope_vars: dict[str, str]) -> str | None:
    if isinstance(receiver, ast.Call):
        if svc := _literal_service(receiver):
            return svc
        receiver = receiver.func  # s3() -> the factory variable's name
    if isinstance(receiver, ast.Name):
        return scope_vars.get(receiver.id) or VARIABLES.get(receiver.id)
    if isinstance(receiver, ast.Attribute):
        return VARIABLES.get(receiver.attr)
    return None


def called_operations() -> list[Call]:
    services = _services_used()
    method_owners: dict[str, set[str]] = {}
    for svc in services:
        for method in _operations(svc):
            method_owners.setdefault(method, set()).add(svc)
    calls: list[Call] = []
    unresolved: list[str] = []
    for path in _files():
        tree = ast.parse(path.read_text())
        module_vars = _assignments(tree)
        scopes = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]
        scope_of: dict[int, dict[str, str]] = {}
        for scope in scopes:  # inner scopes overwrite outer ones (ast.walk is breadth-first)
            found = {**module_vars, **_assignments(scope)}
            for node in ast.walk(scope):
                scope_of[id(node)] = {**scope_of.get(id(node), {}), **found}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            method, receiver = node.func.attr, node.func.value
            where = f"{path.relative_to(REPO)}:{node.lineno}"
            svc = _receiver_service(receiver, scope_of.get(id(node), module_vars))
            if method in ("get_paginator", "get_waiter"):
                if svc is None or not (node.args and isinstance(node.args[0], ast.Constant)):
                    if svc in services or svc is None and isinstance(receiver, ast.Name) and receiver.id in VARIABLES:
                        unresolved.append(f"{where}: {method} on an unknown client")
                    continue
                if svc not in services:
                    continue
                name = node.args[0].value
                op = _operations(svc)[name] if method == "get_paginator" else _waiter_operation(svc, name)
                calls.append(Call(svc, op, where))
                continue
            owners = method_owners.get(method)
            if not owners:
                continue
            if svc in owners:
                calls.append(Call(svc, _operations(svc)[method], where))
            elif svc is None and not (method in NOT_BOTO3 and not node.args and not node.keywords):
                unresolved.append(f"{where}: .{method}() is an operation of {sorted(owners)}; name the client variable "
                                  f"after its service ({', '.join(sorted(VARIABLES))})")
    if unresolved:
        raise AssertionError("boto3 calls whose service cannot be told:\n  " + "\n  ".join(unresolved))
    return calls


def called_actions() -> dict[str, list[str]]:
    """IAM action -> where the code calls it."""
    out: dict[str, list[str]] = {}
    for call in called_operations():
        for action in call.actions:
            out.setdefault(action, []).append(call.where)
    return dict(sorted(out.items()))


# ------------------------------------------------------------------------------------------- the policy


RUNNER_POLICIES = sorted((REPO / "images" / "runtime").glob("runner-iam-policy-*.json"))
MANAGED_POLICY_MAX_CHARS = 6144  # AWS's limit for one managed policy, whitespace not counted


def runner_policy() -> dict:
    """The flow runner's permissions: the union of its managed policies (one would exceed AWS's size limit)."""
    docs = [load_policy(p) for p in RUNNER_POLICIES]
    return {"Version": docs[0]["Version"], "Statement": [st for d in docs for st in d["Statement"]]}


def load_policy(path: Path) -> dict:
    return json.loads(path.read_text())


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def allowing_statements(policy: dict, action: str) -> list[dict]:
    """The Allow statements whose Action matches `action` (case-insensitive wildcards, as IAM matches)."""
    return [s for s in policy["Statement"] if s["Effect"] == "Allow"
            and any(fnmatch.fnmatchcase(action.lower(), a.lower()) for a in _as_list(s.get("Action", [])))]
