"""Routes of the console and the talk page, and the talk page's WebSocket into the session machinery.

The pages and their static files are public (a browser cannot send a bearer token when it navigates);
everything they show comes from the JSON API, which the application guards with ``ADMIN_TOKEN``. The
WebSocket ``/api/v1/talk`` carries the native protocol (docs/protocol.md) unchanged and is served by
the same :class:`~voicegrow.streaming.server.VoiceServer` as port ``WS_PORT``: admission limits, the
registry, the pipeline and the records are those of any device. Browsers cannot put headers on a
WebSocket, so the admin token travels as a subprotocol ``voicegrow.bearer.<base64url(token)>`` (never
in the URL); without it, the device credential of HELLO is checked as on the speaker port.
"""

from __future__ import annotations

import base64
import binascii
import logging
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from quart import Blueprint, Response, jsonify, request, send_from_directory, websocket
from trio_websocket import CloseReason, ConnectionClosed

from voicegrow import __version__
from voicegrow.admin_auth import PROXY_HEADERS
from voicegrow.auth_throttle import parse_address
from voicegrow.forwarded import header_map
from voicegrow.services import Services

__all__ = ["make_web_blueprint", "is_public_path", "TALK_SUBPROTOCOL", "BEARER_SUBPROTOCOL_PREFIX"]

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TALK_SUBPROTOCOL = "voicegrow.native.v1"
BEARER_SUBPROTOCOL_PREFIX = "voicegrow.bearer."
_PAGES = {"/": "console.html", "/talk": "talk.html"}
_PUBLIC_API = frozenset({"/api/v1/web/config"})

def is_public_path(path: str) -> bool:
    """The pages, their static files and the page configuration: no bearer token needed to fetch them."""
    return path in _PAGES or path in _PUBLIC_API or path.startswith("/static/")


def bearer_from_subprotocols(offered: list[str]) -> str | None:
    """The admin token a browser offered as ``voicegrow.bearer.<base64url>``, or None."""
    for name in offered:
        if name.startswith(BEARER_SUBPROTOCOL_PREFIX):
            raw = name[len(BEARER_SUBPROTOCOL_PREFIX):]
            try:
                padded = (raw + "=" * (-len(raw) % 4)).encode("ascii")
                return base64.b64decode(padded, altchars=b"-_", validate=True).decode("utf-8")
            except (binascii.Error, UnicodeError, ValueError):
                return None
    return None


def _same_origin(origin: str | None, host: str, allowed: set[str]) -> bool:
    """A page of another site must not drive the talk socket with the operator's credentials."""
    if not origin:
        return True  # not a browser: it authenticates like any device
    return origin in allowed or urlsplit(origin).netloc == host


class BrowserSocket:
    """Quart's WebSocket with the surface the session drivers use from trio-websocket's connection."""

    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.closed: CloseReason | None = None

    async def get_message(self) -> bytes | str:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        message = await self._ws.receive()
        return b"" if message is None else message  # quart-trio hands an empty binary message as None

    async def send_message(self, message: bytes | str) -> None:
        if self.closed is not None:
            raise ConnectionClosed(self.closed)
        try:
            await self._ws.send(message)
        except Exception as exc:  # the ASGI server refuses to send on a dead socket
            self.closed = CloseReason(1006, f"send failed: {type(exc).__name__}")
            raise ConnectionClosed(self.closed) from exc

    async def aclose(self, code: int = 1000, reason: str | None = None) -> None:
        if self.closed is not None:
            return
        self.closed = CloseReason(code, reason)
        try:
            await self._ws.close(code, reason or "")
        except Exception:  # the peer is already gone
            log.debug("closing the talk socket failed", exc_info=True)


