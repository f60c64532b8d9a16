"""Operating an ECS stack, on moto: autoscaling (scalable target + target tracking on the load
balancer's requests per task), alarms (+ SNS topic when subscriptions are given), the dashboard;
recorded, idempotent on redeploy, found by the scan and removed by teardown. The block's rules.

moto runs no containers: the deploys keep the stack (keep_failed) past the wait's timeout."""

from __future__ import annotations

import json
import os
from collections import Counter
from datetime import datetime, timedelta, timezone

import pytest
from pydantic import ValidationError
from test_ecs_target import recorded, run_deploy, run_teardown, small_model, store  # noqa: F401 - fixtures

from blocks.ecs_capacity import AlarmSettings, EcsGpuCapacity, ScalingSettings
from flows.operations import describe
from tasks.core.aws import Aws
from tasks.core.errors import PipelineInputError
from tasks.core.naming import TAG_STACK
from tasks.core.state import Resource, StackState, load_state, load_traffic, save_state
from tasks.targets.ecs.service import DeployTimeout
from tasks.teardown.sweep import leftovers, scan

pytestmark = pytest.mark.integration
# What this slice changes on a deploy (the ECS target's own steps re-put role policies and attributes as before)
OURS = {"RegisterScalableTarget", "PutScalingPolicy", "PutMetricAlarm", "PutDashboard", "CreateTopic", "Subscribe",
        "ModifyLoadBalancerAttributes", "UpdateService", "DeleteScalingPolicy", "DeleteAlarms", "DeleteDashboards"}


def scaled(**kw) -> EcsGpuCapacity:
    base = dict(ingress_cidrs=["10.1.0.0/16"], max_capacity=4, min_replicas=1, max_replicas=3,
                scaling=ScalingSettings(target_requests_per_minute=12, scale_out_cooldown_s=240, scale_in_cooldown_s=1200))
    return EcsGpuCapacity(**{**base, **kw})


# ---------------------------------------------------------------------------------------------- block


def test_replica_bounds_are_validated():
    assert EcsGpuCapacity().replicas == (1, 1) and not EcsGpuCapacity().autoscaling
    assert EcsGpuCapacity().drain_s == 900 == EcsGpuCapacity().request_timeout_s  # drain = the longest request
    cap = scaled()
    assert cap.replicas == (1, 3) and cap.autoscaling
    assert EcsGpuCapacity(max_capacity=2, max_replicas=2).replicas == (1, 2)  # min defaults to desired_count
    bad = [
        (dict(max_capacity=2, max_replicas=3), "exceeds max_capacity"),
        (dict(max_capacity=4, min_replicas=2, max_replicas=3), "desired_count .1. is outside"),
        (dict(max_capacity=4, desired_count=4, max_replicas=3), "outside"),
        (dict(max_capacity=3, max_replicas=3, deregistration_delay_s=60), "scale-in would stop tasks"),
        (dict(max_replicas=0), "greater than or equal to 1"),
        (dict(min_replicas=-1), "greater than or equal to 0"),
        (dict(alarms={"topic_subscriptions": ["not-an-address"]}), "not e-mail addresses"),
        (dict(alarms={"topic_subscriptions": ["http://plain.example"]}), "https://"),
        (dict(alarms={"topic_subscriptions": ["a@example.com", "a@example.com"]}), "twice"),
    ]
    for kw, message in bad:
        with pytest.raises(ValidationError, match=message):
            EcsGpuCapacity(**kw)
    EcsGpuCapacity(max_capacity=3, max_replicas=3, deregistration_delay_s=900, request_timeout_s=900)
    EcsGpuCapacity(deregistration_delay_s=30)  # a fixed service may drain shorter: nothing scales it in
    assert EcsGpuCapacity(max_capacity=3, min_replicas=0, max_replicas=3).replicas == (0, 3)  # scale to zero between jobs
    ok = AlarmSettings(topic_subscriptions=["ops@example.com", "https://hooks.example.com/x"])
    assert len(ok.topic_subscriptions) == 2


