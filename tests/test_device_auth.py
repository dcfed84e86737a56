"""Device authentication on the native protocol: bearer tokens and the HMAC challenge."""

from __future__ import annotations

import json

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.client import HandshakeFailed, open_native_client
from voicegrow.device_auth import CredentialsError, DeviceCredentials, auth_proof
from voicegrow.protocol import native as wire
from voicegrow.protocol.errors import ErrorCode


@pytest.fixture
def credentials_file(tmp_path):
    path = tmp_path / "devices.json"
    path.write_text(json.dumps({"kitchen": "kitchen-secret", "bedroom": "bedroom-secret"}), encoding="utf-8")
    return path


async def _refusal(url: str, hello: wire.Hello) -> tuple[wire.Error, int]:
    async with open_websocket_url(url) as ws:
        await ws.send_message(wire.encode(hello))
        with trio.fail_after(5):
            frame = wire.decode_message(await ws.get_message())
            with pytest.raises(ConnectionClosed):
                while True:
                    await ws.get_message()
        return frame, ws.closed.code


def _refusals(server, reason: str) -> float:
    return server.services.metrics.auth_refusals.labels("native", reason)._value.get()


async def test_token_mode(tmp_path, credentials_file) -> None:
    settings = make_settings(tmp_path, device_auth="token", device_credentials_file=credentials_file)
    fmt = wire.AudioFormat(16000)
    async with running_server(settings) as server:
        async with open_native_client(server.ws_url, device_id="kitchen", token="kitchen-secret") as client:
            assert client.hello_ack.capabilities["auth"] == "token"
            await client.send_audio(bytes(640))
        frame, code = await _refusal(server.ws_url, wire.Hello("kitchen", fmt, fmt))
        assert (frame.code, code) == (ErrorCode.AUTH_REQUIRED, 4401)
        frame, code = await _refusal(server.ws_url, wire.Hello("kitchen", fmt, fmt, token="bedroom-secret"))
        assert (frame.code, code) == (ErrorCode.AUTH_FAILED, 4403)
        frame, code = await _refusal(server.ws_url, wire.Hello("garage", fmt, fmt, token="kitchen-secret"))
        assert (frame.code, code) == (ErrorCode.AUTH_FAILED, 4403)
        assert _refusals(server, "missing_token") == 1 and _refusals(server, "bad_token") == 2


async def test_hmac_mode(tmp_path, credentials_file) -> None:
    settings = make_settings(tmp_path, device_auth="hmac", device_credentials_file=credentials_file)
    async with running_server(settings) as server:
        async with open_native_client(server.ws_url, device_id="bedroom", secret="bedroom-secret") as client:
            assert len(client.hello_ack.nonce) == 32
            await client.send_audio(bytes(640))
            await client.send(wire.Ping(nonce=3))
            with trio.fail_after(5):
                while not isinstance(await client.next_frame(), wire.Pong):
                    pass
        with pytest.raises(HandshakeFailed) as refused:
            async with open_native_client(server.ws_url, device_id="bedroom", secret="kitchen-secret"):
                pass
        assert refused.value.error_code == ErrorCode.AUTH_FAILED
        # A device that skips the proof and streams audio is stopped before any of it is used.
        fmt = wire.AudioFormat(16000)
        async with open_websocket_url(server.ws_url) as ws:
            await ws.send_message(wire.encode(wire.Hello("bedroom", fmt, fmt)))
            ack = wire.decode_message(await ws.get_message())
            assert isinstance(ack, wire.HelloAck) and ack.nonce
            await ws.send_message(wire.encode(wire.Audio(pcm=bytes(640))))
            with trio.fail_after(5):
                error = wire.decode_message(await ws.get_message())
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()
            assert error.code == ErrorCode.AUTH_REQUIRED and ws.closed.code == 4401
        # A proof for another session (a replay) is refused: every session has its own nonce.
        async with open_websocket_url(server.ws_url) as ws:
            await ws.send_message(wire.encode(wire.Hello("bedroom", fmt, fmt)))
            ack = wire.decode_message(await ws.get_message())
            replayed = auth_proof("bedroom-secret", "0" * 32, "bedroom", ack.session_id)
            await ws.send_message(wire.encode(wire.Control("auth", {"hmac": replayed})))
            error = wire.decode_message(await ws.get_message())
            assert error.code == ErrorCode.AUTH_FAILED
        assert _refusals(server, "bad_proof") == 2 and _refusals(server, "no_proof") == 1


async def test_credentials_are_reloaded_when_the_file_changes(tmp_path, credentials_file) -> None:
    settings = make_settings(tmp_path, device_auth="token", device_credentials_file=credentials_file)
    async with running_server(settings) as server:
        with pytest.raises(HandshakeFailed):
            async with open_native_client(server.ws_url, device_id="garage", token="new-secret"):
                pass
        credentials_file.write_text(json.dumps({"garage": "new-secret"}), encoding="utf-8")
        async with open_native_client(server.ws_url, device_id="garage", token="new-secret"):
            pass
        with pytest.raises(HandshakeFailed):  # kitchen was revoked by the new file
            async with open_native_client(server.ws_url, device_id="kitchen", token="kitchen-secret"):
                pass


def test_bad_credentials_file_is_a_config_error(tmp_path) -> None:
    with pytest.raises(CredentialsError, match="DEVICE_CREDENTIALS_FILE=.*cannot read"):
        DeviceCredentials(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('["not", "a", "map"]', encoding="utf-8")
    with pytest.raises(CredentialsError, match="expected a JSON object"):
        DeviceCredentials(bad)


def test_tokens_are_compared_whole(credentials_file) -> None:
    creds = DeviceCredentials(credentials_file)
    assert creds.check_token("kitchen", "kitchen-secret")
    for wrong in ("kitchen-secreT", "kitchen-secret ", "kitchen-secre", "", None):
        assert not creds.check_token("kitchen", wrong)
    assert not creds.check_token("unknown", "kitchen-secret")
