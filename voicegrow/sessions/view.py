"""One interface for "every live session": this process, the box of workers, or the cluster.

The HTTP API asks a :class:`SessionView` and never knows how far its answer reaches. This base class
is this process alone (``WORKERS=1`` and no Redis); :class:`voicegrow.workers.control.Box` adds the
box's other workers over Unix sockets, :class:`voicegrow.sessions.cluster.ClusterView` every replica
that shares the Redis. Each answer is partial rather than slow or an error when a part is away, and
says which part (``missing``: worker indexes, or ``"redis"``).
"""

from __future__ import annotations

import os
from typing import Any

import trio

__all__ = ["LocalWorker", "SessionView", "rss_bytes"]


def rss_bytes() -> int | None:
    """This process's resident memory now (Linux ``/proc``), or None where that cannot be read."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class LocalWorker:
    """This process's part of every answer: its sessions, its state, its admin actions."""

    def __init__(self, services: Any, index: int = 0, restarts: int = 0) -> None:
        self.services = services  # voicegrow.services.Services
        self.index = index
        self.restarts = restarts

    def sessions(self) -> list[dict[str, Any]]:
        return [{**info.public(), "worker": self.index} for info in self.services.registry]

    def status(self) -> dict[str, Any]:
        services = self.services
        return {
            "worker": self.index,
            "pid": os.getpid(),
            "status": "ok" if services.accepting else "stopping",
            "sessions": len(services.registry),
            "uptime_s": round(services.uptime_s, 3),
            "rss_bytes": rss_bytes(),
            "restarts": self.restarts,
            "asr": dict(services.asr.health()),
        }

    def close_session(self, session_id: str) -> bool:
        """Ask a live session to say goodbye (it ends like a server shutdown would end it)."""
        info = self.services.registry.get(session_id)
        if info is None:
            return False
        if info.request_close is not None:
            info.request_close(1000, "closed by an administrator")
        elif info.cancel_scope is not None:  # still detecting its protocol: nothing to say goodbye with
            info.cancel_scope.cancel()
        return True


    def set_listen_mode(self, device_id: str, mode: str | None) -> list[dict[str, Any]]:
        """Apply an operator's listening mode (None: the settings' again) to the device's running
        sessions here; each one's id and the mode now in force."""
        from voicegrow.listening import ListenMode

        override = None if mode is None else ListenMode(mode)
        applied = []
        for info in self.services.registry:
            if info.device_id == device_id and info.set_listen_mode is not None:
                now = info.set_listen_mode(override)
                applied.append({"session_id": info.session_id, "listen_mode": now.value, "worker": self.index})
        return applied


class SessionView:
    """Every live session this view reaches; the base class reaches this process only."""

    def __init__(self, local: LocalWorker) -> None:
        self.local = local

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Whatever keeps the view current (the cluster's heartbeat); nothing here."""
        task_status.started()

    async def sessions(self) -> tuple[list[dict[str, Any]], list[int | str]]:
        """Every live session, and the parts that did not answer."""
        return self.local.sessions(), []

    async def workers(self) -> list[dict[str, Any]]:
        """The state of each process of this box (a cluster's other boxes report their own)."""
        return [self.local.status()]

    async def close_session(self, session_id: str) -> bool:
        """Close a live session wherever it is held; False when no part of the view holds it."""
        return self.local.close_session(session_id)

    async def set_listen_mode(self, device_id: str, mode: str | None) -> list[dict[str, Any]]:
        """Apply a device's listening mode to its sessions wherever they are held (the sessions reached)."""
        return self.local.set_listen_mode(device_id, mode)