def make_web_blueprint(services: Services, *, voice_server: Any = None) -> Blueprint:
    """The pages, their files, ``/api/v1/web/config`` and the talk socket (when ``voice_server`` is given).

    The application adds the security headers and the pages' Content-Security-Policy (``http_api``).
    """
    bp = Blueprint("web", __name__)
    settings = services.settings
    allowed_origins = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}

    async def shipped(name: str) -> Response:
        response = await send_from_directory(STATIC_DIR, name)  # refuses paths outside the directory
        response.headers["Cache-Control"] = "no-cache"  # revalidate: a new release's files come at once
        return response

    @bp.get("/")
    async def console() -> Response:
        return await shipped("console.html")

    @bp.get("/talk")
    async def talk() -> Response:
        return await shipped("talk.html")

    @bp.get("/static/<path:name>")
    async def static_file(name: str) -> Response:
        return await shipped(name)

    @bp.get("/api/v1/web/config")
    async def web_config() -> Response:
        """What the pages need before sign-in: whether this client must give the admin token, and how
        devices authenticate."""
        skip = services.admin_auth.allowed_without_token(parse_address(request.remote_addr), _proxied(request.headers))
        return jsonify({"admin_token_required": not skip, "device_auth": settings.device_auth,
                        "version": __version__, "talk_subprotocol": TALK_SUBPROTOCOL})

    if voice_server is not None:
        @bp.websocket("/api/v1/talk")
        async def talk_socket() -> Response | None:
            peer = websocket.remote_addr or "unknown"
            client = services.proxies.resolve(peer, header_map(websocket.headers.items()))
            if client.ignored:
                services.metrics.forwarded_ignored.labels("http").inc()
            host = client.host  # behind a TRUSTED_PROXIES proxy, the browser's own address
            remote_addr = host if client.proxy else f"{host}:{(websocket.scope.get('client') or (host, ''))[1]}"
            if TALK_SUBPROTOCOL not in websocket.requested_subprotocols:
                return _refusal(400, "bad_subprotocol", f"offer the subprotocol {TALK_SUBPROTOCOL}")
            if not _same_origin(websocket.headers.get("Origin"), websocket.host, allowed_origins):
                return _refusal(403, "foreign_origin", "the talk socket serves pages of this server only")
            operator = _operator(services.admin_auth)
            if isinstance(operator, Response):
                return operator
            refusal = voice_server.admit(host)
            if refusal is not None:
                response = _refusal(*refusal)
                if refusal[0] == 503:  # full, overloaded or stopping: try again later (or elsewhere)
                    response.headers["Retry-After"] = str(services.settings.admit_retry_after_s)
                return response
            await websocket.accept(subprotocol=TALK_SUBPROTOCOL)
            # Not the operator: a device credential in HELLO, as on the speaker port (ERROR AUTH_REQUIRED,
            # close 4401, after HELLO when DEVICE_AUTH is off).
            socket = BrowserSocket(websocket._get_current_object())
            await voice_server.serve_native(socket, remote_addr, operator=operator, remote_host=host,
                                            via_proxy=client.proxy)
            return None

    return bp


def _operator(auth: Any) -> bool | Response:
    """Whether the talk socket's peer is the operator, by the application's one admin check
    (:class:`~voicegrow.admin_auth.AdminAuth`); a refusal to answer when its address is throttled."""
    token = bearer_from_subprotocols(websocket.requested_subprotocols)
    header = websocket.headers.get("Authorization") or (f"Bearer {token}" if token is not None else None)
    proxied = _proxied(websocket.headers)
    if header is None:  # no credential offered: the operator only from ADMIN_ALLOW_FROM
        return auth.allowed_without_token(parse_address(websocket.remote_addr), proxied)
    denied = auth.check(websocket.remote_addr, header, proxied=proxied)
    if denied is not None and denied.status == 429:  # wrong guesses: no device session either
        response = _refusal(429, denied.error, denied.reason)
        response.headers["Retry-After"] = str(denied.retry_after_s)
        return response
    return denied is None


def _proxied(headers: Any) -> bool:
    return any(name in headers for name in PROXY_HEADERS)


def _refusal(status: int, error: str, reason: str) -> Response:
    response = jsonify({"error": error, "reason": reason})
    response.status_code = status
    return response
