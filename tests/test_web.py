"""The console and talk page as the HTTP port serves them, without a browser: files, headers, access,
and the talk socket's authentication (operator token as a subprotocol, or a device credential)."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser

import httpx
import pytest
import trio
from trio_websocket import open_websocket_url

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.client import HandshakeFailed, open_native_client
from voicegrow.protocol.errors import ErrorCode
from voicegrow.http.web.routes import STATIC_DIR, bearer_from_subprotocols

TOKEN = "op-secret/with+odd=chars"
NATIVE = "voicegrow.native.v1"


def bearer(token: str) -> str:
    return "voicegrow.bearer." + base64.urlsafe_b64encode(token.encode()).decode().rstrip("=")


def talk_url(server) -> str:
    return server.http_url.replace("http://", "ws://") + "/api/v1/talk"


class _Inline(HTMLParser):
    """Collects what a Content-Security-Policy without 'unsafe-inline' would block."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        names = dict(attrs)
        if "style" in names or any(name.startswith("on") for name in names):
            self.problems.append(f"inline attribute on <{tag}>")
        if tag == "style":
            self.problems.append("<style> element")
        if tag == "script":
            if not names.get("src"):
                self.problems.append("inline <script>")
            if (names.get("src") or "").startswith(("http:", "https:", "//")):
                self.problems.append("script from another origin")

    def handle_endtag(self, tag: str) -> None:
        pass


def test_pages_have_no_inline_code_and_every_file_they_name_is_shipped() -> None:
    for page in ("console.html", "talk.html"):
        html = (STATIC_DIR / page).read_text(encoding="utf-8")
        parser = _Inline()
        parser.feed(html)
        assert parser.problems == [], page
        for ref in re.findall(r'(?:src|href)="(/static/[^"]+)"', html):
            assert (STATIC_DIR / ref.removeprefix("/static/")).is_file(), (page, ref)
    for module in STATIC_DIR.glob("*.js"):
        text = module.read_text(encoding="utf-8")
        for ref in re.findall(r'from "\./([^"]+)"', text):
            assert (STATIC_DIR / ref).is_file(), (module.name, ref)
        assert "innerHTML" not in text and "eval(" not in text, module.name
        remote = re.findall(r"https?://[^\s\"'`]+", text.replace("http://www.w3.org/2000/svg", ""))
        assert remote == [], f"{module.name}: no CDN, no remote URL"


def test_english_and_chinese_texts_have_the_same_keys() -> None:
    text = (STATIC_DIR / "i18n.js").read_text(encoding="utf-8")
    en, zh = re.search(r"\ben: \{(.*?)\n  \},", text, re.S).group(1), re.search(r"\bzh: \{(.*?)\n  \},", text, re.S).group(1)
    keys = lambda block: set(re.findall(r'"([a-z]+\.[A-Za-z_.]+)":', block))  # noqa: E731
    assert keys(en) == keys(zh) and len(keys(en)) > 50
    used = set()
    for f in STATIC_DIR.iterdir():
        if f.suffix in (".js", ".html"):
            used |= set(re.findall(r'data-i18n(?:-label|-placeholder)?="([^"]+)"', f.read_text(encoding="utf-8")))
            used |= set(re.findall(r'\bt\("([a-z]+\.[A-Za-z_.]+)"', f.read_text(encoding="utf-8")))
    assert used - keys(en) == set()


def test_page_policy_lets_audio_come_from_the_object_store_only_when_configured() -> None:
    from voicegrow.http.api import html_csp

    assert "media-src 'self' blob:;" in html_csp("h:8000", 4399)
    assert "media-src 'self' blob: https://s3.example:9000;" in html_csp("h:8000", 4399, ("https://s3.example:9000",))


def test_bearer_subprotocol_decoding() -> None:
    assert bearer_from_subprotocols([NATIVE, bearer(TOKEN)]) == TOKEN
    assert bearer_from_subprotocols([NATIVE]) is None
    assert bearer_from_subprotocols(["voicegrow.bearer.%%%"]) is None
    assert bearer_from_subprotocols(["voicegrow.bearer." + base64.urlsafe_b64encode(b"\xff").decode()]) is None


