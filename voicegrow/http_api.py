"""The HTTP API on ``HTTP_PORT``: health, live sessions, Prometheus metrics, and the admin endpoints.

Runs on hypercorn's trio worker inside the server's own trio run, so handlers read the live session
registry and metrics directly. Every error is a JSON body with a reason; no HTML stack trace ever
leaves the process.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

import trio
from quart import Response, jsonify, request
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from voicegrow import __version__
from voicegrow.metrics import CONTENT_TYPE_LATEST
from voicegrow.services import Services

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


def overall_status(accepting: bool, components: dict[str, dict[str, Any]]) -> str:
    """``down`` when no session can be taken, ``degraded`` when any dependency is not ok."""
    if not accepting:
        return "down"
    worst = max((_STATUS_RANK.get(c.get("status", "down"), 2) for c in components.values()), default=0)
    # The server still takes sessions when a dependency is down: spool, apology, offline engines.
    return "ok" if worst == 0 else "degraded"


def create_app(services: Services) -> QuartTrio:
    settings = services.settings
    app = QuartTrio("voicegrow")
    app.config["MAX_CONTENT_LENGTH"] = settings.http_max_body_bytes
    app.config["PROPAGATE_EXCEPTIONS"] = False
    # Werkzeug answers '//' in a path with an HTML redirect; here it reaches the route (and its JSON 400).
    app.url_map.merge_slashes = False
    cors_origins = {o.strip() for o in settings.cors_origins.split(",") if o.strip()}

    @app.before_request
    async def refuse_large_bodies() -> Response | None:
        if not await _body_over(settings.http_max_body_bytes):
            return None
        response = _error(413, "request_too_large",
                          f"request body over {settings.http_max_body_bytes} bytes (HTTP_MAX_BODY_BYTES)")
        response.headers["Connection"] = "close"  # the rest of the body is never read: no reuse
        return response

    @app.before_request
    async def check_admin_token() -> Response | None:
        if not settings.admin_token or request.path in _PUBLIC_PATHS:
            return None
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), settings.admin_token.encode()):
            response = _error(401, "unauthorized", "missing or wrong bearer token (ADMIN_TOKEN)")
            response.headers["WWW-Authenticate"] = 'Bearer realm="voicegrow"'
            return response
        return None

    @app.after_request
    async def security_headers(response: Response) -> Response:
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Cache-Control", "no-store")
        origin = request.headers.get("Origin")
        if origin and origin in cors_origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
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
        return jsonify({
            "status": overall_status(services.accepting, components),
            "version": __version__,
            "uptime_s": round(services.uptime_s, 3),
            "sessions": len(services.registry),
            "components": components,
        })

    @app.get("/api/v1/sessions")
    async def sessions() -> Response:
        items = sorted((s.public() for s in services.registry), key=lambda s: s["since"])
        return jsonify({"sessions": items, "count": len(items)})

    @app.get("/metrics")
    async def metrics() -> Response:
        m = services.metrics
        m.uptime.set(services.uptime_s)
        m.up.set(1 if services.accepting else 0)
        counts = services.registry.count_by_protocol()
        for protocol in ("native", "xiaoai", "detecting"):
            m.sessions_active.labels(protocol).set(counts.get(protocol, 0))
        return Response(m.render(), content_type=CONTENT_TYPE_LATEST)

    from voicegrow.admin_api import make_data_blueprint

    app.register_blueprint(make_data_blueprint(services.persistence, timers=services.timers))
    return app


async def run_http_server(services: Services, *, shutdown: trio.Event,
                          task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the API until ``shutdown`` is set; reports the bound port through ``task_status``."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    host = services.settings.server_host
    config.bind = [f"[{host}]:{services.settings.http_port}" if ":" in host else
                   f"{host}:{services.settings.http_port}"]
    config.accesslog = None
    config.errorlog = logging.getLogger("hypercorn.error")
    config.graceful_timeout = 2.0
    config.include_server_header = False

    app = create_app(services)

    async def started(task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        await serve(app, config, shutdown_trigger=shutdown.wait, task_status=task_status)

    async with trio.open_nursery() as nursery:
        binds = await nursery.start(started)
        port = int(binds[0].rsplit(":", 1)[1])
        task_status.started(port)