# --------------------------------------------------------------------------------------------- deploy


def _tag_ok(tags: list[dict], stack: str) -> bool:
    return any(t["Key"] == TAG_STACK and t["Value"] == stack for t in tags)


def test_autoscaling_alarms_topic_dashboard_shapes_redeploy_and_teardown(store, small_model, monkeypatch):  # noqa: F811
    stack = "operate"
    cap = scaled(alarms=AlarmSettings(topic_subscriptions=["ops@example.com"], p95_response_time_s=45))
    with recorded(monkeypatch) as first, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, cap, keep_failed=True)
    state, _ = load_state(store, stack)
    kinds = Counter(r.kind for r in state.resources)
    assert (kinds["scalable-target"], kinds["scaling-policy"], kinds["alarm"], kinds["alarm-topic"], kinds["dashboard"]) \
        == (1, 1, 4, 1, 1)
    aws = Aws(region="us-east-1")
    elb = aws.client("elbv2")
    lb = elb.describe_load_balancers(Names=[f"vllm-{stack}-alb"])["LoadBalancers"][0]
    tg = elb.describe_target_groups(Names=[f"vllm-{stack}-tg"])["TargetGroups"][0]
    lb_dim = lb["LoadBalancerArn"].split(":loadbalancer/")[1]
    tg_dim = tg["TargetGroupArn"].split(":", 5)[5]

    # scale-in safety: the target group drains as long as the longest request (= the load balancer's idle timeout)
    tg_attrs = {a["Key"]: a["Value"] for a in elb.describe_target_group_attributes(TargetGroupArn=tg["TargetGroupArn"])["Attributes"]}
    lb_attrs = {a["Key"]: a["Value"] for a in elb.describe_load_balancer_attributes(LoadBalancerArn=lb["LoadBalancerArn"])["Attributes"]}
    assert tg_attrs["deregistration_delay.timeout_seconds"] == lb_attrs["idle_timeout.timeout_seconds"] == "900"
    # a spare host for rolling updates: max_capacity 4 > max_replicas 3
    assert first.params["CreateService"][0]["deploymentConfiguration"]["maximumPercent"] == 200

    aas = aws.client("application-autoscaling")
    rid = f"service/vllm-{stack}-cluster/vllm-{stack}-service"
    target = aas.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[rid])["ScalableTargets"]
    assert [(t["ScalableDimension"], t["MinCapacity"], t["MaxCapacity"]) for t in target] == [("ecs:service:DesiredCount", 1, 3)]
    assert _tag_ok([{"Key": k, "Value": v} for k, v in first.params["RegisterScalableTarget"][0]["Tags"].items()], stack)
    policies = aas.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=rid)["ScalingPolicies"]
    assert [p["PolicyType"] for p in policies] == ["TargetTrackingScaling"]
    conf = policies[0]["TargetTrackingScalingPolicyConfiguration"]
    assert conf["TargetValue"] == 12.0 and conf["ScaleOutCooldown"] == 240 and conf["ScaleInCooldown"] == 1200
    assert conf["PredefinedMetricSpecification"] == {"PredefinedMetricType": "ALBRequestCountPerTarget",
                                                     "ResourceLabel": f"{lb_dim}/{tg_dim}"}

    sns = aws.client("sns")
    topic = next(t["TopicArn"] for t in sns.list_topics()["Topics"] if t["TopicArn"].endswith(f":vllm-{stack}-alarms"))
    subs = sns.list_subscriptions_by_topic(TopicArn=topic)["Subscriptions"]
    assert [(s["Protocol"], s["Endpoint"]) for s in subs] == [("email", "ops@example.com")]
    assert _tag_ok(sns.list_tags_for_resource(ResourceArn=topic)["Tags"], stack)

    cw = aws.client("cloudwatch")
    found = {a["AlarmName"]: a for a in cw.describe_alarms(AlarmNamePrefix=f"vllm-{stack}-alarm-")["MetricAlarms"]}
    assert sorted(found) == sorted(f"vllm-{stack}-alarm-{w}" for w in
                                   ("no-healthy-targets", "target-5xx-rate", "p95-response-time", "running-below-desired"))
    for a in found.values():
        assert a["AlarmActions"] == [topic] and a["OKActions"] == [topic]
        assert _tag_ok(cw.list_tags_for_resource(ResourceARN=a["AlarmArn"])["Tags"], stack)
    healthy = found[f"vllm-{stack}-alarm-no-healthy-targets"]
    assert (healthy["MetricName"], healthy["Statistic"], healthy["ComparisonOperator"], healthy["Threshold"],
            healthy["TreatMissingData"]) == ("HealthyHostCount", "Minimum", "LessThanThreshold", 1.0, "breaching")
    assert {d["Name"]: d["Value"] for d in healthy["Dimensions"]} == {"LoadBalancer": lb_dim, "TargetGroup": tg_dim}
    p95 = found[f"vllm-{stack}-alarm-p95-response-time"]
    assert (p95["MetricName"], p95["ExtendedStatistic"], p95["Threshold"]) == ("TargetResponseTime", "p95", 45.0)
    sent = {p["AlarmName"]: p for p in first.params["PutMetricAlarm"]}  # metric-math alarms: check the request
    rate = sent[f"vllm-{stack}-alarm-target-5xx-rate"]
    assert [m["Id"] for m in rate["Metrics"]] == ["errors", "requests", "rate"] and rate["Threshold"] == 5.0
    assert rate["Metrics"][0]["MetricStat"]["Metric"]["MetricName"] == "HTTPCode_Target_5XX_Count"
    below = sent[f"vllm-{stack}-alarm-running-below-desired"]
    assert {m["MetricStat"]["Metric"]["MetricName"] for m in below["Metrics"] if "MetricStat" in m} \
        == {"RunningTaskCount", "DesiredTaskCount"}
    assert below["EvaluationPeriods"] == 20 and below["Metrics"][0]["MetricStat"]["Metric"]["Namespace"] == "ECS/ContainerInsights"

    body = json.loads(cw.get_dashboard(DashboardName=f"vllm-{stack}-dashboard")["DashboardBody"])
    titles = [w["properties"]["title"] for w in body["widgets"]]
    assert titles[:5] == ["Requests", "Response time (s)", "5xx", "Targets", "Tasks"] and titles[-1] == "Alarms"
    price = state.settings["price_per_hour"]
    assert titles[5] == f"Cost over the range shown (USD; tasks x ${price:g}/h)"
    cost = body["widgets"][5]["properties"]["metrics"]
    assert cost[0][0]["expression"] == f"RUNNING_SUM(FILL(tasks, 0) * {price:g} / 60)" and cost[1][-1]["id"] == "tasks"
    latency = body["widgets"][1]["properties"]["metrics"]
    assert [m[-1]["stat"] for m in latency] == ["p50", "p95", "p99"] and latency[0][3] == lb_dim
    assert sorted(body["widgets"][-1]["properties"]["alarms"]) == sorted(a["AlarmArn"] for a in found.values())
    url = state.settings["dashboard_url"]
    assert url == f"https://us-east-1.console.aws.amazon.com/cloudwatch/home?region=us-east-1#dashboards/dashboard/vllm-{stack}-dashboard"
    assert describe(state).dashboard == url  # the status flow's row

    # the scan finds every new kind without the record
    found_kinds = Counter(r.kind for r in scan(aws, stack)[0])
    assert (found_kinds["scalable-target"], found_kinds["scaling-policy"], found_kinds["alarm"], found_kinds["alarm-topic"],
            found_kinds["dashboard"]) == (1, 1, 4, 1, 1)
    assert scan(aws, stack)[1] == []

    # autoscaling moved the count: a redeploy of the same settings changes nothing, not even the count
    ecs = aws.client("ecs")
    ecs.update_service(cluster=f"vllm-{stack}-cluster", service=f"vllm-{stack}-service", desiredCount=2)
    with recorded(monkeypatch) as again, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, cap, keep_failed=True)
    changes = [c for c in again.calls if c in OURS]
    assert changes == [], changes
    assert ecs.describe_services(cluster=f"vllm-{stack}-cluster", services=[f"vllm-{stack}-service"])["services"][0]["desiredCount"] == 2

    # changed thresholds and scaling: only what changed is put again
    cap2 = scaled(alarms=AlarmSettings(topic_subscriptions=["ops@example.com"], p95_response_time_s=90),
                  max_replicas=4, scaling=ScalingSettings(target_requests_per_minute=20))
    with recorded(monkeypatch) as changed, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, cap2, keep_failed=True)
    puts = Counter(c for c in changed.calls if c in OURS)
    assert puts == {"RegisterScalableTarget": 1, "PutScalingPolicy": 1, "PutMetricAlarm": 1}, puts  # the p95 alarm only
    assert aas.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[rid])["ScalableTargets"][0]["MaxCapacity"] == 4

    run_teardown(stack, store)
    assert leftovers(aws, stack) == [] and load_state(store, stack)[0] is None
    assert aas.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[rid])["ScalableTargets"] == []
    assert aas.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=rid)["ScalingPolicies"] == []
    assert cw.describe_alarms(AlarmNamePrefix=f"vllm-{stack}-")["MetricAlarms"] == []
    assert cw.list_dashboards(DashboardNamePrefix=f"vllm-{stack}-")["DashboardEntries"] == []
    assert not [t for t in sns.list_topics()["Topics"] if f":vllm-{stack}-" in t["TopicArn"]]
    run_teardown(stack, store)  # twice: every delete takes "already gone" as done
    assert leftovers(aws, stack) == []


