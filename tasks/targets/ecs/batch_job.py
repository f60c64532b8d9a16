"""Offline batch on ECS: a one-off GPU task from the vLLM image, running the entrypoint in batch mode.

The task definition (family `vllm-<stack>-batch`) carries the model and the server flags in
plain environment variables, and secrets only as Secrets Manager / SSM `valueFrom` ARNs;
each run passes its input/output URIs as container overrides. `run_batch_task` starts it on
the cluster's GPU capacity provider, `wait_task` polls describe_tasks with back-off until it
stops (or stops it at the timeout) and returns its exit code and CloudWatch log link.
"""

from __future__ import annotations

import re
import time
from typing import Callable
from urllib.parse import quote

from botocore.exceptions import ClientError
from pydantic import BaseModel, Field, field_validator

from blocks.catalogue import gpu_instances
from blocks.vllm_server import VllmServerSettings
from tasks.batch.offline import JobResult, OfflineJobFailed, job_environment
from tasks.core.errors import PipelineInputError
from tasks.core.naming import check_stack_name, resource_name, tag_list
from tasks.targets.ecs.gpu_hosts import CONTAINER_MODEL_DIR, model_cache_mount
from tasks.targets.ecs.service import host_share

CONTAINER = "vllm-batch"
SHARD_TAG = "vllm-pipeline:batch-shard"
_SECRET_ARN = re.compile(r"^arn:aws[a-z-]*:(secretsmanager|ssm):[a-z0-9-]+:\d{12}:(secret:|parameter/).+$")
_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/.+$")


class EcsBatchJob(BaseModel):
    """Where and how the offline job runs on ECS (a flow parameter: no secret values, only ARNs)."""

    cluster: str
    image_uri: str = Field(description="The vLLM image (images/vllm), e.g. <account>.dkr.ecr.<region>.amazonaws.com/vllm:tag")
    capacity_provider: str = Field(description="The cluster's GPU capacity provider (Auto Scaling group).")
    execution_role_arn: str = Field(description="Pulls the image, writes the logs, reads the secrets below.")
    task_role_arn: str = Field(description="What the job itself may do: read the model and input, write the output in S3.")
    instance_type: str = "g6.xlarge"
    region: str = "us-east-1"
    log_group: str | None = Field(default=None, description="None: /vllm-pipeline/<stack>/batch")
    secrets: dict[str, str] = Field(default_factory=dict, description="Env name -> Secrets Manager/SSM ARN (e.g. HF_TOKEN).")
    shared_memory_mib: int = Field(default=8192, ge=64)

    @field_validator("instance_type")
    @classmethod
    def _instance(cls, value: str) -> str:
        if value not in gpu_instances():
            raise ValueError(f"{value!r} is not a GPU instance type in blocks/gpu_instances.yaml")
        return value

    @field_validator("secrets")
    @classmethod
    def _secrets(cls, value: dict[str, str]) -> dict[str, str]:
        bad = [k for k, v in value.items() if not _SECRET_ARN.match(v)]
        if bad:
            raise ValueError(f"secrets must be Secrets Manager or SSM parameter ARNs, never values: {bad}")
        return value

    @field_validator("execution_role_arn", "task_role_arn")
    @classmethod
    def _role(cls, value: str) -> str:
        if not _ROLE_ARN.match(value):
            raise ValueError(f"{value!r} is not an IAM role ARN")
        return value


def log_group(stack: str, job: EcsBatchJob) -> str:
    return job.log_group or f"/vllm-pipeline/{stack}/batch"


def task_definition(stack: str, job: EcsBatchJob, settings: VllmServerSettings, model_uri: str) -> dict:
    """register_task_definition's arguments: GPU, CPU and memory from the instance catalogue. The host's
    model cache is mounted as in the service's definition: a job on a host that serves (or served) the
    model reuses its verified copy, and one starting beside the service waits for its fetch, not a second."""
    check_stack_name(stack)
    inst = gpu_instances()[job.instance_type]
    if settings.tensor_parallel_size > inst.gpus:
        raise PipelineInputError(f"tensor_parallel_size {settings.tensor_parallel_size} > the {inst.gpus} GPU(s) of {inst.name}")
    env = job_environment(settings, model_uri, "", "")
    for k in ("BATCH_INPUT_URI", "BATCH_OUTPUT_URI"):  # per run, in the overrides
        env.pop(k)
    env["MODEL_CACHE_DIR"] = CONTAINER_MODEL_DIR
    clash = set(env) & set(job.secrets)
    if clash:
        raise PipelineInputError(f"secrets {sorted(clash)} would shadow the job's own settings")
    # its tensor-parallel GPUs' share of the host, as the service reserves (ecs_service.host_share):
    # the job fits beside the service on a host whose GPUs the service leaves free
    cpu, memory = host_share([job.instance_type], settings.tensor_parallel_size)
    volumes, mounts = model_cache_mount()
    return {
        "family": resource_name(stack, "batch"),
        "taskRoleArn": job.task_role_arn,
        "executionRoleArn": job.execution_role_arn,
        "networkMode": "bridge",  # no listener: outbound only
        "requiresCompatibilities": ["EC2"],
        "cpu": str(cpu),
        "memory": str(memory),
        "volumes": volumes,
        "containerDefinitions": [{
            "name": CONTAINER,
            "image": job.image_uri,
            "essential": True,
            "mountPoints": mounts,
            "command": ["batch"],  # the image's ENTRYPOINT is entrypoint.py; this picks its batch mode
            "environment": [{"name": k, "value": v} for k, v in sorted(env.items())],
            "secrets": [{"name": k, "valueFrom": v} for k, v in sorted(job.secrets.items())],
            "resourceRequirements": [{"type": "GPU", "value": str(settings.tensor_parallel_size)}],
            "linuxParameters": {"sharedMemorySize": job.shared_memory_mib},
            "logConfiguration": {"logDriver": "awslogs", "options": {
                "awslogs-group": log_group(stack, job), "awslogs-region": job.region,
                "awslogs-stream-prefix": "batch", "awslogs-create-group": "true"}},
        }],
        "tags": tag_list(stack, "key", "value"),
    }


