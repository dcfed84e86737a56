"""The HTTP API on ``HTTP_PORT``: health, live sessions, Prometheus metrics, and the admin endpoints.

Runs on hypercorn's trio worker inside the server's own trio run, so handlers read the live session
registry and metrics directly. Every error is a JSON body with a reason; no HTML stack trace ever
leaves the process.
"""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from voicegrow import __version__
from voicegrow.admin_auth import PROXY_HEADERS, AdminAuth, Refusal
from voicegrow.forwarded import ClientAddress, TrustedProxies, header_map
from voicegrow.memprofile import memory_report, release_memory
from voicegrow.metrics import CONTENT_TYPE_LATEST
from voicegrow.services import Services
from voicegrow.http.web import is_public_path, make_web_blueprint

__all__ = ["create_app", "run_http_server"]

log = logging.getLogger(__name__)

_PUBLIC_PATHS = frozenset({"/api/v1/health"})
_STATUS_RANK = {"ok": 0, "embedded": 0, "disabled": 0, "degraded": 1, "down": 2}


def _error(status: int, error: str, reason: str) -> Response:
    response = jsonify({"error": error, "reason": reason})
    response.status_code = status
    return response


async def _body_over(limit: int) -> bool:
    """Whether the request body exceeds ``limit``: by its Content-Length, or, for a chunked body
    (no length), once it has been read up to the limit (Quart keeps no more than that)."""
    if request.content_length is not None:
        return request.content_length > limit
    if not request.headers.get("Transfer-Encoding"):
        return False
    try:
        await request.get_data()
    except RequestEntityTooLarge:
        return True
    return False


def _request_class(body_limits: dict[str, int]) -> type:
    """Quart fixes a request's body limit when it builds the request (``MAX_CONTENT_LENGTH``); the
    paths in ``body_limits`` (audio uploads) get theirs instead, every other path keeps the small one."""
    from quart_trio.wrappers import TrioRequest

    class LimitedRequest(TrioRequest):
        def __init__(self, method: str, scheme: str, path: str, *args: Any,
                     max_content_length: int | None = None, **kwargs: Any) -> None:
            super().__init__(method, scheme, path, *args,
                             max_content_length=body_limits.get(path, max_content_length), **kwargs)
            if path in body_limits:  # the form parser reads this one
                self.max_content_length = body_limits[path]

    return LimitedRequest


def request_client(proxies: TrustedProxies | None = None) -> ClientAddress:
    """The current request's client: the socket's peer, or behind a ``TRUSTED_PROXIES`` proxy the
    address it forwarded. From any other peer forwarding headers change nothing."""
    peer = request.remote_addr or ""
    headers = header_map(request.headers.items())
    if proxies is None:
        return ClientAddress(peer, ignored=bool(headers))
    return proxies.resolve(peer, headers)


def admin_refusal(auth: AdminAuth, client: ClientAddress | None = None) -> Response | None:
    """The admin credential check for the current request: None to go on, else the JSON 401 or 429.

    Every route that is not public goes through this one function (the console's API too), so the rule
    (bearer token, ``ADMIN_ALLOW_FROM``, throttling) lives in :class:`~voicegrow.admin_auth.AdminAuth` only.
    Behind a trusted proxy the forwarded client is the one checked and throttled; a request that carries
    forwarding headers from anyone else never gets the address bypass.
    """
    refusal = admin_check(auth, client or request_client())
    if refusal is None:
        return None
    response = _error(refusal.status, refusal.error, refusal.reason)
    if refusal.status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="voicegrow"'
    if refusal.retry_after_s is not None:
        response.headers["Retry-After"] = str(refusal.retry_after_s)
    return response


def admin_check(auth: AdminAuth, client: ClientAddress) -> Refusal | None:
    """The admin rule for the current request as a :class:`Refusal` (the audio API words its own answer)."""
    headers = request.headers
    proxied = client.proxy is None and any(name in headers for name in PROXY_HEADERS)
    return auth.check(client.host, headers.get("Authorization"), proxied=proxied)


_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789.-:")  # urlsplit lower-cases the name