def test_fixed_stack_has_alarms_and_dashboard_but_no_topic_or_scaling(store, small_model):  # noqa: F811
    stack = "fixed-ops"
    with pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, EcsGpuCapacity(ingress_cidrs=["10.1.0.0/16"]), keep_failed=True)
    try:
        kinds = Counter(r.kind for r in load_state(store, stack)[0].resources)
        assert kinds["alarm"] == 4 and kinds["dashboard"] == 1
        assert not kinds["alarm-topic"] and not kinds["scalable-target"] and not kinds["scaling-policy"]
        cw = Aws(region="us-east-1").client("cloudwatch")
        assert all(a["AlarmActions"] == [] for a in cw.describe_alarms(AlarmNamePrefix=f"vllm-{stack}-")["MetricAlarms"])
        body = json.loads(cw.get_dashboard(DashboardName=f"vllm-{stack}-dashboard")["DashboardBody"])
        assert body["widgets"][-1]["type"] == "alarm"
    finally:
        run_teardown(stack, store)
    assert leftovers(Aws(region="us-east-1"), stack) == []


def test_teardown_from_the_scan_alone_removes_scaling_alarms_topic_dashboard(store, small_model):  # noqa: F811
    stack = "ops-norecord"
    with pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, scaled(alarms=AlarmSettings(topic_subscriptions=["https://hooks.example.com/a"])),
                   keep_failed=True)
    from tasks.core.aws import aws_client
    aws_client("s3").delete_object(Bucket=store.bucket_name, Key=f"stacks/{stack}/state.json")  # the record is lost
    report = run_teardown(stack, store)
    assert not report.had_state_record
    deleted = {d.split(" ", 1)[0] for d in report.deleted}
    assert {"scalable-target", "scaling-policy", "alarm", "alarm-topic", "dashboard"} <= deleted
    assert leftovers(Aws(region="us-east-1"), stack) == []


