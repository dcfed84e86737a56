"""Secure by default: the generated admin token, ADMIN_ALLOW_FROM, failed-auth throttling, security
headers and TLS on both ports.

"Another machine" is a client socket bound to 127.0.0.2: on Linux the whole 127/8 is loopback, but only
127.0.0.1 and ::1 are on the default allowlist.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import shutil
import ssl
import stat
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from tests.conftest import make_settings
from tests.service_fixtures import free_port
from tests.test_storage_behaviour import PCM_IN, delivered, make_turn
from voicegrow import cli
from voicegrow.admin_auth import TOKEN_FILE_NAME, AdminAuth, allowed_networks, ensure_admin_token
from voicegrow.app import ServerHandle, running_server
from voicegrow.audio import wav_bytes
from voicegrow.auth_throttle import AuthThrottle
from voicegrow.client import ConnectFailed, HandshakeFailed, open_native_client
from voicegrow.protocol.errors import ErrorCode
from voicegrow.settings import ConfigError, load_settings
from voicegrow.tls import CertificateStore


def client_from(server: ServerHandle, address: str, **kwargs: Any) -> httpx.AsyncClient:
    """An HTTP client whose connections come from ``address`` (another host, as the server sees it)."""
    transport = httpx.AsyncHTTPTransport(local_address=address, verify=kwargs.pop("verify", True))
    return httpx.AsyncClient(base_url=server.http_url, transport=transport, timeout=10, **kwargs)


def admin_token_from_cli(monkeypatch, capsys, data_dir: Path) -> str:
    """What an operator gets from ``voicegrow admin-token`` with the server's DATA_DIR."""
    monkeypatch.setenv("DATA_DIR", str(data_dir))
    monkeypatch.delenv("ADMIN_TOKEN", raising=False)
    capsys.readouterr()
    assert cli.main(["--env-file", "/nonexistent", "admin-token"]) == 0
    out = capsys.readouterr()
    assert str(data_dir / TOKEN_FILE_NAME) in out.err
    return out.out.strip()


async def stored_turn_audio_path(server: ServerHandle) -> tuple[str, str]:
    """A stored turn (id, its local audio URL's path), written straight into persistence."""
    p = server.services.persistence
    turn = make_turn(device="dev-sec")
    await p.submit_turn(turn, PCM_IN, 16000, b"\0\0" * 2400, 24000)
    await delivered(p)
    url = p.presigned_url((await p.get_turn(turn.turn_id))["audio_in_key"])
    return turn.turn_id, httpx.URL(url).path


def assert_refused(response: httpx.Response, status: int, error: str) -> None:
    assert response.status_code == status, (response.request.url, response.status_code, response.text[:200])
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"] == error and body["reason"], body


# -- 1. no open admin surface by default -------------------------------------------------------------

async def test_default_start_refuses_other_hosts_and_admits_the_token_and_localhost(
        tmp_path, monkeypatch, capsys) -> None:
    async with running_server(make_settings(tmp_path)) as server:
        _, audio_path = await stored_turn_audio_path(server)
        routes = [("GET", "/api/v1/conversations"), ("GET", audio_path), ("DELETE", "/api/v1/devices/dev-sec/data")]
        async with client_from(server, "127.0.0.2") as remote:
            for method, path in routes:
                refused = await remote.request(method, path)
                assert_refused(refused, 401, "unauthorized")
                assert refused.headers["www-authenticate"].startswith("Bearer")
                assert refused.headers["cache-control"] == "no-store"
            assert (await remote.get("/api/v1/health")).status_code == 200  # stays public

            token = admin_token_from_cli(monkeypatch, capsys, tmp_path / "data")
            assert token == server.services.admin_auth.token and len(token) >= 40
            bearer = {"Authorization": f"Bearer {token}"}
            listing = await remote.get("/api/v1/conversations", headers=bearer)
            assert listing.status_code == 200 and len(listing.json()["turns"]) == 1
            audio = await remote.get(audio_path, headers=bearer)
            assert audio.status_code == 200 and audio.content == wav_bytes(PCM_IN, 16000)
            assert audio.headers["cache-control"] == "no-store"

        async with client_from(server, "127.0.0.1") as local:
            assert (await local.get("/api/v1/conversations")).status_code == 200
            assert (await local.get(audio_path)).status_code == 200
            assert (await local.delete("/api/v1/devices/dev-sec/data")).status_code == 200
        async with client_from(server, "127.0.0.2") as remote:  # the token works for the DELETE route too
            again = await remote.delete("/api/v1/devices/dev-sec/data", headers=bearer)
            assert again.status_code == 404 and again.json()["error"] == "not_found"  # erased a moment ago