def html_csp(host: str, ws_port: int, media_origins: tuple[str, ...] = ()) -> str:
    """The Content-Security-Policy of every HTML page: scripts and styles from this server only (no inline
    code), no framing, WebSocket connections to this host's speaker port besides this origin, and audio
    from this origin, ``blob:`` URLs or ``media_origins`` (the object store's presigned URLs)."""
    connect = "'self'"
    try:
        hostname = urlsplit(f"//{host}").hostname or ""
    except ValueError:
        hostname = ""
    if hostname and set(hostname) <= _HOST_CHARS and ws_port:
        if ":" in hostname:
            hostname = f"[{hostname}]"
        connect += f" ws://{hostname}:{ws_port} wss://{hostname}:{ws_port}"
    media = " ".join(("'self'", "blob:", *media_origins))
    return ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            f"media-src {media}; worker-src 'self' blob:; connect-src {connect}; object-src 'none'; "
            "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


def overall_status(accepting: bool, components: dict[str, dict[str, Any]]) -> str:
    """``down`` when no session can be taken, ``degraded`` when any dependency is not ok."""
    if not accepting:
        return "down"
    worst = max((_STATUS_RANK.get(c.get("status", "down"), 2) for c in components.values()), default=0)
    # The server still takes sessions when a dependency is down: spool, apology, offline engines.
    return "ok" if worst == 0 else "degraded"


