"""What every bench command shares: the server under test, clips, figures, and the report.

A benchmark number is only worth what its context is worth, so every command writes the same kind
of JSON: the machine (CPU count, platform, Python, package versions), the exact settings of the run
and the server, and every raw figure next to its summary. The server under test is one of three
things, behind one small interface (:class:`ServerUnderTest`): a server in this process (same trio
clock as the simulated devices, trio tasks countable), a ``voicegrow serve`` subprocess on free
ports with the fake AI in a subprocess too (its own cores and GIL, so the load generator does not
steal from what it measures), or a URL.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import trio

from bench.asr import Clip, default_clips_dir, load_clips
from bench.asr import machine_info as asr_machine_info

__all__ = [
    "add_common_options",
    "assumed_settings",
    "bench_settings",
    "beyond_last_bucket",
    "BenchError",
    "child_process",
    "Clip",
    "clip_pcm",
    "count_tasks",
    "default_clips_dir",
    "FakeAiKnobs",
    "fmt",
    "free_port",
    "histogram_quantile",
    "load_clips",
    "locate_speech",
    "machine_info",
    "markdown_table",
    "MetricsSnapshot",
    "own_cpu_s",
    "parse_overrides",
    "percentiles",
    "ProcessSample",
    "progress",
    "pyplot",
    "REPO_ROOT",
    "report",
    "run_command",
    "Runner",
    "sample_process",
    "save_figure",
    "select_clips",
    "server_environment",
    "server_under_test",
    "ServerUnderTest",
    "SpeechSpan",
    "write_json",
    "wait_for_port",
]

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 16_000
_BYTES_PER_SECOND = 2 * SAMPLE_RATE
_MASK32 = 0xFFFF_FFFF

#: Packages whose versions change figures; recorded in every report.
_PACKAGES = ("trio", "trio-websocket", "wsproto", "hypercorn", "httpx", "prometheus-client",
             "webrtcvad-wheels", "piper-tts", "onnxruntime", "matplotlib", "tqdm", "voicegrow")


class BenchError(Exception):
    """The benchmark could not run as asked (no clips, server did not start, ...); ``code`` says which."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# -- clips ------------------------------------------------------------------------------------------------


def clip_pcm(clip: Clip) -> bytes:
    """The clip as 16 kHz mono s16le bytes, the form devices stream."""
    return np.asarray(clip.pcm, dtype="<i2").tobytes()


def _voice_group(clip: Clip) -> str:
    return clip.id.rsplit("-", 1)[0]  # zh-03 -> zh, en-espeak-07 -> en-espeak


def select_clips(clips: Sequence[Clip], count: int) -> list[Clip]:
    """``count`` clips taking turns between voices (zh, en, en-espeak, zh, ...), cycling if needed.

    Mixing voices keeps a short run representative: a run of twelve must not be twelve Mandarin clips.
    """
    if not clips or count <= 0:
        return []
    groups: dict[str, list[Clip]] = {}
    for clip in clips:
        groups.setdefault(_voice_group(clip), []).append(clip)
    order: list[Clip] = []
    for index in range(max(len(g) for g in groups.values())):
        order += [group[index] for group in groups.values() if index < len(group)]
    return [order[i % len(order)] for i in range(count)]


# -- where the server's VAD will find the speech -----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SpeechSpan:
    """The VAD's view of one clip streamed in ``chunk_bytes`` chunks, followed by silence.

    Positions are seconds from the clip's first sample. ``ended_at_s`` and ``paused_at_s`` are where
    the stream was when the VAD emitted ``UtteranceEnded`` and the last ``SpeechPaused`` (it only sees
    whole chunks), so ``ended_at_s - end_s`` is the hangover a device with that chunking pays and
    ``paused_at_s - end_s`` the delay before a speculative transcription can start.
    """

    start_s: float
    end_s: float
    ended_at_s: float
    paused_at_s: float | None
    utterance_audio: bytes
    paused_audio: bytes | None
    utterances: int
    padded_clip_s: float

    @property
    def hangover_s(self) -> float:
        return self.ended_at_s - self.end_s

    @property
    def trailing_s(self) -> float:
        """From the end of speech to the end of the last chunk that carried clip audio."""
        return self.padded_clip_s - self.end_s


