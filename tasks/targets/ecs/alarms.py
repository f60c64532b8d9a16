"""CloudWatch alarms per stack, and the SNS topic they notify when the user gives subscriptions.

Four alarms (EcsGpuCapacity.alarms holds the thresholds): no healthy target, the share of requests
the server answered 5xx, p95 of the targets' response time, and running tasks below desired (from
Container Insights, which the stack's cluster has on; on a shared cluster without it that alarm
sees no data and stays OK); a fifth, GPU memory near full, when the metrics agent runs (its
threshold is in EcsGpuCapacity.metrics_agent). Each alarm's description ends with a fingerprint of its whole
definition, so a redeploy puts an alarm again only when something in it changed. Alarms carry the
stack's tag (the scan checks it); the topic is named after the stack.
"""

from __future__ import annotations

import hashlib
import json

from blocks.ecs_capacity import AlarmSettings, MetricsAgentSettings
from tasks.core.aws import Aws, unless_gone
from tasks.core.naming import TAG_STACK, resource_name, tag_list
from tasks.targets.ecs import metrics_agent

ALARMS = ("no-healthy-targets", "target-5xx-rate", "p95-response-time", "running-below-desired", "gpu-memory")
_ELB = "AWS/ApplicationELB"


def alarm_name(stack: str, what: str) -> str:
    return resource_name(stack, f"alarm-{what}")


def topic_name(stack: str) -> str:
    return resource_name(stack, "alarms")


def elb_dimensions(lb_arn: str, tg_arn: str) -> list[dict]:
    return [{"Name": "LoadBalancer", "Value": lb_arn.split(":loadbalancer/", 1)[1]},
            {"Name": "TargetGroup", "Value": tg_arn.split(":", 5)[5]}]


def _metric(namespace: str, name: str, dims: list[dict], stat: str, period: int = 60) -> dict:
    return {"Metric": {"Namespace": namespace, "MetricName": name, "Dimensions": dims}, "Period": period, "Stat": stat}


def alarm_specs(stack: str, settings: AlarmSettings, lb_arn: str, tg_arn: str, cluster: str,
                topic_arn: str | None, agent: MetricsAgentSettings | None = None) -> list[tuple[str, dict]]:
    """(what, put_metric_alarm's arguments without tags), in ALARMS order; the GPU-memory alarm only
    with the metrics agent (it publishes the GPUs' memory)."""
    dims = elb_dimensions(lb_arn, tg_arn)
    ecs_dims = [{"Name": "ClusterName", "Value": cluster}, {"Name": "ServiceName", "Value": resource_name(stack, "service")}]
    actions = {"AlarmActions": [topic_arn], "OKActions": [topic_arn]} if topic_arn else {"AlarmActions": [], "OKActions": []}
    s = settings
    specs = [
        ("no-healthy-targets", f"stack {stack}: no healthy vLLM target for {s.no_healthy_targets_minutes} min", {
            "Namespace": _ELB, "MetricName": "HealthyHostCount", "Dimensions": dims, "Statistic": "Minimum",
            "Period": 60, "EvaluationPeriods": s.no_healthy_targets_minutes,
            "DatapointsToAlarm": s.no_healthy_targets_minutes, "Threshold": 1.0,
            "ComparisonOperator": "LessThanThreshold", "TreatMissingData": "breaching"}),
        ("target-5xx-rate", f"stack {stack}: over {s.target_5xx_percent:g}% of requests answered 5xx by vLLM", {
            "Metrics": [
                {"Id": "errors", "MetricStat": _metric(_ELB, "HTTPCode_Target_5XX_Count", dims, "Sum"), "ReturnData": False},
                {"Id": "requests", "MetricStat": _metric(_ELB, "RequestCount", dims, "Sum"), "ReturnData": False},
                {"Id": "rate", "Expression": "100 * FILL(errors, 0) / requests", "Label": "target 5xx %", "ReturnData": True}],
            "EvaluationPeriods": s.target_5xx_minutes, "DatapointsToAlarm": s.target_5xx_minutes,
            "Threshold": float(s.target_5xx_percent), "ComparisonOperator": "GreaterThanThreshold",
            "TreatMissingData": "notBreaching"}),
        ("p95-response-time", f"stack {stack}: p95 response time over {s.p95_response_time_s:g} s", {
            "Namespace": _ELB, "MetricName": "TargetResponseTime", "Dimensions": dims, "ExtendedStatistic": "p95",
            "Period": 60, "EvaluationPeriods": s.p95_response_time_minutes,
            "DatapointsToAlarm": s.p95_response_time_minutes, "Threshold": float(s.p95_response_time_s),
            "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching"}),
        ("running-below-desired", f"stack {stack}: fewer tasks running than desired for "
                                  f"{s.running_below_desired_minutes} min", {
            "Metrics": [
                {"Id": "running", "MetricStat": _metric("ECS/ContainerInsights", "RunningTaskCount", ecs_dims, "Average"),
                 "ReturnData": False},
                {"Id": "desired", "MetricStat": _metric("ECS/ContainerInsights", "DesiredTaskCount", ecs_dims, "Average"),
                 "ReturnData": False},
                {"Id": "missing", "Expression": "desired - running", "Label": "tasks missing", "ReturnData": True}],
            "EvaluationPeriods": s.running_below_desired_minutes, "DatapointsToAlarm": s.running_below_desired_minutes,
            "Threshold": 0.0, "ComparisonOperator": "GreaterThanThreshold", "TreatMissingData": "notBreaching"}),
    ]
    if agent is not None:
        gpu = metrics_agent.dimensions(stack)
        specs.append(("gpu-memory", f"stack {stack}: GPU memory over {agent.gpu_memory_percent:g}% for "
                                    f"{agent.gpu_memory_minutes} min (vLLM takes its gpu_memory_utilization at start)", {
            "Metrics": [
                {"Id": "used", "MetricStat": _metric(metrics_agent.NAMESPACE, metrics_agent.GPU_MEMORY_USED, gpu, "Maximum"),
                 "ReturnData": False},
                {"Id": "total", "MetricStat": _metric(metrics_agent.NAMESPACE, metrics_agent.GPU_MEMORY_TOTAL, gpu, "Maximum"),
                 "ReturnData": False},
                {"Id": "percent", "Expression": "100 * used / total", "Label": "GPU memory %", "ReturnData": True}],
            "EvaluationPeriods": agent.gpu_memory_minutes, "DatapointsToAlarm": agent.gpu_memory_minutes,
            "Threshold": float(agent.gpu_memory_percent), "ComparisonOperator": "GreaterThanThreshold",
            "TreatMissingData": "notBreaching"}))
    out = []
    for what, description, body in specs:
        spec = {"AlarmName": alarm_name(stack, what), "ActionsEnabled": True, **actions, **body}
        fingerprint = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]
        out.append((what, {**spec, "AlarmDescription": f"{description} (vllm-pipeline; definition {fingerprint})"}))
    return out


