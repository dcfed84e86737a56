"""The HTTP API under hostile input: parameter validation, path traversal, leaks, CORS, sizes,
presigned URLs and the admin token.

Requests go to a whole running server (embedded backends) over loopback, through httpx, or
through a raw HTTP/1.1 client (:func:`raw_request`) where httpx would tidy the request up first
(it removes ``..`` segments from paths).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit

import h11
import httpx
import pytest
import trio

from tests.conftest import make_settings
from tests.service_fixtures import StorageTarget, running
from tests.test_admin_api import make_app
from tests.test_storage_behaviour import PCM_IN, PCM_OUT, delivered, make_turn
from voicegrow.http.admin_api import MAX_LIMIT
from voicegrow.app import ServerHandle, running_server
from voicegrow.audio import wav_bytes
from voicegrow.storage import BackendUnavailable, SpoolError

ADMIN_TOKEN = "s3cret-Token-0123456789"
#: Parameter values meant to break parsers: numbers of every shape, Unicode digits, control and
#: format characters, injections, very long values. Percent-encoded as they go on the wire.
HOSTILE_VALUES = [
    "", " ", "0", "-1", "1.5", "1e3", "1e309", "-0", "00000000000000000000001", "9" * 5000, "0x10",
    "nan", "NaN", "inf", "-inf", "Infinity", "null", "true", "[]", "{}", "²", "٣", "５", "Ⅻ", "1_000",
    "\x00", "\x01", "\n", "\r\nX-Injected: 1", "\t", "\u202e", "\ufeff", "😀", "\U0010ffff", "é" * 200,
    "' OR '1'='1", "1; DROP TABLE turns; --", "%s%s%n", "{{7*7}}", "${jndi:ldap://x}", "../../etc/passwd",
    "x" * 129, "y" * 8000, "2023-02-30", "2023-11-14T25:00:00", "9999-12-31T23:59:59-14:00",
    "0001-01-01T00:00:00+14:00", "-9999999999", "WyJ4Il0", "W10", "WzEsMl0", "!!", "====",
]


def _random_values(seed: int, count: int = 40) -> list[str]:
    """Random strings over ASCII, control characters and a few scripts; reproducible from ``seed``."""
    rng = random.Random(seed)
    alphabet = [chr(c) for c in range(0, 128)] + list("ßéä中文字😀\u0301\u200b\u2028")
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 60))) for _ in range(count)]


def _enc(value: str) -> str:
    return quote(value, safe="")


@pytest.fixture
async def api(tmp_path) -> AsyncIterator[tuple[ServerHandle, httpx.AsyncClient]]:
    async with running_server(make_settings(tmp_path)) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            yield server, http


def assert_json_error(response: httpx.Response, status: int, error: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.request.url, response.status_code, response.text[:300])
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert set(body) == {"error", "reason"} and body["reason"], body
    if error is not None:
        assert body["error"] == error, body
    return body


async def raw_request(port: int, method: str, target: str, headers: list[tuple[str, str | bytes]] = (),
                      body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """One request with the target exactly as given (no normalisation), on its own connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = h11.Connection(h11.CLIENT)
    all_headers = [("Host", f"127.0.0.1:{port}"), ("Connection", "close"), *headers]
    if body:
        all_headers.append(("Content-Length", str(len(body))))
    async with stream:
        await stream.send_all(conn.send(h11.Request(method=method, target=target, headers=all_headers)))
        if body:
            await stream.send_all(conn.send(h11.Data(data=body)))
        await stream.send_all(conn.send(h11.EndOfMessage()))
        status, response_headers, data = 0, {}, b""
        with trio.fail_after(10):
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(await stream.receive_some(65536))
                elif isinstance(event, h11.Response):
                    status = event.status_code
                    response_headers = {k.decode().lower(): v.decode("latin-1") for k, v in event.headers}
                elif isinstance(event, h11.Data):
                    data += event.data
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    return status, response_headers, data


# -- 1. input validation ---------------------------------------------------------------------------

