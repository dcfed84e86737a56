"""Prometheus metrics: the same figures that ``bench/`` reads and ``deploy/prometheus`` alerts on.

The collectors live in a :class:`Metrics` object with its own registry, not in module globals, so that
tests can run several servers in one process and read each one's figures apart.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from voicegrow import __version__

__all__ = ["Metrics", "CONTENT_TYPE_LATEST", "STAGES"]

#: Per-turn latency stages, each measured from the end of speech (VAD) except ``turn``.
STAGES = ("asr", "llm_first_token", "first_sentence", "tts_first_audio", "response", "turn")

_LATENCY_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 8.0, 13.0, 21.0, 30.0)


class Metrics:
    """Every collector the server exports, registered in one private registry."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.build_info = Gauge("voicegrow_build_info", "Build information", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        self.uptime = Gauge("voicegrow_uptime_seconds", "Seconds since the server started", registry=r)
        self.up = Gauge("voicegrow_up", "1 while the server accepts sessions", registry=r)
        self.component_up = Gauge(
            "voicegrow_component_up", "Component health: 1 ok, 0.5 degraded, 0 down", ["component"], registry=r)
        self.sessions_active = Gauge(
            "voicegrow_sessions_active", "Live speaker sessions", ["protocol"], registry=r)
        self.connections = Counter(
            "voicegrow_connections_total", "WebSocket connections by protocol and how they ended",
            ["protocol", "outcome"], registry=r)
        self.turns = Counter("voicegrow_turns_total", "Turns by outcome", ["outcome"], registry=r)
        self.asr_requests = Counter(
            "voicegrow_asr_requests_total", "ASR transcriptions by outcome", ["outcome"], registry=r)
        self.llm_requests = Counter(
            "voicegrow_llm_requests_total", "LLM requests by outcome", ["outcome"], registry=r)
        self.tts_requests = Counter(
            "voicegrow_tts_requests_total", "TTS requests by outcome", ["outcome"], registry=r)
        self.stage_latency = Histogram(
            "voicegrow_stage_latency_seconds", "Per-turn latency by stage, from the end of speech",
            ["stage"], buckets=_LATENCY_BUCKETS, registry=r)
        self.asr_queue_depth = Gauge(
            "voicegrow_asr_queue_depth", "Utterances waiting for an ASR worker", registry=r)
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
            registry=r)
        self.limit_hits = Counter(
            "voicegrow_limit_hits_total", "Times a configured limit refused or throttled a client", ["limit"],
            registry=r)
        self.auth_refusals = Counter(
            "voicegrow_auth_refusals_total", "Refused authentications, by protocol and reason",
            ["protocol", "reason"], registry=r)
        self.protocol_errors = Counter(
            "voicegrow_protocol_errors_total", "Protocol errors answered with an error frame", ["code"],
            registry=r)

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return generate_latest(self.registry)
