"""GPU capacity for the ECS target: cluster, launch template, Auto Scaling group, capacity provider.

The hosts boot the ECS GPU-optimized AMI (found through its public SSM parameter, so a new AMI
is picked up on the next deploy) and join the stack's cluster from user data. The Auto Scaling
group is a mixed-instances group: its overrides are the instance type and the block's fallback
types, so when EC2 has no capacity of the first type (InsufficientInstanceCapacity, Spot
unavailable) the group launches the next one itself; with `use_spot`, `on_demand_base` instances
stay on-demand. The capacity provider's managed scaling starts hosts when the service needs them
and managed termination protection keeps a host with a running task from being scaled in.

Each host keeps a model cache, MODEL_CACHE_HOST_PATH on its root EBS volume: the service's and the
offline batch task's definitions mount it where the image's entrypoint caches (`model_cache_mount`),
so a task restart, a rollout or a scale-out onto a host that served the model finds the verified copy
instead of downloading the model again into its container layer. It lives as long as the host.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import shlex
import time

from botocore.exceptions import ClientError

from blocks.ecs_capacity import EcsGpuCapacity
from blocks.model_store import ModelStore
from tasks.core.aws import Aws, error_code, unless_gone
from tasks.core.errors import PipelineInputError
from tasks.core.naming import resource_name, tag_list, tags
from tasks.core.s3 import read_manifest, s3_client, split_s3

MODEL_CACHE_HOST_PATH = "/var/lib/vllm-pipeline/models"  # on the root volume, beside Docker's images
MODEL_CACHE_VOLUME = "model-cache"
CONTAINER_MODEL_DIR = "/models"  # the image's MODEL_CACHE_DIR
CONTAINER_UID = 10001  # the vLLM image's user (images/vllm/Dockerfile): the cache folder is its own
CACHE_COPIES = 2  # the model served and one more: the next revision a rollout brings, or the batch task's model
HOST_BASE_GIB = 60  # the OS and Docker (~10 GiB) and two vLLM images unpacked (~25 GiB each: the running one, the next)

# The cache folder for the image's user: a folder Docker makes for a missing host path is root's, which
# that user cannot write (install -d also hands over a folder that already exists).
USER_DATA = """#!/bin/bash
install -d -m 0755 -o {uid} -g {uid} {cache}
cat >> /etc/ecs/ecs.config <<'CONF'
ECS_CLUSTER={cluster}
ECS_ENABLE_GPU_SUPPORT=true
ECS_ENABLE_TASK_IAM_ROLE=true
ECS_ENABLE_CONTAINER_METADATA=true
ECS_CONTAINER_STOP_TIMEOUT=120s
ECS_IMAGE_PULL_BEHAVIOR=prefer-cached
CONF
"""


# EcsGpuCapacity.prepull_images: pulled in the background (the user data must end for the agent to start and
# join), once Docker answers; the task's own pull then finds the layers (ECS_IMAGE_PULL_BEHAVIOR=prefer-cached,
# and Docker joins a pull already in progress). Its log: /var/log/vllm-pipeline-prepull.log on the host.
PREPULL = """
(until docker info >/dev/null 2>&1; do sleep 2; done
 for image in {images}; do
   start=$(date +%s)
   if docker pull "$image"; then echo "pre-pulled $image in $(( $(date +%s) - start )) s"; else echo "pre-pull of $image failed"; fi
 done) >>/var/log/vllm-pipeline-prepull.log 2>&1 &