BAD_QUERIES = [
    *((path, f"limit={_enc(v)}", "invalid_limit") for path in ("/api/v1/conversations", "/api/v1/devices")
      for v in ("0", "-1", str(MAX_LIMIT + 1), "abc", "1.5", " 5", "²", "٣", "9" * 5000, "0x10", "1e2")),
    *(("/api/v1/conversations", f"since={_enc(v)}", "invalid_since")
      for v in ("yesterday", "nan", "inf", "-5", "1e309", "2023-02-30", "2023-11-14T25:00:00", "-inf")),
    *(("/api/v1/conversations", f"device_id={_enc(v)}", "invalid_device_id")
      for v in ("x" * 129, "\x00", "a\nb", "\x7f", "tab\there")),
    *((path, f"cursor={_enc(v)}", "invalid_cursor") for path in ("/api/v1/conversations", "/api/v1/devices")
      for v in ("!!", "====", "W10", "WzEsMl0x", "bm90IGpzb24", "WyJ4IiwgMSwgMl0", "😀")),
]


@pytest.mark.parametrize(("path", "query", "error"), BAD_QUERIES)
async def test_bad_query_parameters_are_a_json_400(api, path: str, query: str, error: str) -> None:
    _, http = api
    assert_json_error(await http.get(f"{path}?{query}"), 400, error)


@pytest.mark.parametrize(("method", "template", "error"), [
    ("GET", "/api/v1/conversations/{}", "invalid_turn_id"),
    ("DELETE", "/api/v1/devices/{}/data", "invalid_device_id"),
])
async def test_bad_path_identifiers_are_a_json_400(api, method: str, template: str, error: str) -> None:
    _, http = api
    for value in ("x" * 129, "\x00", "a\nb", "\x1b[31m", "\x7f"):
        assert_json_error(await http.request(method, template.format(_enc(value))), 400, error)


async def test_no_parameter_value_makes_a_500(api) -> None:
    """Every parameter of every endpoint, with hostile and random values: answered, or refused
    with a JSON 400/404, never a 500."""
    server, _ = api
    seed = int(os.environ.get("VOICEGROW_FUZZ_SEED") or time.time())
    targets = [
        *(("GET", f"/api/v1/conversations?{name}={{}}") for name in ("device_id", "since", "limit", "cursor")),
        *(("GET", f"/api/v1/devices?{name}={{}}") for name in ("limit", "cursor")),
        ("GET", "/api/v1/conversations/{}"), ("DELETE", "/api/v1/devices/{}/data"),
        ("GET", "/api/v1/audio/{}"), ("GET", "/api/v1/audio/dev-1/{}.wav"),
    ]
    for value in HOSTILE_VALUES + _random_values(seed):
        for method, template in targets:
            target = template.format(_enc(value))
            status, headers, body = await raw_request(server.http_port, method, target)
            where = f"{method} {target[:120]} (VOICEGROW_FUZZ_SEED={seed})"
            assert status in (200, 400, 404), f"{where}: {status} {body[:200]!r}"
            assert headers["content-type"].startswith("application/json"), where
            if status != 200:
                assert {"error", "reason"} <= set(httpx.Response(status, content=body).json()), where


CRAFTED_CURSORS = {
    "nan": '[NaN,"t"]', "infinity": '[Infinity,"t"]', "overflowing float": '[1e400,"t"]',
    "negative overflow": '[-1e400,"t"]', "integer beyond a double": "[" + "9" * 400 + ',"t"]',
    "lone surrogate": '[1.5,"\\ud800"]', "wrong types": '["t",1.5]', "bool": '[true,"t"]',
    "too many values": '[1.5,"t",3]', "object": '{"a":1}',
}


@pytest.mark.parametrize("name", list(CRAFTED_CURSORS))
async def test_crafted_cursors_are_a_400_on_every_backend(storage_target: StorageTarget, name: str) -> None:
    """Cursors are opaque base64 JSON; one a client made up must be refused, not reach the database."""
    token = base64.urlsafe_b64encode(CRAFTED_CURSORS[name].encode()).decode().rstrip("=")
    async with running(storage_target.persistence()) as p:
        client = make_app(p).test_client()
        response = await client.get(f"/api/v1/conversations?cursor={token}")
        assert response.status_code == 400, (name, response.status_code, (await response.get_data())[:200])
        assert (await response.get_json())["error"] == "invalid_cursor"


# -- 2. path traversal -----------------------------------------------------------------------------

TRAVERSALS = [
    "../secret.txt", "..%2Fsecret.txt", "%2e%2e/secret.txt", "%2E%2E%2Fsecret.txt", "..%5Csecret.txt",
    "dev-1/../../secret.txt", "dev-1/..%2F..%2Fsecret.txt", "dev-1/%2e%2e/%2e%2e/secret.txt",
    "%2Fetc%2Fpasswd", "%2F%2Fetc/passwd", "..%252F..%252Fsecret.txt", "....//secret.txt", ".%2E/secret.txt",
    "secret.txt%00.wav", "%00", ".", "..", "dev-1//x.wav", "dev-1/./x.wav", "%5C%5Cserver%5Cshare",
    "..%c0%afsecret.txt", "..%ef%bc%8fsecret.txt",
]


