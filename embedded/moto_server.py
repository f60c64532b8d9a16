"""moto's server with the places it parts from AWS patched, so the stand-in fails where AWS fails and
passes where AWS passes: `python embedded/moto_server.py -H 127.0.0.1 -p PORT` (the arguments are
moto.server's own). embedded/local_aws.py and the IAM-enforced world (tests/enforced_aws.py) run it.

- A terminated instance keeps its primary network interface in moto (its DeleteOnTermination is false
  unless the launch spelled out a network interface); EC2 deletes an instance's primary interface with
  it. Without this, the GPU hosts' security group waits for an interface that never goes: an instance
  that the Auto Scaling group launched on a wake and terminated on its deletion hung the teardown of a
  test (CI's run on afbf793 spent 85 minutes in teardown's wait for it).
- run_task counts only container-level memory; real ECS also takes the task-level `memory` the product
  sets for EC2 tasks, so a task whose containers set only `memoryReservation` is a TypeError in moto.
"""

from __future__ import annotations

import sys
import types


def patch_moto() -> None:
    from moto.ec2.models import instances
    from moto.ecs import models

    calculate = models.EC2ContainerServiceBackend._calculate_task_resource_requirements

    def task_level_memory(task_definition):
        defs = [{**c, "memory": c.get("memory") or c.get("memoryReservation") or 0}
                for c in task_definition.container_definitions]
        return calculate(types.SimpleNamespace(container_definitions=defs))

    models.EC2ContainerServiceBackend._calculate_task_resource_requirements = staticmethod(task_level_memory)

    terminate = instances.Instance.terminate

    def terminate_with_primary_interface(self):
        for nic in self.nics.values():
            nic.delete_on_termination = nic.delete_on_termination or nic.device_index == 0
        return terminate(self)

    instances.Instance.terminate = terminate_with_primary_interface


def main(argv: list[str]) -> None:
    patch_moto()
    from moto.server import main as moto_main

    moto_main(argv)


if __name__ == "__main__":
    main(sys.argv[1:])
