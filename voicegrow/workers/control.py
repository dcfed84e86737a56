"""One view of the box: whichever worker takes an HTTP request answers for all of them.

Each worker serves a control socket, a Unix socket in the supervisor's private run directory: one
JSON request per connection, one JSON answer, then the connection closes. The HTTP handlers ask the
:class:`Box`; it answers for its own process directly and asks the other workers through their
sockets, all at once, each within a short deadline (2 s: a worker whose event loop is that late
is as good as down). A worker that is restarting makes an answer
partial (and the answer says which worker is missing), never slow and never an error.

With ``WORKERS=1`` the box has no peers and is only this process.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import trio

from voicegrow.sessions.view import LocalWorker, SessionView

__all__ = ["Box", "ControlServer"]

log = logging.getLogger(__name__)

_REQUEST_LIMIT = 64 * 1024
_REPLY_LIMIT = 64 * 1024 * 1024  # a listing of every session of a full worker fits many times over


class ControlServer:
    """Serves :class:`LocalWorker`'s answers on a Unix socket for the other workers."""

    def __init__(self, local: LocalWorker, path: Path) -> None:
        self.local = local
        self.path = path

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.path.unlink(missing_ok=True)  # left by the worker this one replaces
            await sock.bind(str(self.path))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        try:
            await trio.serve_listeners(self._serve, [trio.SocketListener(sock)], task_status=_Started(task_status))
        finally:
            self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.fail_after(5):
                    request = json.loads(await _read_all(stream, _REQUEST_LIMIT))
                    reply = self._answer(request)
                    await stream.send_all(json.dumps(reply).encode())
            except (trio.TooSlowError, trio.BrokenResourceError, ValueError, OSError) as exc:
                log.debug("control request failed: %s: %s", type(exc).__name__, exc)

    def _answer(self, request: Any) -> dict[str, Any]:
        op = request.get("op") if isinstance(request, dict) else None
        if op == "sessions":
            return {"sessions": self.local.sessions()}
        if op == "status":
            return {"status": self.local.status()}
        if op == "close" and isinstance(request.get("session_id"), str):
            return {"closed": self.local.close_session(request["session_id"])}
        if (op == "listen_mode" and isinstance(request.get("device_id"), str)
                and request.get("mode") in _LISTEN_MODES):
            return {"applied": self.local.set_listen_mode(request["device_id"], request["mode"])}
        return {"error": f"unknown request {str(op)[:40]!r}"}


#: What a ``listen_mode`` request may carry (None: back to the settings' mode).
_LISTEN_MODES = (None, "wake", "always", "push_to_talk")


class _Started:
    def __init__(self, task_status: trio.TaskStatus[None]) -> None:
        self._task_status = task_status

    def started(self, _listeners: object = None) -> None:
        self._task_status.started()


async def _read_all(stream: trio.SocketStream, limit: int) -> bytes:
    """Everything until the peer's end of file, refused beyond ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while chunk := await stream.receive_some(65536):
        size += len(chunk)
        if size > limit:
            raise ValueError(f"message over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def ask(path: Path, request: dict[str, Any], timeout_s: float) -> dict[str, Any] | None:
    """One request to the worker serving ``path``; None when it does not answer in time (restarting)."""
    with trio.move_on_after(timeout_s):
        try:
            stream = await trio.open_unix_socket(str(path))
            async with stream:
                await stream.send_all(json.dumps(request).encode())
                await stream.send_eof()
                reply = json.loads(await _read_all(stream, _REPLY_LIMIT))
            return reply if isinstance(reply, dict) else None
        except (OSError, trio.BrokenResourceError, ValueError) as exc:
            log.debug("worker at %s did not answer: %s: %s", path, type(exc).__name__, exc)
            return None
    return None


class Box(SessionView):
    """Every worker of this box: this one directly, the others over their control sockets."""

    def __init__(self, local: LocalWorker, peers: dict[int, Path] | None = None, *, timeout_s: float = 2.0) -> None:
        super().__init__(local)
        self.peers = dict(peers or {})
        self.timeout_s = timeout_s

    @property
    def count(self) -> int:
        return 1 + len(self.peers)

    async def _ask_peers(self, request: dict[str, Any]) -> dict[int, dict[str, Any] | None]:
        replies: dict[int, dict[str, Any] | None] = {}

        async def one(index: int, path: Path) -> None:
            replies[index] = await ask(path, request, self.timeout_s)

        async with trio.open_nursery() as nursery:
            for index, path in self.peers.items():
                nursery.start_soon(one, index, path)
        return replies

    async def sessions(self) -> tuple[list[dict[str, Any]], list[int | str]]:
        """Every live session of the box, and the workers that did not answer."""
        items = self.local.sessions()
        missing: list[int | str] = []
        for index, reply in sorted((await self._ask_peers({"op": "sessions"})).items()):
            if reply is None or not isinstance(reply.get("sessions"), list):
                missing.append(index)
            else:
                items.extend(reply["sessions"])
        return items, missing

    async def workers(self) -> list[dict[str, Any]]:
        """Each worker's state; one that did not answer is listed ``down``."""
        statuses = [self.local.status()]
        for index, reply in (await self._ask_peers({"op": "status"})).items():
            status = reply.get("status") if reply else None
            statuses.append(status if isinstance(status, dict) else
                            {"worker": index, "status": "down",
                             "detail": f"no answer within {self.timeout_s:g} s (restarting?)"})
        return sorted(statuses, key=lambda s: s["worker"])

    async def close_session(self, session_id: str) -> bool:
        """Close a live session on whichever worker holds it; False when none does."""
        if self.local.close_session(session_id):
            return True
        replies = await self._ask_peers({"op": "close", "session_id": session_id})
        return any(reply and reply.get("closed") is True for reply in replies.values())

    async def set_listen_mode(self, device_id: str, mode: str | None) -> list[dict[str, Any]]:
        """The device's sessions on every worker that answered get the mode."""
        applied = self.local.set_listen_mode(device_id, mode)
        replies = await self._ask_peers({"op": "listen_mode", "device_id": device_id, "mode": mode})
        for reply in replies.values():
            if reply and isinstance(reply.get("applied"), list):
                applied.extend(a for a in reply["applied"] if isinstance(a, dict))
        return applied
