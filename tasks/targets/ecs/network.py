"""Network for the ECS target: the VPC and subnets, and two security groups per stack.

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
