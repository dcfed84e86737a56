"""The data part of the admin HTTP API: devices, conversations (turns) with their audio and tool calls,
timers and alarms, and erasure.

A Quart blueprint over :class:`~voicegrow.storage.Persistence`; the application registers it and checks
``ADMIN_TOKEN`` for every route, this module does no authentication. Every error is JSON
``{"error": code, "reason": text}``: 400 for bad input, 404 for unknown ids, 503 when the record store
cannot answer. Listings are newest first with an opaque ``cursor``; ``since`` takes ISO-8601 or unix
seconds; ``q`` keeps the conversations whose transcript or reply contains it (the console's search). With the local audio directory (no S3), audio URLs point at ``/api/v1/audio/<key>``, served here.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timezone
from typing import Any

from quart import Blueprint, Response, request

from voicegrow.storage import BackendUnavailable, InvalidCursor, InvalidKey, Persistence, SpoolError
from voicegrow.storage.blobs import check_key

__all__ = ["make_data_blueprint", "make_listen_mode_blueprint", "parse_since", "MAX_LIMIT"]

log = logging.getLogger(__name__)

MAX_LIMIT = 200
DEFAULT_LIMIT = 50
_MAX_ID = 128
_MAX_KEY_BYTES = 1024
_MAX_KEY_PART_BYTES = 255
_MAX_SEARCH_CHARS = 200

JsonResponse = tuple[dict[str, Any], int]


class BadRequest(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


def _error(status: int, code: str, reason: str) -> JsonResponse:
    return {"error": code, "reason": reason}, status


def parse_since(raw: str) -> float:
    """Unix seconds from ``raw``: a number of seconds, or an ISO-8601 time (naive times are UTC)."""
    text = raw.strip()
    try:
        value = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise BadRequest("invalid_since", f"since={raw[:40]!r}: expected ISO-8601 or unix seconds") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=timezone.utc)
        value = moment.timestamp()
    if not math.isfinite(value) or value < 0:
        raise BadRequest("invalid_since", f"since={raw[:40]!r}: expected a time after 1970")
    return value


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return DEFAULT_LIMIT
    # isdigit() alone admits '²' and other digits int() refuses, and int() refuses over 4300 digits.
    if not (raw.isascii() and raw.isdigit() and len(raw) <= 9) or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest("invalid_limit", f"limit={raw[:20]!r}: expected an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _identifier(name: str, raw: str | None, *, required: bool) -> str | None:
    if raw is None or raw == "":
        if required:
            raise BadRequest(f"invalid_{name}", f"{name} is required")
        return None
    if len(raw) > _MAX_ID or not raw.isprintable():
        raise BadRequest(f"invalid_{name}", f"{name}: expected up to {_MAX_ID} printable characters")
    return raw


def _search_text(raw: str | None) -> str | None:
    if raw is None or raw.strip() == "":
        return None
    if len(raw) > _MAX_SEARCH_CHARS or not raw.isprintable():
        raise BadRequest("invalid_q", f"q: expected up to {_MAX_SEARCH_CHARS} printable characters")
    return raw.strip()


def _check_audio_key(key: str) -> None:
    """``check_key`` plus the file system's name limits, which a key we wrote never reaches: a longer
    one is the client's mistake (400), not the audio store failing (ENAMETOOLONG)."""
    check_key(key)
    if len(key.encode("utf-8", "surrogatepass")) > _MAX_KEY_BYTES or any(
            len(part.encode("utf-8", "surrogatepass")) > _MAX_KEY_PART_BYTES for part in key.split("/")):
        raise InvalidKey(f"object key {key[:80]!r}... is longer than any audio key")


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds")


