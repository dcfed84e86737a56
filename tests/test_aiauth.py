"""Request signing for the LLM/TTS service (DESIGN §4)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from voicegrow.aiauth import auth_headers, service_url, verify_signature

NOW = 1_700_000_000
NONCE = "00112233445566778899aabbccddeeff"
BODY = b'{"a":1}'


def independent_signature(secret: str, method: str, path: str, timestamp: str, nonce: str, body: bytes) -> str:
    message = f"{method}\n{path}\n{timestamp}\n{nonce}\n{hashlib.sha256(body).hexdigest()}"
    return hmac.new(secret.encode(), message.encode(), hashlib.sha256).hexdigest()


def test_no_api_key_means_no_headers() -> None:
    assert auth_headers("POST", "/v1/chat/completions", BODY, "", "secret") == {}


def test_api_key_alone_is_a_bearer_token() -> None:
    assert auth_headers("POST", "/v1/chat/completions", BODY, "key", "") == {"Authorization": "Bearer key"}


def test_signature_matches_vector_from_openssl() -> None:
    # printf 'POST\n/v1/chat/completions\n1700000000\n<nonce>\n<sha256 of body>' | openssl dgst -sha256 -hmac s3cret
    headers = auth_headers("POST", "/v1/chat/completions", BODY, "key", "s3cret", now=NOW, nonce=NONCE)
    assert headers == {
        "Authorization": "Bearer key",
        "X-Timestamp": "1700000000",
        "X-Nonce": NONCE,
        "X-Signature": "65578d868b506b35e73cc725c81c83f5d833a26cf68131b3d03d48c56210cb82",
    }


def test_signature_of_empty_get_matches_vector() -> None:
    headers = auth_headers("GET", "/v1/models", b"", "k", "k2", now=NOW, nonce="abcd")
    assert headers["X-Signature"] == "f292847ab425d8210b564a4b3b10619863b5a5cbfa4354337415a615a07a38e2"


@pytest.mark.parametrize("target", [
    "/v1/audio/speech",
    "http://gateway:8080/v1/audio/speech",
    "https://gateway/v1/audio/speech?trace=1",
])
def test_signed_path_has_no_host_and_no_query(target: str) -> None:
    headers = auth_headers("post", target, BODY, "key", "sec", now=NOW, nonce="ab")
    assert headers["X-Signature"] == independent_signature("sec", "POST", "/v1/audio/speech", "1700000000", "ab", BODY)


def test_nonce_is_fresh_random_hex_of_16_bytes() -> None:
    first = auth_headers("POST", "/p", b"", "key", "sec")["X-Nonce"]
    second = auth_headers("POST", "/p", b"", "key", "sec")["X-Nonce"]
    assert len(first) == 32 and int(first, 16) >= 0
    assert first != second


def test_verify_accepts_what_auth_headers_signs() -> None:
    headers = auth_headers("POST", "/v1/chat/completions", BODY, "key", "sec", now=NOW)
    lower = {k.lower(): v for k, v in headers.items()}
    assert verify_signature(lower, "POST", "/v1/chat/completions", BODY, "key", "sec", now=NOW + 10) is None
    assert verify_signature(headers, "POST", "/v1/chat/completions", BODY, "key", "sec", now=NOW) is None


@pytest.mark.parametrize(("change", "reason"), [
    ({"secret": "other"}, "signature mismatch"),
    ({"body": b'{"a":2}'}, "signature mismatch"),
    ({"path": "/v1/audio/speech"}, "signature mismatch"),
    ({"method": "PUT"}, "signature mismatch"),
    ({"api_key": "other"}, "bad or missing bearer token"),
    ({"now": NOW + 301}, "X-Timestamp outside the allowed clock skew"),
    ({"now": NOW - 301}, "X-Timestamp outside the allowed clock skew"),
])
def test_verify_rejects_tampering(change: dict, reason: str) -> None:
    headers = auth_headers("POST", "/v1/chat/completions", BODY, "key", "sec", now=NOW, nonce=NONCE)
    args = {"method": "POST", "path": "/v1/chat/completions", "body": BODY, "api_key": "key", "secret": "sec",
            "now": NOW, **change}
    result = verify_signature(headers, args["method"], args["path"], args["body"], args["api_key"],
                              args["secret"], now=args["now"])
    assert result == reason


def test_verify_reports_missing_or_malformed_headers() -> None:
    assert verify_signature({}, "GET", "/", b"", "key", "") == "bad or missing bearer token"
    assert verify_signature({"authorization": "Bearer key"}, "GET", "/", b"", "key", "") is None
    assert verify_signature({"authorization": "Bearer key"}, "GET", "/", b"", "key", "sec") == (
        "missing X-Timestamp, X-Nonce or X-Signature")
    bad_stamp = {"authorization": "Bearer key", "x-timestamp": "soon", "x-nonce": "a", "x-signature": "b"}
    assert verify_signature(bad_stamp, "GET", "/", b"", "key", "sec") == "X-Timestamp is not an integer"


def test_service_url_joins_and_tolerates_a_v1_base() -> None:
    assert service_url("http://h:1", "/v1/models") == "http://h:1/v1/models"
    assert service_url("http://h:1/", "/v1/models") == "http://h:1/v1/models"
    assert service_url("https://api.example.com/v1", "/v1/models") == "https://api.example.com/v1/models"
    assert service_url("https://gw/ai-manager/", "/v1/audio/speech") == "https://gw/ai-manager/v1/audio/speech"