def test_a_failing_put_is_rolled_back_to_nothing(store, small_model, monkeypatch):  # noqa: F811
    """Each new create (target, policy, topic, an alarm, the dashboard) failing once: the deploy rolls
    back, and nothing of the stack is left."""
    for i, op in enumerate(["RegisterScalableTarget", "PutScalingPolicy", "CreateTopic", "PutMetricAlarm", "PutDashboard"]):
        stack = f"ops-fail-{i}"
        with recorded(monkeypatch) as log:
            log.fail_ops = {op: ["AccessDenied"]}
            with pytest.raises(Exception, match="AccessDenied"):
                run_deploy(stack, store, small_model, scaled(alarms=AlarmSettings(topic_subscriptions=["ops@example.com"])))
        assert leftovers(Aws(region="us-east-1"), stack) == [], (op, leftovers(Aws(region="us-east-1"), stack))
        assert load_state(store, stack)[0] is None


def test_metrics_agent_sidecar_queue_scaling_gpu_alarm_widgets_then_off_again(store, small_model, monkeypatch):  # noqa: F811
    """With the metrics agent: the CloudWatch agent is a sidecar of the vLLM task that scrapes its /metrics
    (EMF into the stack's metrics log group) and reads the GPUs; the service scales on vLLM's queue; a
    GPU-memory alarm and queue/KV/GPU widgets exist; the task role may write only its metrics. A redeploy
    changes nothing; turning it off removes the sidecar, its policy, its alarm and the queue policy."""
    import yaml

    from blocks.ecs_capacity import MetricsAgentSettings

    stack = "agent"
    agent = MetricsAgentSettings(enabled=True, interval_s=20, gpu_memory_percent=97.5)
    cap = scaled(metrics_agent=agent, scaling=ScalingSettings(signal="queue", target_waiting_per_task=3))
    with recorded(monkeypatch) as first, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, cap, keep_failed=True)
    aws = Aws(region="us-east-1")
    ecs, iam, logs, cw = (aws.client(s) for s in ("ecs", "iam", "logs", "cloudwatch"))

    td = ecs.describe_task_definition(taskDefinition=f"vllm-{stack}-server")["taskDefinition"]
    server, sidecar = td["containerDefinitions"]
    assert (server["name"], server["essential"], sidecar["name"], sidecar["essential"]) == ("vllm", True, "cloudwatch-agent", False)
    assert sidecar["image"] == agent.image and sidecar["links"] == ["vllm:vllm"]
    assert sidecar["dependsOn"] == [{"containerName": "vllm", "condition": "START"}]
    assert "resourceRequirements" not in sidecar  # it reserves no GPU: NVIDIA's runtime shows it every GPU
    env = {e["name"]: e["value"] for e in sidecar["environment"]}
    assert env["NVIDIA_VISIBLE_DEVICES"] == "all"
    scrape = yaml.safe_load(env["PROMETHEUS_CONFIG_CONTENT"])
    [job] = scrape["scrape_configs"]
    assert job["static_configs"] == [{"targets": ["vllm:8000"], "labels": {"Stack": stack}}] and scrape["global"]["scrape_interval"] == "20s"
    config = json.loads(env["CW_CONFIG_CONTENT"])
    prom = config["logs"]["metrics_collected"]["prometheus"]
    assert prom["log_group_name"] == f"/vllm-pipeline/{stack}/metrics" and prom["prometheus_config_path"] == "env:PROMETHEUS_CONFIG_CONTENT"
    [rule] = prom["emf_processor"]["metric_declaration"]
    assert rule["dimensions"] == [["Stack"]] and "^vllm:num_requests_waiting$" in rule["metric_selectors"]
    assert prom["emf_processor"]["metric_namespace"] == config["metrics"]["namespace"] == "vllm-pipeline"
    assert config["metrics"]["metrics_collected"]["nvidia_gpu"]["append_dimensions"] == {"Stack": stack}

    group = logs.describe_log_groups(logGroupNamePrefix=f"/vllm-pipeline/{stack}/metrics")["logGroups"]
    assert [(g["logGroupName"], g.get("retentionInDays")) for g in group] == [(f"/vllm-pipeline/{stack}/metrics", 14)]
    role = f"vllm-{stack}-task"
    assert sorted(iam.list_role_policies(RoleName=role)["PolicyNames"]) == ["metrics-agent", "vllm-pipeline"]
    doc = iam.get_role_policy(RoleName=role, PolicyName="metrics-agent")["PolicyDocument"]
    doc = doc if isinstance(doc, dict) else json.loads(doc)
    assert {a for st in doc["Statement"] for a in ([st["Action"]] if isinstance(st["Action"], str) else st["Action"])} \
        == {"logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams", "cloudwatch:PutMetricData"}
    assert all(f"log-group:/vllm-pipeline/{stack}/metrics" in r for st in doc["Statement"] if st["Sid"] == "MetricsAgentLogs"
               for r in st["Resource"])

    rid = f"service/vllm-{stack}-cluster/vllm-{stack}-service"
    aas = aws.client("application-autoscaling")
    [policy] = aas.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=rid)["ScalingPolicies"]
    conf = policy["TargetTrackingScalingPolicyConfiguration"]
    assert policy["PolicyName"] == f"vllm-{stack}-waiting-per-task" and conf["TargetValue"] == 3.0
    assert conf["CustomizedMetricSpecification"] == {"MetricName": "vllm:num_requests_waiting", "Namespace": "vllm-pipeline",
                                                     "Dimensions": [{"Name": "Stack", "Value": stack}], "Statistic": "Average"}
    gpu = {p["AlarmName"]: p for p in first.params["PutMetricAlarm"]}[f"vllm-{stack}-alarm-gpu-memory"]
    assert gpu["Threshold"] == 97.5 and gpu["Metrics"][-1]["Expression"] == "100 * used / total"
    assert {m["MetricStat"]["Metric"]["MetricName"] for m in gpu["Metrics"][:2]} == {"nvidia_smi_memory_used", "nvidia_smi_memory_total"}
    body = json.loads(cw.get_dashboard(DashboardName=f"vllm-{stack}-dashboard")["DashboardBody"])
    titles = [w["properties"]["title"] for w in body["widgets"]]
    assert {"vLLM queue (per task)", "KV cache used (0-1)", "GPU"} <= set(titles)
    assert Counter(r.kind for r in scan(aws, stack)[0])["log-group"] == 2 and Counter(
        r.kind for r in scan(aws, stack)[0])["alarm"] == 5

    with recorded(monkeypatch) as again, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, cap, keep_failed=True)
    assert [c for c in again.calls if c in OURS | {"RegisterTaskDefinition", "CreateLogGroup"}] == []

    off = scaled()  # the agent off, the requests signal back
    with recorded(monkeypatch) as changed, pytest.raises(DeployTimeout):
        run_deploy(stack, store, small_model, off, keep_failed=True)
    assert changed.calls.count("RegisterTaskDefinition") == 1
    td = ecs.describe_task_definition(taskDefinition=f"vllm-{stack}-server")["taskDefinition"]
    assert [c["name"] for c in td["containerDefinitions"]] == ["vllm"]
    assert iam.list_role_policies(RoleName=role)["PolicyNames"] == ["vllm-pipeline"]
    assert [p["PolicyName"] for p in aas.describe_scaling_policies(ServiceNamespace="ecs", ResourceId=rid)["ScalingPolicies"]] \
        == [f"vllm-{stack}-requests-per-target"]
    assert cw.describe_alarms(AlarmNames=[f"vllm-{stack}-alarm-gpu-memory"])["MetricAlarms"] == []

    run_teardown(stack, store)
    assert leftovers(aws, stack) == []
    assert logs.describe_log_groups(logGroupNamePrefix=f"/vllm-pipeline/{stack}/")["logGroups"] == []


