"""Talking to the LLM/TTS service (DESIGN §4): request signing and the signed streaming call.

The gateway authenticates with a bearer key and, when a secret is configured, an HMAC signature over
the method, path, a timestamp, a nonce and the body hash; the timestamp and nonce let it refuse
replays. Both the LLM client and the TTS client stream a signed POST body under the same deadlines, so
that part lives here too, once, raising the caller's own error class.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import httpx
import trio

__all__ = [
    "AiService",
    "AiServiceError",
    "BodyReader",
    "auth_headers",
    "service_url",
    "signature",
    "verify_signature",
]


def signature(secret_key: str, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    """The hex HMAC-SHA256 of DESIGN §4's canonical string."""
    canonical = "\n".join((method.upper(), path, timestamp, nonce, hashlib.sha256(body).hexdigest()))
    return hmac.new(secret_key.encode("utf-8"), canonical.encode("utf-8"), hashlib.sha256).hexdigest()


def _bare_path(path: str) -> str:
    """The path as signed: no scheme, host or query, so a proxy rewriting those cannot break it."""
    parts = urlsplit(path)
    return parts.path or "/"


def auth_headers(method: str, path: str, body: bytes, api_key: str, secret_key: str, *,
                 now: float | None = None, nonce: str | None = None) -> dict[str, str]:
    """Headers that authenticate one request; none at all without an API key."""
    if not api_key:
        return {}
    headers = {"Authorization": f"Bearer {api_key}"}
    if secret_key:
        timestamp = str(int(time.time() if now is None else now))
        nonce = secrets.token_hex(16) if nonce is None else nonce
        headers["X-Timestamp"] = timestamp
        headers["X-Nonce"] = nonce
        headers["X-Signature"] = signature(secret_key, method, _bare_path(path), timestamp, nonce, body)
    return headers