async def test_audio_keys_cannot_leave_the_audio_directory(api) -> None:
    server, http = api
    data_dir = server.services.settings.data_dir
    secret = b"TOP-SECRET-" + os.urandom(8).hex().encode()
    await trio.Path(data_dir, "secret.txt").write_bytes(secret)
    p = server.services.persistence
    turn = make_turn()
    await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
    await delivered(p)
    url = (await http.get(f"/api/v1/conversations/{turn.turn_id}")).json()["audio_in_url"]
    served = await http.get(url)
    assert served.status_code == 200 and served.content == wav_bytes(PCM_IN, 16000)  # the route works
    for key in TRAVERSALS:
        status, headers, body = await raw_request(server.http_port, "GET", f"/api/v1/audio/{key}")
        assert status in (400, 404), (key, status, body[:200])
        assert secret not in body and b"RIFF" not in body, key
        assert headers["content-type"].startswith("application/json"), key


# -- 3. no stack traces ------------------------------------------------------------------------------

def _raise(exc: BaseException) -> Any:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc
    return fail


async def test_internal_errors_are_json_without_a_trace(api, monkeypatch, caplog) -> None:
    server, http = api
    p = server.services.persistence
    leak = f"boom at {__file__}:42 password=hunter2"
    monkeypatch.setattr(p, "list_turns", _raise(RuntimeError(leak)))
    monkeypatch.setattr(p, "get_turn", _raise(KeyError(leak)))
    monkeypatch.setattr(p, "list_devices", _raise(ZeroDivisionError(leak)))
    monkeypatch.setattr(server.services, "component_health", _raise(AssertionError(leak)))
    for path in ("/api/v1/conversations", "/api/v1/conversations/abc", "/api/v1/devices", "/api/v1/health/detail"):
        with caplog.at_level(logging.ERROR, logger="voicegrow"):
            response = await http.get(path)
        body = assert_json_error(response, 500, "internal_error")
        for needle in ("Traceback", "boom", "hunter2", ".py", "/work", "line ", "Error"):
            assert needle not in response.text, (path, needle, body)
        assert any(leak in (r.exc_text or "") or (r.exc_info and leak in str(r.exc_info[1]))
                   for r in caplog.records), "the failure must still be logged on the server"
        caplog.clear()


async def test_storage_failures_are_a_503_without_internals(api, monkeypatch) -> None:
    """A 503 says which kind of failure it is; hosts, directories and errno texts stay in the log."""
    server, http = api
    p = server.services.persistence
    detail = "audio directory /srv/voicegrow/data/audio: [Errno 5] Input/output error (db.internal:3306)"
    monkeypatch.setattr(p, "list_turns", _raise(BackendUnavailable(detail)))
    monkeypatch.setattr(p, "list_devices", _raise(SpoolError(detail)))
    monkeypatch.setattr(p, "read_audio", _raise(BackendUnavailable(detail)))
    for path, error in [("/api/v1/conversations", "storage_unavailable"), ("/api/v1/devices", "spool_write_failed"),
                        ("/api/v1/audio/dev-1/x.wav", "storage_unavailable")]:
        response = await http.get(path)
        assert_json_error(response, 503, error)
        for needle in ("/srv", "Errno", "db.internal", "3306"):
            assert needle not in response.text, (path, needle)


# -- 4. CORS -----------------------------------------------------------------------------------------

ORIGINS = ["https://evil.example", "null", "http://127.0.0.1", "http://localhost:8000", "*", "file://"]
CORS_PATHS = ["/api/v1/health", "/api/v1/sessions", "/api/v1/devices", "/api/v1/conversations", "/metrics"]


async def _cors_headers(http: httpx.AsyncClient, path: str, origin: str) -> list[dict[str, str]]:
    """Response headers of a simple request and of a preflight from ``origin``."""
    simple = await http.get(path, headers={"Origin": origin})
    preflight = await http.options(path, headers={"Origin": origin, "Access-Control-Request-Method": "GET",
                                                  "Access-Control-Request-Headers": "authorization"})
    return [dict(simple.headers), dict(preflight.headers)]