async def test_pages_are_public_with_a_strict_policy_and_the_api_is_not(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, admin_token=TOKEN)) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            for path in ("/", "/talk"):
                page = await http.get(path)
                assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
                csp = page.headers["content-security-policy"]
                assert "script-src 'self';" in csp and "style-src 'self';" in csp and "frame-ancestors 'none'" in csp
                assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
                assert TOKEN not in page.text
            script = await http.get("/static/talk.js")
            assert script.status_code == 200
            assert script.headers["content-type"].split(";")[0] in ("text/javascript", "application/javascript")
            assert (await http.get("/static/app.css")).headers["content-type"].startswith("text/css")
            for bad in ("/static/../http_api.py", "/static/%2e%2e/http_api.py", "/static/nope.js"):
                response = await http.get(bad)  # 401: outside the public files; 404: no such file
                assert response.status_code in (401, 404) and "import" not in response.text, bad
            config = (await http.get("/api/v1/web/config")).json()
            assert config["admin_token_required"] is True and config["device_auth"] == "off"
            assert TOKEN not in json.dumps(config)
            assert (await http.get("/api/v1/sessions")).status_code == 401
            assert (await http.get("/api/v1/conversations", headers={"Authorization": f"Bearer {TOKEN}"})
                    ).status_code == 200


async def test_conversation_search_rejects_bad_input(tmp_path) -> None:
    async with running_server(make_settings(tmp_path)) as server:
        async with httpx.AsyncClient(base_url=server.http_url) as http:
            too_long = await http.get("/api/v1/conversations", params={"q": "x" * 201})
            assert too_long.status_code == 400 and too_long.json()["error"] == "invalid_q"
            control = await http.get("/api/v1/conversations", params={"q": "a\x00b"})
            assert control.status_code == 400
            assert (await http.get("/api/v1/conversations", params={"q": "  "})).status_code == 200


async def test_talk_socket_wants_the_operator_token_without_device_auth(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, admin_token=TOKEN)) as server:
        url = talk_url(server)
        for offered in ((NATIVE,), (NATIVE, bearer("wrong"))):
            with pytest.raises(HandshakeFailed) as refused:
                async with open_native_client(url, device_id="web-1", subprotocols=offered):
                    pass
            assert refused.value.error_code == ErrorCode.AUTH_REQUIRED
        async with open_native_client(url, device_id="web-1", subprotocols=(NATIVE, bearer(TOKEN))) as client:
            assert client.hello_ack.session_id
            async with httpx.AsyncClient(base_url=server.http_url,
                                         headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                with trio.fail_after(5):  # "handshake" until the voice session is set up, then "listening"
                    while True:
                        listing = (await http.get("/api/v1/sessions")).json()
                        if [s["state"] for s in listing["sessions"]] == ["listening"]:
                            break
                        await trio.sleep(0.02)
            (session,) = listing["sessions"]
            assert session["device_id"] == "web-1" and session["protocol"] == "native"
        metrics = server.services.metrics.render().decode()
        assert 'voicegrow_auth_refusals_total{protocol="native",reason="not_operator"} 2.0' in metrics


async def test_talk_socket_refuses_other_sites_and_a_missing_subprotocol(tmp_path) -> None:
    async with running_server(make_settings(tmp_path)) as server:
        url = talk_url(server)
        from trio_websocket import HandshakeError

        with pytest.raises(HandshakeError):
            async with open_websocket_url(url, subprotocols=[NATIVE],
                                          extra_headers=[(b"Origin", b"https://evil.example")]):
                pass
        with pytest.raises(HandshakeError):
            async with open_websocket_url(url):
                pass
        host = server.http_url.removeprefix("http://")
        async with open_websocket_url(url, subprotocols=[NATIVE],
                                      extra_headers=[(b"Origin", f"http://{host}".encode())]) as ws:
            assert ws.subprotocol == NATIVE


async def test_talk_socket_takes_a_device_credential_when_device_auth_is_on(tmp_path) -> None:
    creds = tmp_path / "devices.json"
    creds.write_text(json.dumps({"kitchen-tablet": "tablet-secret"}), encoding="utf-8")
    settings = make_settings(tmp_path, admin_token=TOKEN, device_auth="token", device_credentials_file=creds)
    async with running_server(settings) as server:
        url = talk_url(server)
        async with open_native_client(url, device_id="kitchen-tablet", token="tablet-secret",
                                      subprotocols=(NATIVE,)) as client:
            assert client.hello_ack.session_id
        with pytest.raises(HandshakeFailed) as refused:
            async with open_native_client(url, device_id="kitchen-tablet", token="wrong", subprotocols=(NATIVE,)):
                pass
        assert refused.value.error_code == ErrorCode.AUTH_FAILED
        # The signed-in operator needs no device credential.
        async with open_native_client(url, device_id="operator-browser", subprotocols=(NATIVE, bearer(TOKEN))):
            pass
