"""The parent process of ``WORKERS=N``: it binds the ports, runs N workers, and stops them.

The parent takes no speaker and serves no request; it only keeps workers alive. Each worker is
``voicegrow worker`` in a fresh interpreter (no fork of a process with threads and a loaded model),
in its own session, so a Ctrl-C in a terminal reaches the parent alone and every stop goes one way:

- SIGTERM or SIGINT: the parent sends SIGTERM to every worker; each drains its sessions within
  ``SHUTDOWN_GRACE_S`` and exits; a worker still running well after that is killed. Exit status 0.
- SIGHUP is passed on to every worker (settings and certificates that are re-read on it).
- A worker that dies is started again under the same index, with the same sockets and spool, after a
  back-off that doubles from 0.5 s to 30 s while it keeps dying young. A worker that fails on its very
  first start with a configuration error (exit status 2) stops the whole server with status 2.
- If the parent itself dies (SIGKILL, out of memory), the workers see the end of a pipe only it holds
  open, and shut down too: no orphans keep the ports.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import trio

from voicegrow.settings import Settings
from voicegrow.workers.listeners import bind_shared, reuse_port_supported

__all__ = ["Supervisor"]

log = logging.getLogger(__name__)

_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
_HEALTHY_AFTER_S = 30.0  # a worker that lived this long starts the back-off afresh when it dies
_KILL_MARGIN_S = 5.0  # beyond SHUTDOWN_GRACE_S (+ its 2 s of cancellation) before SIGKILL
_CONFIG_ERROR = 2


class Supervisor:
    def __init__(self, settings: Settings, env_file: str | None) -> None:
        self.settings = settings
        self.env_file = env_file
        self.count = settings.workers
        self._processes: list[trio.Process | None] = [None] * self.count
        self._restarts = [0] * self.count
        self._stopping = False
        self._exit_status = 0
        self._done = trio.CancelScope()

    async def run(self) -> int:
        s = self.settings
        run_dir = Path(tempfile.mkdtemp(prefix="voicegrow-"))  # mode 0700: control sockets, metrics files
        (run_dir / "metrics").mkdir()
        sockets: list[socket.socket] = []
        parent_r, parent_w = os.pipe()
        try:
            try:
                ws = bind_shared(s.server_host, s.ws_port, self.count)
                sockets.extend(ws)
                http = bind_shared(s.server_host, s.http_port, self.count)
                sockets.extend(http)
            except OSError as exc:
                log.error("supervisor: cannot listen on %s (WS_PORT %d, HTTP_PORT %d): %s", s.server_host or "*",
                          s.ws_port, s.http_port, exc)
                return 1
            ws_port, http_port = ws[0].getsockname()[1], http[0].getsockname()[1]
            log.info("supervisor: %d workers on WebSocket port %d and HTTP port %d (%s)", self.count, ws_port,
                     http_port, "SO_REUSEPORT" if reuse_port_supported() else "one shared socket",
                     extra={"ws_port": ws_port, "http_port": http_port, "workers": self.count})
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
                async with trio.open_nursery() as nursery:
                    self._done = nursery.cancel_scope
                    for index in range(self.count):
                        nursery.start_soon(self._keep_running, index, run_dir, ws[index], http[index], parent_r)
                    nursery.start_soon(self._forward_signals, signals)
            if self._exit_status == 0:
                log.info("supervisor: every worker stopped")
            return self._exit_status
        finally:
            for sock in sockets:
                sock.close()
            os.close(parent_r)
            os.close(parent_w)
            shutil.rmtree(run_dir, ignore_errors=True)

    async def _forward_signals(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            if signum == signal.SIGHUP:
                self._signal_all(signal.SIGHUP)
                continue
            log.info("supervisor: received %s: stopping %d workers (grace %.0f s)", signal.Signals(signum).name,
                     self.count, self.settings.shutdown_grace_s)
            break
        await self._stop_all()
        self._done.cancel()

    async def _stop_all(self) -> None:
        self._stopping = True
        self._signal_all(signal.SIGTERM)
        with trio.move_on_after(self.settings.shutdown_grace_s + 2.0 + _KILL_MARGIN_S):
            while any(p is not None for p in self._processes):
                await trio.sleep(0.05)
        for index, process in enumerate(self._processes):
            if process is not None and process.returncode is None:
                log.error("supervisor: worker %d (pid %d) did not stop in time: killed", index, process.pid)
                process.kill()

    def _signal_all(self, signum: int) -> None:
        for process in self._processes:
            if process is not None and process.returncode is None:
                process.send_signal(signum)

    def _argv(self, index: int, run_dir: Path, ws_fd: int, http_fd: int, parent_fd: int) -> list[str]:
        argv = [sys.executable, "-m", "voicegrow"]
        if self.env_file is not None:
            argv += ["--env-file", self.env_file]
        return argv + ["worker", "--index", str(index), "--count", str(self.count), "--run-dir", str(run_dir),
                       "--ws-fd", str(ws_fd), "--http-fd", str(http_fd), "--parent-fd", str(parent_fd),
                       "--restarts", str(self._restarts[index])]

    async def _keep_running(self, index: int, run_dir: Path, ws: socket.socket, http: socket.socket,
                            parent_fd: int) -> None:
        from prometheus_client.multiprocess import mark_process_dead

        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(run_dir / "metrics"))
        backoff = _FIRST_BACKOFF_S
        while not self._stopping:
            argv = self._argv(index, run_dir, ws.fileno(), http.fileno(), parent_fd)
            started = trio.current_time()
            process = await trio.lowlevel.open_process(
                argv, env=env, pass_fds=(ws.fileno(), http.fileno(), parent_fd), start_new_session=True)
            self._processes[index] = process
            if self._stopping:
                process.send_signal(signal.SIGTERM)
            log.info("supervisor: worker %d started (pid %d)", index, process.pid,
                     extra={"worker": index, "pid": process.pid})
            try:
                with trio.CancelScope(shield=True):  # the stop path waits for it, never abandons it
                    status = await process.wait()
            finally:
                self._processes[index] = None
                mark_process_dead(process.pid, str(run_dir / "metrics"))
            if self._stopping:
                log.info("supervisor: worker %d (pid %d) exited with status %d", index, process.pid, status)
                return
            lived = trio.current_time() - started
            if status == _CONFIG_ERROR and self._restarts[index] == 0 and lived < _HEALTHY_AFTER_S:
                log.error("supervisor: worker %d failed to start (configuration error): stopping", index)
                self._exit_status = _CONFIG_ERROR
                await self._stop_all()
                self._done.cancel()
                return
            if lived > _HEALTHY_AFTER_S:
                backoff = _FIRST_BACKOFF_S
            self._restarts[index] += 1
            log.error("supervisor: worker %d (pid %d) exited with status %d after %.1f s; restarting in %.1f s",
                      index, process.pid, status, lived, backoff,
                      extra={"worker": index, "pid": process.pid, "status": status})
            await trio.sleep(backoff)
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
