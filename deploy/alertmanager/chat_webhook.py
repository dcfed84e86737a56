"""AlertManager webhook -> DingTalk or WeCom group robot (section 7.1: alerts to 钉钉 / 企微).

AlertManager posts its own JSON; the robots each want theirs. This bridge listens on LISTEN_PORT
(POST /alert), writes the alerts as one markdown message and posts it to ALERT_WEBHOOK_URL, choosing the
robot by the URL's host (oapi.dingtalk.com or qyapi.weixin.qq.com). A DingTalk robot with signing on
("加签") needs ALERT_WEBHOOK_SECRET. The standard library only, so that it runs in a bare python image.
A robot that refuses the message makes the bridge answer 502, and AlertManager tries again.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import logging
import os
import time
import urllib.parse
import urllib.request
from typing import Any

log = logging.getLogger("chat_webhook")

DINGTALK_HOSTS = ("oapi.dingtalk.com",)
WECOM_HOSTS = ("qyapi.weixin.qq.com",)
#: Both robots cut long messages; keep well under their limits (DingTalk 20000 bytes, WeCom 4096).
MAX_CHARS = 3500


def robot_kind(url: str) -> str:
    """``dingtalk`` or ``wecom`` from the robot URL's host; any other URL is a configuration error."""
    host = urllib.parse.urlsplit(url).hostname or ""
    if host in DINGTALK_HOSTS:
        return "dingtalk"
    if host in WECOM_HOSTS:
        return "wecom"
    raise ValueError(f"ALERT_WEBHOOK_URL={url!r} is not allowed: expected a DingTalk (https://oapi.dingtalk.com/"
                     "robot/send?access_token=...) or WeCom (https://qyapi.weixin.qq.com/cgi-bin/webhook/send?key=...) URL")


def markdown(payload: dict[str, Any]) -> tuple[str, str]:
    """A title and a markdown text for an AlertManager webhook payload (version 4)."""
    alerts = payload.get("alerts") or []
    firing = sum(1 for a in alerts if a.get("status") == "firing")
    name = (payload.get("commonLabels") or {}).get("alertname") or "alerts"
    title = f"VoiceGrow {payload.get('status', 'firing').upper()}: {name}"
    lines = [f"### {title}", f"{firing} firing, {len(alerts) - firing} resolved", ""]
    for alert in alerts:
        labels, notes = alert.get("labels") or {}, alert.get("annotations") or {}
        where = f" @ {labels['instance']}" if labels.get("instance") else ""
        lines.append(f"- **[{alert.get('status', '?').upper()}] {labels.get('alertname', '?')}** "
                     f"({labels.get('severity', '-')}){where}")
        if notes.get("summary"):
            lines.append(f"  {notes['summary']}")
        if alert.get("startsAt"):
            lines.append(f"  since {alert['startsAt']}")
    text = "\n".join(lines)
    if len(text) > MAX_CHARS:
        text = text[:MAX_CHARS - 20] + "\n\n... (cut)"
    return title, text


def signed_url(url: str, secret: str, now_ms: int | None = None) -> str:
    """DingTalk's signing: timestamp and base64(HMAC-SHA256(secret, "timestamp\\nsecret")) in the URL."""
    timestamp = str(now_ms if now_ms is not None else int(time.time() * 1000))
    digest = hmac.new(secret.encode(), f"{timestamp}\n{secret}".encode(), hashlib.sha256).digest()
    sign = urllib.parse.quote_plus(base64.b64encode(digest).decode())
    return f"{url}&timestamp={timestamp}&sign={sign}"


def robot_message(kind: str, title: str, text: str) -> dict[str, Any]:
    if kind == "dingtalk":
        return {"msgtype": "markdown", "markdown": {"title": title, "text": text}}
    return {"msgtype": "markdown", "markdown": {"content": text}}


def deliver(url: str, secret: str, payload: dict[str, Any], timeout: float = 10.0) -> None:
    """Post the alerts to the robot; raises RuntimeError when the robot does not take them."""
    kind = robot_kind(url)
    title, text = markdown(payload)
    target = signed_url(url, secret) if kind == "dingtalk" and secret else url
    body = json.dumps(robot_message(kind, title, text), ensure_ascii=False).encode()
    request = urllib.request.Request(target, data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 (a configured https URL)
        answer = json.loads(response.read() or b"{}")
    if answer.get("errcode", 0) != 0:
        raise RuntimeError(f"{kind} robot refused the message: {answer}")


class Handler(http.server.BaseHTTPRequestHandler):
    url = ""
    secret = ""

    def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
        self._answer(200 if self.path == "/healthz" else 404, {"status": "ok"} if self.path == "/healthz" else {})

    def do_POST(self) -> None:  # noqa: N802
        if self.path != "/alert":
            self._answer(404, {"error": "not_found"})
            return
        try:
            length = int(self.headers.get("Content-Length") or 0)
            payload = json.loads(self.rfile.read(min(length, 1 << 20)))
            if not isinstance(payload, dict):
                raise ValueError("expected a JSON object")
        except ValueError as error:
            self._answer(400, {"error": "bad_request", "reason": str(error)})
            return
        if not self.url:
            log.warning("ALERT_WEBHOOK_URL is empty: %d alert(s) not sent to a chat", len(payload.get("alerts") or []))
            self._answer(200, {"status": "dropped"})
            return
        try:
            deliver(self.url, self.secret, payload)
        except (OSError, RuntimeError, ValueError) as error:
            log.error("could not deliver the alerts: %s", error)
            self._answer(502, {"error": "robot_failed", "reason": str(error)})
            return
        self._answer(200, {"status": "sent"})

    def _answer(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the standard library's name)
        log.info("%s %s", self.address_string(), format % args)


def make_server(url: str, secret: str, port: int, host: str = "0.0.0.0") -> http.server.ThreadingHTTPServer:
    if url:
        robot_kind(url)  # a wrong URL fails at start, not at the first alert
    handler = type("ConfiguredHandler", (Handler,), {"url": url, "secret": secret})
    return http.server.ThreadingHTTPServer((host, port), handler)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(os.environ.get("ALERT_WEBHOOK_URL", "").strip(),
                         os.environ.get("ALERT_WEBHOOK_SECRET", "").strip(), int(os.environ.get("LISTEN_PORT", "8060")))
    log.info("listening on port %d", server.server_address[1])
    server.serve_forever()


if __name__ == "__main__":
    main()
