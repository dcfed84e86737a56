"""Server lifecycle: both listeners in one trio run, and a graceful stop.

``running_server`` is the whole server as an async context manager (tests and ``bench/`` run it
in-process on free ports); ``serve`` wraps it with signal handling for the ``voicegrow serve`` command.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

import trio

from voicegrow import __version__
from voicegrow.http.api import run_http_server
from voicegrow.services import Services, open_services
from voicegrow.settings import Settings
from voicegrow.streaming.server import VoiceServer
from voicegrow.streaming.wyoming import WyomingServer
from voicegrow.workers.context import WorkerContext
from voicegrow.workers.control import ControlServer
from voicegrow.workers.listeners import adopt_listener

__all__ = ["ServerHandle", "running_server", "serve"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerHandle:
    services: Services
    ws_port: int
    http_port: int
    host: str = "127.0.0.1"
    tls: bool = False
    wyoming_port: int = 0  # 0: WYOMING_PORT off (or another worker serves it)

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.tls else 'ws'}://{self.host}:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.http_port}"


@contextlib.asynccontextmanager
async def running_server(settings: Settings, *, persistence_options: dict[str, Any] | None = None,
                         worker: WorkerContext | None = None) -> AsyncIterator[ServerHandle]:
    """Start persistence, the WebSocket server and the HTTP API; stop them gracefully on exit.

    ``worker``: this process is one of WORKERS; it serves the supervisor's sockets instead of binding
    its own, and a control socket through which the other workers see its sessions."""
    async with open_services(settings, persistence_options=persistence_options, worker=worker) as services, \
            trio.open_nursery() as nursery:
        speakers = settings.server_role == "all"  # asr: a pool's worker, no speaker of its own
        await nursery.start(services.persistence.run)
        if speakers:
            await nursery.start(services.timers.run)
        await nursery.start(services.live.run)
        await nursery.start(services.load.run)
        if services.tools is not None and speakers:
            await nursery.start(services.tools.run)
        if settings.asr_preload:  # the first user should not wait for a model load
            nursery.start_soon(services.asr.warm_up)
            if hasattr(services.tts, "preload") and speakers:  # a pool's worker loads a voice when asked
                nursery.start_soon(services.tts.preload)
        if worker is not None:
            await nursery.start(ControlServer(services.live.local, worker.control_socket(worker.index)).run)
            nursery.start_soon(_refresh_gauges, services)
        voice: VoiceServer | None = None
        ws_port = 0
        if speakers:
            voice = VoiceServer(services, None if worker is None else [adopt_listener(worker.ws_fd)])
            ws_port = services.ws_port = await nursery.start(voice.run)
        http_stopped = trio.Event()
        http_port = await nursery.start(lambda task_status: run_http_server(
            services, shutdown=http_stopped, fd=None if worker is None else worker.http_fd,
            voice_server=voice, task_status=task_status))
        wyoming_port = 0
        if settings.wyoming_port and (worker is None or worker.index == 0):
            # Under WORKERS>1 worker 0 alone binds the Wyoming port (Home Assistant holds one or two
            # connections; spreading them buys nothing, and ASR is per process anyway).
            wyoming_port = await nursery.start(WyomingServer(services).run)
        host = settings.server_host if settings.server_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        if services.tls is not None:
            nursery.start_soon(services.tls.watch)
        handle = ServerHandle(services, ws_port, http_port, host, tls=services.tls is not None,
                              wyoming_port=wyoming_port)
        log.info("voicegrow %s listening: WebSocket %s, HTTP %s", __version__,
                 handle.ws_url if speakers else "off (SERVER_ROLE=asr)", handle.http_url,
                 extra={"ws_port": ws_port, "http_port": http_port})
        try:
            yield handle
        finally:
            with trio.CancelScope(shield=True):
                if voice is not None:
                    await voice.shutdown(settings.shutdown_grace_s)
                services.accepting = False
                http_stopped.set()
                with trio.move_on_after(3.0):
                    await trio.sleep(0)  # let hypercorn see the trigger before we cancel
            nursery.cancel_scope.cancel()


async def _refresh_gauges(services: Services) -> None:
    """Under WORKERS>1 any worker renders every worker's gauges: keep this one's current."""
    while True:
        services.refresh_gauges()
        await trio.sleep(1.0)


async def serve(settings: Settings, worker: WorkerContext | None = None) -> int:
    """Run until SIGTERM or SIGINT (or, for a worker, until its supervisor is gone); then stop
    accepting, close sessions, wait the grace period, exit 0. SIGHUP re-reads the TLS certificate
    (when TLS_CERT_FILE is set) and keeps serving."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
        async with running_server(settings, worker=worker) as server, trio.open_nursery() as waiting:
            stop = trio.Event()

            async def on_signal() -> None:
                async for signum in signals:
                    if signum == signal.SIGHUP:
                        if server.services.tls is not None:
                            server.services.tls.try_reload("SIGHUP")
                        else:
                            log.info("received SIGHUP: nothing to re-read (no TLS_CERT_FILE)")
                        continue
                    log.info("received %s: shutting down (grace %.0f s)", signal.Signals(signum).name,
                             settings.shutdown_grace_s)
                    break
                stop.set()

            waiting.start_soon(on_signal)
            if worker is not None:
                waiting.start_soon(_until_parent_gone, worker.parent_fd, stop)
            await stop.wait()
            waiting.cancel_scope.cancel()
    log.info("stopped")
    return 0


async def _until_parent_gone(fd: int, stop: trio.Event) -> None:
    """The supervisor never writes to this pipe; end of file means it died (SIGKILL, OOM)."""
    async with trio.lowlevel.FdStream(fd) as pipe:
        while await pipe.receive_some(64):
            pass
    log.warning("the supervisor is gone: shutting down")
    stop.set()
