"""Setting an ECS stack's desired count by hand: the scale flow, and the batch waking a stack at zero.

The service's desired count, and with it the autoscaling target's minimum, so Application Auto
Scaling does not undo the change (a minimum above the count raises it again; with the minimum at
the count, target tracking may still scale out under load, up to max_replicas, but not below it).
The maximum stays the deploy's. GPU hosts follow by the capacity provider's managed scaling: a new
task gets a host started for it (minutes), and with min_capacity 0 a host left without a task is
terminated about 15 minutes later. A redeploy puts the block's min..max back.

At zero the load balancer has no target: a request gets 503 and is not counted, and target tracking
(ALBRequestCountPerTarget) has no data to scale out on, so only a scale (the flow, the batch) wakes it.
"""

from __future__ import annotations

from collections.abc import Callable

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.core.aws import Aws
from tasks.core.errors import PipelineInputError, retry_if_transient
from tasks.core.naming import resource_name
from tasks.targets.ecs import scaling
from tasks.targets.ecs import service as svc

_RETRY = dict(retries=4, retry_delay_seconds=[2, 5, 15, 45], retry_condition_fn=retry_if_transient, cache_policy=NO_CACHE)


@task(name="ecs-set-desired-count", **_RETRY)
def set_desired_count(aws: Aws, stack: str, cluster: str, replicas: int) -> int:
    """The autoscaling minimum (when the stack autoscales), then the service's count; returns the
    count before. Nothing is called for what is already so."""
    ecs = aws.client("ecs")
    name = resource_name(stack, "service")
    found = [s for s in ecs.describe_services(cluster=cluster, services=[name])["services"] if s["status"] == "ACTIVE"]
    if not found:
        raise PipelineInputError(f"stack {stack!r} has no active ECS service {name} in cluster {cluster}: deploy it first")
    rid = scaling.service_resource_id(cluster, stack)
    aas = aws.client("application-autoscaling")
    targets = aas.describe_scalable_targets(ServiceNamespace=scaling.NAMESPACE, ResourceIds=[rid],
                                            ScalableDimension=scaling.DIMENSION)["ScalableTargets"]
    if targets and targets[0]["MinCapacity"] != replicas:
        aas.register_scalable_target(ServiceNamespace=scaling.NAMESPACE, ResourceId=rid, ScalableDimension=scaling.DIMENSION,
                                     MinCapacity=replicas, MaxCapacity=max(targets[0]["MaxCapacity"], replicas))
    before = found[0]["desiredCount"]
    if before != replicas:
        ecs.update_service(cluster=cluster, service=name, desiredCount=replicas)
    return before


@task(name="ecs-set-host-floor", **_RETRY)
def set_host_floor(aws: Aws, asg_name: str | None, floor: int) -> int | None:
    """The GPU host group's MinSize; returns the one before (None: no group). At zero a MinSize above
    0 would keep GPU hosts, and their bill, with no task on them; with 0, managed scaling removes
    them. The scale up puts the recorded floor back; a redeploy puts the block's min_capacity back."""
    if not asg_name:
        return None
    asg = aws.client("autoscaling")
    found = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[asg_name])["AutoScalingGroups"]
    if not found:
        return None
    before = found[0]["MinSize"]
    if before != floor:
        asg.update_auto_scaling_group(AutoScalingGroupName=asg_name, MinSize=floor)
    return before


@task(name="ecs-wait-scaled-up", cache_policy=NO_CACHE)
def wait_scaled_up(aws: Aws, stack: str, cluster: str, tg_arn: str, url: str, api_key: str, served_name: str,
                   asg_name: str | None, timeout_s: float, progress: Callable[[str], None], poll_s: float = 15) -> None:
    """The deploy's own wait: every task running, every target healthy, /v1/models through the load balancer."""
    svc.wait_until_ready(aws, stack, cluster, resource_name(stack, "service"), tg_arn, url, api_key, served_name, asg_name,
                         timeout_s, progress, poll_s)