def ensure_alarm(aws: Aws, stack: str, spec: dict) -> tuple[str, bool]:
    """Put the alarm unless one with the same definition (its fingerprint) exists."""
    cw = aws.client("cloudwatch")
    found = cw.describe_alarms(AlarmNames=[spec["AlarmName"]], AlarmTypes=["MetricAlarm"])["MetricAlarms"]
    if found and found[0].get("AlarmDescription") == spec["AlarmDescription"]:
        return spec["AlarmName"], False
    cw.put_metric_alarm(**spec, Tags=tag_list(stack))  # on an update AWS keeps the tags it has
    return spec["AlarmName"], not found


def delete_alarm(aws: Aws, name: str) -> bool:
    cw = aws.client("cloudwatch")
    if not cw.describe_alarms(AlarmNames=[name])["MetricAlarms"]:
        return False
    cw.delete_alarms(AlarmNames=[name])
    return True


def stack_alarms(aws: Aws, stack: str) -> list[str]:
    """The stack's alarms: its names, or (names this version no longer makes) its tag."""
    cw = aws.client("cloudwatch")
    ours = {alarm_name(stack, w) for w in ALARMS}
    names = []
    for page in cw.get_paginator("describe_alarms").paginate(AlarmNamePrefix=resource_name(stack, "alarm-"),
                                                             AlarmTypes=["MetricAlarm"]):
        for a in page["MetricAlarms"]:
            if a["AlarmName"] in ours or any(t["Key"] == TAG_STACK and t["Value"] == stack for t in cw.list_tags_for_resource(
                    ResourceARN=a["AlarmArn"]).get("Tags", [])):
                names.append(a["AlarmName"])
    return names


# ------------------------------------------------------------------------------------------------ topic


def _find_topic(aws: Aws, stack: str) -> str | None:
    suffix = f":{topic_name(stack)}"
    for page in aws.client("sns").get_paginator("list_topics").paginate():
        for t in page["Topics"]:
            if t["TopicArn"].endswith(suffix):
                return t["TopicArn"]
    return None


def ensure_topic(aws: Aws, stack: str) -> tuple[str, bool]:
    arn = _find_topic(aws, stack)
    if arn:
        return arn, False
    return aws.client("sns").create_topic(Name=topic_name(stack), Tags=tag_list(stack))["TopicArn"], True


def ensure_subscriptions(aws: Aws, topic_arn: str, endpoints: list[str]) -> list[str]:
    """Subscribe each endpoint not yet subscribed (e-mail: the address must confirm; https: the endpoint
    must answer the confirmation). Endpoints no longer listed stay until teardown (a subscription still
    pending confirmation cannot be removed)."""
    sns = aws.client("sns")
    have = set()
    for page in sns.get_paginator("list_subscriptions_by_topic").paginate(TopicArn=topic_arn):
        have |= {s["Endpoint"] for s in page["Subscriptions"]}
    added = []
    for endpoint in endpoints:
        if endpoint not in have:
            sns.subscribe(TopicArn=topic_arn, Protocol="https" if endpoint.startswith("https://") else "email",
                          Endpoint=endpoint)
            added.append(endpoint)
    return added


def delete_topic(aws: Aws, arn: str) -> bool:
    """The topic and its subscriptions; False when it was already gone."""
    sns = aws.client("sns")
    if unless_gone(lambda: sns.get_topic_attributes(TopicArn=arn), "NotFound", "NotFoundException") is None:
        return False
    sns.delete_topic(TopicArn=arn)
    return True


def stack_topics(aws: Aws, stack: str) -> list[str]:
    arn = _find_topic(aws, stack)
    return [arn] if arn else []