async def test_first_start_makes_the_token_and_says_where_once(tmp_path, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="voicegrow.admin_auth"):
        async with running_server(make_settings(tmp_path)) as server:
            token = server.services.admin_auth.token
        async with running_server(make_settings(tmp_path)) as server:
            assert server.services.admin_auth.token == token  # the same token on the next start
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "voicegrow.admin_auth"]
    path = str(tmp_path / "data" / TOKEN_FILE_NAME)
    assert [level for level, _ in lines] == [logging.WARNING, logging.INFO], lines
    assert all(path in message and token not in message for _, message in lines)  # where, never what


async def test_generated_token_file_is_private_stable_and_shared_with_the_cli(tmp_path, monkeypatch, capsys) -> None:
    data_dir = tmp_path / "data"
    token = admin_token_from_cli(monkeypatch, capsys, data_dir)  # the CLI makes it when the server has not
    path = data_dir / TOKEN_FILE_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in data_dir.iterdir()] == [TOKEN_FILE_NAME]  # no temporary file left behind
    async with running_server(make_settings(tmp_path)) as server:
        assert server.services.admin_auth.token == token
    assert ensure_admin_token(data_dir) == (token, path, False)
    path.chmod(0o644)  # an operator's copy with a loose mode is tightened, not trusted as is
    assert ensure_admin_token(data_dir)[0] == token and stat.S_IMODE(path.stat().st_mode) == 0o600
    path.write_text("short\n")
    with pytest.raises(ConfigError, match="admin token file"):
        ensure_admin_token(data_dir)


def test_processes_starting_together_agree_on_one_token(tmp_path) -> None:
    """WORKERS=N start at once: whoever creates the file, every one reads the same complete token."""
    import concurrent.futures

    with concurrent.futures.ProcessPoolExecutor(4) as pool:
        results = list(pool.map(ensure_admin_token, [tmp_path / "data"] * 8))
    assert len({token for token, _, _ in results}) == 1
    assert sum(created for _, _, created in results) == 1
    assert [p.name for p in (tmp_path / "data").iterdir()] == [TOKEN_FILE_NAME]


async def test_explicit_admin_token_makes_no_file_and_the_cli_prints_it(tmp_path, monkeypatch, capsys) -> None:
    async with running_server(make_settings(tmp_path, admin_token="operator-chosen-token-123")) as server:
        assert server.services.admin_auth.token_file is None
    assert not (tmp_path / "data" / TOKEN_FILE_NAME).exists()
    monkeypatch.setenv("ADMIN_TOKEN", "operator-chosen-token-123")
    assert cli.main(["--env-file", "/nonexistent", "admin-token"]) == 0
    assert capsys.readouterr().out.strip() == "operator-chosen-token-123"


async def test_allowlist_is_exact_and_proxied_requests_need_the_token(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, admin_allow_from="127.0.0.0/30, ::1")) as server:
        async with client_from(server, "127.0.0.2") as allowed, client_from(server, "127.0.0.5") as outside:
            assert (await allowed.get("/api/v1/sessions")).status_code == 200
            assert_refused(await outside.get("/api/v1/sessions"), 401, "unauthorized")
            # A reverse proxy on the box makes every client look local: its forwarded requests get no bypass.
            for header in ("X-Forwarded-For", "X-Real-IP", "Forwarded"):
                assert_refused(await allowed.get("/api/v1/sessions", headers={header: "203.0.113.9"}),
                               401, "unauthorized")
            # A wrong token is refused even from an allowed address (a sign-in check means something).
            assert_refused(await allowed.get("/api/v1/sessions", headers={"Authorization": "Bearer nope"}),
                           401, "unauthorized")


async def test_metrics_need_the_credential_unless_metrics_public(tmp_path) -> None:
    for public in (False, True):
        async with running_server(make_settings(tmp_path / str(public), metrics_public=public)) as server:
            async with client_from(server, "127.0.0.2") as remote:
                metrics = await remote.get("/metrics")
                if public:
                    assert metrics.status_code == 200 and "voicegrow_up" in metrics.text
                else:
                    assert_refused(metrics, 401, "unauthorized")
                assert_refused(await remote.get("/api/v1/sessions"), 401, "unauthorized")  # the rest stays closed


