"""Who may use the admin surface (conversations, recordings, erasure, sessions, metrics).

Secure by default: with ``ADMIN_TOKEN`` unset the server makes a strong random token on first start and
keeps it in ``DATA_DIR/admin_token`` (mode 0600), so an admin API is never open to the network without a
credential. Clients on ``ADMIN_ALLOW_FROM`` (by default only 127.0.0.1 and ::1 while the token is
generated) may skip it, so ``curl localhost`` keeps working on the box itself; everyone else sends
``Authorization: Bearer <token>``. A request that came through a proxy (``Forwarded``,
``X-Forwarded-For`` or ``X-Real-IP``) never gets the address bypass: a reverse proxy on the same host
would otherwise make every client on the internet look like 127.0.0.1.

:meth:`AdminAuth.check` is the one place the rule lives; every HTTP route that is not public (the admin
API, the console's API) goes through it. It knows nothing of Quart: it takes the address and headers.
"""

from __future__ import annotations

import dataclasses
import hmac
import ipaddress
import logging
import os
import secrets
import stat
from pathlib import Path
from typing import Any

from voicegrow.auth_throttle import Address, AuthThrottle, address_key, parse_address
from voicegrow.settings import ConfigError, Settings, parse_networks

__all__ = ["AdminAuth", "Refusal", "TOKEN_FILE_NAME", "allowed_networks", "ensure_admin_token"]

log = logging.getLogger(__name__)

TOKEN_FILE_NAME = "admin_token"
#: Headers a reverse proxy adds; their presence means the socket's peer is not the client.
PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclasses.dataclass(frozen=True)
class Refusal:
    """Why a request is refused, as an HTTP answer: 401 (no or wrong credential) or 429 (locked out)."""

    status: int
    error: str
    reason: str
    retry_after_s: int | None = None


def ensure_admin_token(data_dir: str | os.PathLike[str]) -> tuple[str, Path, bool]:
    """The generated admin token, its file, and whether this call created it.

    Created atomically (written to a private temporary file, then hard-linked into place), so that
    several processes starting at once (``WORKERS``) agree on one token and none reads a half-written file.
    """
    directory = Path(data_dir)
    path = directory / TOKEN_FILE_NAME
    try:
        return _read_token(path), path, False
    except FileNotFoundError:
        pass
    try:
        directory.mkdir(parents=True, exist_ok=True)
        temporary = directory / f".{TOKEN_FILE_NAME}.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="ascii") as handle:
                handle.write(secrets.token_urlsafe(32) + "\n")  # 256 random bits
                handle.flush()
                os.fsync(handle.fileno())
            try:
                os.link(temporary, path)
                created = True
            except FileExistsError:  # another process won the race; its token is the token
                created = False
        finally:
            temporary.unlink(missing_ok=True)
        return _read_token(path), path, created
    except OSError as exc:
        raise ConfigError(f"DATA_DIR={str(directory)!r}: cannot keep the admin token there "
                          f"({exc.strerror or exc}); set ADMIN_TOKEN or fix the directory") from None


def _read_token(path: Path) -> str:
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"admin token file {str(path)!r} cannot be read: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("admin token file %s is readable by others (mode %o); making it 0600", path, mode & 0o777)
        try:
            path.chmod(0o600)
        except OSError as exc:  # not ours to change (another owner, a read-only mount): say so, go on
            log.warning("admin token file %s: cannot make it 0600: %s", path, exc.strerror or exc)
    if len(token) < 16:
        raise ConfigError(f"admin token file {str(path)!r} holds no usable token (under 16 characters); "
                          "delete it to have a new one made")
    return token


def _locked_out(retry_after_s: int) -> Refusal:
    return Refusal(429, "too_many_failures",
                   f"too many failed authentications from this address; retry in {retry_after_s} s", retry_after_s)


def allowed_networks(settings: Settings) -> tuple[Network, ...]:
    """The networks that may skip the token: ``auto`` is loopback while the token is generated, else none."""
    value = settings.admin_allow_from.strip()
    if value.lower() == "auto":
        return () if settings.admin_token else parse_networks("127.0.0.1/32,::1/128")
    if value.lower() == "none":
        return ()
    return parse_networks(value)


class AdminAuth:
    """The admin credential check, with failed guesses reported to the shared :class:`AuthThrottle`."""

    def __init__(self, token: str, allow_from: tuple[Network, ...], throttle: AuthThrottle,
                 metrics: Any = None, *, token_file: Path | None = None) -> None:
        self.token = token
        self.allow_from = allow_from
        self.throttle = throttle
        self.token_file = token_file  # None when the token came from ADMIN_TOKEN
        self._metrics = metrics

    @classmethod
    def from_settings(cls, settings: Settings, throttle: AuthThrottle, metrics: Any = None) -> AdminAuth:
        """Reads or creates the token file when ``ADMIN_TOKEN`` is unset; logs where it is, once."""
        if settings.admin_token:
            return cls(settings.admin_token, allowed_networks(settings), throttle, metrics)
        token, path, created = ensure_admin_token(settings.data_dir)
        if created:
            log.warning("ADMIN_TOKEN is unset: generated an admin token in %s (mode 0600); "
                        "`voicegrow admin-token` prints it", path)
        else:
            log.info("admin token from %s (`voicegrow admin-token` prints it)", path)
        return cls(token, allowed_networks(settings), throttle, metrics, token_file=path)

    def allowed_without_token(self, address: Address | None, proxied: bool) -> bool:
        return address is not None and not proxied and any(address in net for net in self.allow_from)

    def check(self, remote: str | None, authorization: str | None, *, proxied: bool) -> Refusal | None:
        """None when the request may proceed, else the refusal to answer with.

        A presented bearer token is always checked, even from an allowed address: a wrong credential is
        never accepted, and a console's sign-in can verify a token from anywhere.
        """
        address = parse_address(remote)
        key = address_key(remote)
        retry = self.throttle.retry_after(key)
        if retry is not None:
            self._count("throttled")
            return _locked_out(retry)
        scheme, _, token = (authorization or "").partition(" ")
        if not authorization:
            if self.allowed_without_token(address, proxied):
                return None
            self._count("missing_token")
            return Refusal(401, "unauthorized", "missing bearer token (ADMIN_TOKEN; see `voicegrow admin-token`)")
        if scheme.lower() == "bearer" and hmac.compare_digest(token.encode("utf-8", "surrogateescape"),
                                                              self.token.encode()):
            return None
        self._count("bad_token")
        if scheme.lower() == "bearer" and token:
            locked = self.throttle.failed(key, token)
            if locked is not None:
                return _locked_out(locked)
        return Refusal(401, "unauthorized", "missing or wrong bearer token (ADMIN_TOKEN)")

    def _count(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.auth_refusals.labels("admin", reason).inc()