def make_data_blueprint(persistence: Persistence, *, timers: Any = None) -> Blueprint:
    """``timers``: the timer book (voicegrow.tools.timers.TimerBook), told when a device is erased."""
    bp = Blueprint("data", __name__)

    def present_turn(turn: dict[str, Any]) -> dict[str, Any]:
        return {**turn, "started_at_iso": _iso(turn["started_at"]),
                "audio_in_url": persistence.presigned_url(turn["audio_in_key"]),
                "audio_out_url": persistence.presigned_url(turn["audio_out_key"])}

    @bp.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> JsonResponse:
        return _error(400, exc.code, exc.reason)

    @bp.errorhandler(InvalidCursor)
    async def bad_cursor(exc: InvalidCursor) -> JsonResponse:
        return _error(400, exc.code, str(exc))

    # Storage errors name hosts, directories and errno texts: they go to the log, not to the client.
    @bp.errorhandler(BackendUnavailable)
    async def unavailable(exc: BackendUnavailable) -> JsonResponse:
        log.warning("admin API: storage unavailable: %s", exc)
        return _error(503, "storage_unavailable", "the record or audio store cannot answer now; see the server log")

    @bp.errorhandler(SpoolError)
    async def spool_failed(exc: SpoolError) -> JsonResponse:
        log.error("admin API: spool failure: %s", exc)
        return _error(503, exc.code, "the server cannot keep records now; see the server log")

    @bp.get("/api/v1/devices")
    async def list_devices() -> JsonResponse:
        args = request.args
        page = await persistence.list_devices(limit=_limit(args.get("limit")), cursor=args.get("cursor") or None)
        devices = [{**d, "first_seen_at_iso": _iso(d["first_seen_at"]), "last_seen_at_iso": _iso(d["last_seen_at"])}
                   for d in page.items]
        return {"devices": devices, "next_cursor": page.next_cursor}, 200

    @bp.get("/api/v1/conversations")
    async def list_conversations() -> JsonResponse:
        args = request.args
        since = args.get("since")
        page = await persistence.list_turns(
            device_id=_identifier("device_id", args.get("device_id"), required=False),
            since=parse_since(since) if since else None,
            limit=_limit(args.get("limit")), cursor=args.get("cursor") or None,
            text=_search_text(args.get("q")))
        return {"turns": [present_turn(t) for t in page.items], "next_cursor": page.next_cursor}, 200

    @bp.get("/api/v1/conversations/<turn_id>")
    async def get_conversation(turn_id: str) -> JsonResponse:
        _identifier("turn_id", turn_id, required=True)
        turn = await persistence.get_turn(turn_id)
        if turn is None:
            return _error(404, "not_found", f"no turn {turn_id!r}")
        return present_turn(turn), 200

    @bp.get("/api/v1/devices/<device_id>/timers")
    async def list_timers(device_id: str) -> JsonResponse:
        _identifier("device_id", device_id, required=True)
        items = await persistence.list_timers(device_id, limit=_limit(request.args.get("limit")))
        return {"device_id": device_id, "timers": [
            {**t, "due_at_iso": _iso(t["due_at"]), "fired_at_iso": _iso(t["fired_at"])} for t in items]}, 200

    @bp.delete("/api/v1/devices/<device_id>/data")
    async def delete_device_data(device_id: str) -> JsonResponse:
        _identifier("device_id", device_id, required=True)
        if timers is not None:
            timers.forget_device(device_id)  # no reminder of an erased device fires any more
        report = await persistence.delete_device_data(device_id)
        counted = ("turns", "sessions", "events", "timers", "devices", "audio_objects", "history_keys")
        if not report["pending"] and not report["failed"] and not any(report[k] for k in counted):
            return _error(404, "not_found", f"no data for device {device_id!r}")
        return report, 202 if report["pending"] else 200

    @bp.get("/api/v1/audio/<path:key>")
    async def local_audio(key: str) -> Response | JsonResponse:
        if not persistence.audio_is_local:
            return _error(404, "not_found", "audio is served by the object store (use the presigned URL)")
        try:
            _check_audio_key(key)
        except InvalidKey as exc:
            return _error(400, exc.code, str(exc))
        data = await persistence.read_audio(key)
        if data is None:
            return _error(404, "not_found", f"no audio object {key!r}")
        return Response(data, status=200, mimetype="audio/wav")

    return bp


_LISTEN_MODES = ("wake", "always", "push_to_talk")


def make_listen_mode_blueprint(persistence: Persistence, live: Any) -> Blueprint:
    """``/api/v1/devices/<id>/listen-mode``: an operator's listening mode for one device.

    Stored with the device's record (so it holds across reconnects, restarts and replicas) and applied
    at once to the device's live sessions wherever ``live`` (the session view: this process, the box's
    workers, the cluster) reaches them. It wins over ``LISTEN_MODE_DEVICES``, the hello and
    ``LISTEN_MODE``; DELETE gives the device back to them. Written directly, not spooled: the answer
    says the mode is stored, or 503.
    """
    bp = Blueprint("listen_mode", __name__)

    @bp.errorhandler(BadRequest)
    async def bad_request(exc: BadRequest) -> JsonResponse:
        return _error(400, exc.code, exc.reason)

    @bp.errorhandler(BackendUnavailable)
    async def unavailable(exc: BackendUnavailable) -> JsonResponse:
        log.warning("admin API: storage unavailable: %s", exc)
        return _error(503, "storage_unavailable", "the record store cannot answer now; see the server log")

    async def live_modes(device_id: str) -> list[dict[str, Any]]:
        items, _missing = await live.sessions()
        return [{"session_id": s.get("session_id"), "listen_mode": s.get("listen_mode")}
                for s in items if s.get("device_id") == device_id]

    @bp.get("/api/v1/devices/<device_id>/listen-mode")
    async def get_listen_mode(device_id: str) -> JsonResponse:
        _identifier("device_id", device_id, required=True)
        return {"device_id": device_id, "override": await persistence.listen_mode(device_id),
                "sessions": await live_modes(device_id)}, 200

    @bp.put("/api/v1/devices/<device_id>/listen-mode")
    async def put_listen_mode(device_id: str) -> JsonResponse:
        _identifier("device_id", device_id, required=True)
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict):
            raise BadRequest("invalid_json", 'expected a JSON object such as {"mode": "wake"}')
        mode = body.get("mode")
        if not isinstance(mode, str) or mode not in _LISTEN_MODES:
            raise BadRequest("invalid_mode", f"mode: expected one of {', '.join(_LISTEN_MODES)}, got {str(mode)[:40]!r}")
        if set(body) - {"mode"}:
            raise BadRequest("invalid_json", f"unknown fields: {', '.join(sorted(str(k)[:40] for k in set(body) - {'mode'}))}")
        if not await persistence.set_listen_mode(device_id, mode):
            return _error(404, "not_found", f"no device {device_id!r} (a device is known once it has connected)")
        applied = await live.set_listen_mode(device_id, mode)
        return {"device_id": device_id, "override": mode, "applied_to": applied}, 200

    @bp.delete("/api/v1/devices/<device_id>/listen-mode")
    async def delete_listen_mode(device_id: str) -> JsonResponse:
        _identifier("device_id", device_id, required=True)
        if await persistence.listen_mode(device_id) is None:
            return _error(404, "not_found", f"no listening mode set for device {device_id!r}")
        await persistence.set_listen_mode(device_id, None)
        applied = await live.set_listen_mode(device_id, None)
        return {"device_id": device_id, "override": None, "applied_to": applied}, 200

    return bp