def test_admin_allow_from_and_tls_settings_are_validated() -> None:
    base = {"ASR_MODEL_SIZE": "base"}
    for bad in ("localhost", "127.0.0.1,", "10.0.0.0/33", "::1/200", "auto,127.0.0.1"):
        if bad == "127.0.0.1,":
            load_settings({**base, "ADMIN_ALLOW_FROM": bad}, env_file=None)  # a trailing comma is harmless
            continue
        with pytest.raises(ConfigError, match="ADMIN_ALLOW_FROM"):
            load_settings({**base, "ADMIN_ALLOW_FROM": bad}, env_file=None)
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        load_settings({**base, "TLS_CERT_FILE": "/x/cert.pem"}, env_file=None)
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        load_settings({**base, "TLS_KEY_FILE": "/x/key.pem"}, env_file=None)


def test_who_may_skip_the_token_by_setting() -> None:
    throttle = AuthThrottle()

    def auth(**env: str) -> AdminAuth:
        settings = load_settings({"ASR_MODEL_SIZE": "base", "ADMIN_TOKEN": "t" * 20, **env}, env_file=None)
        return AdminAuth("t" * 20, allowed_networks(settings), throttle)

    explicit = auth()  # an operator who sets ADMIN_TOKEN asked for it everywhere (unless ADMIN_ALLOW_FROM says)
    assert explicit.check("127.0.0.1", None, proxied=False) is not None
    loopback = auth(ADMIN_ALLOW_FROM="127.0.0.1,::1")
    for address in ("127.0.0.1", "::1", "::ffff:127.0.0.1"):
        assert loopback.check(address, None, proxied=False) is None, address
    for address in ("127.0.0.2", "10.0.0.1", "::2", "", None, "not-an-address"):
        refusal = loopback.check(address, None, proxied=False)
        assert refusal is not None and refusal.status == 401, address
    assert auth(ADMIN_ALLOW_FROM="none").check("127.0.0.1", None, proxied=False) is not None


# -- 2. failed authentication is throttled ---------------------------------------------------------

async def test_twenty_wrong_tokens_lock_one_address_out_and_no_other(tmp_path) -> None:
    async with running_server(make_settings(tmp_path)) as server:
        token = server.services.admin_auth.token
        async with client_from(server, "127.0.0.2") as attacker, client_from(server, "127.0.0.3") as other:
            statuses = []
            for i in range(20):
                response = await attacker.get("/api/v1/devices", headers={"Authorization": f"Bearer guess-{i}"})
                statuses.append(response.status_code)
            assert statuses[:19] == [401] * 19 and statuses[19] == 429, statuses
            # The 21st attempt is not even checked: the right token is refused too (the lock is no oracle).
            locked = await attacker.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})
            assert_refused(locked, 429, "too_many_failures")
            assert 1 <= int(locked.headers["retry-after"]) <= 30
            assert (await attacker.get("/api/v1/health")).status_code == 200  # health is no credential check
            # Another address is not affected.
            assert (await other.get("/api/v1/devices", headers={"Authorization": f"Bearer {token}"})).status_code == 200
            assert_refused(await other.get("/api/v1/devices", headers={"Authorization": "Bearer guess-0"}),
                           401, "unauthorized")
        metrics = server.services.metrics.render().decode()
        assert 'voicegrow_auth_refusals_total{protocol="admin",reason="throttled"} 1.0' in metrics
        assert 'voicegrow_auth_refusals_total{protocol="admin",reason="bad_token"} 21.0' in metrics


async def test_the_same_wrong_token_repeated_is_refused_but_never_locks(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, auth_max_failures=3)) as server:
        async with client_from(server, "127.0.0.2") as stale:
            for _ in range(10):
                assert_refused(await stale.get("/api/v1/devices", headers={"Authorization": "Bearer old-token"}),
                               401, "unauthorized")
            for _ in range(5):  # missing credentials are no guesses either
                assert_refused(await stale.get("/api/v1/devices"), 401, "unauthorized")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_throttle_backs_off_doubling_and_forgives_a_quiet_address() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=3, backoff_s=10, max_backoff_s=40, window_s=60, clock=clock)
    assert throttle.failed("a", "1") is None and throttle.failed("a", "2") is None
    assert throttle.failed("a", "2") is None  # a repeat is not a new guess
    assert throttle.failed("a", "3") == 10 and throttle.retry_after("a") == 10
    assert throttle.retry_after("b") is None
    clock.now += 10.5
    assert throttle.retry_after("a") is None
    for guess in "456":
        locked = throttle.failed("a", guess)
    assert locked == 20  # doubled
    clock.now += 20.5
    assert [throttle.failed("a", g) for g in "789"] == [None, None, 40]
    clock.now += 40.5
    assert [throttle.failed("a", g) for g in "abc"] == [None, None, 40]  # capped at max_backoff_s
    clock.now += 40 + 41  # quiet for longer than max_backoff_s: strikes forgotten
    assert [throttle.failed("a", g) for g in "def"] == [None, None, 10]
    clock.now += 100
    throttle.failed("w", "1")
    throttle.failed("w", "2")
    clock.now += 61  # the window passed: old guesses no longer count
    assert throttle.failed("w", "3") is None