"""


def user_data(capacity: EcsGpuCapacity, cluster: str) -> str:
    """The hosts' boot script: the model cache folder, the ECS agent's configuration, the optional pre-pull."""
    script = USER_DATA.format(cluster=cluster, uid=CONTAINER_UID, cache=MODEL_CACHE_HOST_PATH)
    if capacity.prepull_images:  # the block's validator admits only plain references; quoted all the same
        script += PREPULL.format(images=" ".join(shlex.quote(ref) for ref in capacity.prepull_images))
    return script


def gpu_ami(aws: Aws, parameter: str) -> str:
    return aws.client("ssm").get_parameter(Name=parameter)["Parameter"]["Value"]


def ensure_cluster(aws: Aws, stack: str) -> tuple[str, bool]:
    ecs = aws.client("ecs")
    name = resource_name(stack, "cluster")
    found = ecs.describe_clusters(clusters=[name])["clusters"]
    if found and found[0]["status"] == "ACTIVE":
        return found[0]["clusterArn"], False
    arn = ecs.create_cluster(
        clusterName=name, tags=tag_list(stack, "key", "value"),
        settings=[{"name": "containerInsights", "value": "enabled"}],
    )["cluster"]["clusterArn"]
    return arn, True


def model_cache_mount() -> tuple[list[dict], list[dict]]:
    """(volumes, mountPoints) of a task definition: the host's model cache at the container's MODEL_CACHE_DIR."""
    return ([{"name": MODEL_CACHE_VOLUME, "host": {"sourcePath": MODEL_CACHE_HOST_PATH}}],
            [{"sourceVolume": MODEL_CACHE_VOLUME, "containerPath": CONTAINER_MODEL_DIR, "readOnly": False}])


def model_cache_bytes(store: ModelStore, model_uri: str, adapter_uris: list[str]) -> int:
    """What a host's cache holds for a deploy: the staged files of the model and its adapters, by their
    manifests (read as the capacity planner reads them, with the store's credentials). The model must be
    staged; an adapter without a manifest adds nothing here (the adapter checks before a deploy name it,
    and adapters are megabytes beside the model's gigabytes)."""
    s3 = s3_client(store)
    total = 0
    for uri in [model_uri, *adapter_uris]:
        bucket, prefix = split_s3(uri)
        manifest = read_manifest(s3, bucket, prefix.strip("/"))
        if manifest is None and uri == model_uri:
            raise PipelineInputError(f"{uri} has no manifest: the model is not (completely) staged; run the stage flow")
        total += manifest.total_bytes if manifest else 0
    return total


def root_volume_gib(capacity: EcsGpuCapacity, cache_bytes: int) -> int:
    """The hosts' root EBS volume: CACHE_COPIES copies of the cached model plus HOST_BASE_GIB for the OS and
    the images, or the block's root_volume_gib when that is more. The entrypoint deletes least recently
    used models when a fetch needs room, so two copies bound what the cache holds."""
    return max(capacity.root_volume_gib, math.ceil(CACHE_COPIES * cache_bytes / 2**30) + HOST_BASE_GIB)


def launch_template_data(capacity: EcsGpuCapacity, ami: str, cluster: str, profile_arn: str, host_sg: str,
                         instance_type: str, stack: str, cache_bytes: int) -> dict:
    """`cache_bytes`: what the model cache holds (model_cache_bytes), for the disk's size."""
    return {
        "ImageId": ami,
        "InstanceType": instance_type,
        "IamInstanceProfile": {"Arn": profile_arn},
        "SecurityGroupIds": [host_sg],
        "UserData": base64.b64encode(user_data(capacity, cluster).encode()).decode(),
        # Hop limit 1: containers (bridge mode, one hop away) cannot reach the instance role's
        # credentials; the task role reaches them through the ECS agent instead.
        "MetadataOptions": {"HttpTokens": "required", "HttpPutResponseHopLimit": 1, "HttpEndpoint": "enabled"},
        "BlockDeviceMappings": [{"DeviceName": "/dev/xvda", "Ebs": {
            "VolumeSize": root_volume_gib(capacity, cache_bytes), "VolumeType": "gp3", "Encrypted": True,
            "DeleteOnTermination": True}}],
        "Monitoring": {"Enabled": True},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [*tag_list(stack), {"Key": "Name", "Value": resource_name(stack, "gpu-host")}]},
            {"ResourceType": "volume", "Tags": tag_list(stack)},
        ],
    }


def launch_template_fingerprint(data: dict) -> str:
    """A digest of the whole launch-template data, kept as each version's description: EC2 answers
    the data back in its own normal form, so the digest of what we sent is what is compared."""
    return "vllm-pipeline " + hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def ensure_launch_template(aws: Aws, stack: str, data: dict) -> tuple[str, bool]:
    """Get-or-create; any change of the data (AMI, instance type, profile, security group, disk,
    user data, ...) becomes a new version made the default."""
    ec2 = aws.client("ec2")
    name = resource_name(stack, "hosts")
    fingerprint = launch_template_fingerprint(data)
    found = (unless_gone(lambda: ec2.describe_launch_templates(LaunchTemplateNames=[name]),
                         "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.NotFound")
             or {}).get("LaunchTemplates", [])
    if not found:
        lt = ec2.create_launch_template(
            LaunchTemplateName=name, LaunchTemplateData=data, VersionDescription=fingerprint,
            TagSpecifications=[{"ResourceType": "launch-template", "Tags": tag_list(stack)}],
        )["LaunchTemplate"]
        return lt["LaunchTemplateId"], True
    lt_id = found[0]["LaunchTemplateId"]
    current = ec2.describe_launch_template_versions(LaunchTemplateId=lt_id, Versions=["$Default"])["LaunchTemplateVersions"]
    if not current or current[0].get("VersionDescription") != fingerprint:  # older versions have none: one new version
        version = ec2.create_launch_template_version(LaunchTemplateId=lt_id, LaunchTemplateData=data,
                                                     VersionDescription=fingerprint)["LaunchTemplateVersion"]
        ec2.modify_launch_template(LaunchTemplateId=lt_id, DefaultVersion=str(version["VersionNumber"]))
    return lt_id, False


