"""Prometheus metrics: the same figures that ``bench/`` reads and ``deploy/prometheus`` alerts on.

The collectors live in a :class:`Metrics` object with its own registry, not in module globals, so that
tests can run several servers in one process and read each one's figures apart.

With ``WORKERS`` over 1 the supervisor gives every worker ``PROMETHEUS_MULTIPROC_DIR``: prometheus_client
then keeps each process's values in files there, and any worker's ``/metrics`` renders the sum over all
of them. Counters and histograms of a worker that died stay in the sum (a total never goes backwards);
gauges say how they combine (``multiprocess_mode``: the ``live*`` modes forget a dead worker's value).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector

from voicegrow import __version__

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "STAGES", "MULTIPROCESS"]

#: Decided as prometheus_client decides it when it is imported: values in shared files or in this process.
MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

#: Per-turn latency stages, each measured from the end of speech (VAD) except ``turn``.
STAGES = ("asr", "llm_first_token", "first_sentence", "tts_first_audio", "response", "turn")

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 30.0)


class Metrics:
    """Every collector the server exports, registered in one private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Gauge("voicegrow_build_info", "Build information", ["version"], registry=r,
                                multiprocess_mode="livemax")
        self.build_info.labels(__version__).set(1)
        self.uptime = Gauge("voicegrow_uptime_seconds", "Seconds since the server started", registry=r,
                            multiprocess_mode="livemax")
        self.up = Gauge("voicegrow_up", "1 while the server accepts sessions", registry=r,
                        multiprocess_mode="livemax")
        self.component_up = Gauge(
            "voicegrow_component_up", "Component health: 1 ok, 0.5 degraded, 0 down", ["component"], registry=r,
            multiprocess_mode="livemin")
        self.sessions_active = Gauge(
            "voicegrow_sessions_active", "Live speaker sessions", ["protocol"], registry=r,
            multiprocess_mode="livesum")
        self.connections = Counter(
            "voicegrow_connections_total", "WebSocket connections by protocol and how they ended",
            ["protocol", "outcome"], registry=r)
        self.turns = Counter("voicegrow_turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.asr_requests = Counter(
            "voicegrow_asr_requests_total", "ASR transcriptions by outcome", ["outcome"], registry=r)
        self.audio_api_requests = Counter(
            "voicegrow_audio_api_requests_total", "OpenAI audio API requests, by endpoint and outcome",
            ["endpoint", "outcome"], registry=r)
        self.llm_requests = Counter(
            "voicegrow_llm_requests_total", "LLM requests by outcome", ["outcome"], registry=r)
        self.llm_preemptive = Counter(
            "voicegrow_llm_preemptive_total", "Replies started on the speculative transcript before the end of"
            " the turn (LLM_PREEMPTIVE), by outcome: used, or wasted (the user went on talking after the LLM"
            " had been asked: a paid call for nothing)", ["outcome"], registry=r)
        self.tool_calls = Counter(
            "voicegrow_tool_calls_total", "Tool calls the LLM made, by where the tool lives (builtin, mcp, device)"
            " and outcome (ok, error)", ["source", "outcome"], registry=r)
        self.reminders = Counter(
            "voicegrow_reminders_total", "Timers and alarms that came due: fired (spoken) or dropped (the device"
            " stayed offline past TIMER_OFFLINE_GRACE_S)", ["outcome"], registry=r)
        self.tts_requests = Counter(
            "voicegrow_tts_requests_total", "TTS requests by outcome", ["outcome"], registry=r)
        self.stage_latency = Histogram(
            "voicegrow_stage_latency_seconds", "Per-turn latency by stage, from the end of speech",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.asr_queue_depth = Gauge(
            "voicegrow_asr_queue_depth", "Utterances waiting for an ASR worker", registry=r,
            multiprocess_mode="livesum")
        self.audio_frames_received = Counter(
            "voicegrow_audio_frames_received_total", "Audio frames received from devices", ["protocol"],
            registry=r)
        self.ingest_lag = Histogram(
            "voicegrow_ingest_lag_seconds", "How late an audio frame was processed after it was sent",
            ["protocol"], buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0), registry=r)
        self.audio_frames_dropped = Counter(
            "voicegrow_audio_frames_dropped_total", "Audio frames dropped, by reason", ["reason"], registry=r)
        self.spool_depth = Gauge(
            "voicegrow_spool_depth", "Records waiting in the local spool, by component", ["component"],
            registry=r, multiprocess_mode="livesum")
        self.echo_rejected = Counter(
            "voicegrow_echo_rejected_total", "Utterances heard over a reply and dropped as its echo", ["reason"],
            registry=r)
        self.limit_hits = Counter(
            "voicegrow_limit_hits_total", "Times a configured limit refused or throttled a client", ["limit"],
            registry=r)
        self.admission_threshold = Gauge(
            "voicegrow_admission_threshold", "Load above which new sessions are refused (0: check off), by check",
            ["check"], registry=r, multiprocess_mode="livemax")
        self.admission_load = Gauge(
            "voicegrow_admission_load", "The load admission compares with its threshold (ASR queue wait in"
            " seconds; CPU as a share of the usable cores), by check", ["check"], registry=r,
            multiprocess_mode="livemax")
        self.auth_refusals = Counter(
            "voicegrow_auth_refusals_total", "Refused authentications, by protocol and reason",
            ["protocol", "reason"], registry=r)
        self.forwarded_ignored = Counter(
            "voicegrow_forwarded_headers_ignored_total",
            "Requests whose X-Forwarded-For / X-Real-IP came from a peer not in TRUSTED_PROXIES", ["port"],
            registry=r)
        self.protocol_errors = Counter(
            "voicegrow_protocol_errors_total", "Protocol errors answered with an error frame", ["code"],
            registry=r)

        # Per worker (index 0 with WORKERS=1): which worker holds how many speakers, and at what memory cost.
        self.worker_sessions = Gauge(
            "voicegrow_worker_sessions", "Live speaker sessions held by each worker process", ["worker"],
            registry=r, multiprocess_mode="livesum")
        self.worker_rss = Gauge(
            "voicegrow_worker_resident_memory_bytes", "Resident memory of each worker process", ["worker"],
            registry=r, multiprocess_mode="livesum")
        self.worker_restarts = Gauge(
            "voicegrow_worker_restarts", "Times the supervisor restarted this worker index", ["worker"],
            registry=r, multiprocess_mode="livemax")

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``: this process's, or the sum over every worker's."""
        if MULTIPROCESS:
            combined = CollectorRegistry()
            MultiProcessCollector(combined)
            return generate_latest(combined)
        return generate_latest(self.registry)
