"""A CloudWatch dashboard per stack: requests, latency percentiles, 5xx, healthy hosts, running and
desired tasks, the stack's alarms, the cost over the range shown, and with the metrics agent vLLM's queue,
KV cache and the GPUs. Dashboards take no tags: the name (`vllm-<stack>-dashboard`)
is how teardown finds it."""

from __future__ import annotations

import json

from tasks.core.aws import Aws, unless_gone
from tasks.core.naming import resource_name
from tasks.targets.ecs import metrics_agent
from tasks.targets.ecs.alarms import elb_dimensions

_GONE = ("ResourceNotFound", "ResourceNotFoundException")
_CONSOLE = {"aws": "console.aws.amazon.com", "aws-cn": "console.amazonaws.cn", "aws-us-gov": "console.amazonaws-us-gov.com"}


def dashboard_name(stack: str) -> str:
    return resource_name(stack, "dashboard")


def console_url(region: str, name: str, partition: str = "aws") -> str:
    host = _CONSOLE.get(partition, _CONSOLE["aws"])
    return f"https://{region}.{host}/cloudwatch/home?region={region}#dashboards/dashboard/{name}"


def dashboard_body(stack: str, region: str, lb_arn: str, tg_arn: str, cluster: str, alarm_arns: list[str],
                   agent: bool = False, price_per_hour: float | None = None) -> dict:
    """The widgets; with the metrics agent also vLLM's queue, its KV-cache use and the GPUs' utilisation and
    memory. With the instance's price, the cost: running tasks x price, summed minute by minute over the
    range the dashboard shows (one task per GPU host; a host's minutes without a task are not in it)."""
    dims = elb_dimensions(lb_arn, tg_arn)
    lb = dims[0]["Value"]
    tg = dims[1]["Value"]
    service = resource_name(stack, "service")

    def widget(title: str, metrics: list, x: int, y: int, stat: str = "Sum", **props) -> dict:
        return {"type": "metric", "x": x, "y": y, "width": 12, "height": 6,
                "properties": {"title": title, "region": region, "stat": stat, "period": 60, "view": "timeSeries",
                               "metrics": metrics, **props}}

    elb = "AWS/ApplicationELB"
    widgets = [
        widget("Requests", [[elb, "RequestCount", "LoadBalancer", lb, "TargetGroup", tg, {"label": "requests"}],
                            [elb, "RequestCountPerTarget", "TargetGroup", tg, {"label": "per task (scaling signal)"}]], 0, 0),
        widget("Response time (s)", [[elb, "TargetResponseTime", "LoadBalancer", lb, "TargetGroup", tg, {"stat": p, "label": p}]
                                     for p in ("p50", "p95", "p99")], 12, 0, stat="p95"),
        widget("5xx", [[elb, "HTTPCode_Target_5XX_Count", "LoadBalancer", lb, "TargetGroup", tg, {"label": "vLLM 5xx"}],
                       [elb, "HTTPCode_ELB_5XX_Count", "LoadBalancer", lb, {"label": "load balancer 5xx"}]], 0, 6),
        widget("Targets", [[elb, "HealthyHostCount", "LoadBalancer", lb, "TargetGroup", tg, {"label": "healthy"}],
                           [elb, "UnHealthyHostCount", "LoadBalancer", lb, "TargetGroup", tg, {"label": "unhealthy"}]],
               12, 6, stat="Minimum"),
        widget("Tasks", [["ECS/ContainerInsights", "RunningTaskCount", "ClusterName", cluster, "ServiceName", service,
                          {"label": "running"}],
                         ["ECS/ContainerInsights", "DesiredTaskCount", "ClusterName", cluster, "ServiceName", service,
                          {"label": "desired"}]], 0, 12, stat="Average"),
    ]
    if agent:
        ns, dims = metrics_agent.NAMESPACE, ["Stack", stack]
        widgets += [
            widget("vLLM queue (per task)", [[ns, metrics_agent.WAITING, *dims, {"label": "waiting"}],
                                             [ns, metrics_agent.RUNNING, *dims, {"label": "running"}]], 0, 18, stat="Average"),
            widget("KV cache used (0-1)", [[ns, metrics_agent.KV_CACHE, *dims, {"label": "KV cache"}]], 12, 18, stat="Maximum"),
            widget("GPU", [[ns, metrics_agent.GPU_UTILIZATION, *dims, {"label": "utilisation %", "stat": "Average"}],
                           [{"expression": "100 * used / total", "label": "memory %", "id": "mem"}],
                           [ns, metrics_agent.GPU_MEMORY_USED, *dims, {"id": "used", "visible": False}],
                           [ns, metrics_agent.GPU_MEMORY_TOTAL, *dims, {"id": "total", "visible": False}]], 0, 24,
                   stat="Maximum"),
        ]
    if price_per_hour is not None:
        widgets.append(widget(f"Cost over the range shown (USD; tasks x ${price_per_hour:g}/h)", [
            [{"expression": f"RUNNING_SUM(FILL(tasks, 0) * {price_per_hour:g} / 60)", "label": "cost so far", "id": "cost"}],
            ["ECS/ContainerInsights", "RunningTaskCount", "ClusterName", cluster, "ServiceName", service,
             {"id": "tasks", "visible": False}]], 12, 24 if agent else 18, stat="Average"))
    if alarm_arns:
        widgets.append({"type": "alarm", "x": 12, "y": 12, "width": 12, "height": 6,
                        "properties": {"title": "Alarms", "alarms": sorted(alarm_arns)}})
    return {"widgets": widgets}


def ensure_dashboard(aws: Aws, stack: str, body: dict) -> tuple[str, bool]:
    """Put the dashboard unless it already has this body."""
    cw = aws.client("cloudwatch")
    name = dashboard_name(stack)
    found = unless_gone(lambda: cw.get_dashboard(DashboardName=name), *_GONE)
    if found is not None and json.loads(found["DashboardBody"]) == body:
        return name, False
    cw.put_dashboard(DashboardName=name, DashboardBody=json.dumps(body))
    return name, found is None


def delete_dashboard(aws: Aws, name: str) -> bool:
    cw = aws.client("cloudwatch")
    if unless_gone(lambda: cw.get_dashboard(DashboardName=name), *_GONE) is None:
        return False
    return unless_gone(lambda: cw.delete_dashboards(DashboardNames=[name]), *_GONE) is not None


def stack_dashboards(aws: Aws, stack: str) -> list[str]:
    name = dashboard_name(stack)
    found = []
    for page in aws.client("cloudwatch").get_paginator("list_dashboards").paginate(DashboardNamePrefix=name):
        found += [d["DashboardName"] for d in page["DashboardEntries"] if d["DashboardName"] == name]
    return found