def locate_speech(pcm: bytes, settings: Any, *, chunk_bytes: int, max_silence_s: float = 5.0) -> SpeechSpan | None:
    """Replay the server's VAD (same settings, same chunking) over the clip and the silence after it.

    The segmenter is sans-IO and deterministic, so a fresh stream that starts with the clip (or with
    silence a whole number of VAD frames long) cuts exactly where the server's does. That gives a
    device-side end of speech without sharing a clock with the server. None if no utterance ended.
    """
    from voicegrow.pipeline.vad import SpeechPaused, SpeechResumed, UtteranceEnded, VadSegmenter

    vad = VadSegmenter(sample_rate=SAMPLE_RATE, frame_ms=settings.vad_frame_ms,
                       aggressiveness=settings.vad_aggressiveness, preroll_ms=settings.vad_preroll_ms,
                       silence_ms=settings.vad_silence_ms, min_speech_ms=settings.vad_min_speech_ms,
                       max_utterance_s=settings.vad_max_utterance_s)
    chunks = [pcm[i:i + chunk_bytes] for i in range(0, len(pcm), chunk_bytes)]
    padded_s = len(chunks) * chunk_bytes / _BYTES_PER_SECOND
    chunks += [bytes(chunk_bytes)] * math.ceil(max_silence_s * _BYTES_PER_SECOND / chunk_bytes)
    fed = 0
    ended: list[tuple[float, Any]] = []
    paused: tuple[float, bytes] | None = None
    for chunk in chunks:
        fed += len(chunk)
        for event in vad.feed(chunk):
            if isinstance(event, SpeechPaused):
                paused = (fed / _BYTES_PER_SECOND, event.audio)
            elif isinstance(event, SpeechResumed):
                paused = None
            elif isinstance(event, UtteranceEnded):
                ended.append((fed / _BYTES_PER_SECOND, event))
        if ended and fed >= len(pcm):
            break
    if not ended:
        return None
    at, last = ended[-1]
    speculated = paused if paused is not None and last.paused_audio_len is not None else None
    return SpeechSpan(start_s=last.start_s, end_s=last.end_s, ended_at_s=at,
                      paused_at_s=speculated[0] if speculated else None, utterance_audio=last.audio,
                      paused_audio=speculated[1] if speculated else None, utterances=len(ended),
                      padded_clip_s=padded_s)


# -- figures ----------------------------------------------------------------------------------------------


def percentiles(values: Iterable[float]) -> dict[str, Any]:
    """n, mean, min, p50, p95, p99, max of ``values`` (linear interpolation); None for an empty set."""
    data = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if data.size == 0:
        return {"n": 0, "mean": None, "min": None, "p50": None, "p95": None, "p99": None, "max": None}
    p50, p95, p99 = np.percentile(data, [50, 95, 99])
    return {"n": int(data.size), "mean": float(data.mean()), "min": float(data.min()), "p50": float(p50),
            "p95": float(p95), "p99": float(p99), "max": float(data.max())}


