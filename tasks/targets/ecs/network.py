"""Network for the ECS target: the VPC and subnets, and two security groups per stack (three with a tool
gateway: its own, and two recorded rules on the load balancer's group; gateway.py).

- `<stack>-alb`: the load balancer; ingress only from the configured CIDRs (default: the VPC's
  own CIDR) on 80 (or 443).
- `<stack>-host`: the GPU instances, where the vLLM container's port is mapped (bridge mode);
  ingress only from the load balancer's group, only on the container port. No SSH: Session
  Manager gives a shell.
"""

from __future__ import annotations

import time

from botocore.exceptions import ClientError
from pydantic import BaseModel

from blocks.ecs_capacity import EcsGpuCapacity
from tasks.core.aws import Aws, error_code, unless_gone
from tasks.core.errors import PipelineInputError
from tasks.core.naming import resource_name, tag_list


class Network(BaseModel):
    vpc_id: str
    cidr: str
    subnets: list[str]


def resolve_network(aws: Aws, capacity: EcsGpuCapacity) -> Network:
    """The block's VPC/subnets, checked to exist; or the default VPC and its default subnets."""
    ec2 = aws.client("ec2")
    vpc_id = capacity.vpc_id
    if vpc_id is None:
        vpcs = ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"]
        if not vpcs:
            raise PipelineInputError(f"region {capacity.region} has no default VPC: set vpc_id and subnets in the EcsGpuCapacity block")
        vpc_id = vpcs[0]["VpcId"]
    if capacity.subnets:
        try:
            found = ec2.describe_subnets(SubnetIds=capacity.subnets)["Subnets"]
        except ClientError as exc:
            if error_code(exc).startswith("InvalidSubnet"):
                raise PipelineInputError(f"EcsGpuCapacity.subnets: {exc.response['Error'].get('Message')}") from None
            raise
        other = [s["SubnetId"] for s in found if s["VpcId"] != vpc_id]
        if other:
            raise PipelineInputError(f"EcsGpuCapacity.subnets {other} are not in VPC {vpc_id}")
        subnets = list(capacity.subnets)
    else:
        found = ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc_id]}])["Subnets"]
        default = [s for s in found if s.get("DefaultForAz")] or found
        subnets = [s["SubnetId"] for s in sorted(default, key=lambda s: s["AvailabilityZone"])]
    azs = {s["AvailabilityZone"] for s in found if s["SubnetId"] in subnets}
    if len(azs) < 2:
        raise PipelineInputError(f"a load balancer needs subnets in two availability zones; VPC {vpc_id} gives {sorted(azs)}")
    cidr = ec2.describe_vpcs(VpcIds=[vpc_id])["Vpcs"][0]["CidrBlock"]
    return Network(vpc_id=vpc_id, cidr=cidr, subnets=subnets)


def find_security_group(ec2, vpc_id: str, name: str) -> str | None:
    groups = ec2.describe_security_groups(
        Filters=[{"Name": "vpc-id", "Values": [vpc_id]}, {"Name": "group-name", "Values": [name]}]
    )["SecurityGroups"]
    return groups[0]["GroupId"] if groups else None


def ensure_security_group(aws: Aws, stack: str, kind: str, vpc_id: str, description: str) -> tuple[str, bool]:
    """Get-or-create by name in the VPC; returns (group id, created)."""
    ec2 = aws.client("ec2")
    name = resource_name(stack, kind)
    existing = find_security_group(ec2, vpc_id, name)
    if existing:
        return existing, False
    group_id = ec2.create_security_group(
        GroupName=name, Description=description, VpcId=vpc_id,
        TagSpecifications=[{"ResourceType": "security-group", "Tags": [*tag_list(stack), {"Key": "Name", "Value": name}]}],
    )["GroupId"]
    return group_id, True


def ensure_ingress(aws: Aws, group_id: str, port: int, *, cidrs: list[str] | None = None, source_group: str | None = None) -> None:
    """Add exactly these TCP rules; a rule that exists already is fine."""
    perm: dict = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
    if cidrs:
        perm["IpRanges"] = [{"CidrIp": c, "Description": "vllm-pipeline ingress_cidrs"} for c in cidrs]
    if source_group:
        perm["UserIdGroupPairs"] = [{"GroupId": source_group, "Description": "from the load balancer"}]
    try:
        aws.client("ec2").authorize_security_group_ingress(GroupId=group_id, IpPermissions=[perm])
    except ClientError as exc:
        if error_code(exc) != "InvalidPermission.Duplicate":
            raise