def test_metrics_agent_settings_are_checked_before_any_resource(store, small_model):  # noqa: F811
    from blocks.ecs_capacity import MetricsAgentSettings

    with pytest.raises(ValidationError, match="needs metrics_agent.enabled"):
        scaled(scaling=ScalingSettings(signal="queue"))
    low = scaled(metrics_agent=MetricsAgentSettings(enabled=True, gpu_memory_percent=90))
    with pytest.raises(PipelineInputError, match="not above VllmServerSettings.gpu_memory_utilization"):
        run_deploy("agent-low", store, small_model, low)
    assert load_state(store, "agent-low")[0] is None and leftovers(Aws(region="us-east-1"), "agent-low") == []


# ------------------------------------------------------------------------------------- scale to zero, idle


@pytest.fixture()
def served(monkeypatch):
    """moto runs no containers: the wait for a serving stack (deploy, scale up) returns at once; its calls are kept."""
    from tasks.targets.ecs import service as svc

    waits: list[tuple] = []
    monkeypatch.setattr(svc, "wait_until_ready", lambda *a, **k: waits.append(a))
    return waits


def _service(aws: Aws, stack: str) -> dict:
    return aws.client("ecs").describe_services(cluster=f"vllm-{stack}-cluster", services=[f"vllm-{stack}-service"])["services"][0]