def create_app(services: Services, *, voice_server: Any = None) -> QuartTrio:
    """The application; ``voice_server`` (the speaker port's server) also serves the talk page's socket."""
    settings = services.settings
    app = QuartTrio("voicegrow", static_folder=None)  # the pages serve their own files (voicegrow.http.web)
    app.config["MAX_CONTENT_LENGTH"] = settings.http_max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    # Werkzeug answers '//' in a path with an HTML redirect; here it reaches the route (and its JSON 400).
    app.url_map.merge_slashes = False
    cors_origins = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}
    from voicegrow.http.audio_api import AUDIO_PATHS, TRANSCRIPTION_PATH, make_audio_blueprint
    from voicegrow.http.xiaozhi_ota import OTA_PATHS, make_ota_blueprint

    # The audio API checks its own credentials (API_KEYS or the admin rule) and words its errors as OpenAI.
    public_paths = (_PUBLIC_PATHS | OTA_PATHS | AUDIO_PATHS
                    | ({"/metrics"} if settings.metrics_public else set()))
    body_limits = {TRANSCRIPTION_PATH: settings.audio_max_upload_bytes}
    app.request_class = _request_class(body_limits)
    media_origins = ((f"{'https' if settings.minio_secure else 'http'}://{settings.minio_endpoint}",)
                     if settings.minio_endpoint else ())

    @app.before_request
    async def refuse_large_bodies() -> Response | None:
        limit = body_limits.get(request.path, settings.http_max_body_bytes)
        if not await _body_over(limit):
            return None
        if request.path in body_limits:
            from voicegrow.http.audio_api import ApiError

            response = ApiError(413, f"request body over {limit} bytes (AUDIO_MAX_UPLOAD_BYTES)",
                                param="file", code="file_too_large").response()
        else:
            response = _error(413, "request_too_large",
                              f"request body over {settings.http_max_body_bytes} bytes (HTTP_MAX_BODY_BYTES)")
        response.headers["Connection"] = "close"  # the rest of the body is never read: no reuse
        return response

    @app.before_request
    async def check_admin_credential() -> Response | None:
        if request.path in public_paths or is_public_path(request.path):
            return None
        client = request_client(services.proxies)
        if client.ignored:
            services.metrics.forwarded_ignored.labels("http").inc()
        return admin_refusal(services.admin_auth, client)

    @app.after_request
    async def security_headers(response: Response) -> Response:
        headers = response.headers
        headers.setdefault("X-Content-Type-Options", "nosniff")
        headers.setdefault("Referrer-Policy", "no-referrer")
        headers.setdefault("X-Frame-Options", "DENY")
        # Recordings, transcripts and admin JSON must not linger in browser or proxy caches.
        headers.setdefault("Cache-Control", "no-store")
        if (response.mimetype or "") == "text/html":
            headers.setdefault("Content-Security-Policy", html_csp(request.host, settings.ws_port, media_origins))
        origin = request.headers.get("Origin")
        if origin and origin in cors_origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        return response

    @app.errorhandler(HTTPException)
    async def http_error(exc: HTTPException) -> Response:
        name = (exc.name or "error").lower().replace(" ", "_")
        return _error(exc.code or 500, name, exc.description or name)

    @app.errorhandler(Exception)
    async def unexpected_error(exc: Exception) -> Response:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal_error", "the server failed to handle this request; see its log")

    @app.get("/api/v1/health")
    async def health() -> Response:
        if not services.accepting:
            return _error(503, "shutting_down", "the server is stopping and takes no new sessions")
        return jsonify({"status": "ok"})

    @app.get("/api/v1/health/detail")
    async def health_detail() -> Response:
        components = await services.component_health()
        workers = await services.live.workers()
        status = overall_status(services.accepting, components)
        if status == "ok" and any(w["status"] != "ok" for w in workers):
            status = "degraded"  # a worker is restarting: its share of new speakers waits for it
        return jsonify({
            "status": status,
            "version": __version__,
            "uptime_s": round(services.uptime_s, 3),
            "sessions": sum(w.get("sessions", 0) for w in workers),
            "components": components,
            "workers": workers,
        })

    @app.get("/api/v1/sessions")
    async def sessions() -> Response:
        items, missing = await services.live.sessions()
        items.sort(key=lambda s: s["since"])
        return jsonify({"sessions": items, "count": len(items), "workers_missing": missing})

    @app.delete("/api/v1/sessions/<session_id>")
    async def close_session(session_id: str) -> Response:
        if len(session_id) > 64 or not session_id.isprintable():
            return _error(400, "invalid_session_id", "session_id: expected up to 64 printable characters")
        if not await services.live.close_session(session_id):
            return _error(404, "not_found", f"no live session {session_id!r}")
        response = jsonify({"session_id": session_id, "closing": True})
        response.status_code = 202
        return response

    @app.get("/metrics")
    async def metrics() -> Response:
        services.refresh_gauges()
        return Response(services.metrics.render(), content_type=CONTENT_TYPE_LATEST)

    # The memory report names source files and lines: admin only, as every path but health is.
    @app.get("/api/v1/debug/memory")
    async def memory_growth() -> Response:
        group_by = request.args.get("group_by", "lineno")
        raw_limit = request.args.get("limit", "20")
        if group_by not in ("lineno", "traceback"):
            return _error(400, "invalid_group_by", "group_by: expected lineno or traceback")
        if not (raw_limit.isascii() and raw_limit.isdigit() and int(raw_limit[:4]) <= 200):
            return _error(400, "invalid_limit", "limit: expected an integer from 0 (no growth sites) to 200")
        # A snapshot of a big heap takes a while: in a thread, so that audio keeps flowing meanwhile.
        report = await trio.to_thread.run_sync(lambda: memory_report(
            services.memory_tracer, limit=int(raw_limit), group_by=group_by))
        return jsonify(report)

    @app.post("/api/v1/debug/memory/baseline")
    async def memory_baseline() -> Response:
        if services.memory_tracer is None:
            return _error(404, "memory_trace_off", "allocation tracing is off (set MEMORY_TRACE_FRAMES)")
        return jsonify(await trio.to_thread.run_sync(services.memory_tracer.reset_baseline))

    @app.post("/api/v1/debug/memory/release")
    async def memory_release() -> Response:
        return jsonify(release_memory())  # in this thread: the collector must not race the event loop

    from voicegrow.http.admin_api import make_data_blueprint, make_listen_mode_blueprint

    app.register_blueprint(make_data_blueprint(services.persistence, timers=services.timers))
    app.register_blueprint(make_listen_mode_blueprint(services.persistence, services.live))
    app.register_blueprint(make_ota_blueprint(services))
    app.register_blueprint(make_audio_blueprint(services))
    app.register_blueprint(make_web_blueprint(services, voice_server=voice_server))
    return app


async def run_http_server(services: Services, *, shutdown: trio.Event, fd: int | None = None,
                          voice_server: Any = None, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API until ``shutdown`` is set; reports the bound port through ``task_status``.

    ``fd``: an inherited listening socket (a worker's) instead of binding ``HTTP_PORT``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = services.tls.hypercorn_config() if services.tls is not None else Config()
    host = services.settings.server_host
    if fd is not None:
        config.bind = [f"fd://{fd}"]
    else:
        config.bind = [f"[{host}]:{services.settings.http_port}" if ":" in host else
                       f"{host}:{services.settings.http_port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    config.include_server_header = False

    app = create_app(services, voice_server=voice_server)

    async def started(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        port = int(binds[0].rsplit(":", 1)[1])
        task_status.started(port)
