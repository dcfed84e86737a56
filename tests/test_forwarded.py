"""TRUSTED_PROXIES: which address is the client's, as a table of peers and headers."""

from __future__ import annotations

import pytest

from voicegrow.forwarded import ClientAddress, TrustedProxies, header_map
from voicegrow.settings import ConfigError, load_settings, parse_networks

NGINX = TrustedProxies(parse_networks("127.0.0.1/32,10.0.0.0/8", "TRUSTED_PROXIES"))

CASES = [
    # peer, headers, expected
    ("127.0.0.1", {"x-forwarded-for": "192.168.1.23"}, ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    # A client's own claim is left of the hop nginx appended: the right-most untrusted hop wins.
    ("127.0.0.1", {"x-forwarded-for": "1.2.3.4, 192.168.1.23"}, ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    # Two trusted proxies in a row (a CDN edge in 10/8, then nginx): skipped from the right.
    ("127.0.0.1", {"x-forwarded-for": "192.168.1.23, 10.1.2.3"}, ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    # Every hop trusted: the first one is the client.
    ("127.0.0.1", {"x-forwarded-for": "10.9.9.9, 10.1.2.3"}, ClientAddress("10.9.9.9", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-real-ip": "192.168.1.23"}, ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-forwarded-for": "192.168.1.23", "x-real-ip": "8.8.8.8"},
     ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-forwarded-for": "[2001:db8::7]:443"}, ClientAddress("2001:db8::7", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-forwarded-for": "203.0.113.9:51234"}, ClientAddress("203.0.113.9", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-forwarded-for": "::ffff:192.168.1.23"}, ClientAddress("192.168.1.23", proxy="127.0.0.1")),
    # Garbage in the right-most untrusted position: nothing left of it is believed; the proxy is the client.
    ("127.0.0.1", {"x-forwarded-for": "192.168.1.23, not-an-ip"}, ClientAddress("127.0.0.1", proxy="127.0.0.1")),
    ("127.0.0.1", {"x-real-ip": "<script>"}, ClientAddress("127.0.0.1", proxy="127.0.0.1")),
    # Through the trusted proxy without headers (its own health check): the proxy itself.
    ("127.0.0.1", {}, ClientAddress("127.0.0.1")),
    # From an untrusted peer every forwarding header is ignored, and that is noted.
    ("192.168.1.50", {"x-forwarded-for": "127.0.0.1"}, ClientAddress("192.168.1.50", ignored=True)),
    ("192.168.1.50", {"x-real-ip": "10.0.0.1"}, ClientAddress("192.168.1.50", ignored=True)),
    ("192.168.1.50", {"forwarded": "for=10.0.0.1"}, ClientAddress("192.168.1.50", ignored=True)),
    ("192.168.1.50", {}, ClientAddress("192.168.1.50")),
]


@pytest.mark.parametrize(("peer", "headers", "expected"), CASES)
def test_the_client_address_behind_trusted_proxies(peer: str, headers: dict[str, str],
                                                   expected: ClientAddress) -> None:
    assert NGINX.resolve(peer, headers) == expected


def test_with_no_trusted_proxies_every_header_is_ignored() -> None:
    nobody = TrustedProxies()
    assert not nobody
    assert nobody.resolve("127.0.0.1", {"x-forwarded-for": "1.2.3.4"}) == ClientAddress("127.0.0.1", ignored=True)


def test_header_map_lowercases_names_and_joins_repeats() -> None:
    pairs = [(b"Host", b"x"), (b"X-Forwarded-For", b"1.1.1.1"), (b"x-forwarded-for", b"2.2.2.2"),
             ("X-Real-IP", "3.3.3.3")]
    assert header_map(pairs) == {"x-forwarded-for": "1.1.1.1, 2.2.2.2", "x-real-ip": "3.3.3.3"}


def test_trusted_proxies_setting_is_validated() -> None:
    assert load_settings({"TRUSTED_PROXIES": "172.16.0.0/12, ::1"}, env_file=None).trusted_proxies
    with pytest.raises(ConfigError, match=r"^TRUSTED_PROXIES='nginx' is not allowed: 'nginx' is no IP"):
        load_settings({"TRUSTED_PROXIES": "nginx"}, env_file=None)
