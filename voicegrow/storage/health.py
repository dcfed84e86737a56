"""The health of one storage component, as the health endpoint and the metrics report it.

``ok``: the real backend answered its last call. ``embedded``: the embedded stand-in (SQLite, the
in-process dict, the local directory) is in use and working. ``degraded``: the backend is unreachable;
writes wait in the spool (``spool_depth``) and Redis-backed reads answer empty. ``down``: records are
being lost because the spool itself cannot be written, or the backend has not been tried yet.
``rejected`` counts records a backend refused for good, kept in the spool's ``rejected/`` folder for an
operator to look at.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from voicegrow.metrics import Metrics

__all__ = ["ComponentHealth", "STATUS_VALUE"]

#: The value of ``voicegrow_component_up`` for each status.
STATUS_VALUE = {"ok": 1.0, "embedded": 1.0, "degraded": 0.5, "down": 0.0}


class ComponentHealth:
    def __init__(self, name: str, *, embedded: bool, backend: str, metrics: Metrics | None,
                 spool_depth: Callable[[], int] = lambda: 0, rejected: Callable[[], int] = lambda: 0) -> None:
        self.name = name
        self.embedded = embedded
        self.backend = backend
        self._metrics = metrics
        self._spool_depth = spool_depth
        self._rejected = rejected
        self._tried = False
        self._unreachable: str | None = None
        self._spool_error: str | None = None
        self.latency_ms: float | None = None
        self._publish()

    @property
    def tried(self) -> bool:
        return self._tried

    @property
    def status(self) -> str:
        if self._spool_error is not None:
            return "down"
        if self._unreachable is not None:
            return "degraded"
        if not self._tried:
            return "embedded" if self.embedded else "down"
        return "embedded" if self.embedded else "ok"

    @property
    def detail(self) -> str:
        if self._spool_error is not None:
            return self._spool_error
        if self._unreachable is not None:
            return self._unreachable
        return "" if self._tried or self.embedded else "not tried yet"

    def _publish(self) -> None:
        if self._metrics is not None:
            self._metrics.component_up.labels(self.name).set(STATUS_VALUE[self.status])
            self._metrics.spool_depth.labels(self.name).set(self._spool_depth())

    def succeeded(self, latency_s: float | None = None) -> None:
        self._tried, self._unreachable = True, None
        if latency_s is not None:
            self.latency_ms = round(latency_s * 1000, 2)
        self._publish()

    def failed(self, detail: str) -> None:
        """The backend is unreachable; writes wait in the spool."""
        self._tried, self._unreachable = True, detail
        self._publish()

    def spool_failed(self, detail: str) -> None:
        self._spool_error = detail
        self._publish()

    def spooled(self) -> None:
        """A record reached the spool: it can be written again (and the depth changed)."""
        self._spool_error = None
        self._publish()

    def depth_changed(self) -> None:
        self._publish()

    def report(self) -> dict[str, Any]:
        return {"status": self.status, "latency_ms": self.latency_ms, "detail": self.detail,
                "spool_depth": self._spool_depth(), "rejected": self._rejected(), "backend": self.backend}
