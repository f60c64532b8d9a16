"""Write images/runtime/ecs-base-job-template.json: prefect-aws's ECS worker template with this
project's defaults, for the CPU work pool that runs the flows on AWS (the GPU service is started
by the deploy flow itself, not by the worker).

    python scripts/ecs_work_pool.py            # rewrite the file (after a prefect-aws upgrade)
    prefect work-pool create vllm-ecs --type ecs --base-job-template images/runtime/ecs-base-job-template.json

Defaults changed from prefect-aws's: Fargate, 1 vCPU / 4 GiB (the flows stream and hash, they do
not compute), CloudWatch logs on, task definitions matched by family instead of one per run, and
the container named for the project. The image comes from the deployment (prefect.yaml's
`vllm-ecs` pool job variables: the flow-runtime image the build-images flow pushed).

Two variables are required and have no default, because only the account has them: `execution_role_arn`
(Fargate pulls the image from ECR and writes the CloudWatch logs with it; prefect-aws refuses logs without
it) and `task_role_arn` (the flow runner's role, with images/runtime/runner-iam-policy-*.json). Set them
as the pool's defaults (the work pool's page in the Prefect UI) or as job variables; until then Prefect
refuses to create an ECS flow run, naming the variable, instead of the worker failing every run.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect_aws.workers.ecs_worker import ECSWorker

TEMPLATE = Path(__file__).resolve().parent.parent / "images" / "runtime" / "ecs-base-job-template.json"

DEFAULTS = {
    "launch_type": "FARGATE",
    "cpu": 1024,
    "memory": 4096,
    "container_name": "vllm-pipeline-flow",
    "family": "vllm-pipeline-flow",
    "configure_cloudwatch_logs": True,
    "cloudwatch_logs_prefix": "vllm-pipeline-flow",
    "match_latest_revision_in_family": True,
    "auto_deregister_task_definition": False,
}

REQUIRED = {
    "execution_role_arn": "The task execution role: pulls the flow-runtime image from ECR and writes the CloudWatch "
                          "logs (required: logs are on).",
    "task_role_arn": "The flow runner's role: the three managed policies images/runtime/runner-iam-policy-*.json.",
}


def template() -> dict:
    base = ECSWorker.get_default_base_job_template()
    props = base["variables"]["properties"]
    for name, value in DEFAULTS.items():
        props[name]["default"] = value
    props["env"]["default"] = {"PREFECT_LOGGING_LEVEL": "INFO", "PYTHONUNBUFFERED": "1"}
    for name, why in REQUIRED.items():
        props[name] = {"type": "string", "title": props[name]["title"], "description": why}
    base["variables"]["required"] = sorted({*base["variables"].get("required", []), *REQUIRED})
    return base


if __name__ == "__main__":
    TEMPLATE.parent.mkdir(exist_ok=True)
    TEMPLATE.write_text(json.dumps(template(), indent=2, sort_keys=True) + "\n")
    print(f"wrote {TEMPLATE}")
