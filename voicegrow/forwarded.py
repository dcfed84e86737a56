"""Who the client really is when a reverse proxy (the documented nginx) stands in front of the server.

Behind nginx every socket's peer is nginx. Admission limits per address, the open-xiaoai allowlist by
address, the auth throttle, logs and stored sessions all need the device's own address, which the proxy
passes in ``X-Forwarded-For`` (or ``X-Real-IP``). Those headers are only believed from the peers listed
in ``TRUSTED_PROXIES``: anyone else could write any address into them, so from an untrusted peer they are
ignored (and counted), and the peer's own address is the client's.

``X-Forwarded-For`` is read from the right: each proxy appends the address it saw, so the right-most hop
that is not itself a trusted proxy is the first address no trusted party can have been told by the
client. Everything left of it is the client's own claim. Pure functions over strings: no sockets here.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping

__all__ = ["ClientAddress", "FORWARDING_HEADERS", "TrustedProxies"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Headers through which a proxy names the client (lower case).
FORWARDING_HEADERS = ("x-forwarded-for", "x-real-ip", "forwarded")


@dataclasses.dataclass(frozen=True)
class ClientAddress:
    """The client's address as the server should use it.

    ``proxy`` is the trusted proxy's address when the client came through one; ``ignored`` says that the
    peer sent forwarding headers without being trusted to (they changed nothing).
    """

    host: str
    proxy: str | None = None
    ignored: bool = False


def _parse_ip(text: str) -> IPAddress | None:
    text = text.strip().strip('"')
    if text.startswith("[") and "]" in text:  # "[2001:db8::1]:443" (Forwarded / some proxies)
        text = text[1:text.index("]")]
    elif text.count(":") == 1:  # "203.0.113.5:51234"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class TrustedProxies:
    """``TRUSTED_PROXIES``: the networks whose forwarding headers are believed."""

    def __init__(self, networks: Iterable[Network] = ()) -> None:
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        address = _parse_ip(host)
        return address is not None and any(address in network for network in self.networks)

    def resolve(self, peer: str, headers: Mapping[str, str]) -> ClientAddress:
        """The client behind ``peer`` given the request's headers (names in lower case)."""
        forwarded_for = headers.get("x-forwarded-for")
        real_ip = headers.get("x-real-ip")
        if not self.trusts(peer):
            return ClientAddress(peer, ignored=any(headers.get(name) for name in FORWARDING_HEADERS))
        if forwarded_for:
            hops = [hop for hop in forwarded_for.split(",") if hop.strip()]
            for hop in reversed(hops):
                address = _parse_ip(hop)
                if address is None:
                    # A hop nobody trusted could write garbage; nothing left of it can be believed, and
                    # the nearest trusted party is the best address known.
                    return ClientAddress(peer, proxy=peer)
                if not any(address in network for network in self.networks):
                    return ClientAddress(str(address), proxy=peer)
            first = _parse_ip(hops[0]) if hops else None  # every hop is a trusted proxy: the first one
            if first is not None:
                return ClientAddress(str(first), proxy=peer)
        if real_ip:
            address = _parse_ip(real_ip)
            if address is not None:
                return ClientAddress(str(address), proxy=peer)
        return ClientAddress(peer, proxy=peer if (forwarded_for or real_ip) else None)


def header_map(pairs: Iterable[tuple[bytes | str, bytes | str]]) -> dict[str, str]:
    """Forwarding headers from raw (name, value) pairs, names in lower case; repeated ones joined by
    commas as HTTP says they mean the same as one list."""
    found: dict[str, str] = {}
    for raw_name, raw_value in pairs:
        name = (raw_name.decode("latin-1") if isinstance(raw_name, bytes) else raw_name).lower()
        if name not in FORWARDING_HEADERS:
            continue
        value = raw_value.decode("latin-1") if isinstance(raw_value, bytes) else raw_value
        found[name] = f"{found[name]}, {value}" if name in found else value
    return found
