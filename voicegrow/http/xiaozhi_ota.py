"""``POST /xiaozhi/ota/``: the check-version call a xiaozhi-esp32 board makes before anything else.

A board flashed with stock firmware asks its ``ota_url`` for a JSON answer (``Ota::CheckVersion``):
``websocket`` (stored as the board's WebSocket settings — without it the firmware falls back to
MQTT), ``server_time`` (its clock) and optionally ``firmware`` (an upgrade) and ``activation``.
Pointing the board's OTA URL at ``http://HOST:8000/xiaozhi/ota/`` is therefore all it takes for it to
find VoiceGrow's speaker port. No firmware is offered unless ``XIAOZHI_FIRMWARE_VERSION`` and
``XIAOZHI_FIRMWARE_URL`` are set, and no activation is ever asked for. docs/xiaozhi.md §OTA.

The endpoint is public (a board has no admin credential); it hands out ``XIAOZHI_TOKEN``, so with a
token configured, ``XIAOZHI_ALLOWLIST`` is what keeps strangers out.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint, Response, jsonify, request

from voicegrow.protocol.xiaozhi import DEFAULT_PATH
from voicegrow.services import Services
from voicegrow.settings import Settings

__all__ = ["OTA_PATHS", "make_ota_blueprint", "ota_answer", "public_ws_url"]

OTA_PATH = "/xiaozhi/ota/"
#: Public paths (no admin credential): the firmware calls the URL as configured, with or without the slash.
OTA_PATHS = frozenset({OTA_PATH, OTA_PATH.rstrip("/")})
_MAX_ID_CHARS = 64


def public_ws_url(settings: Settings, request_host: str, ws_port: int, tls: bool) -> str:
    """``XIAOZHI_WS_URL``, else the host the board reached us by, on the speaker port."""
    if settings.xiaozhi_ws_url:
        return settings.xiaozhi_ws_url
    hostname = urlsplit(f"//{request_host}").hostname or "127.0.0.1"
    host = f"[{hostname}]" if ":" in hostname else hostname
    return f"{'wss' if tls else 'ws'}://{host}:{ws_port}{DEFAULT_PATH}"


def ota_answer(settings: Settings, *, ws_url: str, device_version: str | None, now: float) -> dict[str, Any]:
    """The JSON the firmware's ``Ota::CheckVersion`` parses (field by field in docs/xiaozhi.md)."""
    offset = datetime.datetime.fromtimestamp(now).astimezone().utcoffset() or datetime.timedelta()
    answer: dict[str, Any] = {
        "server_time": {"timestamp": int(now * 1000), "timezone_offset": int(offset.total_seconds() // 60)},
        "websocket": {"url": ws_url, "token": settings.xiaozhi_token},
    }
    if settings.xiaozhi_firmware_version:
        answer["firmware"] = {"version": settings.xiaozhi_firmware_version, "url": settings.xiaozhi_firmware_url}
    elif device_version:
        answer["firmware"] = {"version": device_version, "url": ""}  # "up to date": nothing to download
    return answer


def _device_version(body: Mapping[str, Any]) -> str | None:
    application = body.get("application")
    version = application.get("version") if isinstance(application, dict) else None
    return version[:_MAX_ID_CHARS] if isinstance(version, str) else None


def _error(status: int, error: str, reason: str) -> Response:
    response = jsonify({"error": error, "reason": reason})
    response.status_code = status
    return response


def make_ota_blueprint(services: Services) -> Blueprint:
    settings = services.settings
    blueprint = Blueprint("xiaozhi_ota", __name__)
    allowlist = frozenset(p.strip().lower() for p in settings.xiaozhi_allowlist.split(",") if p.strip())

    @blueprint.route(OTA_PATH, methods=["GET", "POST"], strict_slashes=False)
    async def check_version() -> Response:
        device_id = (request.headers.get("Device-Id") or "").strip()
        client_id = (request.headers.get("Client-Id") or "").strip()
        if not device_id or len(device_id) > _MAX_ID_CHARS or len(client_id) > _MAX_ID_CHARS:
            return _error(400, "device_id_required", f"a Device-Id header of 1 to {_MAX_ID_CHARS} characters "
                                                     "is required (the board's MAC address)")
        host = request.remote_addr or ""
        if allowlist and not ({device_id.lower(), client_id.lower(), host.lower()} & allowlist):
            services.metrics.auth_refusals.labels("xiaozhi_ota", "not_allowlisted").inc()
            return _error(403, "not_allowlisted", "this board is not in XIAOZHI_ALLOWLIST")
        body: Any = {}
        raw = await request.get_data()
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as exc:
                return _error(400, "invalid_json", f"the body is not JSON: {str(exc)[:120]}")
        if not isinstance(body, dict):
            return _error(400, "invalid_json", "the body must be a JSON object (the board's system info)")
        ws_url = public_ws_url(settings, request.host, services.ws_port or settings.ws_port,
                               getattr(services, "tls", None) is not None)
        return jsonify(ota_answer(settings, ws_url=ws_url, device_version=_device_version(body), now=time.time()))

    return blueprint