def _floor(aws: Aws, stack: str) -> tuple[int, int]:
    rid = f"service/vllm-{stack}-cluster/vllm-{stack}-service"
    aas = aws.client("application-autoscaling")
    [t] = aas.describe_scalable_targets(ServiceNamespace="ecs", ResourceIds=[rid])["ScalableTargets"]
    return t["MinCapacity"], t["MaxCapacity"]


def _host_floor(aws: Aws, stack: str) -> int:
    return aws.client("autoscaling").describe_auto_scaling_groups(AutoScalingGroupNames=[f"vllm-{stack}-hosts"])[
        "AutoScalingGroups"][0]["MinSize"]


def test_scale_sets_the_count_and_the_autoscaling_floor_and_a_redeploy_restores_them(store, small_model, served):  # noqa: F811
    from prefect import flow

    from flows.scale import scale_stack

    stack, aws = "scaler", Aws(region="us-east-1")
    cap = scaled(alarms=AlarmSettings(enabled=False), dashboard=False, min_capacity=1)  # one GPU host kept warm
    run_deploy(stack, store, small_model, cap)
    assert load_state(store, stack)[0].scale.replicas == 1 and len(served) == 1 and _host_floor(aws, stack) == 1
    run = flow(name="t-scale")(scale_stack)
    try:
        down = run(store, stack, 0)
        assert (down.before, down.after) == (1, 0) and len(served) == 1  # no wait going down
        assert _service(aws, stack)["desiredCount"] == 0 and _floor(aws, stack) == (0, 3)  # autoscaling cannot undo it
        assert _host_floor(aws, stack) == 0  # no GPU host is kept (and billed) for a stack at zero
        state = load_state(store, stack)[0]
        assert state.at_zero and state.scale.by == "scale" and describe(state).price_per_hour == 0
        up = run(store, stack, 2)
        assert _service(aws, stack)["desiredCount"] == 2 and _floor(aws, stack) == (2, 3) and _host_floor(aws, stack) == 1
        assert len(served) == 2 and served[-1][5] == state.endpoint.url  # waited until it serves through the load balancer
        with pytest.raises(PipelineInputError, match="at most 3 replica"):
            run(store, stack, 4)
        assert up.after == 2 and load_state(store, stack)[0].scale.replicas == 2
        run(store, stack, 0)
        run_deploy(stack, store, small_model, cap)  # a redeploy serves again, with the block's bounds
        assert _service(aws, stack)["desiredCount"] == 1 and _floor(aws, stack) == (1, 3)
        assert load_state(store, stack)[0].scale.replicas == 1
    finally:
        run_teardown(stack, store)
    assert nothing_left_of(stack)


