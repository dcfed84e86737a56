"""Every limit enforced: the offending client is refused with its code, the others are unaffected."""

from __future__ import annotations

import socket
import struct

import pytest
import trio
from trio_websocket import ConnectionRejected, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, RejectConnection, Request

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.client import open_native_client
from voicegrow.protocol import native as wire
from voicegrow.protocol.errors import ErrorCode


def _limit_hits(server, limit: str) -> float:
    return server.services.metrics.limit_hits.labels(limit)._value.get()


async def _ping_pong(client) -> None:
    """The well-behaved client is still served."""
    await client.send(wire.Ping(nonce=42))
    with trio.fail_after(5):
        while not isinstance(frame := await client.next_frame(), wire.Pong):
            pass
    assert frame.nonce == 42


async def _connect_from(port: int, source: str) -> tuple[int, trio.SocketStream | None]:
    """Open a WebSocket from a chosen loopback source address; the HTTP status of the answer."""
    stream = await trio.open_tcp_stream("127.0.0.1", port, local_address=source)
    conn = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(conn.send(Request(host="127.0.0.1", target="/")))
    with trio.fail_after(5):
        while True:
            conn.receive_data(await stream.receive_some(65536))
            for event in conn.events():
                if isinstance(event, AcceptConnection):
                    hello = wire.Hello(f"from-{source}", wire.AudioFormat(16000), wire.AudioFormat(24000))
                    await stream.send_all(conn.send(BytesMessage(data=wire.encode(hello))))
                    return 101, stream
                if isinstance(event, RejectConnection):
                    await stream.aclose()
                    return event.status_code, None


async def test_max_sessions_in_total(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, max_sessions=2)) as server:
        async with open_native_client(server.ws_url, device_id="a") as a, \
                open_native_client(server.ws_url, device_id="b"):
            with pytest.raises(ConnectionRejected) as refused:
                async with open_websocket_url(server.ws_url):
                    pass
            assert refused.value.status_code == 503
            assert b"max_sessions" in refused.value.body
            await _ping_pong(a)
        assert _limit_hits(server, "max_sessions") == 1
        async with open_native_client(server.ws_url, device_id="c") as c:  # room again
            await _ping_pong(c)


async def test_max_sessions_per_source_address(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, max_sessions_per_ip=2)) as server:
        streams = []
        for _ in range(2):
            status, stream = await _connect_from(server.ws_port, "127.0.0.2")
            assert status == 101
            streams.append(stream)
        with trio.fail_after(5):
            while server.services.registry.count_from("127.0.0.2") < 2:
                await trio.sleep(0.01)
        status, _ = await _connect_from(server.ws_port, "127.0.0.2")
        assert status == 429
        # Another address is unaffected.
        status, other = await _connect_from(server.ws_port, "127.0.0.3")
        assert status == 101
        for stream in [*streams, other]:
            await stream.aclose()
        assert _limit_hits(server, "max_sessions_per_ip") == 1


async def test_connection_attempts_per_minute(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, max_connects_per_ip_per_min=3)) as server:
        for _ in range(3):
            status, stream = await _connect_from(server.ws_port, "127.0.0.4")
            assert status == 101
            await stream.aclose()
        status, _ = await _connect_from(server.ws_port, "127.0.0.4")
        assert status == 429
        status, stream = await _connect_from(server.ws_port, "127.0.0.5")
        assert status == 101
        await stream.aclose()
        assert _limit_hits(server, "connect_rate") == 1


async def test_audio_faster_than_real_time_is_refused(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, max_audio_rate=2)) as server:
        async with open_native_client(server.ws_url, device_id="calm") as calm, \
                open_native_client(server.ws_url, device_id="flood") as flood:
            with trio.fail_after(10):
                with pytest.raises(Exception):  # the flood is cut off: 60 s of audio at once
                    for _ in range(3000):
                        await flood.send_audio(bytes(640))
                    while True:
                        frame = await flood.next_frame()
                        if isinstance(frame, wire.Error):
                            assert frame.code == ErrorCode.RATE_LIMITED
            await _ping_pong(calm)
        assert _limit_hits(server, "audio_rate") == 1


