"""Structured logging: one JSON object per line, with the session id on every session line.

The session id travels in a :mod:`contextvars` variable. Trio copies the context into each task it
spawns, so setting it once at the top of a connection handler tags every line that the connection's
task tree logs, without threading a logger adapter through every call.
"""

from __future__ import annotations

import contextvars
import datetime as _dt
import json
import logging
import sys
from typing import Any

__all__ = ["configure_logging", "session_id_var", "device_id_var", "JsonFormatter"]

session_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("session_id", default=None)
device_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("device_id", default=None)

_STANDARD_ATTRS = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as a single JSON line; extra ``logger.info(..., extra={...})`` keys are kept."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": _dt.datetime.fromtimestamp(record.created, _dt.timezone.utc).isoformat(
                timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "module": record.module,
            "function": record.funcName,
            "line": record.lineno,
        }
        session_id = session_id_var.get()
        if session_id:
            entry["session_id"] = session_id
        device_id = device_id_var.get()
        if device_id:
            entry["device_id"] = device_id
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        worker = getattr(record, "worker", None)
        if worker is not None and not isinstance(worker, bool):
            line = f"{line} [worker={worker}]"
        session_id = session_id_var.get()
        return f"{line} [session={session_id}]" if session_id else line


class _WorkerTag(logging.Filter):
    """Under WORKERS>1 every line says which worker wrote it."""

    def __init__(self, worker: int) -> None:
        super().__init__()
        self.worker = worker

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.worker
        return True


def configure_logging(level: str = "INFO", fmt: str = "json", worker: int | None = None) -> None:
    """Route all logging to stdout at ``level``; idempotent, so tests may call it repeatedly."""
    handler = logging.StreamHandler(sys.stdout)
    if worker is not None:
        handler.addFilter(_WorkerTag(worker))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # Third-party chatter that would drown the session lines at INFO.
    for noisy in ("httpx", "httpcore", "hypercorn.access", "trio-websocket", "faster_whisper"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
