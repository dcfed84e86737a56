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
from voicegrow.http_api import run_http_server
from voicegrow.services import Services, open_services
from voicegrow.settings import Settings
from voicegrow.streaming.server import VoiceServer

__all__ = ["ServerHandle", "running_server", "serve"]

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ServerHandle:
    services: Services
    ws_port: int
    http_port: int
    host: str = "127.0.0.1"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.ws_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.http_port}"


@contextlib.asynccontextmanager
async def running_server(settings: Settings, *,
                         persistence_options: dict[str, Any] | None = None) -> AsyncIterator[ServerHandle]:
    """Start persistence, the WebSocket server and the HTTP API; stop them gracefully on exit."""
    async with open_services(settings, persistence_options=persistence_options) as services, \
            trio.open_nursery() as nursery:
        await nursery.start(services.persistence.run)
        await nursery.start(services.timers.run)
        if services.tools is not None:
            await nursery.start(services.tools.run)
        if settings.asr_preload:  # the first user should not wait for a model load
            nursery.start_soon(services.asr.warm_up)
            if hasattr(services.tts, "preload"):
                nursery.start_soon(services.tts.preload)
        voice = VoiceServer(services)
        ws_port = await nursery.start(voice.run)
        http_stopped = trio.Event()
        http_port = await nursery.start(lambda task_status: run_http_server(
            services, shutdown=http_stopped, task_status=task_status))
        host = settings.server_host if settings.server_host not in ("0.0.0.0", "::", "") else "127.0.0.1"
        handle = ServerHandle(services, ws_port, http_port, host)
        log.info("voicegrow %s listening: WebSocket %s, HTTP %s", __version__, handle.ws_url, handle.http_url,
                 extra={"ws_port": ws_port, "http_port": http_port})
        try:
            yield handle
        finally:
            with trio.CancelScope(shield=True):
                await voice.shutdown(settings.shutdown_grace_s)
                http_stopped.set()
                with trio.move_on_after(3.0):
                    await trio.sleep(0)  # let hypercorn see the trigger before we cancel
            nursery.cancel_scope.cancel()


async def serve(settings: Settings) -> int:
    """Run until SIGTERM or SIGINT; then stop accepting, close sessions, wait the grace period, exit 0."""
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with running_server(settings):
            async for signum in signals:
                log.info("received %s: shutting down (grace %.0f s)", signal.Signals(signum).name,
                         settings.shutdown_grace_s)
                break
    log.info("stopped")
    return 0
