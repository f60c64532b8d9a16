"""Rolling back a failed ECS deploy, driven by what the run recorded (tasks.targets.ecs.deploy.Recorder)."""

from __future__ import annotations

from prefect import get_run_logger

from tasks.core.aws import Aws
from tasks.core.naming import resource_name
from tasks.targets.ecs.deploy import Recorder
from tasks.targets.ecs.gateway import KIND as GATEWAY
from tasks.targets.ecs.gateway import family as gateway_family
from tasks.teardown.sweep import delete_all, scan


def rollback(aws: Aws, stack: str, rec: Recorder, new_stack: bool) -> list[str]:
    """Undo this run. A new stack: everything the record and the scan know. An update: the service goes
    back to its previous task definition, the new revision is deregistered, and what this run created goes."""
    logger = get_run_logger()
    if new_stack:
        found, _ = scan(aws, stack)
        deleted = delete_all(aws, stack, [*rec.state.resources, *found])
        logger.warning("stack %r: rolled back, %d resources deleted", stack, len(deleted))
        return deleted
    ecs = aws.client("ecs")
    deleted = []
    for r in rec.created:
        if r.kind == "service-revision":
            cluster = next((x.id.rpartition("/")[0] for x in rec.state.resources if x.kind == "service"), None)
            if cluster:
                ecs.update_service(cluster=cluster, service=resource_name(stack, "service"), taskDefinition=r.id)
                deleted.append(f"service back to {r.id}")
        elif r.kind == "gateway-revision":  # the tool gateway's service (tasks/targets/ecs/gateway.py)
            cluster = next((x.id.rpartition("/")[0] for x in rec.state.resources
                            if x.kind == "service" and x.id.endswith("/" + resource_name(stack, GATEWAY))), None)
            if cluster:
                ecs.update_service(cluster=cluster, service=resource_name(stack, GATEWAY), taskDefinition=r.id)
                deleted.append(f"gateway back to {r.id}")
        elif r.kind == "task-definition-revision":
            ecs.deregister_task_definition(taskDefinition=r.id)
            deleted.append(f"task-definition {r.id}")
    # a task definition family is kept (its earlier revision serves), unless this run made it: the gateway's, when
    # this update added the gateway (deploy.deploy_gateway marks it created only then)
    others = [r for r in rec.created if r.kind not in ("service-revision", "gateway-revision", "task-definition-revision",
                                                        "task-definition") or (r.kind == "task-definition" and r.id == gateway_family(stack))]
    deleted += delete_all(aws, stack, others)
    rec.state.resources = [r for r in rec.state.resources if (r.kind, r.id) not in {(o.kind, o.id) for o in others}]
    logger.warning("stack %r: update rolled back: %s", stack, deleted)
    return deleted
