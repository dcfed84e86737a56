"""The WebSocket listener on ``WS_PORT``: admission, protocol detection, one task tree per speaker.

Each accepted connection gets its own cancel scope inside the server's handler nursery; the session
is in the registry from accept until its last task has exited. Shutdown stops the listener first,
then asks every session to say goodbye, waits up to the grace period, and cancels what is left.

Protocol detection (:mod:`voicegrow.protocol.detect`): a xiaozhi board names itself in the
handshake (path ``/xiaozhi/…``, its ``Device-Id`` headers). Otherwise a native client speaks first
(its hello); an open-xiaoai speaker says nothing after connecting, so silence for
``PROTOCOL_DETECT_MS`` — or a first message that is JSON text — means open-xiaoai, and the server
starts that conversation itself.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, WebSocketRequest, wrap_server_stream

from voicegrow.forwarded import header_map
from voicegrow.logsetup import session_id_var
from voicegrow.protocol.detect import detect_from_handshake, detect_protocol
from voicegrow.services import Services
from voicegrow.sessions.registry import SessionInfo

__all__ = ["VoiceServer", "detect_protocol"]

log = logging.getLogger(__name__)

class _ConnectRateLimiter:
    """Connection attempts per source address in a sliding minute."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._attempts: dict[str, collections.deque[float]] = {}

    def allow(self, host: str, now: float) -> bool:
        attempts = self._attempts.setdefault(host, collections.deque())
        while attempts and now - attempts[0] > 60.0:
            attempts.popleft()
        if len(attempts) >= self.per_minute:
            return False
        attempts.append(now)
        if len(self._attempts) > 10_000:  # forget idle hosts so a scan cannot grow this map forever
            for stale in [h for h, q in self._attempts.items() if not q or now - q[-1] > 60.0]:
                del self._attempts[stale]
        return True


class _PortReporter:
    """Reports the bound port (not trio's listener list) to whoever started the server."""

    def __init__(self, task_status: trio.TaskStatus[int], port: int) -> None:
        self._task_status, self._port = task_status, port

    def started(self, _listeners: object = None) -> None:
        self._task_status.started(self._port)