async def test_cors_is_off_by_default(api) -> None:
    _, http = api
    for path in CORS_PATHS:
        for origin in ORIGINS:
            for headers in await _cors_headers(http, path, origin):
                assert not any(name.startswith("access-control-") for name in headers), (path, origin, headers)


async def test_cors_allows_only_the_configured_origins(tmp_path) -> None:
    allowed = ["https://admin.example", "https://ops.example:8443"]
    settings = make_settings(tmp_path, cors_origins=" , ".join(allowed))
    async with running_server(settings) as server, httpx.AsyncClient(base_url=server.http_url) as http:
        for path in CORS_PATHS:
            for origin in allowed:
                simple, _ = await _cors_headers(http, path, origin)
                assert simple.get("access-control-allow-origin") == origin, (path, origin)
                assert "origin" in simple.get("vary", "").lower()
                assert "access-control-allow-credentials" not in simple
            for origin in [*ORIGINS, "https://admin.example.evil.example", "https://evil.example/https://admin.example",
                           "http://admin.example", "https://ops.example", "https://admin.example:443"]:
                for headers in await _cors_headers(http, path, origin):
                    assert "access-control-allow-origin" not in headers, (path, origin, headers)


# -- 5. request size ---------------------------------------------------------------------------------

async def test_bodies_over_the_limit_are_a_json_413_and_the_server_goes_on(tmp_path) -> None:
    settings = make_settings(tmp_path, http_max_body_bytes=2048)
    async with running_server(settings) as server, httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
        for method, path in [("DELETE", "/api/v1/devices/x/data"), ("GET", "/api/v1/devices"),
                             ("POST", "/api/v1/health"), ("PUT", "/api/v1/nothing")]:
            response = await http.request(method, path, content=b"x" * 4096)
            assert_json_error(response, 413, "request_too_large")
            assert response.headers.get("connection") == "close"  # the unread rest must not be parsed as a request

            async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: chunked transfer coding
                for _ in range(64):
                    yield b"y" * 1000

            chunked = await http.request(method, path, content=chunks())
            assert_json_error(chunked, 413, "request_too_large")
        within = await http.request("DELETE", "/api/v1/devices/x/data", content=b"x" * 2000)
        assert within.status_code == 404  # under the limit: handled as usual
        assert (await http.get("/api/v1/health")).status_code == 200


# -- 6. presigned URLs ----------------------------------------------------------------------------------

