"""``python -m bench storm``: a replica restarts under its speakers — how fast are they all back?

The deployment's shape: nginx (the repository's ``deploy/config/nginx/nginx.conf``, in a real nginx) in
front of a replica started as ``voicegrow serve`` with ``TRUSTED_PROXIES`` naming nginx, and N
open-xiaoai speakers, each from its own loopback address, streaming their microphones in real time and
reconnecting the way the Rust client does (at once after a drop, then every second). When all are
recording, the replica gets SIGTERM, drains, and a new one starts on the same ports. Measured from the
SIGTERM: when each speaker was armed again (``start_recording`` and ``start_play`` on a new connection)
and streaming (record frames going out again); refusals by the new replica's own limit counters
(``connect_rate`` must stay 0) and the handshake answers nginx logged.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import trio

from bench.common import markdown_table
from bench.nginx import Replica, free_port, running_nginx

__all__ = ["ReplicaProcess", "main", "run_storm"]

REPO_ROOT = Path(__file__).resolve().parents[1]


class ReplicaProcess:
    """``voicegrow serve`` as its own process on fixed ports, started and stopped as ops would."""

    def __init__(self, folder: Path, *, ws_port: int | None = None, http_port: int | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.folder = folder
        self.ws_port, self.http_port = ws_port or free_port(), http_port or free_port()
        self.env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "SERVER_HOST": "127.0.0.1",
                    "WS_PORT": str(self.ws_port), "HTTP_PORT": str(self.http_port), "DATA_DIR": str(folder),
                    "ASR_PRELOAD": "false", "LOG_FORMAT": "text", "SHUTDOWN_GRACE_S": "2",
                    "PROTOCOL_DETECT_MS": "300", "TRUSTED_PROXIES": "127.0.0.1/32", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, timeout_s: float = 60.0) -> float:
        """Start and wait until the health endpoint answers; the seconds that took."""
        started = time.monotonic()
        self.folder.mkdir(parents=True, exist_ok=True)
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 (the child keeps it)
        self.proc = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"],
                                     env=self.env, cwd=REPO_ROOT, stdout=log, stderr=log)
        log.close()
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"replica exited with {self.proc.returncode}; see {self.folder / 'server.log'}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.http_url}/api/v1/health", timeout=0.5).status_code == 200:
                    return time.monotonic() - started
            if time.monotonic() - started > timeout_s:
                raise RuntimeError(f"replica did not answer within {timeout_s} s")
            time.sleep(0.05)

    def sigterm(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def stop(self) -> None:
        self.sigterm()
        if self.proc is not None:
            self.wait(15)


def speaker_address(index: int) -> str:
    """A distinct loopback address per speaker (never nginx's 127.0.0.1)."""
    return f"127.0.{index // 250 + 1}.{index % 250 + 2}"


def limit_hits(metrics_text: str) -> dict[str, float]:
    hits: dict[str, float] = {}
    for line in metrics_text.splitlines():
        if line.startswith("voicegrow_limit_hits_total{"):
            label = line[line.index('limit="') + 7:]
            hits[label[:label.index('"')]] = float(line.rsplit(" ", 1)[1])
    return hits


def handshake_statuses(access_log: Path, since_epoch: float) -> Counter[int]:
    """The statuses nginx answered WebSocket handshakes with on the speaker port since ``since_epoch``."""
    statuses: Counter[int] = Counter()
    for line in access_log.read_text(encoding="utf-8", errors="replace").splitlines():
        with contextlib.suppress(ValueError, KeyError):
            entry = json.loads(line)
            stamp = time.mktime(time.strptime(entry["time"][:19], "%Y-%m-%dT%H:%M:%S"))
            if stamp >= int(since_epoch) and entry["request"].startswith("GET / "):
                statuses[int(entry["status"])] += 1
    return statuses


async def run_storm(speakers: int, *, folder: Path, settle_s: float = 120.0, within_s: float = 30.0
                    ) -> dict[str, Any]:
    from bench.xiaoai_emulator import run_emulator

    first = ReplicaProcess(folder / "replica-a")
    started_s = first.start()
    results: dict[str, Any] = {"speakers": speakers, "first_start_s": round(started_s, 2)}
    second = ReplicaProcess(folder / "replica-b", ws_port=first.ws_port, http_port=first.http_port)
    try:
        with running_nginx(folder / "nginx", [Replica(first.ws_port, first.http_port)]) as nginx:
            async with contextlib.AsyncExitStack() as stack:
                emulators = []
                for index in range(speakers):
                    emulators.append(await stack.enter_async_context(run_emulator(
                        nginx.url("ws"), serial=f"storm{index:04d}", source_address=speaker_address(index),
                        auto_reconnect=True, connect_timeout=None, keep_played_audio=False)))
                with trio.move_on_after(settle_s):
                    while not all(e.recording and e.playing for e in emulators):
                        await trio.sleep(0.2)
                results["armed_before"] = sum(e.recording and e.playing for e in emulators)
                before = [(e.connections, e.record_frames_sent) for e in emulators]
                back_at: list[float | None] = [None] * speakers
                stop_epoch, stopped = time.time(), trio.current_time()
                first.sigterm()
                exit_code = await trio.to_thread.run_sync(first.wait)
                drained_s = trio.current_time() - stopped
                restart_s = await trio.to_thread.run_sync(second.start)
                with trio.move_on_after(max(within_s, 5.0) * 2):
                    while any(t is None for t in back_at):
                        now = trio.current_time()
                        for i, emu in enumerate(emulators):
                            if back_at[i] is None and emu.connections > before[i][0] and emu.recording \
                                    and emu.playing and emu.record_frames_sent > before[i][1] + 1:
                                back_at[i] = now - stopped
                        await trio.sleep(0.05)
                async with httpx.AsyncClient(timeout=10) as http:
                    metrics = (await http.get(f"{second.http_url}/metrics")).text
                    listed = (await http.get(f"{second.http_url}/api/v1/sessions")).json()["sessions"]
                times = sorted(t for t in back_at if t is not None)

                def quantile(q: float) -> float | None:
                    return round(times[min(len(times) - 1, int(q * len(times)))], 2) if times else None

                results.update(
                    old_replica_exit_code=exit_code, drained_s=round(drained_s, 2), restart_s=round(restart_s, 2),
                    back=len(times), back_p50_s=quantile(0.5), back_p95_s=quantile(0.95),
                    back_max_s=round(times[-1], 2) if times else None,
                    back_within_target=sum(t <= within_s for t in times), target_s=within_s,
                    distinct_addresses_listed=len({s["remote_addr"] for s in listed}),
                    limit_hits=limit_hits(metrics),
                    nginx_handshakes=dict(handshake_statuses(nginx.folder / "access.log", stop_epoch)))
    finally:
        first.stop()
        second.stop()
    results["passed"] = (results.get("back_within_target") == speakers
                         and not results.get("limit_hits", {}).get("connect_rate"))
    return results


def render(results: dict[str, Any]) -> str:
    rows = [
        ["speakers (each its own address)", results["speakers"]],
        ["armed before the restart", results.get("armed_before")],
        ["old replica: SIGTERM → exited (s), exit code", f"{results.get('drained_s')}, {results.get('old_replica_exit_code')}"],
        ["new replica: start → health (s)", results.get("restart_s")],
        ["re-armed and streaming again", f"{results.get('back')} of {results['speakers']}"],
        ["SIGTERM → back p50 / p95 / max (s)",
         f"{results.get('back_p50_s')} / {results.get('back_p95_s')} / {results.get('back_max_s')}"],
        [f"back within {results.get('target_s')} s", results.get("back_within_target")],
        ["refused by the new replica (limit hits)", json.dumps(results.get("limit_hits", {}))],
        ["nginx handshake answers since SIGTERM", json.dumps(results.get("nginx_handshakes", {}))],
        ["addresses the new replica lists", results.get("distinct_addresses_listed")],
    ]
    verdict = "passed" if results.get("passed") else "FAILED"
    return markdown_table(["reconnect storm", "figure"], rows, align="lr") + f"\n\n**{verdict}**\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench storm", description=__doc__.split("\n")[0])
    parser.add_argument("--speakers", type=int, default=300)
    parser.add_argument("--within", type=float, default=30.0, help="seconds every speaker must be back within")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="voicegrow-storm-") as tmp:
        results = trio.run(lambda: run_storm(args.speakers, folder=Path(tmp), within_s=args.within))
    print(render(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0 if results["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
