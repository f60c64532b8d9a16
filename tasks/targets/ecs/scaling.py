"""Autoscaling of the vLLM service: an Application Auto Scaling target on its desired count and a
target-tracking policy on the load balancer's requests per task (ALBRequestCountPerTarget), or on
vLLM's queue per task (`vllm:num_requests_waiting`, published by the metrics agent sidecar).

Scale-out adds a task; the capacity provider's managed scaling then brings up a GPU host for it.
Scale-in is safe by the target group's deregistration delay (EcsGpuCapacity.drain_s, at least
request_timeout_s, which is also the load balancer's idle timeout): the leaving task gets no new
request and finishes those in flight before ECS stops it; the capacity provider's managed
termination protection keeps a host with a task from being terminated under it.

Application Auto Scaling has no names: a target is its resource id (`service/<cluster>/<service>`),
a policy its name on that target. The state record keeps `scalable-target` as the resource id and
`scaling-policy` as `<resource id>|<policy name>`; teardown finds both by the service's name.
"""

from __future__ import annotations

from blocks.ecs_capacity import EcsGpuCapacity, ScalingSettings
from tasks.core.aws import Aws
from tasks.core.naming import resource_name, tags
from tasks.targets.ecs import metrics_agent

NAMESPACE = "ecs"
DIMENSION = "ecs:service:DesiredCount"
_CONFIG_KEYS = ("TargetValue", "PredefinedMetricSpecification", "CustomizedMetricSpecification", "ScaleOutCooldown",
                "ScaleInCooldown", "DisableScaleIn")
_POLICY_BY_SIGNAL = {"requests": "requests-per-target", "queue": "waiting-per-task"}


def service_resource_id(cluster: str, stack: str) -> str:
    return f"service/{cluster}/{resource_name(stack, 'service')}"


def policy_name(stack: str, signal: str = "requests") -> str:
    return resource_name(stack, _POLICY_BY_SIGNAL[signal])


def resource_label(lb_arn: str, tg_arn: str) -> str:
    """`app/<lb name>/<lb id>/targetgroup/<tg name>/<tg id>`: what ALBRequestCountPerTarget is measured on."""
    return f"{lb_arn.split(':loadbalancer/', 1)[1]}/{tg_arn.split(':', 5)[5]}"


def policy_configuration(stack: str, scaling: ScalingSettings, lb_arn: str, tg_arn: str) -> dict:
    """The target-tracking configuration for the block's signal: the load balancer's requests per task,
    or vLLM's queue per task as the metrics agent publishes it (its Average over the tasks' datapoints)."""
    if scaling.signal == "queue":
        target, metric = scaling.target_waiting_per_task, {"CustomizedMetricSpecification": {
            "MetricName": metrics_agent.WAITING, "Namespace": metrics_agent.NAMESPACE,
            "Dimensions": metrics_agent.dimensions(stack), "Statistic": "Average"}}
    else:
        target, metric = scaling.target_requests_per_minute, {"PredefinedMetricSpecification": {
            "PredefinedMetricType": "ALBRequestCountPerTarget", "ResourceLabel": resource_label(lb_arn, tg_arn)}}
    return {
        "TargetValue": float(target),
        **metric,
        "ScaleOutCooldown": scaling.scale_out_cooldown_s,
        "ScaleInCooldown": scaling.scale_in_cooldown_s,
        "DisableScaleIn": False,
    }


def _targets(aws: Aws, resource_id: str) -> list[dict]:
    return aws.client("application-autoscaling").describe_scalable_targets(
        ServiceNamespace=NAMESPACE, ResourceIds=[resource_id], ScalableDimension=DIMENSION)["ScalableTargets"]


def _policies(aws: Aws, resource_id: str) -> list[dict]:
    aas = aws.client("application-autoscaling")
    out: list[dict] = []
    for page in aas.get_paginator("describe_scaling_policies").paginate(
            ServiceNamespace=NAMESPACE, ResourceId=resource_id, ScalableDimension=DIMENSION):
        out += [p for p in page["ScalingPolicies"] if p["ResourceId"] == resource_id]
    return out


