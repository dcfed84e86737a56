"""The process-wide services every session shares: ASR, LLM, TTS, persistence, metrics, registry.

Built once per server from the settings; sessions receive this bundle instead of reaching for
globals, so two servers can live in one process (the tests do that) without sharing state.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import trio

from voicegrow.auth_throttle import AuthThrottle
from voicegrow.forwarded import TrustedProxies
from voicegrow.metrics import Metrics
from voicegrow.sessions.load import LoadMonitor
from voicegrow.sessions.registry import SessionRegistry
from voicegrow.sessions.view import LocalWorker, SessionView, rss_bytes
from voicegrow.settings import Settings, parse_networks
from voicegrow.workers.context import WorkerContext
from voicegrow.workers.control import Box

__all__ = ["Services", "open_services"]


@dataclasses.dataclass
class Services:
    settings: Settings
    metrics: Metrics
    registry: SessionRegistry
    http: httpx.AsyncClient
    asr: Any  # voicegrow.pipeline.asr.AsrService
    llm: Any  # voicegrow.pipeline.llm.LlmClient | OfflineResponder
    tts: Any  # voicegrow.pipeline.tts.TtsEngine
    persistence: Any  # voicegrow.storage.persistence.Persistence
    device_credentials: Any = None  # voicegrow.device_auth.DeviceCredentials when DEVICE_AUTH is on
    memory_tracer: Any = None  # voicegrow.memprofile.MemoryTracer when MEMORY_TRACE_FRAMES is set
    tools: Any = None  # voicegrow.tools.ToolRegistry; None when LLM_TOOLS is off
    timers: Any = None  # voicegrow.tools.timers.TimerBook
    auth_throttle: AuthThrottle = dataclasses.field(default_factory=AuthThrottle)  # every credential's guesses
    admin_auth: Any = None  # voicegrow.admin_auth.AdminAuth: the admin token and ADMIN_ALLOW_FROM
    tls: Any = None  # voicegrow.tls.CertificateStore when TLS_CERT_FILE is set
    load: Any = None  # voicegrow.sessions.load.LoadMonitor: ADMIT_MAX_* checks at the handshake
    #: TRUSTED_PROXIES: whose X-Forwarded-For is believed (set from the settings after construction).
    proxies: TrustedProxies = dataclasses.field(default_factory=TrustedProxies)
    #: This process's place among WORKERS (None: the single-process server).
    worker: WorkerContext | None = None
    #: Every live session this process can answer for: itself, its box (WORKERS), every replica sharing
    #: REDIS_HOST (voicegrow.sessions.view); set from the settings after construction.
    live: SessionView = dataclasses.field(init=False)
    started_monotonic: float = dataclasses.field(default_factory=time.monotonic)
    accepting: bool = True
    ws_port: int = 0  # the speaker port as bound (WS_PORT may be 0); the xiaozhi OTA answer hands it out

    def __post_init__(self) -> None:
        self.proxies = TrustedProxies(parse_networks(self.settings.trusted_proxies, "TRUSTED_PROXIES"))
        index, restarts = (self.worker.index, self.worker.restarts) if self.worker else (0, 0)
        local = LocalWorker(self, index, restarts)
        box = Box(local, {k: self.worker.control_socket(k) for k in self.worker.peers()}) if self.worker else \
            SessionView(local)
        self.live = box
        if self.settings.redis_host:
            from voicegrow.sessions.cluster import ClusterView

            self.live = ClusterView.from_settings(self.settings, local, box, replica_id=self.persistence.replica_id)

    @property
    def uptime_s(self) -> float:
        return time.monotonic() - self.started_monotonic

    def refresh_gauges(self) -> None:
        """The gauges that describe this process now (a scrape, and every second under WORKERS>1,
        since any worker may render the others' values)."""
        m, local = self.metrics, self.live.local
        m.uptime.set(self.uptime_s)
        m.up.set(1 if self.accepting else 0)
        counts = self.registry.count_by_protocol()
        for protocol in ("native", "xiaoai", "xiaozhi", "detecting"):
            m.sessions_active.labels(protocol).set(counts.get(protocol, 0))
        label = str(local.index)
        m.worker_sessions.labels(label).set(len(self.registry))
        m.worker_restarts.labels(label).set(local.restarts)
        rss = rss_bytes()
        if rss is not None:
            m.worker_rss.labels(label).set(rss)

    async def component_health(self) -> dict[str, dict[str, Any]]:
        """Health of every dependency, probed concurrently, each bounded by a short deadline."""
        asr = dict(self.asr.health())
        state = asr.get("status")
        if state in ("cold", "loading"):  # it takes sessions; the model loads before the first transcript
            asr.update(status="ok", state=state, detail=asr.get("detail") or f"model {state}")
        elif state == "error":
            asr.update(status="down", state=state)
        components: dict[str, dict[str, Any]] = {"asr": asr}

        async def probe(name: str, check: Any) -> None:
            started = time.monotonic()
            with trio.move_on_after(3.0) as scope:
                try:
                    result = dict(await check())
                except Exception as exc:  # a health probe reports, it never raises
                    result = {"status": "down", "detail": f"{type(exc).__name__}: {exc}"}
            if scope.cancelled_caught:
                result = {"status": "down", "detail": "health probe timed out after 3 s"}
            result.setdefault("latency_ms", round((time.monotonic() - started) * 1000, 1))
            components[name] = result

        async with trio.open_nursery() as nursery:
            nursery.start_soon(probe, "llm", self.llm.health)
            nursery.start_soon(probe, "tts", self.tts.health)
        components.update(self.persistence.health())
        return components


@contextlib.asynccontextmanager
async def open_services(settings: Settings, *, metrics: Metrics | None = None,
                        persistence_options: dict[str, Any] | None = None,
                        worker: WorkerContext | None = None) -> AsyncIterator[Services]:
    """Build the services for one server; the HTTP client is closed when the block exits.

    ``persistence_options`` tunes the storage layer's retry timing (tests shorten it). ``worker``: this
    process is one of WORKERS (its own spool; embedded live state shared through SQLite).
    """
    from voicegrow.admin_auth import AdminAuth
    from voicegrow.pipeline.llm import build_llm
    from voicegrow.storage.persistence import Persistence
    from voicegrow.pipeline.tts import build_tts

    metrics = metrics or Metrics()
    credentials = None
    if settings.device_auth != "off":
        from voicegrow.device_auth import DeviceCredentials

        credentials = DeviceCredentials(settings.device_credentials_file)  # a bad file fails start-up
    throttle = AuthThrottle(max_failures=settings.auth_max_failures, backoff_s=settings.auth_backoff_s)
    admin_auth = AdminAuth.from_settings(settings, throttle, metrics)
    tls = None
    if settings.tls_cert_file:
        from voicegrow.tls import CertificateStore

        tls = CertificateStore(settings.tls_cert_file, settings.tls_key_file)  # a bad pair fails start-up
    tracer = None
    if settings.memory_trace_frames:
        from voicegrow.memprofile import MemoryTracer

        tracer = MemoryTracer(settings.memory_trace_frames)  # first, so the baseline precedes the sessions
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=50)
    async with contextlib.AsyncExitStack() as stack:
        if tracer is not None:
            stack.callback(tracer.close)
        http = await stack.enter_async_context(httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(30.0)))
        registry = SessionRegistry()
        persistence = Persistence.from_settings(settings, metrics=metrics, key_prefix=settings.redis_key_prefix,
                                                worker=None if worker is None else worker.index,
                                                **(persistence_options or {}))
        tools, timers = build_tools(settings, persistence, registry, metrics)
        asr = build_asr(settings, http, metrics)
        yield Services(
            settings=settings,
            metrics=metrics,
            registry=registry,
            http=http,
            asr=asr,
            load=LoadMonitor(settings, asr, metrics),
            llm=build_llm(settings, http_client=http),
            tts=build_tts(settings, http_client=http),
            persistence=persistence,
            device_credentials=credentials,
            auth_throttle=throttle,
            admin_auth=admin_auth,
            tls=tls,
            worker=worker,
            tools=tools if settings.llm_tools else None,
            timers=timers,
            memory_tracer=tracer,
        )