def test_throttle_memory_is_bounded_under_a_scan() -> None:
    clock = FakeClock()
    throttle = AuthThrottle(max_failures=2, backoff_s=10, max_tracked=100, clock=clock)
    throttle.failed("locked", "1")
    throttle.failed("locked", "2")
    for i in range(5000):
        throttle.failed(f"10.{i // 256}.{i % 256}.1", "x")
    assert throttle.tracked() <= 100
    assert throttle.retry_after("locked") is not None  # a lock-out outlives a scan


async def test_native_device_guesses_are_throttled_per_address(tmp_path) -> None:
    credentials = tmp_path / "devices.json"
    credentials.write_text('{"kitchen": "kitchen-secret"}')
    settings = make_settings(tmp_path, device_auth="token", device_credentials_file=credentials,
                             auth_max_failures=3)
    async with running_server(settings) as server:
        codes = []
        for i in range(4):
            with pytest.raises(HandshakeFailed) as refused:
                async with open_native_client(server.ws_url, device_id="kitchen", token=f"guess-{i}"):
                    pass
            codes.append(refused.value.error_code)
        assert codes == [ErrorCode.AUTH_FAILED] * 3 + [ErrorCode.AUTH_THROTTLED], codes
        with pytest.raises(HandshakeFailed) as refused:  # the right secret too, while locked
            async with open_native_client(server.ws_url, device_id="kitchen", token="kitchen-secret"):
                pass
        assert refused.value.error_code == ErrorCode.AUTH_THROTTLED and "retry in" in str(refused.value)
        # The admin API shares the lock-out: the same address guessing there is the same attacker.
        async with client_from(server, "127.0.0.1") as http:
            assert_refused(await http.get("/api/v1/sessions"), 429, "too_many_failures")
        metrics = server.services.metrics.render().decode()
        assert 'voicegrow_auth_refusals_total{protocol="native",reason="throttled"} 2.0' in metrics


async def _close_code(url: str, headers: list[tuple[bytes, bytes]] | None = None) -> int | None:
    from trio_websocket import ConnectionClosed, open_websocket_url

    async with open_websocket_url(url, extra_headers=headers) as ws:
        with trio.fail_after(10):
            try:
                while True:
                    await ws.get_message()
            except ConnectionClosed as closed:
                return closed.reason.code
    return None


@pytest.mark.parametrize("protocol", ["xiaoai", "xiaozhi"])
async def test_speaker_token_guesses_are_throttled(tmp_path, protocol: str) -> None:
    """XIAOAI_TOKEN (in the URL) and XIAOZHI_TOKEN (a bearer header) share the lock-out."""
    def attempt(token: str) -> tuple[str, list[tuple[bytes, bytes]] | None]:
        if protocol == "xiaoai":
            return f"{server.ws_url}/?token={token}", None
        return f"{server.ws_url}/xiaozhi/v1/", [(b"Authorization", f"Bearer {token}".encode()),
                                                (b"Device-Id", b"aa:bb:cc:dd:ee:ff"), (b"Protocol-Version", b"1")]

    settings = make_settings(tmp_path, auth_max_failures=2, **{f"{protocol}_token": "s3cret-speaker"})
    async with running_server(settings) as server:
        assert await _close_code(*attempt("guess-1")) == 4403
        assert await _close_code(*attempt("guess-2")) == 4403  # the second guess locks
        assert await _close_code(*attempt("s3cret-speaker")) == 4403  # locked: the right one too
        metrics = server.services.metrics
        assert metrics.auth_refusals.labels(protocol, "throttled")._value.get() == 1
        assert metrics.auth_refusals.labels(protocol, "bad_token")._value.get() == 2
        assert server.services.auth_throttle.retry_after("127.0.0.1") is not None