def ensure_scalable_target(aws: Aws, stack: str, cluster: str, capacity: EcsGpuCapacity) -> tuple[str, bool]:
    """Register the service's desired count with min..max replicas; nothing when it already is."""
    rid = service_resource_id(cluster, stack)
    lo, hi = capacity.replicas
    found = _targets(aws, rid)
    if found and (found[0]["MinCapacity"], found[0]["MaxCapacity"]) == (lo, hi):
        return rid, False
    kwargs: dict = {"ServiceNamespace": NAMESPACE, "ResourceId": rid, "ScalableDimension": DIMENSION,
                    "MinCapacity": lo, "MaxCapacity": hi}
    if not found:
        kwargs["Tags"] = tags(stack)  # tags go on at creation; an update of min/max keeps them
    aws.client("application-autoscaling").register_scalable_target(**kwargs)
    return rid, not found


def _same(have: dict, wanted: dict) -> bool:
    def norm(d: dict) -> dict:
        out = {k: d.get(k) for k in _CONFIG_KEYS}
        out["TargetValue"] = float(out["TargetValue"] or 0)
        out["DisableScaleIn"] = bool(out["DisableScaleIn"])
        return out
    return norm(have) == norm(wanted)


def ensure_scaling_policy(aws: Aws, stack: str, resource_id: str, config: dict, signal: str = "requests") -> tuple[str, bool]:
    """The target-tracking policy on the signal; put again only when its configuration changed. The
    other signal's policy, from a deploy before the signal changed, is deleted: two target-tracking
    policies would each scale out, and scale in only when both agree."""
    name = policy_name(stack, signal)
    policies = _policies(aws, resource_id)
    for other in {policy_name(stack, s) for s in _POLICY_BY_SIGNAL} - {name}:
        if any(p["PolicyName"] == other for p in policies):
            delete_scaling_policy(aws, f"{resource_id}|{other}")
    found = next((p for p in policies if p["PolicyName"] == name), None)
    if found is not None and found.get("PolicyType") == "TargetTrackingScaling" \
            and _same(found.get("TargetTrackingScalingPolicyConfiguration", {}), config):
        return f"{resource_id}|{name}", False
    aws.client("application-autoscaling").put_scaling_policy(
        PolicyName=name, ServiceNamespace=NAMESPACE, ResourceId=resource_id, ScalableDimension=DIMENSION,
        PolicyType="TargetTrackingScaling", TargetTrackingScalingPolicyConfiguration=config)
    return f"{resource_id}|{name}", found is None


def delete_scaling_policy(aws: Aws, rid: str) -> bool:
    """`<resource id>|<policy name>`; False when it was already gone (or its target was)."""
    resource_id, _, name = rid.partition("|")
    if not any(p["PolicyName"] == name for p in _policies(aws, resource_id)):
        return False
    aws.client("application-autoscaling").delete_scaling_policy(
        PolicyName=name, ServiceNamespace=NAMESPACE, ResourceId=resource_id, ScalableDimension=DIMENSION)
    return True


def deregister_scalable_target(aws: Aws, resource_id: str) -> bool:
    """Its policies first (AWS deletes them with the target; not every stand-in does), then the target."""
    if not _targets(aws, resource_id):
        return False
    for p in _policies(aws, resource_id):
        delete_scaling_policy(aws, f"{resource_id}|{p['PolicyName']}")
    aws.client("application-autoscaling").deregister_scalable_target(
        ServiceNamespace=NAMESPACE, ResourceId=resource_id, ScalableDimension=DIMENSION)
    return True


def stack_scaling(aws: Aws, stack: str) -> tuple[list[str], list[str]]:
    """(scalable-target ids, scaling-policy ids) on the stack's service, in whichever cluster: the
    service's name is the stack's own."""
    aas = aws.client("application-autoscaling")
    service = resource_name(stack, "service")
    targets = []
    for page in aas.get_paginator("describe_scalable_targets").paginate(ServiceNamespace=NAMESPACE):
        targets += [t["ResourceId"] for t in page["ScalableTargets"]
                    if t["ScalableDimension"] == DIMENSION and t["ResourceId"].rsplit("/", 1)[-1] == service]
    policies = [f"{rid}|{p['PolicyName']}" for rid in targets for p in _policies(aws, rid)]
    return targets, policies