def nothing_left_of(stack: str) -> bool:
    return leftovers(Aws(region="us-east-1"), stack) == []


def _ecs_record(model_store, stack: str, hours_ago: float, replicas: int = 1) -> str:
    """An ECS stack's state record as a deploy (or a scale) `hours_ago` leaves it, with its load
    balancer's ARN: what reap reads. Its resources are not made (the deploy is tested above): the
    requests are what this is about, put into CloudWatch as the load balancer would."""
    then = datetime.now(timezone.utc) - timedelta(hours=hours_ago)
    lb = f"arn:aws:elasticloadbalancing:us-east-1:123456789012:loadbalancer/app/vllm-{stack}-alb/{os.urandom(8).hex()}"
    state = StackState(stack=stack, target="ecs", status="running", created_at=then.isoformat(), ttl_hours=1,
                       settings={"region": "us-east-1", "instance_type": "g5.xlarge", "price_per_hour": 1.0},
                       resources=[Resource(kind="load-balancer", id=lb, region="us-east-1")])
    state.set_replicas(replicas, "deploy", now=then)
    save_state(model_store, state, None)
    return lb


def test_reap_and_status_go_by_the_load_balancers_request_count(store):  # noqa: F811
    from prefect import flow

    from flows.operations import reap_stacks, stack_statuses

    lb = _ecs_record(store, "reap-busy", 2)  # each deployed 2 h ago, TTL 1 h
    _ecs_record(store, "reap-quiet", 2)
    _ecs_record(store, "reap-asleep", 2, replicas=0)  # scaled to zero by design
    now = datetime.now(timezone.utc)
    dims = [{"Name": "LoadBalancer", "Value": lb.split(":loadbalancer/", 1)[1]}]
    Aws(region="us-east-1").client("cloudwatch").put_metric_data(Namespace="AWS/ApplicationELB", MetricData=[
        {"MetricName": "RequestCount", "Dimensions": dims, "Value": v, "Unit": "Count", "Timestamp": now - timedelta(minutes=m)}
        for v, m in ((7, 90), (3, 50), (2, 10))])

    rows = {r.stack: r for r in flow(name="t-status")(stack_statuses)(store)}
    assert rows["reap-busy"].requests_last_hour == 5 and rows["reap-quiet"].requests_last_hour == 0  # the 7 are 90 min old
    seen = datetime.fromisoformat(rows["reap-busy"].last_request_at)
    assert now - timedelta(minutes=10) <= seen <= now - timedelta(minutes=8)  # the end of the last busy minute
    assert rows["reap-busy"].idle_hours < 0.2 and rows["reap-quiet"].idle_hours >= 2
    assert (rows["reap-asleep"].replicas, rows["reap-asleep"].price_per_hour, rows["reap-busy"].price_per_hour) == (0, 0, 1)
    assert load_traffic(store, "reap-busy")[0].last_request_at == rows["reap-busy"].last_request_at  # kept beside the record

    dry = {v.stack: v for v in flow(name="t-reap")(reap_stacks)(store, dry_run=True)}
    assert not dry["reap-busy"].expired and dry["reap-quiet"].expired
    asleep = dry["reap-asleep"]
    assert not asleep.expired and asleep.at_zero and asleep.limit_hours == 168  # at zero by design: its own limit
    assert all(load_state(store, s)[0] is not None for s in dry)  # a dry run tears nothing down
    flow(name="t-reap")(reap_stacks)(store)
    assert [s for s in dry if load_state(store, s)[0] is not None] == ["reap-asleep", "reap-busy"]

    state, etag = load_state(store, "reap-asleep")
    state.set_replicas(0, "scale", zero_ttl_hours=1)  # its own limit, now passed (as the scale flow sets it)
    save_state(store, state, etag)
    expired = [v.stack for v in flow(name="t-reap")(reap_stacks)(store) if v.expired]
    assert expired == ["reap-asleep"] and load_state(store, "reap-asleep")[0] is None
    assert load_traffic(store, "reap-asleep")[1] is None  # what was kept beside the record went with it
    run_teardown("reap-busy", store)