def build_asr(settings: Settings, http: httpx.AsyncClient, metrics: Metrics) -> Any:
    """The local model's service, or with ``ASR_BASE_URL`` the remote one (the local model its fallback,
    loaded only if ``ASR_REMOTE_FALLBACK=local`` and then used)."""
    from voicegrow.pipeline.asr import build_asr_service

    local = build_asr_service(settings, metrics=metrics)
    if not settings.asr_base_url:
        return local
    from voicegrow.pipeline.remote_asr import RemoteAsr

    return RemoteAsr.from_settings(settings, http, metrics, fallback=local)


def build_tools(settings: Settings, persistence: Any, registry: SessionRegistry,
                metrics: Metrics) -> tuple[Any, Any]:
    """The tool registry (built-ins, timers, the MCP servers of ``MCP_SERVERS``) and the timer book."""
    from zoneinfo import ZoneInfo

    from voicegrow.tools import ToolRegistry
    from voicegrow.tools.builtins import BuiltinTools
    from voicegrow.tools.mcp import McpTools, parse_mcp_servers
    from voicegrow.tools.timers import Timer, TimerBook, TimerTools

    async def record(kind: str, timer: Timer, data: dict[str, Any]) -> None:
        metrics.reminders.labels("fired" if kind == "timer_fired" else "dropped").inc()
        await persistence.record_event(timer.device_id, kind, {"timer_id": timer.timer_id, "kind": timer.kind,
                                                               "label": timer.label, **data})

    timers = TimerBook(persistence, registry.announcer, tz=ZoneInfo(settings.tz),
                       grace_s=settings.timer_offline_grace_s, max_per_device=settings.timer_max_per_device,
                       load_wait=persistence.wait_records_delivered, on_event=record)
    providers: list[Any] = [BuiltinTools(), TimerTools(timers)]
    providers += [McpTools(config, timeout_s=settings.mcp_timeout_s) for config in parse_mcp_servers(settings.mcp_servers)]
    return ToolRegistry(providers, timeout_s=settings.tool_timeout_s), timers
