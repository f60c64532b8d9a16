"""The CloudWatch agent as a sidecar of the vLLM task: vLLM's queue and the GPUs' memory in CloudWatch.

The agent (AWS's own component, not a scraper of ours) does two things in each task:
- scrapes the server's Prometheus `/metrics` (its ECS Prometheus support, with a static target: the
  task's network mode is bridge, so the sidecar reaches the server by a container link, `vllm:<port>`;
  vLLM serves `/metrics` without the API key) and writes the series below as embedded metric format
  (EMF) logs into the stack's metrics log group, which CloudWatch turns into metrics in NAMESPACE with
  the one dimension `Stack`: each task's datapoints aggregate, so `Average` is per task;
- reads every GPU of its host with nvidia-smi (its `nvidia_gpu` input), aggregated to `Stack` too. It
  reserves no GPU: on the ECS GPU AMI Docker's default runtime is NVIDIA's, which gives a container that
  sets NVIDIA_VISIBLE_DEVICES=all the GPUs' device nodes and nvidia-smi, read-only for counters.

The sidecar is not essential (the server keeps serving if the agent dies) and starts after the server.
What it feeds: the `queue` scaling signal (scaling.py), the GPU-memory alarm (alarms.py) and the
dashboard's queue, KV-cache and GPU widgets (dashboard.py). Its own log lines go to the server's log group
under the `cwagent` prefix; the metrics log group is created by the deploy (tagged, with the stack's
retention), so teardown and the scan find it; the agent only writes streams into it.
"""

from __future__ import annotations

import json

import yaml

from blocks.ecs_capacity import MetricsAgentSettings
from blocks.vllm_server import VllmServerSettings
from tasks.core.errors import PipelineInputError
from tasks.core.naming import log_group_name, metrics_log_group_name

NAMESPACE = "vllm-pipeline"
CONTAINER = "cloudwatch-agent"
POLICY_NAME = "metrics-agent"
SERVER_LINK = "vllm"  # the alias the sidecar reaches the server container by
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_CACHE = "vllm:kv_cache_usage_perc"
VLLM_SERIES = (WAITING, RUNNING, KV_CACHE)
GPU_UTILIZATION = "nvidia_smi_utilization_gpu"
GPU_MEMORY_USED = "nvidia_smi_memory_used"
GPU_MEMORY_TOTAL = "nvidia_smi_memory_total"


def check_settings(agent: MetricsAgentSettings, settings: VllmServerSettings) -> None:
    """Before any resource: the GPU-memory alarm's threshold must be above what vLLM takes at start."""
    if agent.enabled and agent.gpu_memory_percent <= settings.gpu_memory_utilization * 100:
        raise PipelineInputError(
            f"EcsGpuCapacity.metrics_agent.gpu_memory_percent ({agent.gpu_memory_percent:g}) is not above "
            f"VllmServerSettings.gpu_memory_utilization ({settings.gpu_memory_utilization:g}): vLLM takes that share "
            f"of each GPU at start, so the alarm would fire as soon as it loads and never clear")


def dimensions(stack: str) -> list[dict]:
    return [{"Name": "Stack", "Value": stack}]


def prometheus_config(stack: str, port: int, settings: MetricsAgentSettings) -> str:
    """The Prometheus scrape configuration (the agent reads it from PROMETHEUS_CONFIG_CONTENT)."""
    return yaml.safe_dump({
        "global": {"scrape_interval": f"{settings.interval_s}s", "scrape_timeout": f"{min(10, settings.interval_s)}s"},
        "scrape_configs": [{
            "job_name": "vllm",
            "metrics_path": "/metrics",
            "sample_limit": 10000,
            "static_configs": [{"targets": [f"{SERVER_LINK}:{port}"], "labels": {"Stack": stack}}],
        }],
    }, sort_keys=True)


def agent_config(stack: str, region: str, settings: MetricsAgentSettings) -> dict:
    """The agent's configuration (from CW_CONFIG_CONTENT): the Prometheus input with its EMF rule, and nvidia_gpu."""
    selectors = [f"^{name}$" for name in VLLM_SERIES]
    return {
        "agent": {"region": region, "metrics_collection_interval": settings.interval_s, "omit_hostname": True},
        "metrics": {
            "namespace": NAMESPACE,
            "metrics_collected": {"nvidia_gpu": {
                "measurement": ["utilization_gpu", "memory_used", "memory_total"],
                "metrics_collection_interval": settings.interval_s,
                "append_dimensions": {"Stack": stack},
            }},
            "aggregation_dimensions": [["Stack"]],
        },
        "logs": {
            "metrics_collected": {"prometheus": {
                "log_group_name": metrics_log_group_name(stack),
                "prometheus_config_path": "env:PROMETHEUS_CONFIG_CONTENT",
                "emf_processor": {"metric_namespace": NAMESPACE, "metric_declaration": [{
                    "source_labels": ["job"], "label_matcher": "^vllm$",
                    "dimensions": [["Stack"]], "metric_selectors": selectors}]},
            }},
            "force_flush_interval": settings.interval_s,
        },
    }


def container(stack: str, region: str, port: int, server_container: str, settings: MetricsAgentSettings) -> dict:
    """The sidecar's container definition."""
    env = {
        "CW_CONFIG_CONTENT": json.dumps(agent_config(stack, region, settings), sort_keys=True),
        "PROMETHEUS_CONFIG_CONTENT": prometheus_config(stack, port, settings),
        "NVIDIA_VISIBLE_DEVICES": "all",
        "NVIDIA_DRIVER_CAPABILITIES": "utility",
    }
    return {
        "name": CONTAINER,
        "image": settings.image,
        "essential": False,
        "cpu": 128,
        "memoryReservation": 256,
        "links": [f"{server_container}:{SERVER_LINK}"],
        "dependsOn": [{"containerName": server_container, "condition": "START"}],
        "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
        "logConfiguration": {"logDriver": "awslogs", "options": {
            "awslogs-group": log_group_name(stack), "awslogs-region": region, "awslogs-stream-prefix": "cwagent"}},
    }


def task_policy(stack: str, partition: str, region: str, account: str) -> str:
    """The task role's inline policy POLICY_NAME (beside its main one): streams in the metrics log group,
    and PutMetricData in NAMESPACE only (the nvidia_gpu series; the EMF series are made by CloudWatch Logs)."""
    group = f"arn:{partition}:logs:{region}:{account}:log-group:{metrics_log_group_name(stack)}"
    return json.dumps({"Version": "2012-10-17", "Statement": [
        {"Sid": "MetricsAgentLogs", "Effect": "Allow", "Resource": [group, f"{group}:log-stream:*"],
         "Action": ["logs:CreateLogStream", "logs:PutLogEvents", "logs:DescribeLogStreams"]},
        {"Sid": "MetricsAgentGpu", "Effect": "Allow", "Resource": "*", "Action": ["cloudwatch:PutMetricData"],
         "Condition": {"StringEquals": {"cloudwatch:namespace": NAMESPACE}}},
    ]})