def mixed_instances_policy(capacity: EcsGpuCapacity, lt_id: str, instance_type: str) -> dict:
    types = [instance_type, *capacity.fallback_instance_types]
    return {
        "LaunchTemplate": {
            "LaunchTemplateSpecification": {"LaunchTemplateId": lt_id, "Version": "$Default"},
            "Overrides": [{"InstanceType": t} for t in types],
        },
        "InstancesDistribution": {
            "OnDemandAllocationStrategy": "prioritized",  # the order above, first type first
            "OnDemandBaseCapacity": capacity.on_demand_base if capacity.use_spot else 0,
            "OnDemandPercentageAboveBaseCapacity": 0 if capacity.use_spot else 100,
            "SpotAllocationStrategy": "capacity-optimized-prioritized",
        },
    }


def ensure_auto_scaling_group(aws: Aws, stack: str, capacity: EcsGpuCapacity, lt_id: str, subnets: list[str],
                              instance_type: str) -> tuple[str, bool]:
    asg = aws.client("autoscaling")
    name = resource_name(stack, "hosts")
    policy = mixed_instances_policy(capacity, lt_id, instance_type)
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]
    if found:
        asg.update_auto_scaling_group(
            AutoScalingGroupName=name, MinSize=capacity.min_capacity, MaxSize=capacity.max_capacity,
            MixedInstancesPolicy=policy, VPCZoneIdentifier=",".join(subnets),
        )
        return found[0]["AutoScalingGroupARN"], False
    asg.create_auto_scaling_group(
        AutoScalingGroupName=name, MinSize=capacity.min_capacity, MaxSize=capacity.max_capacity,
        DesiredCapacity=capacity.min_capacity, MixedInstancesPolicy=policy, VPCZoneIdentifier=",".join(subnets),
        NewInstancesProtectedFromScaleIn=True,  # managed termination protection needs it
        CapacityRebalance=capacity.use_spot,
        Tags=[{"Key": k, "Value": v, "PropagateAtLaunch": True, "ResourceId": name, "ResourceType": "auto-scaling-group"}
              for k, v in tags(stack).items()],
    )
    return asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"][0]["AutoScalingGroupARN"], True


def ensure_capacity_provider(aws: Aws, stack: str, asg_arn: str, cluster: str) -> tuple[str, bool]:
    """Get-or-create the provider and add it to the cluster (its default strategy if it has none)."""
    ecs = aws.client("ecs")
    name = resource_name(stack, "gpu")
    found = [cp for cp in ecs.describe_capacity_providers(capacityProviders=[name]).get("capacityProviders", [])
             if cp.get("status") == "ACTIVE"]
    created = False
    if found:
        arn = found[0]["capacityProviderArn"]
    else:
        arn = ecs.create_capacity_provider(
            name=name, tags=tag_list(stack, "key", "value"),
            autoScalingGroupProvider={
                "autoScalingGroupArn": asg_arn,
                "managedScaling": {"status": "ENABLED", "targetCapacity": 100, "minimumScalingStepSize": 1,
                                   "maximumScalingStepSize": 1, "instanceWarmupPeriod": 300},
                "managedTerminationProtection": "ENABLED",
            },
        )["capacityProvider"]["capacityProviderArn"]
        created = True
    found_cluster = ecs.describe_clusters(clusters=[cluster])["clusters"][0]
    have = found_cluster.get("capacityProviders", [])
    if name not in have:
        # The cluster may be shared: its providers and its default strategy stay as they are (our
        # service names its provider itself); ours becomes the default only where there is none.
        strategy = found_cluster.get("defaultCapacityProviderStrategy") or [{"capacityProvider": name, "weight": 1, "base": 0}]
        ecs.put_cluster_capacity_providers(cluster=cluster, capacityProviders=[*have, name],
                                           defaultCapacityProviderStrategy=strategy)
        wait_for_attachments(ecs, cluster)
    return arn, created


