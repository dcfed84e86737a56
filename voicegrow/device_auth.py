"""Device credentials for the native protocol: bearer tokens or an HMAC challenge.

``DEVICE_AUTH=token``: the device puts its secret in HELLO's ``token``. Simple, but the secret crosses
the wire (use TLS in front). ``DEVICE_AUTH=hmac``: the secret never crosses the wire; HELLO_ACK carries
a fresh server nonce and the device answers with a CONTROL ``auth`` event whose ``hmac`` is
``hex(HMAC-SHA256(secret, nonce + "\\n" + device_id + "\\n" + session_id))``, before any audio. A replayed
answer is useless because every session has its own nonce.

Credentials live in a JSON file, ``{"device-id": "secret", ...}``, re-read when it changes, so an
operator can add or revoke a device without restarting the server. Comparisons are constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

from voicegrow.settings import ConfigError

__all__ = ["CredentialsError", "DeviceCredentials", "auth_proof", "new_nonce"]


class CredentialsError(ConfigError):
    """The credentials file is missing or malformed; the message names the file and the problem."""


def new_nonce() -> str:
    return secrets.token_hex(16)


def auth_proof(secret: str, nonce: str, device_id: str, session_id: str) -> str:
    """What a device sends in the ``auth`` event in ``hmac`` mode."""
    message = f"{nonce}\n{device_id}\n{session_id}".encode()
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


class DeviceCredentials:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._secrets: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            stat = self.path.stat()
        except OSError as exc:
            raise CredentialsError(f"DEVICE_CREDENTIALS_FILE={str(self.path)!r}: cannot read: {exc.strerror}") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        if stamp == self._stamp:
            return
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CredentialsError(f"DEVICE_CREDENTIALS_FILE={str(self.path)!r}: not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in data.items()):
            raise CredentialsError(
                f"DEVICE_CREDENTIALS_FILE={str(self.path)!r}: expected a JSON object of device id → secret")
        self._secrets, self._stamp = dict(data), stamp

    def secret_for(self, device_id: str) -> str | None:
        """The device's secret, or None for an unknown device (the file is re-read if it changed)."""
        try:
            self._load()
        except CredentialsError:
            pass  # keep serving with the last good credentials; the error was logged at start-up
        return self._secrets.get(device_id)

    def check_token(self, device_id: str, token: str | None) -> bool:
        secret = self.secret_for(device_id)
        # Compare even for unknown devices, so timing does not tell which device ids exist.
        return hmac.compare_digest((token or "").encode(), (secret or "\0" * 32).encode()) and secret is not None

    def check_proof(self, device_id: str, nonce: str, session_id: str, proof: str) -> bool:
        secret = self.secret_for(device_id)
        expected = auth_proof(secret or "\0", nonce, device_id, session_id)
        return hmac.compare_digest(proof.encode(), expected.encode()) and secret is not None