def verify_signature(headers: Mapping[str, str], method: str, path: str, body: bytes, api_key: str,
                     secret_key: str, max_skew_s: float = 300, *, now: float | None = None) -> str | None:
    """Why a request fails authentication, or None if it passes (the server side, for the fake).

    ``headers`` must be looked up case-insensitively (httpx.Headers, or a dict with lower-case keys).
    Nonces are not remembered here: replay protection beyond the time window is the gateway's job.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    if api_key:
        if not hmac.compare_digest(lower.get("authorization", ""), f"Bearer {api_key}"):
            return "bad or missing bearer token"
    if not secret_key:
        return None
    timestamp, nonce, given = (lower.get(k, "") for k in ("x-timestamp", "x-nonce", "x-signature"))
    if not (timestamp and nonce and given):
        return "missing X-Timestamp, X-Nonce or X-Signature"
    try:
        stamp = int(timestamp)
    except ValueError:
        return "X-Timestamp is not an integer"
    if abs((time.time() if now is None else now) - stamp) > max_skew_s:
        return "X-Timestamp outside the allowed clock skew"
    expected = signature(secret_key, method, _bare_path(path), timestamp, nonce, body)
    if not hmac.compare_digest(given.lower(), expected):
        return "signature mismatch"
    return None


def service_url(base_url: str, path: str) -> str:
    """``base_url`` + ``path``, tolerating a base that already ends in ``/v1`` (as OpenAI's docs write it)."""
    base = base_url.rstrip("/")
    if base.endswith("/v1") and path.startswith("/v1/"):
        base = base[: -len("/v1")]
    return base + path


class AiServiceError(Exception):
    """A call to the LLM or TTS service failed; ``reason`` is a short code a caller can act on.

    Reasons: ``connect`` (unreachable), ``timeout``, ``http_4xx``, ``http_5xx``, ``bad_stream``
    (the body broke off or could not be parsed), and subclass-specific ones.
    """

    def __init__(self, reason: str, detail: str = "", *, status: int | None = None) -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.status = status


class BodyReader:
    """Reads a streamed response body chunk by chunk, each read bounded by a trio deadline."""

    def __init__(self, response: httpx.Response, deadline: float,
                 error: type[AiServiceError]) -> None:
        self.response = response
        self.deadline = deadline
        self._error = error
        self._chunks = response.aiter_bytes()

    async def read(self, deadline: float | None = None) -> bytes:
        """The next chunk, or ``b""`` at the end of the body.

        ``deadline`` (trio clock) may shorten the overall one, e.g. to bound the gap between tokens.
        """
        limit = self.deadline if deadline is None else min(deadline, self.deadline)
        with trio.move_on_at(limit):
            try:
                return await self._chunks.__anext__()
            except StopAsyncIteration:
                return b""
            except httpx.TimeoutException as exc:
                raise self._error("timeout", f"reading the body: {exc!r}") from exc
            except (httpx.TransportError, httpx.DecodingError) as exc:
                raise self._error("bad_stream", f"body broke off: {exc!r}") from exc
        which = "the overall" if limit == self.deadline else "the caller's"
        raise self._error("timeout", f"no data before {which} deadline")


def _status_reason(status: int) -> str:
    """An unfollowed redirect counts with 4xx: both mean the configuration must change, not the server."""
    return "http_5xx" if status >= 500 else "http_4xx"


class AiService:
    """One configured service (the LLM or the TTS): where it is, its keys, and how long to wait.

    ``connect_timeout_s`` bounds the connection set-up; ``timeout_s`` everything from the call to the
    last byte. The HTTP client is shared when given (one pool per process) and owned otherwise.
    """

    def __init__(self, base_url: str, api_key: str, secret_key: str, timeout_s: float, *,
                 connect_timeout_s: float = 5.0, http_client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.secret_key = secret_key
        self.timeout_s = timeout_s
        self.connect_timeout_s = min(connect_timeout_s, timeout_s)
        self._owns_client = http_client is None
        self.http_client = http_client or httpx.AsyncClient()

    def url(self, path: str) -> str:
        return service_url(self.base_url, path)

    async def aclose(self) -> None:
        """Close the HTTP client if this object created it."""
        if self._owns_client:
            await self.http_client.aclose()

    @asynccontextmanager
    async def post_stream(self, path: str, body: bytes,
                          error: type[AiServiceError]) -> AsyncIterator[BodyReader]:
        """POST ``body`` (JSON) signed, and hand over a reader of the streamed answer.

        A non-2xx answer raises ``error`` with ``http_4xx``/``http_5xx`` and the start of the body as
        detail. Leaving the block closes the response at once, also on cancellation, so a barge-in
        does not leave a generation running on a pooled connection.
        """
        url = self.url(path)
        deadline = trio.current_time() + self.timeout_s
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream, */*"}
        headers.update(auth_headers("POST", url, body, self.api_key, self.secret_key))
        # httpx's own timeouts are a backstop: the deadlines that matter are trio's, around each await.
        request = self.http_client.build_request(
            "POST", url, content=body, headers=headers,
            timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s))
        response: httpx.Response | None = None
        with trio.move_on_at(deadline):
            try:
                response = await self.http_client.send(request, stream=True)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise error("connect", f"{url}: {exc!r}") from exc
            except httpx.TimeoutException as exc:
                raise error("timeout", f"{url}: {exc!r}") from exc
            except httpx.TransportError as exc:
                raise error("connect", f"{url}: {exc!r}") from exc
        if response is None:
            raise error("timeout", f"{url}: no response headers within {self.timeout_s:g} s")
        try:
            if response.status_code >= 300:
                raise error(_status_reason(response.status_code),
                            f"{url}: HTTP {response.status_code} {await _error_text(response, error)}",
                            status=response.status_code)
            yield BodyReader(response, deadline, error)
        finally:
            with trio.CancelScope(shield=True):
                await response.aclose()

    async def health(self, path: str = "/v1/models", timeout_s: float = 3.0) -> dict[str, object]:
        """A probe: GET ``path`` signed, as ``{"status": "ok"|"down", "latency_ms", "url"[, "detail"]}``."""
        url = self.url(path)
        timeout_s = min(timeout_s, self.timeout_s)
        headers = auth_headers("GET", url, b"", self.api_key, self.secret_key)
        started = trio.current_time()
        status, detail = "down", ""
        with trio.move_on_after(timeout_s) as scope:
            try:
                response = await self.http_client.get(url, headers=headers, timeout=timeout_s)
            except httpx.HTTPError as exc:
                detail = f"{type(exc).__name__}: {exc}"
            else:
                if response.is_success:
                    status = "ok"
                else:
                    detail = f"HTTP {response.status_code}"
        if scope.cancelled_caught:
            detail = f"no answer within {timeout_s:g} s"
        latency_ms = math.floor((trio.current_time() - started) * 1000)
        result: dict[str, object] = {"status": status, "latency_ms": latency_ms, "url": url}
        if detail:
            result["detail"] = detail
        return result


async def _error_text(response: httpx.Response, error: type[AiServiceError]) -> str:
    """The start of an error answer's body, for the log; never waits long for it."""
    reader = BodyReader(response, trio.current_time() + 2.0, error)
    detail = b""
    try:
        while len(detail) < 500 and (chunk := await reader.read()):
            detail += chunk
    except AiServiceError:
        pass
    return detail[:500].decode("utf-8", "replace")