def wait_for_attachments(ecs, cluster: str, timeout_s: float = 300) -> None:
    """put_cluster_capacity_providers finishes asynchronously: a service created (or a provider
    deleted) before the cluster's attachments settle is refused."""
    deadline, delay = time.monotonic() + timeout_s, 2.0
    while True:
        found = ecs.describe_clusters(clusters=[cluster], include=["ATTACHMENTS"])["clusters"]
        status = found[0].get("attachmentsStatus", "UPDATE_COMPLETE") if found else "UPDATE_COMPLETE"
        if status in ("UPDATE_COMPLETE", "UPDATE_FAILED"):
            if status == "UPDATE_FAILED":
                raise RuntimeError(f"cluster {cluster}: capacity provider attachment failed")
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"cluster {cluster}: capacity provider attachment still {status} after {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 15)


# -------------------------------------------------------------------------------------------- deletes


def delete_capacity_provider(aws: Aws, name: str, cluster: str | None) -> bool:
    ecs = aws.client("ecs")
    if cluster:
        try:
            found = ecs.describe_clusters(clusters=[cluster])["clusters"]
            if found and name in found[0].get("capacityProviders", []):
                ecs.put_cluster_capacity_providers(  # only ours goes: the rest of a shared cluster's setup stays
                    cluster=cluster, capacityProviders=[c for c in found[0]["capacityProviders"] if c != name],
                    defaultCapacityProviderStrategy=[s for s in found[0].get("defaultCapacityProviderStrategy", [])
                                                     if s["capacityProvider"] != name],
                )
                wait_for_attachments(ecs, cluster)
        except ClientError as exc:
            if error_code(exc) not in ("ClusterNotFoundException",):
                raise
    found = [cp for cp in ecs.describe_capacity_providers(capacityProviders=[name]).get("capacityProviders", [])
             if cp.get("status") == "ACTIVE"]
    if not found:
        return False
    return unless_gone(lambda: ecs.delete_capacity_provider(capacityProvider=name), "ClientException", says="not found") is not None


def delete_auto_scaling_group(aws: Aws, name: str, timeout_s: float = 900) -> bool:
    """ForceDelete terminates the hosts; wait until the group is gone (its instances with it)."""
    asg = aws.client("autoscaling")
    if not asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]:
        return False
    # ScalingActivityInProgress / ResourceInUse are raised: the delete task retries them
    if unless_gone(lambda: asg.delete_auto_scaling_group(AutoScalingGroupName=name, ForceDelete=True),
                   "ValidationError", says="not found") is None:
        return False
    deadline = time.monotonic() + timeout_s
    delay = 2.0
    while asg.describe_auto_scaling_groups(AutoScalingGroupNames=[name])["AutoScalingGroups"]:
        if time.monotonic() > deadline:
            raise TimeoutError(f"Auto Scaling group {name} still deleting after {timeout_s:.0f}s")
        time.sleep(delay)
        delay = min(delay * 1.5, 20)
    return True


def delete_launch_template(aws: Aws, lt_id_or_name: str) -> bool:
    ec2 = aws.client("ec2")
    key = {"LaunchTemplateId": lt_id_or_name} if lt_id_or_name.startswith("lt-") else {"LaunchTemplateName": lt_id_or_name}
    return unless_gone(lambda: ec2.delete_launch_template(**key), "InvalidLaunchTemplateId.NotFound",
                       "InvalidLaunchTemplateName.NotFoundException", "InvalidLaunchTemplateId.Malformed") is not None


def terminate_instances(aws: Aws, instance_ids: list[str]) -> bool:
    if not instance_ids:
        return False
    ec2 = aws.client("ec2")
    if unless_gone(lambda: ec2.terminate_instances(InstanceIds=instance_ids), "InvalidInstanceID.NotFound") is None:
        return False
    ec2.get_waiter("instance_terminated").wait(InstanceIds=instance_ids, WaiterConfig={"Delay": 5, "MaxAttempts": 120})
    return True


def delete_cluster(aws: Aws, cluster: str) -> bool:
    ecs = aws.client("ecs")
    found = ecs.describe_clusters(clusters=[cluster])["clusters"]
    if not found or found[0]["status"] != "ACTIVE":
        return False
    for page in ecs.get_paginator("list_container_instances").paginate(cluster=cluster):
        for arn in page["containerInstanceArns"]:
            ecs.deregister_container_instance(cluster=cluster, containerInstance=arn, force=True)
    return unless_gone(lambda: ecs.delete_cluster(cluster=cluster), "ClusterNotFoundException") is not None
