"""Progress of long work as a Prefect progress artifact, updated from many threads at most once a second."""

from __future__ import annotations

import threading
import time
from uuid import UUID

from prefect.artifacts import create_progress_artifact, update_progress_artifact


class Progress:
    def __init__(self, key: str, total: int, description: str, min_interval: float = 1.0):
        self.total = max(total, 1)
        self.done = 0
        self._lock = threading.Lock()
        self._last = 0.0
        self._interval = min_interval
        self.description = description
        self.artifact_id: UUID = create_progress_artifact(progress=0.0, key=key, description=description)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n
            now = time.monotonic()
            if now - self._last < self._interval:
                return
            self._last = now
            pct = min(100.0, 100.0 * self.done / self.total)
        update_progress_artifact(self.artifact_id, pct)

    def finish(self) -> None:
        update_progress_artifact(self.artifact_id, 100.0)
