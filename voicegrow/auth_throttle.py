"""Failed authentication, throttled per source address: one piece for every credential the server checks.

The admin API (``ADMIN_TOKEN``), the native devices' credentials (``DEVICE_AUTH``), the open-xiaoai URL
token and, when they land, the audio API keys all report a wrong credential here and ask here first
whether an address is locked out. One throttle per server, shared by every surface: an address guessing
at any of them is the same attacker.

What counts is *distinct* wrong credentials an address presented within ``window_s``. Brute force needs a
new guess every try; a client with a stale token retries the same wrong one, and a 401 that says "wrong
token" helps its operator more than a lock that hides it. A missing credential is no guess and is not
counted. At ``max_failures`` guesses the address is locked out for ``backoff_s``, doubled each time it
trips again (up to ``max_backoff_s``); while locked, every attempt is refused with a Retry-After — a right
credential too, so the lock tells a guesser nothing.

Sans-IO: the clock is injected, nothing here sleeps, touches sockets or knows HTTP.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import math
import secrets
import time
from collections.abc import Callable

__all__ = ["Address", "AuthThrottle", "address_key", "parse_address"]

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_address(raw: str | None) -> Address | None:
    """An IP address from a socket peer string; IPv4-mapped IPv6 becomes IPv4, a zone id is dropped."""
    if not raw:
        return None
    try:
        address = ipaddress.ip_address(raw.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def address_key(raw: str | None) -> str:
    """The throttle's key for a peer: the normalised address, so ::ffff:10.0.0.7 and 10.0.0.7 are one."""
    address = parse_address(raw)
    return str(address) if address is not None else (raw or "unknown")


@dataclasses.dataclass
class _Record:
    window_start: float
    last_seen: float
    guesses: set[bytes] = dataclasses.field(default_factory=set)
    locked_until: float = 0.0
    strikes: int = 0  # lock-outs so far, for the doubling back-off


class AuthThrottle:
    def __init__(self, *, max_failures: int = 20, backoff_s: float = 30.0, max_backoff_s: float = 900.0,
                 window_s: float = 600.0, max_tracked: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if max_failures < 1:
            raise ValueError("max_failures must be at least 1")
        self.max_failures = max_failures
        self.backoff_s = backoff_s
        self.max_backoff_s = max(max_backoff_s, backoff_s)
        self.window_s = window_s
        self.max_tracked = max_tracked
        self._clock = clock
        # Wrong credentials are kept only as keyed hashes: a near miss of the real token is never in memory.
        self._key = secrets.token_bytes(16)
        self._records: dict[str, _Record] = {}

    def retry_after(self, address: str) -> int | None:
        """Whole seconds until ``address`` may try again, or None when it is not locked out."""
        record = self._records.get(address)
        if record is None:
            return None
        remaining = record.locked_until - self._clock()
        return math.ceil(remaining) if remaining > 0 else None

    def failed(self, address: str, credential: str | bytes) -> int | None:
        """Note a wrong ``credential`` from ``address``; returns the Retry-After if this guess locked it out."""
        now = self._clock()
        record = self._record(address, now)
        if record.locked_until > now:
            return math.ceil(record.locked_until - now)
        if now - record.window_start > self.window_s:
            record.window_start, record.guesses = now, set()
        raw = credential.encode("utf-8", "surrogateescape") if isinstance(credential, str) else credential
        record.guesses.add(hashlib.blake2b(raw, key=self._key, digest_size=16).digest())
        if len(record.guesses) < self.max_failures:
            return None
        lock_s = min(self.backoff_s * 2 ** record.strikes, self.max_backoff_s)
        record.strikes += 1
        record.locked_until = now + lock_s
        record.window_start, record.guesses = record.locked_until, set()  # a fresh allowance afterwards
        return math.ceil(lock_s)

    def tracked(self) -> int:
        """How many addresses the throttle remembers (bounded by ``max_tracked``)."""
        return len(self._records)

    def _record(self, address: str, now: float) -> _Record:
        record = self._records.get(address)
        if record is not None and now - max(record.last_seen, record.locked_until) > self.max_backoff_s:
            record = None  # quiet for long enough: forgiven, strikes and all
        if record is None:
            if len(self._records) >= self.max_tracked:
                self._forget(now)
            record = self._records[address] = _Record(window_start=now, last_seen=now)
        record.last_seen = now
        return record

    def _forget(self, now: float) -> None:
        """Bound memory under a scan from many addresses: drop the quiet ones, then the oldest unlocked."""
        for address in [a for a, r in self._records.items()
                        if now - max(r.last_seen, r.locked_until) > self.window_s]:
            del self._records[address]
        if len(self._records) >= self.max_tracked:
            unlocked = sorted((r.last_seen, a) for a, r in self._records.items() if r.locked_until <= now)
            for _, address in unlocked[: len(self._records) - self.max_tracked + 1]:
                del self._records[address]
        while len(self._records) >= self.max_tracked:  # every one locked: the oldest lock goes
            del self._records[min(self._records, key=lambda a: self._records[a].locked_until)]