def _permission(port: int, source: str, description: str) -> dict:
    perm: dict = {"IpProtocol": "tcp", "FromPort": port, "ToPort": port}
    if source.startswith("sg-"):
        perm["UserIdGroupPairs"] = [{"GroupId": source, "Description": description}]
    else:
        perm["IpRanges"] = [{"CidrIp": source, "Description": description}]
    return perm


def rule_id(group_id: str, port: int, source: str) -> str:
    """An ingress rule as a recorded resource: `<group>:<port>:<CIDR or source group>`."""
    return f"{group_id}:{port}:{source}"


def ensure_rule(aws: Aws, group_id: str, port: int, source: str, description: str) -> tuple[str, bool]:
    """One TCP ingress rule on a group that is not only this rule's (the load balancer's, which the gateway adds
    to): recorded by itself, so a rollback that removes the gateway from a running stack removes its rules too.
    `source`: a CIDR or a security group id. Returns (rule id, created)."""
    try:
        aws.client("ec2").authorize_security_group_ingress(GroupId=group_id, IpPermissions=[_permission(port, source, description)])
    except ClientError as exc:
        if error_code(exc) != "InvalidPermission.Duplicate":
            raise
        return rule_id(group_id, port, source), False
    return rule_id(group_id, port, source), True


def revoke_rule(aws: Aws, rid: str) -> bool:
    """The rule `rid` (rule_id) revoked, as the group describes it (description included: moto matches on it);
    False when it or its group is gone already."""
    ec2 = aws.client("ec2")
    group_id, port, source = rid.split(":", 2)
    found = unless_gone(lambda: ec2.describe_security_groups(GroupIds=[group_id]), "InvalidGroup.NotFound")
    if found is None:
        return False
    key, field = ("UserIdGroupPairs", "GroupId") if source.startswith("sg-") else ("IpRanges", "CidrIp")
    entries = [e for p in found["SecurityGroups"][0].get("IpPermissions", [])
               if p.get("IpProtocol") == "tcp" and p.get("FromPort") == int(port) == p.get("ToPort")
               for e in p.get(key, []) if e.get(field) == source]
    if not entries:
        return False
    perm = {"IpProtocol": "tcp", "FromPort": int(port), "ToPort": int(port),
            key: [{k: v for k, v in e.items() if k in (field, "Description")} for e in entries[:1]]}
    return unless_gone(lambda: ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=[perm]),
                       "InvalidGroup.NotFound", "InvalidPermission.NotFound") is not None


class StillAttachedError(RuntimeError):
    """A security group's network interfaces outlived the wait. Not retried (a RuntimeError, not a
    TimeoutError): the wait was the retry, and six more would hold a teardown for hours; the message
    names each interface and what holds it, so a person can see what is left and why."""


def wait_for_enis_released(ec2, group_id: str, timeout_s: float = 900) -> None:
    """A deleted load balancer and terminated hosts release their network interfaces minutes later;
    until then the group cannot be deleted (DependencyViolation)."""
    deadline, delay = time.monotonic() + timeout_s, 5.0
    while enis := ec2.describe_network_interfaces(Filters=[{"Name": "group-id", "Values": [group_id]}])["NetworkInterfaces"]:
        if time.monotonic() > deadline:
            held = ", ".join(
                f"{e['NetworkInterfaceId']} ({e.get('Description') or e.get('InterfaceType', '')}"
                f"{', attached to ' + e['Attachment']['InstanceId'] if e.get('Attachment', {}).get('InstanceId') else ''})"
                for e in enis
            )
            raise StillAttachedError(f"security group {group_id}: network interfaces still attached after "
                                     f"{timeout_s:.0f}s: {held}")
        time.sleep(delay)
        delay = min(delay * 1.5, 30)


def delete_security_group(aws: Aws, group_id: str) -> bool:
    """Revoke its rules first (another group's rules may point at it), then delete."""
    ec2 = aws.client("ec2")
    found = unless_gone(lambda: ec2.describe_security_groups(GroupIds=[group_id]), "InvalidGroup.NotFound")
    if found is None:
        return False
    group = found["SecurityGroups"][0]
    if group.get("IpPermissions"):
        ec2.revoke_security_group_ingress(GroupId=group_id, IpPermissions=group["IpPermissions"])
    wait_for_enis_released(ec2, group_id)
    # DependencyViolation (an ENI of a draining load balancer still uses it) is raised: the task retries it
    return unless_gone(lambda: ec2.delete_security_group(GroupId=group_id), "InvalidGroup.NotFound") is not None
