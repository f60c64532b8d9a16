"""What an ECS stack has served: the load balancer's `RequestCount` in CloudWatch (AWS/ApplicationELB).

RequestCount counts the requests the load balancer sent to a target (or answered itself by a
fixed rule); health checks are not requests, and a request that found no target (a stack scaled to
zero answers 503) is not counted. The load balancer publishes a data point only for minutes with
requests, so a missing minute means none. CloudWatch keeps 1-minute points for 15 days, 5-minute
ones for 63 days, hourly ones for 15 months: the period grows with the window asked for.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from tasks.core.aws import Aws

NAMESPACE = "AWS/ApplicationELB"


def lb_dimension(lb_arn: str) -> str:
    """`app/<name>/<id>`: the load balancer as CloudWatch names it."""
    return lb_arn.split(":loadbalancer/", 1)[1]


def period_for(window: timedelta) -> int:
    hours = window.total_seconds() / 3600
    return 60 if hours <= 3 else 300 if hours <= 24 * 63 else 3600


def request_counts(aws: Aws, lb_arn: str, start: datetime, end: datetime) -> tuple[int, list[tuple[datetime, float]]]:
    """(period in seconds, [(period start, requests)]) for the periods of [start, end) that had requests."""
    period = period_for(end - start)
    query = {"Id": "requests", "ReturnData": True, "MetricStat": {
        "Metric": {"Namespace": NAMESPACE, "MetricName": "RequestCount",
                   "Dimensions": [{"Name": "LoadBalancer", "Value": lb_dimension(lb_arn)}]},
        "Period": period, "Stat": "Sum"}}
    points: list[tuple[datetime, float]] = []
    pages = aws.client("cloudwatch").get_paginator("get_metric_data").paginate(
        MetricDataQueries=[query], StartTime=start, EndTime=end, ScanBy="TimestampDescending")
    for page in pages:
        for result in page["MetricDataResults"]:
            points += [(ts, v) for ts, v in zip(result["Timestamps"], result["Values"]) if v > 0]
    return period, points