async def test_oversized_frame_counts_as_a_protocol_error(tmp_path) -> None:
    async with running_server(make_settings(tmp_path, max_frame_bytes=2048)) as server:
        async with open_native_client(server.ws_url, device_id="calm") as calm:
            async with open_native_client(server.ws_url, device_id="big") as big:
                header = struct.pack("!2sBBIIIII", wire.MAGIC, wire.VERSION, wire.FrameType.AUDIO, 0, 0, 0, 0, 4096)
                await big._ws.send_message(header + bytes(4096))
                with trio.fail_after(5):
                    error = await big.next_frame()
                assert isinstance(error, wire.Error) and error.code == ErrorCode.OVERSIZED
            await _ping_pong(calm)
        assert server.services.metrics.protocol_errors.labels("oversized")._value.get() == 1


async def test_a_device_that_stops_reading_is_closed(tmp_path) -> None:
    settings = make_settings(tmp_path, write_queue_frames=8, slow_reader_timeout_s=1)
    async with running_server(settings) as server:
        async with open_native_client(server.ws_url, device_id="calm") as calm:
            # A raw client with a tiny receive window that sends PINGs and never reads the PONGs.
            sock = trio.socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            await sock.connect(("127.0.0.1", server.ws_port))
            stream = trio.SocketStream(sock)
            conn = WSConnection(ConnectionType.CLIENT)
            await stream.send_all(conn.send(Request(host="127.0.0.1", target="/")))
            while not any(isinstance(e, AcceptConnection) for e in conn.events()):
                conn.receive_data(await stream.receive_some(65536))
            hello = wire.Hello("deaf", wire.AudioFormat(16000), wire.AudioFormat(24000))
            await stream.send_all(conn.send(BytesMessage(data=wire.encode(hello))))
            ping = conn.send(BytesMessage(data=wire.encode(wire.Ping(nonce=1))))
            with trio.fail_after(30):
                with pytest.raises((trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
                    while True:  # the server closes the session once its write queue stayed full
                        await stream.send_all(ping * 64)
                        if _limit_hits(server, "slow_reader"):
                            await trio.sleep(0.2)
            await _ping_pong(calm)
            await stream.aclose()
        assert _limit_hits(server, "slow_reader") == 1


@pytest.mark.slow
async def test_utterance_length_and_llm_input_are_capped(tmp_path, audio_fixtures, manifest) -> None:
    from tests.test_pipeline_e2e import _clip, _server_with_fake_ai
    from voicegrow.client import stream_wav_and_collect

    entry = next(e for e in manifest if e["id"] == "en-01")  # "Tell me a story about a little rabbit." ~2.9 s
    async with _server_with_fake_ai(tmp_path, vad_max_utterance_s=1.5, max_llm_input_chars=10) as (server, ai):
        async with open_native_client(server.ws_url, device_id="chatty") as client:
            await stream_wav_and_collect(client, _clip(audio_fixtures, entry), speed=2.0, timeout_s=60)
            # The session is still served after both limits were hit.
            await _ping_pong(client)

            def sent() -> list[str]:
                return [r["body"]["messages"][-1]["content"] for r in ai.requests
                        if r["path"].endswith("/chat/completions")]

            with trio.fail_after(30):
                while not sent():
                    await trio.sleep(0.05)
    assert all(len(text) <= 10 for text in sent())
    assert _limit_hits(server, "utterance_length") >= 1
    assert _limit_hits(server, "llm_input_chars") >= 1


async def test_open_xiaoai_audio_faster_than_real_time_is_cut_off(tmp_path) -> None:
    """The open-xiaoai driver had no MAX_AUDIO_RATE check: a flood was fed to the VAD as fast as it came.
    Its 90 ms cadence (and the start-up burst) pass; 60 s of audio at once closes that speaker only."""
    from bench.xiaoai_emulator import run_emulator

    async with running_server(make_settings(tmp_path, max_audio_rate=2)) as server:
        async with run_emulator(server.ws_url, serial="calm") as calm, \
                run_emulator(server.ws_url, serial="flood") as flood:
            for emu in (calm, flood):
                await emu.wait_for_request("start_recording", timeout=10)
            await calm.stream_pcm(bytes(2 * 16000 * 2), realtime=True)  # 2 s, one frame per 90 ms
            assert _limit_hits(server, "audio_rate") == 0
            await flood.stream_pcm(bytes(2 * 16000 * 60), realtime=False)
            await flood.wait_until(lambda e: not e.connected, timeout=10)
            assert _limit_hits(server, "audio_rate") == 1
            assert calm.connected and calm.recording
            await calm.stream_pcm(bytes(2880 * 3), realtime=True)
            assert _limit_hits(server, "audio_rate") == 1
