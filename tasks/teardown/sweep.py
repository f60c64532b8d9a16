"""Teardown: find everything a stack made (its state record *and* a scan), delete it in dependency
order, then prove nothing is left.

The scan is the resource groups tagging API plus per-service listings for what that API misses
(IAM roles and instance profiles, which it does not cover; Auto Scaling groups, capacity providers
and launch templates, which it covers late or not at all in some regions; CloudWatch dashboards,
which take no tags; Application Auto Scaling targets and policies, found by the service's name;
alarms and the alarm topic, listed by name and checked by tag). Every delete treats
"already gone" as success, so teardown can run twice, after a partial teardown, or without a record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.core.aws import Aws, error_code, unless_gone
from tasks.core.errors import is_transient
from tasks.core.naming import TAG_STACK, log_group_name, resource_name
from tasks.core.secrets import delete_secret
from tasks.core.state import Resource
from tasks.gateway.config import delete_toolset
from tasks.targets.ecs.alarms import delete_alarm, delete_topic, stack_alarms, stack_topics
from tasks.targets.ecs.dashboard import delete_dashboard, stack_dashboards
from tasks.targets.ecs.gateway import family as gateway_family
from tasks.targets.ecs.gpu_hosts import (
    delete_auto_scaling_group,
    delete_capacity_provider,
    delete_cluster,
    delete_launch_template,
    terminate_instances,
)
from tasks.targets.ecs.iam import delete_instance_profile, delete_role, stack_roles
from tasks.targets.ecs.network import delete_security_group, revoke_rule
from tasks.targets.ecs.scaling import delete_scaling_policy, deregister_scalable_target, stack_scaling
from tasks.targets.ecs.service import (
    delete_load_balancer,
    delete_log_group,
    delete_service,
    delete_target_group,
    deregister_family,
)
from tasks.targets.local.gateway import stop_local_gateway
from tasks.targets.local.server import stop_local_server

# Dependency order: what uses a thing goes before it.
# The scaling target goes before the service (or Application Auto Scaling could raise the count
# teardown just set to zero); alarms before the topic they notify.
ORDER = [
    "gateway-process", "process", "dashboard", "alarm", "alarm-topic", "scaling-policy", "scalable-target", "service", "ecs-task", "task-definition", "capacity-provider", "asg", "instance", "launch-template",
    "listener-rule", "listener", "load-balancer", "target-group", "ingress-rule", "security-group", "log-group", "secret", "s3-object",
    "instance-profile", "iam-role", "cluster",
]
# Deleting these can meet a dependency still draining (an ALB's ENIs, a target group in use): retry.
_RETRYABLE_DELETE = frozenset({"DependencyViolation", "ResourceInUse", "ResourceInUseException", "ClusterContainsServicesException",
                               "ClusterContainsTasksException", "ClusterContainsContainerInstancesException",
                               "ScalingActivityInProgress", "ResourceContention", "UpdateInProgressException"})


def _retry_delete(task, task_run, state) -> bool:
    try:
        state.result()
    except Exception as exc:  # noqa: BLE001 - classified
        return is_transient(exc) or (isinstance(exc, ClientError) and error_code(exc) in _RETRYABLE_DELETE)
    return False


# ------------------------------------------------------------------------------------------------ scan


def kind_of_arn(arn: str) -> Resource | None:
    """A tagging-API ARN as a (kind, id) teardown knows how to delete; None for a kind it does not."""
    parts = arn.split(":", 5)
    if len(parts) < 6:
        return None
    service, region, rest = parts[2], parts[3], parts[5]
    if service == "ecs":
        kind, _, name = rest.partition("/")
        if kind == "service":
            return Resource(kind="service", id=name, region=region)  # <cluster>/<service>
        if kind == "cluster":
            return Resource(kind="cluster", id=name, region=region)
        if kind == "task-definition":
            return Resource(kind="task-definition", id=name.rsplit(":", 1)[0], region=region)
        if kind == "capacity-provider":
            return Resource(kind="capacity-provider", id=name, region=region)
        if kind == "task":
            return Resource(kind="ecs-task", id=name, region=region)  # <cluster>/<task id>
    if service == "ec2":
        kind, _, rid = rest.partition("/")
        mapping = {"security-group": "security-group", "instance": "instance", "launch-template": "launch-template"}
        if kind in mapping:
            return Resource(kind=mapping[kind], id=rid, region=region)
        if kind == "volume":
            return None  # DeleteOnTermination: goes with its instance
    if service == "elasticloadbalancing":
        if rest.startswith("loadbalancer/"):
            return Resource(kind="load-balancer", id=arn, region=region)
        if rest.startswith("targetgroup/"):
            return Resource(kind="target-group", id=arn, region=region)
        if rest.startswith("listener/"):
            return Resource(kind="listener", id=arn, region=region)
        if rest.startswith("listener-rule/"):
            return Resource(kind="listener-rule", id=arn, region=region)
    if service == "logs" and rest.startswith("log-group:"):
        return Resource(kind="log-group", id=rest.removeprefix("log-group:").removesuffix(":*"), region=region)
    if service == "secretsmanager":
        return Resource(kind="secret", id=arn, region=region)
    if service == "autoscaling" and "autoScalingGroupName/" in rest:
        return Resource(kind="asg", id=rest.split("autoScalingGroupName/", 1)[1], region=region)
    if service == "cloudwatch" and rest.startswith("alarm:"):
        return Resource(kind="alarm", id=rest.removeprefix("alarm:"), region=region)
    if service == "sns":
        return Resource(kind="alarm-topic", id=arn, region=region)
    if service == "application-autoscaling" and rest.startswith("scalable-target/"):
        return Resource(kind="scalable-target", id=arn, region=region)  # the scan lists these by the service's name
    if service == "iam":
        kind, _, name = rest.partition("/")
        return Resource(kind={"role": "iam-role", "instance-profile": "instance-profile"}.get(kind, "iam"),
                        id=name.rsplit("/", 1)[-1], region=region)
    return None


def _has_tag(tags: Iterable[dict], stack: str, key: str = "Key", value: str = "Value") -> bool:
    return any(t.get(key) == TAG_STACK and t.get(value) == stack for t in tags or [])


# Kinds the scan lists from their own service, live state only; for these a tagging-API hit (which
# may be a resource deleted minutes ago: "tagged or previously tagged") is not evidence.
LISTED = frozenset({"secret", "iam-role", "instance-profile", "asg", "launch-template", "security-group", "instance",
                    "capacity-provider", "task-definition", "log-group", "alarm", "alarm-topic",
                    "scalable-target", "scaling-policy", "dashboard"})


def _still_there(aws: Aws, r: Resource) -> bool:
    """Whether a tagging-API hit still exists: ECS and ELB say so themselves."""
    ecs = aws.client("ecs")
    if r.kind == "ecs-task":
        cluster, _, task_id = r.id.rpartition("/")
        found = unless_gone(lambda: ecs.describe_tasks(cluster=cluster, tasks=[task_id]), "ClusterNotFoundException",
                            "InvalidParameterException") or {}
        return any(t.get("lastStatus") != "STOPPED" for t in found.get("tasks", []))
    if r.kind in ("load-balancer", "target-group", "listener", "listener-rule"):
        elb = aws.client("elbv2")
        call = {"load-balancer": lambda: elb.describe_load_balancers(LoadBalancerArns=[r.id]),
                "target-group": lambda: elb.describe_target_groups(TargetGroupArns=[r.id]),
                "listener": lambda: elb.describe_listeners(ListenerArns=[r.id]),
                "listener-rule": lambda: elb.describe_rules(RuleArns=[r.id])}[r.kind]
        return unless_gone(call, "LoadBalancerNotFound", "TargetGroupNotFound", "ListenerNotFound", "RuleNotFound") is not None
    if r.kind == "cluster":
        return any(c["status"] != "INACTIVE" for c in ecs.describe_clusters(clusters=[r.id])["clusters"])
    if r.kind == "service":
        cluster, _, name = r.id.rpartition("/")
        found = unless_gone(lambda: ecs.describe_services(cluster=cluster, services=[name]), "ClusterNotFoundException") or {}
        return any(s["status"] != "INACTIVE" for s in found.get("services", []))
    return True


def scan(aws: Aws, stack: str) -> tuple[list[Resource], list[str]]:
    """(resources carrying the stack's tag or living under its names, ARNs of tagged things of a kind
    teardown cannot delete). Secrets Manager, not the tagging index (which lags), decides on secrets."""
    found: dict[tuple[str, str], Resource] = {}
    unknown: list[str] = []

    def add(r: Resource | None) -> None:
        if r is not None:
            found.setdefault((r.kind, r.id), r)

    try:
        api = aws.client("resourcegroupstaggingapi")
        for page in api.get_paginator("get_resources").paginate(TagFilters=[{"Key": TAG_STACK, "Values": [stack]}]):
            for m in page.get("ResourceTagMappingList", []):
                r = kind_of_arn(m["ResourceARN"])
                if r is None and ":volume/" not in m["ResourceARN"]:
                    unknown.append(m["ResourceARN"])
                elif r is not None and r.kind not in LISTED and _still_there(aws, r):
                    add(r)
    except ClientError as exc:  # not in every partition
        get_run_logger().warning("tagging API scan skipped: %s", exc)

    sm = aws.client("secretsmanager")
    for page in sm.get_paginator("list_secrets").paginate(Filters=[{"Key": "tag-key", "Values": [TAG_STACK]}]):
        for s in page.get("SecretList", []):
            if _has_tag(s.get("Tags"), stack):
                add(Resource(kind="secret", id=s["ARN"]))

    roles, profiles = stack_roles(aws, stack)
    for name in roles:
        add(Resource(kind="iam-role", id=name))
    for name in profiles:
        add(Resource(kind="instance-profile", id=name))

    asg = aws.client("autoscaling")
    for page in asg.get_paginator("describe_auto_scaling_groups").paginate(
            Filters=[{"Name": f"tag:{TAG_STACK}", "Values": [stack]}]):
        for g in page["AutoScalingGroups"]:
            add(Resource(kind="asg", id=g["AutoScalingGroupName"]))

    ec2 = aws.client("ec2")
    tag_filter = [{"Name": f"tag:{TAG_STACK}", "Values": [stack]}]
    for page in ec2.get_paginator("describe_launch_templates").paginate(Filters=tag_filter):
        for lt in page["LaunchTemplates"]:
            add(Resource(kind="launch-template", id=lt["LaunchTemplateId"]))
    for page in ec2.get_paginator("describe_security_groups").paginate(Filters=tag_filter):
        for g in page["SecurityGroups"]:
            add(Resource(kind="security-group", id=g["GroupId"]))
    live = [{"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped", "shutting-down"]}]
    for page in ec2.get_paginator("describe_instances").paginate(Filters=tag_filter + live):
        for res in page["Reservations"]:
            for i in res["Instances"]:
                add(Resource(kind="instance", id=i["InstanceId"]))

    ecs = aws.client("ecs")
    cps = ecs.describe_capacity_providers(capacityProviders=[resource_name(stack, "gpu")], include=["TAGS"])
    for cp in cps.get("capacityProviders", []):
        if cp.get("status") == "ACTIVE":
            add(Resource(kind="capacity-provider", id=cp["name"]))
    for family in (resource_name(stack, "server"), resource_name(stack, "batch"), gateway_family(stack)):
        for page in ecs.get_paginator("list_task_definitions").paginate(familyPrefix=family, status="ACTIVE"):
            if any(a.rsplit("/", 1)[-1].rsplit(":", 1)[0] == family for a in page["taskDefinitionArns"]):
                add(Resource(kind="task-definition", id=family))
    clusters = ecs.describe_clusters(clusters=[resource_name(stack, "cluster")])["clusters"]
    if clusters and clusters[0]["status"] == "ACTIVE":
        add(Resource(kind="cluster", id=clusters[0]["clusterName"]))

    # Operating the stack: alarms (name + tag), its topic (name), the dashboard (name: dashboards take
    # no tags), the scaling target and policies (the service's name, in whichever cluster).
    for name in stack_alarms(aws, stack):
        add(Resource(kind="alarm", id=name))
    for arn in stack_topics(aws, stack):
        add(Resource(kind="alarm-topic", id=arn))
    for name in stack_dashboards(aws, stack):
        add(Resource(kind="dashboard", id=name))
    targets, policies = stack_scaling(aws, stack)
    for rid in targets:
        add(Resource(kind="scalable-target", id=rid))
    for pid in policies:
        add(Resource(kind="scaling-policy", id=pid))

    logs = aws.client("logs")
    prefix = log_group_name(stack).rsplit("/", 1)[0] + "/"
    for page in logs.get_paginator("describe_log_groups").paginate(logGroupNamePrefix=prefix):
        for g in page["logGroups"]:
            add(Resource(kind="log-group", id=g["logGroupName"]))
    return sorted(found.values(), key=lambda r: (ORDER.index(r.kind) if r.kind in ORDER else 99, r.id)), sorted(unknown)


@task(name="scan-stack", retries=3, retry_delay_seconds=[2, 5, 15], retry_condition_fn=_retry_delete, cache_policy=NO_CACHE)
def scan_task(aws: Aws, stack: str) -> tuple[list[Resource], list[str]]:
    return scan(aws, stack)


def leftovers(aws: Aws, stack: str) -> list[str]:
    """What still exists for the stack, as `kind id` lines. Empty is the proof teardown is complete."""
    resources, unknown = scan(aws, stack)
    return [f"{r.kind} {r.id}" for r in resources] + unknown


# ---------------------------------------------------------------------------------------------- delete


def _cluster_of(stack: str, resources: list[Resource]) -> str:
    return next((r.id for r in resources if r.kind == "cluster"), resource_name(stack, "cluster"))


def _stop_task(aws: Aws, r: Resource, cluster: str) -> bool:
    task_cluster, _, task_id = r.id.rpartition("/")
    return unless_gone(lambda: aws.client("ecs").stop_task(cluster=task_cluster or cluster, task=task_id,
                                                           reason="vllm-pipeline teardown"),
                       "InvalidParameterException", "ClusterNotFoundException", "ClientException") is not None


# kind -> how to delete one (aws, resource, the stack's cluster); each returns False when it was already gone
DELETERS: dict[str, Callable[[Aws, Resource, str], bool]] = {
    "gateway-process": lambda aws, r, cluster: stop_local_gateway(int(r.id)),  # the local target's tool gateway
    "process": lambda aws, r, cluster: stop_local_server(int(r.id)),
    "dashboard": lambda aws, r, cluster: delete_dashboard(aws, r.id),
    "alarm": lambda aws, r, cluster: delete_alarm(aws, r.id),
    "alarm-topic": lambda aws, r, cluster: delete_topic(aws, r.id),
    "scaling-policy": lambda aws, r, cluster: delete_scaling_policy(aws, r.id),
    "scalable-target": lambda aws, r, cluster: deregister_scalable_target(aws, r.id),
    "service": lambda aws, r, cluster: delete_service(aws, r.id.rpartition("/")[0] or cluster, r.id.rpartition("/")[2]),
    "ecs-task": _stop_task,
    "task-definition": lambda aws, r, cluster: bool(deregister_family(aws, r.id)),
    "capacity-provider": lambda aws, r, cluster: delete_capacity_provider(aws, r.id, cluster),
    "asg": lambda aws, r, cluster: delete_auto_scaling_group(aws, r.id),
    "instance": lambda aws, r, cluster: terminate_instances(aws, [r.id]),
    "launch-template": lambda aws, r, cluster: delete_launch_template(aws, r.id),
    "listener-rule": lambda aws, r, cluster: unless_gone(lambda: aws.client("elbv2").delete_rule(RuleArn=r.id),
                                                         "RuleNotFound") is not None,
    "listener": lambda aws, r, cluster: unless_gone(lambda: aws.client("elbv2").delete_listener(ListenerArn=r.id),
                                                    "ListenerNotFound") is not None,
    "load-balancer": lambda aws, r, cluster: delete_load_balancer(aws, r.id),
    "target-group": lambda aws, r, cluster: delete_target_group(aws, r.id),
    "ingress-rule": lambda aws, r, cluster: revoke_rule(aws, r.id),
    "security-group": lambda aws, r, cluster: delete_security_group(aws, r.id),
    "log-group": lambda aws, r, cluster: delete_log_group(aws, r.id),
    "secret": lambda aws, r, cluster: delete_secret(r.id, aws.credentials, aws.region),
    "s3-object": lambda aws, r, cluster: delete_toolset(r.id, aws.credentials, aws.region),
    "instance-profile": lambda aws, r, cluster: delete_instance_profile(aws, r.id),
    "iam-role": lambda aws, r, cluster: delete_role(aws, r.id),
    "cluster": lambda aws, r, cluster: delete_cluster(aws, r.id),
}


def delete_one(aws: Aws, stack: str, r: Resource, cluster: str) -> bool:
    """Delete one resource; False when it was already gone."""
    if r.kind not in DELETERS:
        raise ValueError(f"teardown does not know how to delete a {r.kind!r}")
    return DELETERS[r.kind](aws, r, cluster)


@task(name="delete-resource", retries=6, retry_delay_seconds=[2, 5, 10, 20, 30, 60], retry_condition_fn=_retry_delete,
      cache_policy=NO_CACHE)
def delete_task(aws: Aws, stack: str, resource: Resource, cluster: str) -> bool:
    gone = delete_one(aws, stack, resource, cluster)
    get_run_logger().info("%s %s %s", resource.kind, resource.id, "deleted" if gone else "was already gone")
    return gone


def revoke_security_groups(aws: Aws, group_ids: list[str]) -> None:
    """Rules first: the task group's rule names the load balancer's group, so neither deletes while it stands."""
    ec2 = aws.client("ec2")
    for gid in group_ids:
        found = unless_gone(lambda: ec2.describe_security_groups(GroupIds=[gid]), "InvalidGroup.NotFound")
        if found is None:
            continue
        group = found["SecurityGroups"][0]
        if group.get("IpPermissions"):
            ec2.revoke_security_group_ingress(GroupId=gid, IpPermissions=group["IpPermissions"])


def delete_all(aws: Aws, stack: str, resources: list[Resource], keep: Iterable[str] = ()) -> list[str]:
    """Delete in dependency order; returns `kind id` of what was deleted. `keep`: kinds to leave."""
    unique: dict[tuple[str, str], Resource] = {}
    for r in resources:
        if r.kind not in keep:
            unique.setdefault((r.kind, r.id), r)
    ordered = sorted(unique.values(), key=lambda r: ORDER.index(r.kind) if r.kind in ORDER else len(ORDER))
    cluster = _cluster_of(stack, ordered)
    deleted: list[str] = []
    failed: list[str] = []
    groups = [r.id for r in ordered if r.kind == "security-group"]
    for r in ordered:
        try:
            if r.kind == "security-group" and groups:
                revoke_security_groups(aws, groups)
                groups = []
            if delete_task(aws, stack, r, cluster):
                deleted.append(f"{r.kind} {r.id}")
        except Exception as exc:  # noqa: BLE001 - one stuck resource must not leave the rest billing
            failed.append(f"{r.kind} {r.id}: {str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}")
    if failed:
        raise TeardownIncomplete(f"deleted {len(deleted)}, could not delete {len(failed)} (run teardown again): {failed}")
    return deleted


class TeardownIncomplete(RuntimeError):
    """Some deletes failed after their retries; everything else was still deleted."""
