"""What a worker process knows about its place in the box; handed over by the supervisor on argv."""

from __future__ import annotations

import dataclasses
from pathlib import Path

__all__ = ["WorkerContext"]


@dataclasses.dataclass(frozen=True)
class WorkerContext:
    #: 0 … count-1; a replacement takes the index (and the sockets, spool and label) of the one it replaces.
    index: int
    count: int
    #: The supervisor's private directory (mode 0700): control sockets, Prometheus' multiprocess files.
    run_dir: Path
    #: Inherited listening sockets for WS_PORT and HTTP_PORT.
    ws_fd: int
    http_fd: int
    #: The read end of a pipe whose write end only the supervisor holds: end of file means it is gone.
    parent_fd: int
    #: How many times this index was restarted before (0 for the first start).
    restarts: int = 0

    def control_socket(self, index: int) -> Path:
        return self.run_dir / f"worker-{index}.sock"

    def peers(self) -> list[int]:
        return [k for k in range(self.count) if k != self.index]
