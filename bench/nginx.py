"""A real nginx (Debian's nginx-light) running the repository's ``deploy/config/nginx/nginx.conf``,
for ``tests/test_behind_nginx.py`` and ``python -m bench storm``.

The file is rendered for this machine only where it must be: the Compose service names in its upstreams
become loopback replicas, its listening ports become free loopback ports, and the certificate, pid and
log paths point into the test's folder. Routing, stickiness, headers and TLS are the file's own.
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

NGINX_CONF = Path(__file__).resolve().parents[1] / "deploy" / "config" / "nginx" / "nginx.conf"
#: The ports the file listens on, by their role.
LISTEN_PORTS = {"http_redirect": 80, "https": 443, "ws": 4399, "wss": 4443, "device_http": 8000, "health": 8081,
                "asr_pool": 8090}


class NginxUnavailable(RuntimeError):
    """nginx (or openssl for its certificate) is not installed, or it would not start."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Replica:
    ws_port: int
    http_port: int


@dataclass
class Nginx:
    ports: dict[str, int]
    cert: Path
    folder: Path

    def url(self, role: str, path: str = "/") -> str:
        scheme = {"https": "https", "ws": "ws", "wss": "wss"}.get(role, "http")
        return f"{scheme}://127.0.0.1:{self.ports[role]}{path}"

    def error_log(self) -> str:
        path = self.folder / "error.log"
        return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def throwaway_certificate(folder: Path) -> Path:
    openssl = shutil.which("openssl")
    if openssl is None:
        raise NginxUnavailable("openssl not found (Debian package openssl)")
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(folder / "privkey.pem"),
                    "-out", str(folder / "fullchain.pem")], check=True, capture_output=True, timeout=60)
    return folder / "fullchain.pem"


def render(conf: str, replicas: Sequence[Replica], ports: dict[str, int], folder: Path) -> str:
    """The deployed configuration with local upstreams, ports and paths."""
    def upstream(match: re.Match[str]) -> str:
        index = int(match.group(2)[1:]) - 1 if match.group(2) else 0
        if index >= len(replicas):
            return ""  # fewer replicas here than the scale file runs
        port = replicas[index].ws_port if match.group(3) == "4399" else replicas[index].http_port
        return f"{match.group(1)}127.0.0.1:{port}{match.group(4)}"

    conf = re.sub(r"^(\s*server )server(-\d+)?:(\d+)([^\n]*)$", upstream, conf, flags=re.M)
    # The ASR pool's workers: here the replicas' own HTTP ports (every replica serves the audio API).
    conf = re.sub(r"^(\s*server )asr(-\d+)?:(\d+)([^\n]*)$", upstream, conf, flags=re.M)
    for role, port in LISTEN_PORTS.items():
        conf = re.sub(rf"^(\s*listen ){port}\b", rf"\g<1>127.0.0.1:{ports[role]}", conf, flags=re.M)
    conf = conf.replace("/etc/nginx/certs", str(folder))
    conf = re.sub(r"^pid .*;$", f"pid {folder}/nginx.pid;", conf, flags=re.M)
    conf = re.sub(r"^error_log .*;$", f"error_log {folder}/error.log info;", conf, flags=re.M)
    conf = conf.replace("access_log /dev/stdout json;", f"access_log {folder}/access.log json;")
    return conf


@contextmanager
def running_nginx(folder: Path, replicas: Sequence[Replica]) -> Iterator[Nginx]:
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if binary is None:
        raise NginxUnavailable("nginx not found (Debian package nginx-light)")
    folder.mkdir(parents=True, exist_ok=True)
    cert = throwaway_certificate(folder)
    ports = {role: free_port() for role in LISTEN_PORTS}
    conf = folder / "nginx.conf"
    conf.write_text(render(NGINX_CONF.read_text(encoding="utf-8"), replicas, ports, folder), encoding="utf-8")
    proc = subprocess.Popen([binary, "-p", str(folder), "-c", str(conf), "-e", str(folder / "error.log"),
                             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    nginx = Nginx(ports, cert, folder)
    try:
        deadline = time.monotonic() + 15
        while True:
            if proc.poll() is not None:
                raise NginxUnavailable(f"nginx exited: {proc.stderr.read().decode() if proc.stderr else ''}\n"
                                       f"{nginx.error_log()}")
            try:
                if httpx.get(nginx.url("health", "/healthz"), timeout=0.5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise NginxUnavailable(f"nginx did not answer its health check:\n{nginx.error_log()}")
            time.sleep(0.05)
        yield nginx
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