def histogram_quantile(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """Prometheus' ``histogram_quantile``: ``buckets`` are (upper bound, cumulative count), +Inf last.

    Linear interpolation inside the bucket the rank falls in; a rank in the +Inf bucket answers the
    largest finite bound (a lower bound of the truth, as Prometheus does). None when there is no data.
    """
    ordered = sorted(buckets)
    if not ordered or ordered[-1][1] <= 0:
        return None
    total = ordered[-1][1]
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank:
            if math.isinf(bound):
                return lower_bound
            if count == lower_count:
                return bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound


def beyond_last_bucket(q: float, buckets: Sequence[tuple[float, float]]) -> bool:
    """Whether the ``q`` quantile lies past the largest finite bound (so the histogram can only say "≥")."""
    ordered = sorted(buckets)
    finite = [count for bound, count in ordered if not math.isinf(bound)]
    return bool(ordered) and ordered[-1][1] > 0 and (not finite or finite[-1] < q * ordered[-1][1])


@dataclasses.dataclass(frozen=True)
class MetricsSnapshot:
    """One scrape of ``/metrics``: every sample by name and labels."""

    samples: Mapping[tuple[str, frozenset[tuple[str, str]]], float]

    @classmethod
    def parse(cls, text: str) -> MetricsSnapshot:
        from prometheus_client.parser import text_string_to_metric_families

        samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, frozenset(sample.labels.items()))] = float(sample.value)
        return cls(samples)

    def total(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels``."""
        wanted = set(labels.items())
        return sum(v for (n, lab), v in self.samples.items() if n == name and wanted <= lab)

    def buckets(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """Cumulative ``(le, count)`` of histogram ``name``, summed over series matching ``labels``."""
        wanted = set(labels.items())
        sums: dict[float, float] = {}
        for (n, lab), value in self.samples.items():
            if n == f"{name}_bucket" and wanted <= lab:
                le = float(dict(lab)["le"])
                sums[le] = sums.get(le, 0.0) + value
        return sorted(sums.items())

    def bucket_delta(self, before: MetricsSnapshot | None, name: str, **labels: str) -> list[tuple[float, float]]:
        """This snapshot's histogram minus ``before``'s: what happened between the two scrapes."""
        earlier = dict(before.buckets(name, **labels)) if before is not None else {}
        return [(le, count - earlier.get(le, 0.0)) for le, count in self.buckets(name, **labels)]


# -- processes and tasks ------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ProcessSample:
    """CPU seconds used so far, resident memory, open file descriptors and threads of one process."""

    at: float
    cpu_s: float
    rss_bytes: int
    fds: int
    threads: int


def sample_process(pid: int) -> ProcessSample:
    """``/proc/PID`` and its descendants (a WORKERS>1 server is a supervisor and its workers), summed:
    works for this process and for a server subprocess alike (Linux)."""
    samples = [_sample_one(p) for p in [pid, *_descendants(pid)]]
    return ProcessSample(samples[0].at, sum(s.cpu_s for s in samples), sum(s.rss_bytes for s in samples),
                         sum(s.fds for s in samples), sum(s.threads for s in samples))


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # gone meanwhile
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], list(parents.get(pid, []))
    while todo:
        child = todo.pop()
        found.append(child)
        todo.extend(parents.get(child, []))
    return found


def _sample_one(pid: int) -> ProcessSample:
    proc = Path(f"/proc/{pid}")
    stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu_s = (int(stat[11]) + int(stat[12])) / ticks  # utime, stime (fields 14 and 15)
    status = dict(line.split(":", 1) for line in (proc / "status").read_text().splitlines() if ":" in line)
    rss = int(status["VmRSS"].split()[0]) * 1024
    threads = int(status["Threads"])
    fds = len(os.listdir(proc / "fd"))
    return ProcessSample(time.monotonic(), cpu_s, rss, fds, threads)


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def count_tasks(task: trio.lowlevel.Task) -> int:
    """Live trio tasks in ``task``'s tree, itself included (children of every nursery it holds)."""
    return 1 + sum(count_tasks(child) for nursery in task.child_nurseries for child in nursery.child_tasks)


def free_port() -> int:
    """A TCP port that was free a moment ago (for a subprocess that needs the number up front)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the server under test ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FakeAiKnobs:
    """The fake LLM/TTS service's pacing, as the commands' ``--llm-*``/``--tts-*`` options set it."""

    ttft_ms: float = 300.0
    tokens_per_s: float = 40.0
    tts_ms_per_char: float = 15.0
    tts_first_chunk_ms: float = 50.0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FakeAiKnobs:
        return cls(args.llm_ttft_ms, args.llm_tokens_per_s, args.tts_ms_per_char)

    def config(self) -> Any:
        from bench.fake_ai import FakeAiConfig

        return FakeAiConfig(ttft_ms=self.ttft_ms, tokens_per_s=self.tokens_per_s,
                            tts_ms_per_char=self.tts_ms_per_char, tts_first_chunk_ms=self.tts_first_chunk_ms)

    def argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "bench.fake_ai", "--port", str(port), "--ttft-ms", str(self.ttft_ms),
                "--tokens-per-s", str(self.tokens_per_s), "--tts-ms-per-char", str(self.tts_ms_per_char),
                "--tts-first-chunk-ms", str(self.tts_first_chunk_ms)]


def server_environment(data_dir: str, *, ai_url: str | None, overrides: Mapping[str, str] = {}) -> dict[str, str]:
    """The settings of a bench server: embedded backends, Whisper base, limits out of the way.

    The admission limits are raised because every simulated speaker comes from 127.0.0.1, which the
    production defaults (50 sessions, 120 connects a minute per address) would rightly refuse.
    Every utterance is heard (``LISTEN_MODE=always``): the simulated speakers say no wake word
    (``bench room`` measures the listening modes).
    """
    env = {
        "SERVER_HOST": "127.0.0.1", "WS_PORT": "0", "HTTP_PORT": "0", "DATA_DIR": data_dir,
        "ASR_MODEL_SIZE": "base", "ASR_LANGUAGE": "auto", "ASR_PRELOAD": "true",
        "LOG_FORMAT": "text", "LOG_LEVEL": "WARNING", "PROTOCOL_DETECT_MS": "300", "SHUTDOWN_GRACE_S": "2",
        "MAX_SESSIONS": "5000", "MAX_SESSIONS_PER_IP": "5000", "MAX_CONNECTS_PER_IP_PER_MIN": "1000000",
        "LISTEN_MODE": "always",
    }
    if ai_url:
        env.update(LLM_BASE_URL=ai_url, TTS_BASE_URL=ai_url)
    env.update({key.upper(): value for key, value in overrides.items()})
    return env


def parse_overrides(pairs: Sequence[str]) -> dict[str, str]:
    """``--set KEY=VALUE`` options as a dict; BenchError for a malformed one."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise BenchError("bad_option", f"--set expects KEY=VALUE, got {pair!r}")
        out[key.strip().upper()] = value
    return out


def bench_settings(env: Mapping[str, str]) -> Any:
    """Settings from ``env`` alone (no ``.env`` file): the bench says exactly what the server gets."""
    from voicegrow.settings import ConfigError, load_settings

    try:
        return load_settings(env, env_file=None)
    except ConfigError as exc:
        raise BenchError("bad_settings", str(exc)) from exc


def assumed_settings(server: ServerUnderTest, env_file: str | None) -> Any:
    """The server's settings: ours when we started it; for a URL, those of ``env_file`` under this
    process's environment (the VAD replay and the components need them to match the server's)."""
    if server.settings is not None:
        return server.settings
    from voicegrow.settings import read_env_file

    env = dict(read_env_file(env_file)) if env_file else {}
    env.update(os.environ)
    return bench_settings(env)


@dataclasses.dataclass
class ServerUnderTest:
    """Where the simulated devices connect, and what can be observed of the server.

    ``settings`` is None for a URL (its configuration is not ours to know); ``pid`` is None unless the
    server runs on this machine and we know its process; ``server_task`` is set in-process only.
    """

    mode: str
    ws_url: str
    http_url: str | None
    pid: int | None
    settings: Any
    http: httpx.AsyncClient
    handle: Any = None
    server_task: trio.lowlevel.Task | None = None
    ai_url: str | None = None
    admin_token: str = ""
    fake_ai: Any = None  # the in-process fake LLM/TTS service, if any

    def forget_ai_requests(self) -> None:
        """Empty the in-process fake AI's request log, which keeps every request (tests read it) and
        would otherwise grow this process's memory through a soak."""
        if self.fake_ai is not None:
            self.fake_ai.requests.clear()

    async def metrics(self) -> MetricsSnapshot | None:
        """The server's Prometheus figures now, from ``GET /metrics`` in every mode (the handler also
        refreshes the gauges that are only set when scraped, such as the live sessions)."""
        if not self.http_url:
            return None
        try:
            response = await self.http.get(f"{self.http_url}/metrics", headers=self._auth())
            response.raise_for_status()
        except httpx.HTTPError:
            return None
        return MetricsSnapshot.parse(response.text)

    def process(self) -> ProcessSample | None:
        if self.pid is None:
            return None
        try:
            return sample_process(self.pid)
        except (OSError, KeyError, IndexError, ValueError):
            return None  # the process is gone, or /proc is not Linux's

    def live_tasks(self) -> int | None:
        """Trio tasks of the server's own task tree (in-process only)."""
        return count_tasks(self.server_task) if self.server_task is not None else None

    async def memory_baseline(self) -> bool:
        """Ask the server's allocation tracer to measure growth from now on; False when it has none."""
        if not self.http_url:
            return False
        try:
            response = await self.http.post(f"{self.http_url}/api/v1/debug/memory/baseline", headers=self._auth(),
                                            timeout=120.0)
        except httpx.HTTPError:
            return False
        return response.status_code == 200

    async def memory_release(self) -> dict[str, Any] | None:
        """Ask the server to collect its garbage and return free pages (``POST /api/v1/debug/memory/release``)."""
        if not self.http_url:
            return None
        try:
            response = await self.http.post(f"{self.http_url}/api/v1/debug/memory/release", headers=self._auth(),
                                            timeout=60.0)
            response.raise_for_status()
            return dict(response.json())
        except (httpx.HTTPError, ValueError):
            return None

    async def memory_report(self, limit: int = 15) -> dict[str, Any] | None:
        """The server's RSS and allocator figures and, when it traces allocations and ``limit`` > 0,
        its top growth sites since the baseline (``GET /api/v1/debug/memory``)."""
        if not self.http_url:
            return None
        try:
            response = await self.http.get(f"{self.http_url}/api/v1/debug/memory", params={"limit": str(limit)},
                                           headers=self._auth(), timeout=120.0)
            response.raise_for_status()
            return dict(response.json())
        except (httpx.HTTPError, ValueError):
            return None

    async def turn_records(self, device_id: str, limit: int = 5) -> list[dict[str, Any]]:
        """The server's stored turns of a device, newest first (admin API); [] if unavailable."""
        if not self.http_url:
            return []
        try:
            response = await self.http.get(f"{self.http_url}/api/v1/conversations",
                                           params={"device_id": device_id, "limit": str(limit)},
                                           headers=self._auth())
            response.raise_for_status()
            return list(response.json().get("turns", []))
        except (httpx.HTTPError, ValueError):
            return []

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"} if self.admin_token else {}


@contextlib.asynccontextmanager
async def server_under_test(mode: str, *, fake_ai: FakeAiKnobs | None, overrides: Mapping[str, str] = {},
                            url: str | None = None, http_url: str | None = None, pid: int | None = None,
                            admin_token: str = "", startup_timeout_s: float = 180.0) -> AsyncIterator[ServerUnderTest]:
    """Run (or reach) the server for one bench run; stop what was started on exit.

    ``mode``: ``in-process``, ``subprocess`` or ``url``. ``fake_ai`` None means the server uses what
    ``overrides`` configure (or its embedded defaults). Returns once the ASR model is loaded, so the
    first measured turn does not pay for it.
    """
    async with httpx.AsyncClient(timeout=httpx.Timeout(10.0)) as http:
        if mode == "url":
            if not url:
                raise BenchError("bad_option", "mode url needs --url")
            yield ServerUnderTest("url", url, http_url, pid, None, http, admin_token=admin_token)
            return
        with tempfile.TemporaryDirectory(prefix="voicegrow-bench-") as tmp:
            if mode == "in-process":
                async with _in_process(tmp, fake_ai, overrides, http) as server:
                    yield server
            elif mode == "subprocess":
                async with _subprocess(tmp, fake_ai, overrides, http, startup_timeout_s) as server:
                    yield server
            else:
                raise BenchError("bad_option", f"unknown server mode {mode!r}")


@contextlib.asynccontextmanager
async def _in_process(tmp: str, fake_ai: FakeAiKnobs | None, overrides: Mapping[str, str],
                      http: httpx.AsyncClient) -> AsyncIterator[ServerUnderTest]:
    from bench.fake_ai import run_fake_ai
    from voicegrow.app import running_server

    async with contextlib.AsyncExitStack() as stack:
        ai = await stack.enter_async_context(run_fake_ai(fake_ai.config())) if fake_ai is not None else None
        ai_url = ai.url if ai is not None else None
        settings = bench_settings(server_environment(str(Path(tmp) / "data"), ai_url=ai_url, overrides=overrides))

        stop = trio.Event()

        async def host(task_status: trio.TaskStatus[tuple[Any, trio.lowlevel.Task]] = trio.TASK_STATUS_IGNORED) -> None:
            # Its own task, so that the server's task tree can be counted apart from the devices'.
            async with running_server(settings) as handle:
                task_status.started((handle, trio.lowlevel.current_task()))
                await stop.wait()  # then leave the block: a graceful stop, persistence still running

        nursery = await stack.enter_async_context(trio.open_nursery())
        handle, task = await nursery.start(host)
        stack.callback(stop.set)
        await handle.services.asr.warm_up()
        yield ServerUnderTest("in-process", handle.ws_url, handle.http_url, os.getpid(), settings, http,
                              handle=handle, server_task=task, ai_url=ai_url, fake_ai=ai,
                              admin_token=settings.admin_token)


@contextlib.asynccontextmanager
async def _subprocess(tmp: str, fake_ai: FakeAiKnobs | None, overrides: Mapping[str, str],
                      http: httpx.AsyncClient, startup_timeout_s: float) -> AsyncIterator[ServerUnderTest]:
    logs = Path(tmp)
    async with contextlib.AsyncExitStack() as stack:
        ai_url = None
        child_env = _environment_without_settings()
        child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
        if fake_ai is not None:
            port = free_port()
            ai_url = f"http://127.0.0.1:{port}"
            await stack.enter_async_context(child_process(fake_ai.argv(port), child_env, logs / "fake_ai.log"))
            await wait_for_port(port, 30.0, logs / "fake_ai.log")
        ws_port, http_port = free_port(), free_port()
        env = server_environment(str(logs / "data"), ai_url=ai_url, overrides=overrides)
        env.update(WS_PORT=str(ws_port), HTTP_PORT=str(http_port))
        settings = bench_settings(env)
        argv = [sys.executable, "-m", "voicegrow", "--env-file", str(logs / "no.env"), "serve"]
        proc = await stack.enter_async_context(child_process(argv, {**child_env, **env}, logs / "server.log"))
        http_url = f"http://127.0.0.1:{http_port}"
        await _wait_until_ready(http, http_url, proc, startup_timeout_s, logs / "server.log", settings.admin_token)
        yield ServerUnderTest("subprocess", f"ws://127.0.0.1:{ws_port}", http_url, proc.pid, settings, http,
                              ai_url=ai_url, admin_token=settings.admin_token)
        if proc.returncode is not None:
            raise BenchError("server_died", f"the server exited with {proc.returncode} during the run:\n"
                             + _tail(logs / "server.log"))


def _environment_without_settings() -> dict[str, str]:
    """This process's environment minus every VoiceGrow setting: the bench alone configures its server."""
    from voicegrow.settings import Settings

    names = {field.name.upper() for field in dataclasses.fields(Settings)}
    return {key: value for key, value in os.environ.items() if key not in names}


@contextlib.asynccontextmanager
async def child_process(argv: list[str], env: Mapping[str, str], log_path: Path) -> AsyncIterator[trio.Process]:
    with open(log_path, "wb") as log:
        proc = await trio.lowlevel.open_process(argv, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
                                                stdin=subprocess.DEVNULL, cwd=str(REPO_ROOT))
        try:
            yield proc
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    proc.terminate()  # SIGTERM: the server's graceful stop
                    with trio.move_on_after(15):
                        await proc.wait()
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()


async def wait_for_port(port: int, timeout_s: float, log_path: Path) -> None:
    with trio.move_on_after(timeout_s):
        while True:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
            except OSError:
                await trio.sleep(0.1)
                continue
            await stream.aclose()
            return
    raise BenchError("start_failed", f"nothing listens on port {port} after {timeout_s:g} s:\n{_tail(log_path)}")


async def _wait_until_ready(http: httpx.AsyncClient, http_url: str, proc: trio.Process, timeout_s: float,
                            log_path: Path, admin_token: str = "") -> None:
    """Health answers, and the ASR component no longer reports ``cold``/``loading``."""
    headers = {"Authorization": f"Bearer {admin_token}"} if admin_token else {}
    with trio.move_on_after(timeout_s):
        while proc.returncode is None:
            try:
                response = await http.get(f"{http_url}/api/v1/health/detail", headers=headers)
                detail = response.json()
                asr = detail.get("components", {}).get("asr", {})
                workers = detail.get("workers", [])  # WORKERS>1: every worker's own model
                if (response.status_code == 200 and "state" not in asr and asr.get("status") != "down"
                        and all(w.get("asr", {}).get("status") not in ("cold", "loading") for w in workers)):
                    return
                if asr.get("status") == "down":
                    raise BenchError("start_failed", f"the server's ASR failed to load: {asr}\n{_tail(log_path)}")
            except (httpx.HTTPError, ValueError):
                pass
            await trio.sleep(0.25)
        raise BenchError("start_failed", f"the server exited with {proc.returncode}:\n{_tail(log_path)}")
    raise BenchError("start_failed", f"the server was not ready after {timeout_s:g} s:\n{_tail(log_path)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# -- the command line ---------------------------------------------------------------------------------------


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """The options every command takes: clips, the fake AI's pacing, server settings, reaching a URL, output."""
    parser.add_argument("--clips", type=Path, default=None, help="directory with manifest.json and 16 kHz WAVs")
    parser.add_argument("--llm-ttft-ms", type=float, default=300.0, help="fake LLM time to first token (default 300)")
    parser.add_argument("--llm-tokens-per-s", type=float, default=40.0, help="fake LLM token rate (default 40)")
    parser.add_argument("--tts-ms-per-char", type=float, default=15.0,
                        help="fake TTS audio per character (default 15: short replies keep runs short)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="a setting of the server the bench starts, e.g. --set ASR_SPECULATIVE=false")
    parser.add_argument("--http-url", help="with --url: the server's HTTP API (metrics, admin API)")
    parser.add_argument("--admin-token", default="", help="with --url: the server's ADMIN_TOKEN")
    parser.add_argument("--env-file", help="with --url: the server's .env, for its VAD (and ASR, LLM, TTS) settings")
    parser.add_argument("--json", type=Path, help="write every figure here")
    parser.add_argument("--plot", type=Path, help="write the plot here (PNG)")


Runner = Callable[[argparse.Namespace, list[Clip]], Awaitable[dict[str, Any]]]


def run_command(name: str, args: argparse.Namespace, run: Runner, *, clip_count: int,
                render: Callable[[dict[str, Any], argparse.Namespace], str],
                plot: Callable[[dict[str, Any], Path], None], passed: Callable[[dict[str, Any]], bool]) -> int:
    """Load the clips, run, print the Markdown, write JSON and PNG: 0 passed, 1 not, 2 could not run."""
    clips_dir = args.clips or default_clips_dir()
    try:
        clips = select_clips(load_clips(clips_dir), clip_count)
        if not clips:
            raise BenchError("no_clips", f"no clips in {clips_dir}")
        results = trio.run(run, args, clips)
    except (BenchError, OSError) as exc:
        print(f"bench {name}: {exc}", file=sys.stderr)
        return 2
    print(render(results, args))
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k != "admin_token"}
        settings["clips"] = str(clips_dir)
        write_json(args.json, report(name, settings, results))
    if args.plot:
        plot(results, args.plot)
    return 0 if passed(results) else 1


# -- reports ---------------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The machine a figure came from: CPUs, platform, Python, load, and the versions that matter."""
    info = asr_machine_info()
    for dist in _PACKAGES:
        try:
            info["versions"][dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            info["versions"][dist] = None
    try:
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, text=True,
                                            capture_output=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git_commit"] = None
    return info


def report(command: str, settings: Mapping[str, Any], results: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON every command writes: what ran, where, with which settings, and what came out."""
    return {"command": command, "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine_info(), "settings": dict(settings), **results}


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1, default=_jsonable) + "\n", encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fmt(value: float | None, digits: int = 0, scale: float = 1.0) -> str:
    """A table cell: ``-`` for a missing figure."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value * scale:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], *, align: str = "") -> str:
    """A GitHub Markdown table; ``align`` has one ``l``/``r`` per column (default: first left, rest right)."""
    align = align or "l" + "r" * (len(header) - 1)
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    for row in rows:
        lines.append("| " + " | ".join(str(cell).replace("|", "\\|") for cell in row) + " |")
    return "\n".join(lines)


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend: plots are files, never windows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    print(f"wrote {path}", file=sys.stderr)


def progress(total: float | None, desc: str, unit: str = "it") -> Any:
    """A tqdm bar on stderr (stdout is for the Markdown tables); sparse updates when not a terminal."""
    from tqdm import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True, leave=interactive,
                mininterval=0.5 if interactive else 10.0)
