"""One typed, validated settings object, read once at start-up.

Every setting comes from an environment variable of the same name (upper case), or from an optional
``.env`` file; the process environment wins over the file. A bad value raises :class:`ConfigError`
with one line naming the variable, the value and what is allowed, so that a typo in a compose file
fails the container at once instead of surfacing as a strange runtime error hours later.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["ConfigError", "Settings", "load_settings", "parse_networks", "read_env_file"]


class ConfigError(ValueError):
    """A setting has a value that is not allowed; the message is one line meant for an operator."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


@dataclasses.dataclass(frozen=True)
class _Spec:
    kind: type
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    secret: bool = False


def _field(default: Any, kind: type, *, choices: tuple[str, ...] | None = None,
           low: float | None = None, high: float | None = None, secret: bool = False) -> Any:
    return dataclasses.field(
        default=default,
        metadata={"spec": _Spec(kind, choices, low, high, secret)},
    )


def _port(default: int) -> Any:
    return _field(default, int, low=0, high=65535)  # 0: any free port (tests, embedded servers)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Effective configuration. Field names are the environment variable names in lower case."""

    # -- server
    server_host: str = _field("0.0.0.0", str)
    # all: speakers and the HTTP API; asr: an ASR worker of a pool (no speaker port, no timers: the OpenAI
    # audio API, Wyoming, health and metrics only), for edge replicas whose ASR_BASE_URL points at the pool.
    server_role: str = _field("all", str, choices=("all", "asr"))
    ws_port: int = _port(4399)
    http_port: int = _port(8000)
    wyoming_port: int = _port(0)  # Home Assistant's Wyoming protocol (ASR and TTS); 0: off
    wyoming_max_audio_s: float = _field(30.0, float, low=1, high=600)  # one transcribe request's audio
    debug: bool = _field(False, bool)
    log_level: str = _field("INFO", str, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"))
    log_format: str = _field("json", str, choices=("json", "text"))
    workers: int = _field(1, int, low=1, high=64)
    data_dir: str = _field("./data", str)
    admin_token: str = _field("", str, secret=True)  # empty: generated into DATA_DIR/admin_token
    admin_allow_from: str = _field("auto", str)  # addresses/networks that may skip the admin token
    trusted_proxies: str = _field("", str)  # CIDRs whose X-Forwarded-For / X-Real-IP are believed
    metrics_public: bool = _field(False, bool)  # /metrics without the admin credential
    auth_max_failures: int = _field(20, int, low=1, high=1_000_000)  # distinct wrong credentials per address
    auth_backoff_s: float = _field(30.0, float, low=0.1, high=86400)  # first lock-out; doubles, up to 15 min
    tls_cert_file: str = _field("", str)  # PEM chain: wss:// and https:// without a proxy
    tls_key_file: str = _field("", str)
    shutdown_grace_s: float = _field(10.0, float, low=0, high=600)
    handshake_timeout_s: float = _field(10.0, float, low=0.1, high=600)
    ws_ping_interval_s: float = _field(0.0, float, low=0, high=3600)  # 0: no library keepalive pings
    ws_ping_timeout_s: float = _field(120.0, float, low=1, high=3600)
    write_queue_frames: int = _field(256, int, low=8, high=100_000)
    slow_reader_timeout_s: float = _field(10.0, float, low=0.1, high=3600)
    max_frame_bytes: int = _field(256 * 1024, int, low=1024, high=16 * 1024 * 1024)
    protocol_detect_ms: int = _field(1500, int, low=10, high=60_000)
    # tracemalloc frames per allocation, 0: off; the growth report is GET /api/v1/debug/memory
    memory_trace_frames: int = _field(0, int, low=0, high=100)

    # -- limits (hostile input)
    max_sessions: int = _field(500, int, low=1, high=100_000)
    max_sessions_per_ip: int = _field(50, int, low=1, high=100_000)
    max_connects_per_ip_per_min: int = _field(120, int, low=1, high=1_000_000)
    # Load-aware admission (HTTP 503 + Retry-After at the handshake, so a balancer tries another
    # replica): the oldest live utterance's wait for an ASR worker, in seconds, and this process's CPU
    # as a share of the cores it may use (0 to 1); 0 turns a check off.
    admit_max_asr_wait_s: float = _field(0.0, float, low=0, high=600)
    admit_max_cpu: float = _field(0.0, float, low=0, high=1)
    admit_retry_after_s: int = _field(5, int, low=1, high=3600)
    max_audio_rate: float = _field(3.0, float, low=1.0, high=100.0)  # × real time
    max_llm_input_chars: int = _field(2000, int, low=10, high=1_000_000)

    # -- device auth (native protocol)
    device_auth: str = _field("off", str, choices=("off", "token", "hmac"))
    device_credentials_file: str = _field("", str)

    # -- ASR
    asr_model_size: str = _field("small", str)
    asr_model_path: str = _field("", str)
    asr_device: str = _field("cpu", str, choices=("cpu", "cuda", "auto"))
    asr_compute_type: str = _field(
        "int8", str, choices=("int8", "int8_float16", "int8_float32", "float16", "float32", "default"))
    asr_language: str = _field("auto", str)  # auto: Chinese or English, per utterance
    asr_timeout: float = _field(30.0, float, low=0.1, high=3600)
    asr_workers: int = _field(1, int, low=1, high=64)
    asr_cpu_threads: int = _field(0, int, low=0, high=256)  # 0: let CTranslate2 decide
    asr_beam_size: int = _field(1, int, low=1, high=10)
    # Whisper's previous-text prompt for Chinese (initial_prompt); empty: none (bench room: fewer misheard
    # words in noise, but no Chinese punctuation; simplified characters come from the t2s step either way)
    asr_prompt_zh: str = _field("以下是普通话的句子。", str)
    asr_engine: str = _field("fast", str, choices=("fast", "stock"))
    asr_speculative: bool = _field(True, bool)
    # start the LLM (and TTS) on the speculative transcript during the hangover; audio waits for the end
    # of the turn; a user who goes on talking costs one wasted LLM call (voicegrow_llm_preemptive_total)
    llm_preemptive: bool = _field(True, bool)
    # ... once the pause has lasted this long (a word gap shorter than it costs no LLM call)
    llm_preemptive_after_ms: int = _field(200, int, low=0, high=10_000)
    asr_preload: bool = _field(True, bool)  # load the model at start-up, not on the first utterance
    asr_allow_download: bool = _field(False, bool)  # fetch a standard model from the hub if not installed
    # remote ASR: any OpenAI-compatible /v1/audio/transcriptions instead of the local model (docs/audio-api.md)
    asr_base_url: str = _field("", str)
    asr_api_key: str = _field("", str, secret=True)
    asr_remote_model: str = _field("whisper-1", str)
    asr_remote_timeout_s: float = _field(10.0, float, low=0.1, high=3600)  # per attempt; ASR_TIMEOUT bounds all
    asr_remote_retries: int = _field(1, int, low=0, high=5)
    asr_remote_fallback: str = _field("off", str, choices=("off", "local"))  # local: the local model answers

    # -- VAD
    vad_aggressiveness: int = _field(2, int, low=0, high=3)
    # webrtc_floor: webrtcvad and the session's noise floor (endpoints in a fan's noise); see README
    vad_engine: str = _field("webrtc_floor", str, choices=("webrtc", "webrtc_floor", "silero", "webrtc_silero"))
    # speech this many dB under the loudest of the utterance (a TV behind the user) does not extend it,
    # nor, once the user was heard, start a turn; 0: off
    vad_relative_db: float = _field(10.0, float, low=0, high=60)
    vad_frame_ms: int = _field(30, int, choices=("10", "20", "30"))
    vad_preroll_ms: int = _field(300, int, low=0, high=5000)
    vad_silence_ms: int = _field(500, int, low=60, high=10_000)
    vad_min_speech_ms: int = _field(250, int, low=0, high=10_000)
    vad_max_utterance_s: float = _field(15.0, float, low=1, high=120)
    barge_in_min_ms: int = _field(300, int, low=0, high=10_000)
    # auto: echo-safe barge-in (server-side echo cancellation) unless the device cancels its own echo;
    # vad stays the default until echo-safe holds live (README, "A speaker that hears itself")
    barge_in: str = _field("vad", str, choices=("auto", "vad", "wake_word", "off"))
    barge_in_echo_kept_db: float = _field(-10.0, float, low=-40, high=0)  # speech over a reply must keep this

    # -- listening (voicegrow/listening.py): which heard speech becomes a turn
    # auto: wake for open-xiaoai speakers, always for native devices, the browser and xiaozhi boards
    listen_mode: str = _field("auto", str, choices=("auto", "wake", "always", "push_to_talk"))
    listen_mode_devices: str = _field("", str)  # device_id=mode,… (wins over LISTEN_MODE and the hello)
    follow_up_s: float = _field(8.0, float, low=0, high=600)  # after a wake signal, and after each reply
    wake_preroll_ms: int = _field(1500, int, low=0, high=10_000)  # audio kept before a wake signal

    # -- TTS
    tts_base_url: str = _field("", str)
    tts_api_key: str = _field("", str, secret=True)
    tts_secret_key: str = _field("", str, secret=True)
    tts_model: str = _field("tts-1", str)
    tts_voice_zh: str = _field("zh-CN-Neural2-C", str)
    tts_voice_en: str = _field("en-US-Neural2-C", str)
    tts_speaking_rate: float = _field(0.9, float, low=0.25, high=4.0)
    tts_pitch: float = _field(0.0, float, low=-20.0, high=20.0)
    tts_timeout: float = _field(30.0, float, low=0.1, high=3600)
    tts_lead_ms: int = _field(200, int, low=0, high=5000)
    tts_normalize_remote: bool = _field(False, bool)  # send "七点半", not "7:30", to TTS_BASE_URL too
    tts_offline_voice_zh: str = _field("jf_gongitsune", str, choices=(
        "jf_gongitsune", "jf_nezumi", "jm_kumo", "jf_alpha", "jf_tebukuro"))
    tts_workers: int = _field(1, int, low=1, high=64)  # offline sentences synthesized at once

    # -- LLM
    llm_base_url: str = _field("", str)
    llm_api_key: str = _field("", str, secret=True)
    llm_secret_key: str = _field("", str, secret=True)
    llm_model: str = _field("gemini-2.0-flash-exp", str)
    llm_max_tokens: int = _field(300, int, low=1, high=100_000)
    llm_temperature: float = _field(0.7, float, low=0.0, high=2.0)
    llm_timeout: float = _field(30.0, float, low=0.1, high=3600)
    llm_system_prompt: str = _field("", str)
    llm_history_turns: int = _field(8, int, low=0, high=1000)
    llm_history_chars: int = _field(4000, int, low=0, high=1_000_000)

    # -- tools (function calling), timers, MCP
    tz: str = _field("Asia/Shanghai", str)  # the speakers' time zone: alarms, "what time is it"
    llm_tools: bool = _field(True, bool)  # offer tools to the LLM (off for servers without function calling)
    llm_tool_rounds: int = _field(3, int, low=1, high=10)
    tool_timeout_s: float = _field(10.0, float, low=0.1, high=600)
    timer_offline_grace_s: float = _field(600.0, float, low=0, high=7 * 86400)
    timer_max_per_device: int = _field(20, int, low=1, high=1000)
    mcp_servers: str = _field("", str)
    mcp_timeout_s: float = _field(10.0, float, low=0.1, high=600)

    # -- persistence
    mysql_host: str = _field("", str)
    mysql_port: int = _port(3306)
    mysql_database: str = _field("voicegrow", str)
    mysql_user: str = _field("voicegrow", str)
    mysql_password: str = _field("", str, secret=True)
    redis_host: str = _field("", str)
    redis_port: int = _port(6379)
    redis_password: str = _field("", str, secret=True)
    redis_db: int = _field(0, int, low=0, high=1024)
    redis_key_prefix: str = _field("voicegrow:", str)  # several deployments may share one Redis
    session_ttl_s: int = _field(86400, int, low=1, high=365 * 86400)
    minio_endpoint: str = _field("", str)
    minio_access_key: str = _field("", str, secret=True)
    minio_secret_key: str = _field("", str, secret=True)
    minio_bucket: str = _field("voicegrow", str)
    minio_secure: bool = _field(False, bool)
    presigned_url_ttl_s: int = _field(900, int, low=1, high=7 * 86400)
    replica_id: str = _field("", str)
    # With REDIS_HOST: how often each replica rewrites its entry in the shared session listing; an
    # entry lives three heartbeats, so a replica that died leaves the listing within 3 × this.
    cluster_heartbeat_s: float = _field(2.0, float, low=0.1, high=60)

    # -- open-xiaoai speakers
    xiaoai_token: str = _field("", str, secret=True)
    xiaoai_allowlist: str = _field("", str)  # comma separated serials or IP addresses
    xiaoai_record_watchdog_s: float = _field(3.0, float, low=0.5, high=600)
    xiaoai_request_timeout_s: float = _field(10.0, float, low=0.1, high=600)
    xiaoai_silence_builtin: bool = _field(True, bool)
    xiaoai_silence_commands: str = _field("", str)  # ';;'-separated fixed shell commands

    # -- xiaozhi-esp32 boards
    xiaozhi_token: str = _field("", str, secret=True)  # handed out by the OTA answer, checked as Bearer
    xiaozhi_allowlist: str = _field("", str)  # comma separated Device-Id (MAC), Client-Id or IP addresses
    xiaozhi_output_rate: int = _field(24000, int, choices=("16000", "24000", "48000"))
    xiaozhi_mcp_timeout_s: float = _field(5.0, float, low=0.1, high=120)
    xiaozhi_ws_url: str = _field("", str)  # what the OTA answer points boards to; empty: this host, WS_PORT
    xiaozhi_firmware_version: str = _field("", str)
    xiaozhi_firmware_url: str = _field("", str)

    # -- HTTP API
    http_max_body_bytes: int = _field(64 * 1024, int, low=1024, high=64 * 1024 * 1024)
    cors_origins: str = _field("", str)

    # -- OpenAI audio API (/v1/audio/transcriptions, /v1/audio/speech; docs/audio-api.md)
    api_keys: str = _field("", str, secret=True)  # comma separated; empty: the admin credential rules apply
    audio_max_upload_bytes: int = _field(25 * 1024 * 1024, int, low=1024, high=1024 * 1024 * 1024)
    audio_max_duration_s: float = _field(300.0, float, low=1, high=4 * 3600)
    audio_timeout_s: float = _field(300.0, float, low=1, high=4 * 3600)  # queue wait + transcription
    audio_max_input_chars: int = _field(4096, int, low=1, high=1_000_000)  # /v1/audio/speech input

    def masked(self) -> dict[str, Any]:
        """The settings as a plain dict, with every secret that is set replaced by ``***``."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata["spec"].secret and value:
                value = "***"
            out[f.name.upper()] = value
        return out

    @property
    def api_key_list(self) -> tuple[str, ...]:
        return tuple(k.strip() for k in self.api_keys.split(",") if k.strip())


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a ``.env`` file: ``KEY=value`` lines, ``#`` comments, optional ``export`` and quotes."""
    values: dict[str, str] = {}
    for number, raw in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export "):
            line = line[len("export "):].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise ConfigError(f"{path}:{number}: expected KEY=value, got {raw!r}")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _convert(name: str, raw: str, spec: _Spec) -> Any:
    env = name.upper()
    if spec.kind is bool:
        lowered = raw.strip().lower()
        if lowered in _TRUE:
            return True
        if lowered in _FALSE:
            return False
        raise ConfigError(f"{env}={raw!r} is not allowed: expected true or false")
    if spec.kind is str:
        value: Any = raw.strip()
        if env == "LOG_LEVEL":
            value = value.upper()
        if spec.choices and value not in spec.choices:
            raise ConfigError(f"{env}={raw!r} is not allowed: expected one of {', '.join(spec.choices)}")
        return value
    if env == "WYOMING_PORT" and not raw.strip():
        return 0  # empty (a compose file's ${WYOMING_PORT:-}) is off, like 0
    try:
        value = spec.kind(raw.strip())
    except ValueError:
        kind = "an integer" if spec.kind is int else "a number"
        raise ConfigError(f"{env}={raw!r} is not allowed: expected {kind}{_range_text(spec)}") from None
    if spec.kind is float and value != value:  # NaN
        raise ConfigError(f"{env}={raw!r} is not allowed: expected a number{_range_text(spec)}")
    if spec.choices and str(value) not in spec.choices:
        raise ConfigError(f"{env}={raw!r} is not allowed: expected one of {', '.join(spec.choices)}")
    if (spec.low is not None and value < spec.low) or (spec.high is not None and value > spec.high):
        kind = "an integer" if spec.kind is int else "a number"
        raise ConfigError(f"{env}={raw!r} is not allowed: expected {kind}{_range_text(spec)}")
    return value


def _range_text(spec: _Spec) -> str:
    if spec.low is None and spec.high is None:
        return ""
    fmt = (lambda v: f"{v:g}") if spec.kind is float else (lambda v: str(int(v)))
    return f" from {fmt(spec.low)} to {fmt(spec.high)}"


_ASR_SIZES = ("tiny", "tiny.en", "base", "base.en", "small", "small.en", "medium", "medium.en",
              "large", "large-v1", "large-v2", "large-v3", "large-v3-turbo", "turbo",
              "distil-small.en", "distil-medium.en", "distil-large-v2", "distil-large-v3")


def parse_networks(setting: str, name: str = "ADMIN_ALLOW_FROM",
                   ) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A list of addresses and networks (``ADMIN_ALLOW_FROM``, ``TRUSTED_PROXIES``); a bad part is a
    :class:`ConfigError` naming the variable and the part."""
    networks = []
    for part in (p.strip() for p in setting.split(",")):
        if not part:
            continue
        try:
            networks.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigError(
                f"{name}={setting!r} is not allowed: {part!r} is no IP address or network (expected "
                + ("auto, none, or " if name == "ADMIN_ALLOW_FROM" else "")
                + "comma-separated addresses or networks such as 127.0.0.1,::1,192.168.1.0/24)") from None
    return tuple(networks)


def _check_cross_field(s: Settings) -> None:
    if s.asr_model_size not in _ASR_SIZES and not s.asr_model_path:
        raise ConfigError(
            f"ASR_MODEL_SIZE={s.asr_model_size!r} is not allowed: expected one of {', '.join(_ASR_SIZES)}"
            " (or set ASR_MODEL_PATH to a CTranslate2 model directory)")
    if s.asr_language != "auto" and not (2 <= len(s.asr_language) <= 3 and s.asr_language.isalpha()):
        raise ConfigError(
            f"ASR_LANGUAGE={s.asr_language!r} is not allowed: expected a language code such as zh or en, or auto")
    for name in ("llm_base_url", "tts_base_url", "asr_base_url"):
        url = getattr(s, name)
        if url and not url.startswith(("http://", "https://")):
            raise ConfigError(f"{name.upper()}={url!r} is not allowed: expected an http:// or https:// URL")
    if s.xiaozhi_ws_url and not s.xiaozhi_ws_url.startswith(("ws://", "wss://")):
        raise ConfigError(f"XIAOZHI_WS_URL={s.xiaozhi_ws_url!r} is not allowed: expected a ws:// or wss:// URL")
    if bool(s.xiaozhi_firmware_version) != bool(s.xiaozhi_firmware_url):
        raise ConfigError("XIAOZHI_FIRMWARE_URL and XIAOZHI_FIRMWARE_VERSION are not allowed one without the other: "
                          "set both to offer a firmware image, or neither")
    if s.xiaozhi_firmware_url and not s.xiaozhi_firmware_url.startswith(("http://", "https://")):
        raise ConfigError(f"XIAOZHI_FIRMWARE_URL={s.xiaozhi_firmware_url!r} is not allowed: expected an http:// "
                          "or https:// URL")
    if any(len(key) < 16 or not key.isprintable() or " " in key for key in s.api_key_list):
        raise ConfigError("API_KEYS is not allowed: expected comma-separated keys of at least 16 printable "
                          "characters without spaces")
    if s.ws_port and s.ws_port == s.http_port:
        raise ConfigError(f"HTTP_PORT={s.http_port} is not allowed: it must differ from WS_PORT")
    if s.wyoming_port and s.wyoming_port in (s.ws_port, s.http_port):
        raise ConfigError(f"WYOMING_PORT={s.wyoming_port} is not allowed: it must differ from WS_PORT and HTTP_PORT")
    try:
        ZoneInfo(s.tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"TZ={s.tz!r} is not allowed: expected an IANA time zone such as Asia/Shanghai") from None
    if s.mcp_servers:
        from voicegrow.tools.mcp import McpConfigError, parse_mcp_servers

        try:
            parse_mcp_servers(s.mcp_servers)
        except McpConfigError as exc:
            raise ConfigError(f"MCP_SERVERS is not allowed: {exc}") from None
    if s.listen_mode_devices:
        from voicegrow.listening import ListenModeError, parse_listen_mode_devices

        try:
            parse_listen_mode_devices(s.listen_mode_devices)
        except ListenModeError as exc:
            raise ConfigError(f"LISTEN_MODE_DEVICES={s.listen_mode_devices!r} is not allowed: {exc}") from None
    if s.admin_allow_from.strip().lower() not in ("auto", "none"):
        parse_networks(s.admin_allow_from)
    parse_networks(s.trusted_proxies, "TRUSTED_PROXIES")
    if bool(s.tls_cert_file) != bool(s.tls_key_file):
        given, missing = ("TLS_CERT_FILE", "TLS_KEY_FILE") if s.tls_cert_file else ("TLS_KEY_FILE", "TLS_CERT_FILE")
        raise ConfigError(f"{given} is set but {missing} is not: expected both (a PEM certificate chain and its key)")
    if s.device_auth != "off" and not s.device_credentials_file:
        raise ConfigError(
            f"DEVICE_AUTH={s.device_auth!r} is not allowed without DEVICE_CREDENTIALS_FILE: "
            "expected a path to the device credentials file")


def load_settings(environ: Mapping[str, str] | None = None,
                  env_file: str | os.PathLike[str] | None = ".env") -> Settings:
    """Build the settings from ``environ`` (default: the process environment) over ``env_file``."""
    source: dict[str, str] = {}
    if env_file is not None and Path(env_file).is_file():
        source.update(read_env_file(env_file))
    source.update(os.environ if environ is None else environ)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(Settings):
        raw = source.get(f.name.upper())
        if raw is not None:
            values[f.name] = _convert(f.name, raw, f.metadata["spec"])
    settings = Settings(**values)
    _check_cross_field(settings)
    return settings


def replace(settings: Settings, **changes: Any) -> Settings:
    """A copy of ``settings`` with some fields changed (tests and embedded servers use it)."""
    return dataclasses.replace(settings, **changes)

