"""TLS without a proxy: ``TLS_CERT_FILE`` / ``TLS_KEY_FILE`` serve ``wss://`` on the speaker port and
``https://`` on the HTTP port, and a renewed certificate is taken up without a restart.

One live :class:`ssl.SSLContext` per port, built once; a reload loads the new chain *into* those contexts,
so the listeners (trio's ``SSLListener`` here, hypercorn's there) keep their context object and every
connection accepted afterwards gets the new certificate, while connections already open keep theirs
(OpenSSL copies the certificate into each connection). A reload reads both files once into a private
snapshot and checks that pair in a scratch context first: a half-renewed pair (new certificate, old key)
is refused with a warning and the old certificate stays in service until the next attempt.

Reloads happen on SIGHUP (``voicegrow serve``) and when either file changes (polled).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from pathlib import Path
from typing import Any

import trio

from voicegrow.settings import ConfigError

__all__ = ["CertificateStore", "POLL_INTERVAL_S"]

log = logging.getLogger(__name__)

#: How often the files' modification stamps are compared (certbot renews days ahead: seconds do not matter).
POLL_INTERVAL_S = 5.0


def _server_context(alpn: list[str]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.options |= ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols(alpn)
    return context


class CertificateStore:
    """The server's certificate chain and key, as live server contexts for both listeners."""

    def __init__(self, cert_file: str | os.PathLike[str], key_file: str | os.PathLike[str]) -> None:
        self.cert_path = Path(cert_file)
        self.key_path = Path(key_file)
        self.http_context = _server_context(["h2", "http/1.1"])
        self.ws_context = _server_context(["http/1.1"])
        self._stamp: tuple[Any, ...] | None = None
        self.reloads = 0
        self.reload()  # a bad pair at start-up is a configuration error

    def _stamps(self) -> tuple[Any, ...]:
        stamps = []
        for name, path in (("TLS_CERT_FILE", self.cert_path), ("TLS_KEY_FILE", self.key_path)):
            try:
                st = path.stat()
            except OSError as exc:
                raise ConfigError(f"{name}={str(path)!r}: cannot read: {exc.strerror}") from None
            stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def reload(self) -> None:
        """Read both files and put the pair in service; raises :class:`ConfigError` (naming the variable)
        and keeps the old pair when they are unreadable or do not match."""
        stamp = self._stamps()
        try:
            cert, key = self.cert_path.read_bytes(), self.key_path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"TLS_CERT_FILE/TLS_KEY_FILE: cannot read {exc.filename!r}: {exc.strerror}") from None
        with tempfile.TemporaryDirectory(prefix="voicegrow-tls-") as private:  # mode 0700
            cert_copy, key_copy = Path(private, "cert.pem"), Path(private, "key.pem")
            cert_copy.write_bytes(cert)
            fd = os.open(key_copy, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as handle:
                handle.write(key)
            try:
                _server_context([]).load_cert_chain(cert_copy, key_copy)
            except (ssl.SSLError, ValueError) as exc:
                raise ConfigError(f"TLS_CERT_FILE={str(self.cert_path)!r} / TLS_KEY_FILE={str(self.key_path)!r}: "
                                  f"not a usable PEM certificate chain and matching key ({exc})") from None
            for context in (self.http_context, self.ws_context):
                context.load_cert_chain(cert_copy, key_copy)
        self._stamp = stamp
        self.reloads += 1

    def changed(self) -> bool:
        try:
            return self._stamps() != self._stamp
        except ConfigError:
            return False  # a file being replaced (renamed away for a moment): look again next time

    def try_reload(self, why: str) -> bool:
        """Reload, logging instead of raising: a running server keeps its old certificate on failure."""
        try:
            self.reload()
        except ConfigError as exc:
            log.warning("TLS certificate not reloaded (%s): %s; the previous one stays in service", why, exc)
            return False
        log.info("TLS certificate reloaded (%s) from %s", why, self.cert_path)
        return True

    async def watch(self, interval_s: float = POLL_INTERVAL_S) -> None:
        """Reload whenever either file changes; runs until cancelled."""
        refused: tuple[Any, ...] | None = None  # a pair that failed once is not retried until it changes again
        while True:
            await trio.sleep(interval_s)
            if self.changed():
                stamp = self._stamp_or_none()
                if stamp != refused and not self.try_reload("the files changed"):
                    refused = stamp

    def _stamp_or_none(self) -> tuple[Any, ...] | None:
        try:
            return self._stamps()
        except ConfigError:
            return None

    def hypercorn_config(self) -> Any:
        """A hypercorn ``Config`` that serves this store's live context (not one of its own making)."""
        from hypercorn.config import Config

        store = self

        class LiveTlsConfig(Config):
            def create_ssl_context(self) -> ssl.SSLContext:
                return store.http_context

        config = LiveTlsConfig()
        config.certfile, config.keyfile = str(self.cert_path), str(self.key_path)  # marks the binds secure
        return config
