"""The local target's long-lived processes (the vLLM server, the tool gateway): recognising ours by its
command line, telling a dead one from a live one, stopping its whole process group.

Each runs in its own session so it outlives the flow run that started it; a pid in a state record may
since have been recycled, so every action first checks the process is still the one we started.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path


def command_line(pid: int | None) -> list[str] | None:
    """The argv of a live process, None when there is none."""
    if not pid:
        return None
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return None


def alive(pid: int, is_ours: Callable[[int | None], bool]) -> bool:
    """Still running and still ours; reaps it first if it is our child and died (else it stays a zombie)."""
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    return is_ours(pid)


def stop_group(pid: int | None, is_ours: Callable[[int | None], bool], grace: float, poll: float) -> bool:
    """SIGTERM the process group, SIGKILL after `grace` seconds. False if it was already gone (or not ours)."""
    if not pid or not is_ours(pid):
        return False
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and alive(pid, is_ours):
        time.sleep(poll)
    if alive(pid, is_ours):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        while alive(pid, is_ours):
            time.sleep(0.1)
    return True