def _sigv4_presigned_signature(url: str, secret_key: str, region: str = "us-east-1") -> str:
    """The SigV4 query-string signature S3 expects for ``url``, computed independently of minio."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k != "X-Amz-Signature"]
    canonical_query = "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in sorted(query))
    canonical_request = "\n".join(["GET", quote(parts.path, safe="/-_.~"), canonical_query,
                                   f"host:{parts.netloc}", "", "host", "UNSIGNED-PAYLOAD"])
    amz_date = dict(query)["X-Amz-Date"]
    scope = f"{amz_date[:8]}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (amz_date[:8], region, "s3", "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


async def _presigned_audio_url(server: ServerHandle, http: httpx.AsyncClient) -> str:
    p = server.services.persistence
    turn = make_turn()
    await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
    await delivered(p)
    body = (await http.get(f"/api/v1/conversations/{turn.turn_id}")).json()
    assert body["audio_in_url"].startswith("http://") and "/api/v1/audio/" not in body["audio_in_url"]
    return body["audio_in_url"]


@pytest.mark.parametrize("ttl", [None, 1], ids=["default", "1s"])
async def test_presigned_urls_are_signed_for_the_configured_ttl(tmp_path, s3_bucket: dict[str, Any],
                                                                ttl: int | None) -> None:
    """The expiry travels in the signed part of the URL: X-Amz-Date (now) + X-Amz-Expires
    (PRESIGNED_URL_TTL_S), so no holder of the link can extend it."""
    overrides = {**s3_bucket, **({"presigned_url_ttl_s": ttl} if ttl else {})}
    async with running_server(make_settings(tmp_path, **overrides)) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            signed_at = time.time()
            url = await _presigned_audio_url(server, http)
            query = dict(parse_qsl(urlsplit(url).query))
            assert query["X-Amz-Expires"] == str(ttl or 900) == str(server.services.settings.presigned_url_ttl_s)
            amz_date = time.mktime(time.strptime(query["X-Amz-Date"], "%Y%m%dT%H%M%SZ")) - time.timezone
            assert abs(amz_date - signed_at) < 60
            assert query["X-Amz-SignedHeaders"] == "host" and query["X-Amz-Algorithm"] == "AWS4-HMAC-SHA256"
            assert query["X-Amz-Signature"] == _sigv4_presigned_signature(url, s3_bucket["minio_secret_key"])
            if ttl is None:  # a fresh default link works (a 1 s link may already be stale when fetched)
                fetched = await http.get(url)
                assert fetched.status_code == 200 and fetched.content == wav_bytes(PCM_IN, 16000)
            assert (await http.get(url.split("?")[0])).status_code == 403  # the object is not public


@pytest.mark.skipif(not os.environ.get("VOICEGROW_TEST_S3_ENDPOINT"), reason=(
    "moto serves presigned URLs whatever their expiry or signature; set VOICEGROW_TEST_S3_ENDPOINT to a "
    "MinIO server to check refusal end to end (test_presigned_urls_are_signed_for_the_configured_ttl "
    "checks the URLs themselves)"))
async def test_expired_or_altered_presigned_urls_are_refused(tmp_path, s3_bucket: dict[str, Any]) -> None:
    async with running_server(make_settings(tmp_path, **s3_bucket, presigned_url_ttl_s=1)) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            url = await _presigned_audio_url(server, http)
            await trio.sleep(2.0)
            assert (await http.get(url)).status_code == 403
            longer = url.replace("X-Amz-Expires=1&", "X-Amz-Expires=604800&")
            assert longer != url and (await http.get(longer)).status_code == 403


# -- 7. admin token ---------------------------------------------------------------------------------

async def test_admin_token_must_match_exactly_and_come_as_a_bearer(tmp_path) -> None:
    wrong_tokens = [
        ADMIN_TOKEN[:-1] + "8",  # last character
        ADMIN_TOKEN[:-1],  # one shorter
        ADMIN_TOKEN + "9",  # one longer
        ADMIN_TOKEN.upper(), ADMIN_TOKEN.lower(), "*", "null",
        ADMIN_TOKEN[::-1], ADMIN_TOKEN * 2,
    ]
    refused_headers: list[dict[str, str]] = [{"Authorization": f"Bearer {t}"} for t in wrong_tokens]
    refused_headers += [
        {"Authorization": f"Basic {base64.b64encode(f'admin:{ADMIN_TOKEN}'.encode()).decode()}"},
        {"Authorization": f"Basic {ADMIN_TOKEN}"}, {"Authorization": f"Token {ADMIN_TOKEN}"},
        {"Authorization": f"Digest {ADMIN_TOKEN}"}, {"Authorization": ADMIN_TOKEN},
        {"Authorization": f"Bearer{ADMIN_TOKEN}"}, {"Authorization": f"Bearer  {ADMIN_TOKEN}"},
        {"Authorization": "Bearer"}, {"Authorization": ""}, {"X-Admin-Token": ADMIN_TOKEN},
        {"Cookie": f"token={ADMIN_TOKEN}"}, {"Proxy-Authorization": f"Bearer {ADMIN_TOKEN}"},
    ]
    async with running_server(make_settings(tmp_path, admin_token=ADMIN_TOKEN)) as server:
        async with httpx.AsyncClient(base_url=server.http_url, timeout=10) as http:
            for path in ("/api/v1/devices", "/api/v1/sessions", f"/api/v1/devices?token={ADMIN_TOKEN}"):
                for headers in refused_headers:
                    response = await http.get(path, headers=headers)
                    assert_json_error(response, 401, "unauthorized")
                    assert response.headers["www-authenticate"].startswith("Bearer")
                    assert ADMIN_TOKEN not in response.text and ADMIN_TOKEN[:-1] not in response.text
            # Non-ASCII bytes (httpx will not send them): refused like any wrong token, no crash.
            for value in (f"Bearer {ADMIN_TOKEN[:-1]}é".encode(), f"Bearer {ADMIN_TOKEN}\u0301".encode(),
                          f"Bearer {ADMIN_TOKEN[:-1]}\udcff".encode("utf-8", "surrogateescape")):
                status, _, body = await raw_request(server.http_port, "GET", "/api/v1/devices",
                                                    [("Authorization", value)])
                assert status == 401 and b"unauthorized" in body, value
            ok = await http.get("/api/v1/devices", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
            assert ok.status_code == 200