def register(ecs, stack: str, job: EcsBatchJob, settings: VllmServerSettings, model_uri: str) -> str:
    return ecs.register_task_definition(**task_definition(stack, job, settings, model_uri))["taskDefinition"]["taskDefinitionArn"]


def run_batch_task(ecs, stack: str, job: EcsBatchJob, task_def_arn: str, input_uri: str, output_uri: str,
                   shard: str | None = None) -> str:
    """run_task on the GPU capacity provider; returns the task ARN or fails with ECS's reason. A shard of
    a sharded batch ("2/4") is one such task: its URIs are its own, and it is named in its environment
    (BATCH_SHARD, shown with the task's overrides) and in a tag (the console tells the shards' tasks apart)."""
    environment = [{"name": "BATCH_INPUT_URI", "value": input_uri}, {"name": "BATCH_OUTPUT_URI", "value": output_uri}]
    tags = tag_list(stack, "key", "value")
    if shard is not None:
        environment.append({"name": "BATCH_SHARD", "value": shard})
        tags.append({"key": SHARD_TAG, "value": shard})
    try:
        resp = ecs.run_task(
            cluster=job.cluster, taskDefinition=task_def_arn, count=1,
            capacityProviderStrategy=[{"capacityProvider": job.capacity_provider, "weight": 1, "base": 0}],
            overrides={"containerOverrides": [{"name": CONTAINER, "environment": environment}]},
            startedBy="vllm-pipeline-batch", tags=tags, propagateTags="TASK_DEFINITION",
            enableECSManagedTags=True,
        )
    except ClientError as exc:
        err = exc.response.get("Error", {})
        raise OfflineJobFailed(f"ECS run_task on cluster {job.cluster!r} failed: {err.get('Code')} "
                               f"{str(err.get('Message', ''))[:300]}") from None
    if resp.get("failures") or not resp.get("tasks"):
        reasons = "; ".join(f"{f.get('reason')} {f.get('detail') or ''}".strip() for f in resp.get("failures", [])) or "no task started"
        raise OfflineJobFailed(f"ECS could not start the batch task on cluster {job.cluster!r} "
                               f"(capacity provider {job.capacity_provider!r}): {reasons}")
    return resp["tasks"][0]["taskArn"]


def log_link(region: str, group: str, task_arn: str) -> str:
    """The CloudWatch console page of the task's log stream (batch/<container>/<task id>)."""
    def enc(s: str) -> str:
        return quote(quote(s, safe=""), safe="").replace("%", "$")

    stream = f"batch/{CONTAINER}/{task_arn.rsplit('/', 1)[-1]}"
    return (f"https://{region}.console.aws.amazon.com/cloudwatch/home?region={region}"
            f"#logsV2:log-groups/log-group/{enc(group)}/log-events/{enc(stream)}")


def wait_task(ecs, cluster: str, task_arn: str, timeout_s: float, link: str, first_poll_s: float = 5,
              max_poll_s: float = 60, sleep: Callable[[float], None] = time.sleep,
              clock: Callable[[], float] = time.monotonic) -> JobResult:
    """Poll until STOPPED (back-off first_poll_s x1.5 up to max_poll_s); stop the task at the timeout."""
    started = clock()
    delay = first_poll_s
    missing = 0
    while True:
        resp = ecs.describe_tasks(cluster=cluster, tasks=[task_arn])
        tasks = resp.get("tasks") or []
        if not tasks:
            missing += 1
            if missing >= 3:
                raise OfflineJobFailed(f"ECS no longer knows task {task_arn}: {resp.get('failures')}")
        else:
            t = tasks[0]
            if t.get("lastStatus") == "STOPPED":
                c = next((c for c in t.get("containers", []) if c.get("name") == CONTAINER), {})
                reason = "; ".join(x for x in (t.get("stoppedReason"), c.get("reason")) if x) or None
                return JobResult(exit_code=c.get("exitCode"), log=link, reason=reason,
                                 wall_s=round(clock() - started, 2), task_arn=task_arn)
        if clock() - started >= timeout_s:
            ecs.stop_task(cluster=cluster, task=task_arn, reason=f"vllm-pipeline: batch timeout {timeout_s:.0f}s")
            raise OfflineJobFailed(f"the batch task {task_arn} did not finish in {timeout_s:.0f}s and was stopped; logs: {link}")
        sleep(min(delay, max(0.0, timeout_s - (clock() - started))))
        delay = min(max_poll_s, delay * 1.5)