# -- 4. security headers ------------------------------------------------------------------------------

async def test_security_headers_on_every_response(tmp_path) -> None:
    from voicegrow.http.api import create_app

    async with running_server(make_settings(tmp_path)) as server:
        async with client_from(server, "127.0.0.1") as http:
            for path in ("/api/v1/health", "/api/v1/conversations", "/api/v1/nothing-here", "/metrics"):
                response = await http.get(path)
                assert response.headers["x-content-type-options"] == "nosniff", path
                assert response.headers["referrer-policy"] == "no-referrer", path
                assert response.headers["x-frame-options"] == "DENY", path
                assert response.headers["cache-control"] == "no-store", path
                assert "content-security-policy" not in response.headers or path == "/metrics"
        app = create_app(server.services)

        @app.get("/page")
        async def page() -> Any:
            return "<!doctype html><title>x</title>", 200, {"Content-Type": "text/html; charset=utf-8"}

        client = app.test_client()
        bearer = {"Authorization": f"Bearer {server.services.admin_auth.token}"}
        html = await client.get("/page", headers={"Host": "speaker.local:8000", **bearer})
        assert html.status_code == 200, (html.status_code, await html.get_data())
        csp = html.headers["Content-Security-Policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "object-src 'none'" in csp
        hostile = await client.get("/page", headers={"Host": "evil; script-src *", **bearer})
        assert "script-src *" not in hostile.headers["Content-Security-Policy"]


def test_html_csp_allows_the_speaker_port_of_this_host_only() -> None:
    from voicegrow.http.api import html_csp

    assert "connect-src 'self' ws://speaker.local:4399 wss://speaker.local:4399;" in html_csp("speaker.local:8000", 4399)
    assert "ws://[::1]:4399" in html_csp("[::1]:8000", 4399)
    assert "connect-src 'self';" in html_csp("a b;script-src *", 4399)


# -- 3. TLS on both ports ---------------------------------------------------------------------------

def make_certificate(directory: Path, name: str, common_name: str = "voicegrow test") -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 and localhost (valid one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def trusting(*cert_paths: Path) -> ssl.SSLContext:
    context = ssl.create_default_context()
    for path in cert_paths:
        context.load_verify_locations(cafile=str(path))
    return context


def served_common_name(response: httpx.Response) -> str:
    ssl_object = response.extensions["network_stream"].get_extra_info("ssl_object")
    subject = dict(item[0] for item in ssl_object.getpeercert()["subject"])
    return subject["commonName"]


async def test_speaker_session_and_http_over_tls_and_a_renewed_certificate(tmp_path) -> None:
    cert, key = make_certificate(tmp_path, "first", "first certificate")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(cert, live_cert)
    shutil.copy(key, live_key)
    settings = make_settings(tmp_path, tls_cert_file=live_cert, tls_key_file=live_key, handshake_timeout_s=60)
    async with running_server(settings) as server:
        assert server.ws_url.startswith("wss://") and server.http_url.startswith("https://")
        # A client that speaks no TLS is closed at once, not kept until the 60 s handshake deadline.
        plain = await trio.open_tcp_stream("127.0.0.1", server.ws_port)
        await plain.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
        with trio.fail_after(30):
            assert await plain.receive_some(1024) == b""
        await plain.aclose()
        async with open_native_client(server.ws_url, device_id="tls-speaker", ssl_context=trusting(cert)) as speaker:
            assert speaker.hello_ack.session_id
            await speaker.send_audio(b"\0\0" * 640)
            assert len(server.services.registry) == 1 and next(iter(server.services.registry)).protocol == "native"
        async with httpx.AsyncClient(base_url=server.http_url, verify=trusting(cert), timeout=10) as https:
            health = await https.get("/api/v1/health")
            assert health.status_code == 200 and served_common_name(health) == "first certificate"
            assert (await https.get("/api/v1/sessions")).status_code == 200  # localhost over TLS: admin works
        with pytest.raises(ConnectFailed):  # plain ws:// to a TLS port gets no session
            async with open_native_client(server.ws_url.replace("wss://", "ws://"), connect_timeout_s=1):
                pass

        # A half-renewed pair (new certificate, old key) is refused and the old one stays in service.
        new_cert, new_key = make_certificate(tmp_path, "second", "second certificate")
        shutil.copy(new_cert, live_cert)
        store = server.services.tls
        assert store.changed() and not store.try_reload("test")
        async with httpx.AsyncClient(base_url=server.http_url, verify=trusting(cert, new_cert), timeout=10) as https:
            assert served_common_name(await https.get("/api/v1/health")) == "first certificate"
        # The renewal completes: the file watcher takes the new pair up without a restart.
        shutil.copy(new_key, live_key)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.watch, 0.05)
            with trio.fail_after(5):
                while store.changed():
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        async with httpx.AsyncClient(base_url=server.http_url, verify=trusting(new_cert), timeout=10) as https:
            assert served_common_name(await https.get("/api/v1/health")) == "second certificate"
        async with open_native_client(server.ws_url, ssl_context=trusting(new_cert)) as speaker:
            assert speaker.hello_ack.session_id
        with pytest.raises(ConnectFailed):  # the old certificate is no longer what the speaker port serves
            async with open_native_client(server.ws_url, ssl_context=trusting(cert), connect_timeout_s=1):
                pass


def test_serve_rereads_the_certificate_on_sighup(tmp_path) -> None:
    """``voicegrow serve`` with TLS: SIGHUP swaps the certificate at once and the server keeps serving."""
    import signal
    import subprocess
    import sys
    import time

    first, first_key = make_certificate(tmp_path, "first", "first certificate")
    second, second_key = make_certificate(tmp_path, "second", "second certificate")
    live_cert, live_key = tmp_path / "live.crt", tmp_path / "live.key"
    shutil.copy(first, live_cert)
    shutil.copy(first_key, live_key)
    ports = [free_port(), free_port()]
    env = {**os.environ, "WS_PORT": str(ports[0]), "HTTP_PORT": str(ports[1]), "SERVER_HOST": "127.0.0.1",
           "DATA_DIR": str(tmp_path / "data"), "ASR_MODEL_SIZE": "base", "ASR_PRELOAD": "false",
           "SHUTDOWN_GRACE_S": "1", "LOG_FORMAT": "text", "TLS_CERT_FILE": str(live_cert),
           "TLS_KEY_FILE": str(live_key)}
    for key in [k for k in env if k.startswith(("MYSQL_", "REDIS_", "MINIO_", "LLM_", "TTS_", "ADMIN_"))]:
        del env[key]
    proc = subprocess.Popen([sys.executable, "-m", "voicegrow", "--env-file", "/nonexistent", "serve"],
                            env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def common_name(cert: Path) -> str | None:
        try:
            with httpx.Client(verify=trusting(cert), timeout=2) as http:
                response = http.get(f"https://127.0.0.1:{ports[1]}/api/v1/health")
                return served_common_name(response) if response.status_code == 200 else None
        except httpx.HTTPError:
            return None

    try:
        deadline = time.monotonic() + 60
        while common_name(first) != "first certificate":
            assert proc.poll() is None and time.monotonic() < deadline, "the server did not come up over TLS"
            time.sleep(0.2)
        shutil.copy(second, live_cert)
        shutil.copy(second_key, live_key)
        proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while common_name(second) != "second certificate":
            assert proc.poll() is None and time.monotonic() < deadline, "no new certificate after SIGHUP"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "TLS certificate reloaded (SIGHUP)" in proc.stdout.read()


def test_a_bad_certificate_pair_fails_start_up_naming_the_variables(tmp_path) -> None:
    cert, _ = make_certificate(tmp_path, "a")
    _, other_key = make_certificate(tmp_path, "b")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        CertificateStore(cert, other_key)
    with pytest.raises(ConfigError, match="TLS_KEY_FILE"):
        CertificateStore(cert, tmp_path / "missing.key")
    (tmp_path / "garbage.crt").write_text("not a certificate")
    with pytest.raises(ConfigError, match="TLS_CERT_FILE"):
        CertificateStore(tmp_path / "garbage.crt", other_key)
    assert os.path.exists(cert)


def test_talk_refuses_an_unusable_cafile(tmp_path, capsys) -> None:
    from voicegrow import talk
    from voicegrow.audio import write_wav

    clip = tmp_path / "clip.wav"
    write_wav(clip, b"\0\0" * 1600, 16000)
    (tmp_path / "not-a-cert.pem").write_text("garbage")
    for cafile in (tmp_path / "missing.pem", tmp_path / "not-a-cert.pem"):
        assert talk.main(["--url", "wss://127.0.0.1:1/", "--wav", str(clip), "--cafile", str(cafile)]) == 2
        assert "--cafile" in capsys.readouterr().err