class VoiceServer:
    def __init__(self, services: Services, listeners: list[trio.SocketListener] | None = None) -> None:
        """``listeners``: already listening sockets (a worker's, inherited); None: open ``WS_PORT``."""
        self.services = services
        self._given_listeners = listeners
        s = services.settings
        self._rate_limiter = _ConnectRateLimiter(s.max_connects_per_ip_per_min)
        self._listen_scope = trio.CancelScope()
        self._handlers: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until :meth:`stop_accepting`; then keep running until every session has ended."""
        s = self.services.settings
        tcp_listeners = self._given_listeners or await trio.open_tcp_listeners(s.ws_port, host=s.server_host or None)
        port = tcp_listeners[0].socket.getsockname()[1]
        listeners: list[trio.abc.Listener[Any]] = list(tcp_listeners)
        if self.services.tls is not None:  # wss://: the TLS handshake runs inside the handshake deadline
            listeners = [trio.SSLListener(listener, self.services.tls.ws_context) for listener in tcp_listeners]
        # Room for an open-xiaoai audio frame as JSON (3-4 bytes per sample byte) over our frame limit.
        max_message = max(4 * s.max_frame_bytes, 1 << 20)
        self._max_message = max_message
        async with trio.open_nursery() as handlers:
            self._handlers = handlers
            with self._listen_scope:
                await trio.serve_listeners(self._serve_stream, listeners, handler_nursery=handlers,
                                           task_status=_PortReporter(task_status, port))
        # Listening stopped; the handlers nursery has waited for every session to end.

    async def _serve_stream(self, stream: trio.abc.Stream) -> None:
        """One TCP connection: the WebSocket handshake, then the session, every failure contained.

        trio-websocket runs its reader task in the nursery it is given; keeping that nursery per
        connection means a library error on one socket (seen: a close raced by an oversized message)
        ends that connection only, never the listener or another session.
        """
        try:
            async with trio.open_nursery() as nursery:
                with trio.move_on_after(self.services.settings.handshake_timeout_s) as handshake:
                    if isinstance(stream, trio.SSLStream):  # a client that speaks no TLS fails here, at once
                        try:
                            await stream.do_handshake()
                        except trio.BrokenResourceError as exc:
                            log.info("TLS handshake failed: %s", exc.__cause__ or exc)
                            return
                    request = await wrap_server_stream(nursery, stream, message_queue_size=8,
                                                       max_message_size=self._max_message)
                if not handshake.cancelled_caught:
                    await self._handle(request)
                nursery.cancel_scope.cancel()
        except Exception as exc:  # contained: this connection only
            log.warning("connection failed: %s: %s", type(exc).__name__, exc)
        finally:
            with trio.move_on_after(1.0) as cleanup:
                cleanup.shield = True
                await stream.aclose()

    def stop_accepting(self) -> None:
        self.services.accepting = False
        self._listen_scope.cancel()

    async def shutdown(self, grace_s: float) -> None:
        """Say goodbye to every session, wait up to ``grace_s`` for them to end, then cancel the rest."""
        self.stop_accepting()
        for info in self.services.registry:
            if info.request_close is not None:
                info.request_close(1001, "server shutting down")
        with trio.move_on_after(grace_s):
            await self.services.registry.wait_empty()
        for info in self.services.registry:
            if info.cancel_scope is not None:
                info.cancel_scope.cancel()
        with trio.move_on_after(2.0):
            await self.services.registry.wait_empty()

    # -- one connection ---------------------------------------------------------------------------

    def _admission_refusal(self, host: str) -> tuple[int, str, str] | None:
        s = self.services.settings
        registry = self.services.registry
        if not self.services.accepting:
            return 503, "shutting_down", "server is shutting down"
        if not self._rate_limiter.allow(host, time.monotonic()):
            return 429, "connect_rate", "too many connection attempts from this address"
        if len(registry) >= s.max_sessions:
            return 503, "max_sessions", "server is full"
        overloaded = self.services.load.refusal()
        if overloaded is not None:
            return 503, "overloaded", overloaded
        if registry.count_from(host) >= s.max_sessions_per_ip:
            return 429, "max_sessions_per_ip", "too many sessions from this address"
        return None

    async def _handle(self, request: WebSocketRequest) -> None:
        remote = request.remote
        peer = str(getattr(remote, "address", remote))
        client = self.services.proxies.resolve(peer, header_map(request.headers))
        if client.ignored:
            self.services.metrics.forwarded_ignored.labels("ws").inc()
        host = client.host
        # Behind a proxy the device's own port is not known: the address alone, as nginx passes it.
        remote_addr = host if client.proxy else f"{host}:{getattr(remote, 'port', '')}"
        refusal = self.admit(host)
        if refusal is not None:
            status, limit, reason = refusal
            log.info("refused connection from %s: %s", remote_addr, reason)
            headers = [(b"content-type", b"application/json")]
            if status == 503:  # full, overloaded or stopping: a balancer tries another replica, a device later
                headers.append((b"retry-after", str(self.services.settings.admit_retry_after_s).encode()))
            body = json.dumps({"error": limit, "reason": reason}).encode()
            await request.reject(status, extra_headers=headers, body=body)
            return
        connected_at = trio.current_time()
        ws = await request.accept()
        await self.run_session(ws, remote_addr, lambda info: self._serve(ws, info, request, connected_at),
                               remote_host=host, via_proxy=client.proxy)

    async def run_session(self, ws: Any, remote_addr: str, serve: Callable[[SessionInfo], Awaitable[None]], *,
                          remote_host: str = "", via_proxy: str | None = None) -> None:
        """One accepted WebSocket as a session: in the registry, under its cancel scope, recorded at its end.

        ``ws`` is a trio-websocket connection or anything with its ``get_message`` / ``send_message`` /
        ``aclose`` / ``closed`` surface (the HTTP port's talk route hands in such an adapter).
        """
        metrics = self.services.metrics
        info = SessionInfo(session_id=uuid.uuid4().hex[:16], remote_addr=remote_addr, remote_host=remote_host,
                           via_proxy=via_proxy)
        session_id_var.set(info.session_id)
        registry = self.services.registry
        registry.add(info)
        outcome = "closed"
        try:
            with trio.CancelScope() as scope:
                info.cancel_scope = scope
                async with trio.open_nursery() as nursery:
                    if self.services.settings.ws_ping_interval_s > 0 and hasattr(ws, "ping"):
                        nursery.start_soon(self._keepalive, ws, scope)
                    await serve(info)
                    nursery.cancel_scope.cancel()
        except Exception:
            outcome = "error"
            log.exception("session crashed")  # contained: other sessions are untouched
        finally:
            registry.remove(info.session_id)
            metrics.connections.labels(info.protocol, outcome).inc()
            with trio.move_on_after(1.0) as cleanup:
                cleanup.shield = True
                await self._record_end(info, outcome)
                if not ws.closed:
                    await ws.aclose(1011 if outcome == "error" else 1000)
            log.info("session ended", extra={"protocol": info.protocol, "turns": info.turns})

    def admit(self, host: str) -> tuple[int, str, str] | None:
        """The admission limits for a connection from ``host`` accepted elsewhere (the talk route):
        None, or (HTTP status, limit, reason) with the limit's hit already counted."""
        refusal = self._admission_refusal(host)
        if refusal is not None:
            self.services.metrics.limit_hits.labels(refusal[1]).inc()
            self.services.metrics.connections.labels("unknown", "refused").inc()
        return refusal

    async def serve_native(self, ws: Any, remote_addr: str, *, operator: bool, remote_host: str = "",
                           via_proxy: str | None = None) -> None:
        """A native-protocol session on a WebSocket accepted by the HTTP port (the browser's talk page).

        ``operator``: the peer proved the admin token, so device authentication is not asked again;
        otherwise it must authenticate as a device, and with ``DEVICE_AUTH=off`` it cannot.
        """
        from voicegrow.streaming.native import NativeSession

        settings = self.services.settings
        deadline = trio.current_time() + settings.handshake_timeout_s
        mode = "off" if operator else (settings.device_auth if settings.device_auth != "off" else "operator")

        async def serve(info: SessionInfo) -> None:
            info.protocol = "native"
            await NativeSession(self.services, ws, info, None, deadline, auth_mode=mode).run()

        await self.run_session(ws, remote_addr, serve, remote_host=remote_host, via_proxy=via_proxy)

    async def _serve(self, ws: WebSocketConnection, info: SessionInfo, request: WebSocketRequest,
                     connected_at: float) -> None:
        s = self.services.settings
        handshake_deadline = connected_at + s.handshake_timeout_s
        if detect_from_handshake(request.path, request.headers) == "xiaozhi":
            from voicegrow.streaming.xiaozhi import XiaozhiSession

            info.protocol = "xiaozhi"
            await XiaozhiSession(self.services, ws, info, request, handshake_deadline).run()
            return
        first: bytes | str | None = None
        with trio.move_on_after(s.protocol_detect_ms / 1000):
            try:
                first = await ws.get_message()
            except ConnectionClosed:
                return
        protocol = detect_protocol(first)
        if protocol == "xiaoai":
            from voicegrow.streaming.xiaoai import XiaoaiSession

            info.protocol = "xiaoai"
            await XiaoaiSession(self.services, ws, info, first, handshake_deadline, request).run()
            return
        from voicegrow.streaming.native import NativeSession

        info.protocol = "native"
        await NativeSession(self.services, ws, info, first, handshake_deadline).run()

    async def _keepalive(self, ws: WebSocketConnection, session: trio.CancelScope) -> None:
        """WebSocket pings, only when WS_PING_INTERVAL_S is set: many devices never answer them.

        A peer that does not answer within WS_PING_TIMEOUT_S is taken for gone and its session ends.
        """
        s = self.services.settings
        while True:
            await trio.sleep(s.ws_ping_interval_s)
            with trio.move_on_after(s.ws_ping_timeout_s):
                try:
                    await ws.ping()
                except ConnectionClosed:
                    return
                continue
            log.info("no pong within %.0f s; closing the session", s.ws_ping_timeout_s)
            session.cancel()
            return

    async def _record_end(self, info: SessionInfo, outcome: str) -> None:
        try:
            await self.services.persistence.session_ended(info.session_id, time.time(), outcome)
            if info.device_id:
                await self.services.persistence.release_device(info.device_id, info.session_id)
        except Exception:
            log.exception("could not record the session end")

