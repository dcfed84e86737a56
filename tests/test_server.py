"""The WebSocket server core: real sessions on loopback, bad peers, and the session registry."""

from __future__ import annotations

import struct

import pytest
import trio
from trio_websocket import ConnectionClosed, open_websocket_url
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, BytesMessage, Request

from tests.conftest import make_settings
from voicegrow.app import running_server
from voicegrow.client import open_native_client
from voicegrow.protocol import native as wire
from voicegrow.protocol.errors import ErrorCode


async def _wait_for(predicate, *, timeout: float = 5.0) -> None:
    with trio.fail_after(timeout):
        while not predicate():
            await trio.sleep(0.01)


async def _expect_error_and_close(ws, code: ErrorCode, close_code: int) -> None:
    """The server answers a protocol error with an ERROR frame, then closes with ``close_code``."""
    with trio.fail_after(5):
        message = await ws.get_message()
        frame = wire.decode_message(message)
        assert isinstance(frame, wire.Error)
        assert frame.code == code
        assert frame.reason
        with pytest.raises(ConnectionClosed):
            while True:
                await ws.get_message()
    assert ws.closed.code == close_code


async def test_hello_audio_close_session(embedded_server) -> None:
    registry = embedded_server.services.registry
    async with open_native_client(embedded_server.ws_url, device_id="kitchen") as client:
        assert client.audio_out.sample_rate == 24000
        await _wait_for(lambda: any(s.device_id == "kitchen" for s in registry))
        session = next(iter(registry))
        assert session.protocol == "native"
        for _ in range(10):
            await client.send_audio(bytes(640))  # 20 ms of silence
        await client.send(wire.Ping(nonce=7))
        with trio.fail_after(5):
            while not isinstance(frame := await client.next_frame(), wire.Pong):
                pass
        assert frame.nonce == 7
    await _wait_for(lambda: len(registry) == 0)
    assert embedded_server.services.metrics.audio_frames_received.labels("native")._value.get() == 10


async def test_garbage_gets_an_error_frame_and_the_server_serves_the_next_session(embedded_server) -> None:
    async with open_websocket_url(embedded_server.ws_url) as ws:
        await ws.send_message(b"\x00\x01garbage that is no frame at all")
        await _expect_error_and_close(ws, ErrorCode.BAD_MAGIC, 1002)
    async with open_native_client(embedded_server.ws_url, device_id="second") as client:
        await client.send(wire.Ping(nonce=1))
        with trio.fail_after(5):
            assert isinstance(await client.next_frame(), wire.Pong)


async def test_text_message_on_the_native_protocol_is_refused(embedded_server) -> None:
    async with open_websocket_url(embedded_server.ws_url) as ws:
        hello = wire.Hello("dev", wire.AudioFormat(16000), wire.AudioFormat(24000))
        await ws.send_message(wire.encode(hello))
        assert isinstance(wire.decode_message(await ws.get_message()), wire.HelloAck)
        await ws.send_message("not a frame")
        await _expect_error_and_close(ws, ErrorCode.BAD_PAYLOAD, 1007)


async def test_audio_before_hello_is_an_unexpected_frame(embedded_server) -> None:
    async with open_websocket_url(embedded_server.ws_url) as ws:
        await ws.send_message(wire.encode(wire.Audio(pcm=bytes(640))))
        await _expect_error_and_close(ws, ErrorCode.UNEXPECTED_FRAME, 1002)


async def test_oversized_frame_is_refused_with_its_own_code(tmp_path) -> None:
    settings = make_settings(tmp_path, max_frame_bytes=4096)
    async with running_server(settings) as server:
        async with open_native_client(server.ws_url, device_id="big") as client:
            header = struct.pack("!2sBBIIIII", wire.MAGIC, wire.VERSION, wire.FrameType.AUDIO, 0, 0, 0, 0, 8192)
            await client._ws.send_message(header + bytes(8192))
            await _expect_error_and_close(client._ws, ErrorCode.OVERSIZED, 1009)
        async with open_native_client(server.ws_url, device_id="after") as client:
            await client.send_audio(bytes(640))
            await client.send(wire.Ping(nonce=2))
            with trio.fail_after(5):
                while not isinstance(await client.next_frame(), wire.Pong):
                    pass


async def test_silent_peer_is_closed_at_the_handshake_deadline(tmp_path) -> None:
    settings = make_settings(tmp_path, handshake_timeout_s=1.0)
    async with running_server(settings) as server:
        async with open_websocket_url(server.ws_url) as ws:
            with trio.fail_after(10):  # generous: the deadline is 1 s
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.get_message()  # a silent peer may be greeted, but never served
        await _wait_for(lambda: len(server.services.registry) == 0)


async def test_half_finished_hello_is_closed_at_the_deadline(tmp_path) -> None:
    settings = make_settings(tmp_path, handshake_timeout_s=1.0)
    async with running_server(settings) as server:
        async with open_websocket_url(server.ws_url) as ws:
            await ws.send_message(wire.encode(wire.Ping(nonce=1)))  # speaks, but not hello
            await _expect_error_and_close(ws, ErrorCode.UNEXPECTED_FRAME, 1002)


async def _raw_session(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """A WebSocket client without a library in between, so the test can drop the TCP connection."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    conn = WSConnection(ConnectionType.CLIENT)
    await stream.send_all(conn.send(Request(host="127.0.0.1", target="/")))
    while True:
        conn.receive_data(await stream.receive_some(65536))
        if any(isinstance(e, AcceptConnection) for e in conn.events()):
            break
    hello = wire.Hello("vanishing", wire.AudioFormat(16000), wire.AudioFormat(24000))
    await stream.send_all(conn.send(BytesMessage(data=wire.encode(hello))))
    return stream, conn


async def test_vanished_peer_leaves_no_task_behind(embedded_server) -> None:
    registry = embedded_server.services.registry
    stream, conn = await _raw_session(embedded_server.ws_port)
    await _wait_for(lambda: any(s.device_id == "vanishing" for s in registry))
    for _ in range(5):
        await stream.send_all(conn.send(BytesMessage(data=wire.encode(wire.Audio(pcm=bytes(640))))))
    # The peer vanishes: no close frame, the TCP connection just goes away.
    stream.socket.setsockopt(__import__("socket").SOL_SOCKET, __import__("socket").SO_LINGER,
                             struct.pack("ii", 1, 0))  # RST, as a pulled plug would look after a timeout
    await stream.aclose()
    with trio.fail_after(1.0):  # every task of that session is gone within 1 s
        await registry.wait_empty()


async def test_many_sessions_at_once(embedded_server) -> None:
    registry = embedded_server.services.registry
    entered = 0
    release = trio.Event()

    async def one(index: int) -> None:
        nonlocal entered
        async with open_native_client(embedded_server.ws_url, device_id=f"speaker-{index}") as client:
            entered += 1
            await client.send_audio(bytes(640))
            await release.wait()

    async with trio.open_nursery() as nursery:
        for index in range(12):
            nursery.start_soon(one, index)
        await _wait_for(lambda: entered == 12)
        await _wait_for(lambda: {s.device_id for s in registry} == {f"speaker-{i}" for i in range(12)})
        release.set()
    await _wait_for(lambda: len(registry) == 0)


async def test_shutdown_says_goodbye_with_a_close_frame(tmp_path) -> None:
    settings = make_settings(tmp_path)
    got: list[wire.Frame] = []
    async with trio.open_nursery() as nursery:
        connected = trio.Event()
        stop = trio.Event()

        async def run_server() -> None:
            async with running_server(settings) as server:
                nursery.start_soon(run_client, server.ws_url)
                await connected.wait()
                await stop.wait()

        async def run_client(url: str) -> None:
            async with open_native_client(url, device_id="staying") as client:
                connected.set()
                stop.set()  # the server starts its shutdown now
                with trio.fail_after(10):
                    try:
                        while True:
                            got.append(await client.next_frame())
                    except Exception:
                        pass

        nursery.start_soon(run_server)
    assert any(isinstance(f, wire.Close) and f.code == 1001 for f in got)


async def _raw_hello_without_pong_answers(port: int) -> tuple[trio.SocketStream, WSConnection]:
    """Like ``_raw_session``, but this peer never answers WebSocket pings (as many devices do)."""
    stream, conn = await _raw_session(port)
    return stream, conn


async def _alive_after(stream: trio.SocketStream, conn: WSConnection, seconds: float) -> bool:
    """Keep reading (never answering pings) for ``seconds``; False if the server closed the connection."""
    from wsproto.events import CloseConnection

    with trio.move_on_after(seconds):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                return False
            conn.receive_data(data)
            if any(isinstance(e, CloseConnection) for e in conn.events()):
                return False
    return True


async def test_devices_that_never_answer_pings_are_not_dropped_by_default(tmp_path) -> None:
    async with running_server(make_settings(tmp_path)) as server:  # WS_PING_INTERVAL_S=0: no pings
        stream, conn = await _raw_hello_without_pong_answers(server.ws_port)
        assert await _alive_after(stream, conn, 3.0)
        assert len(server.services.registry) == 1
        await stream.aclose()


async def test_configured_keepalive_ends_a_session_that_never_answers(tmp_path) -> None:
    settings = make_settings(tmp_path, ws_ping_interval_s=0.3, ws_ping_timeout_s=1)
    async with running_server(settings) as server:
        stream, conn = await _raw_hello_without_pong_answers(server.ws_port)
        assert not await _alive_after(stream, conn, 10.0)
        with trio.fail_after(5):
            await server.services.registry.wait_empty()
        await stream.aclose()
        # A client whose library answers pings stays.
        async with open_native_client(server.ws_url, device_id="answers") as client:
            await trio.sleep(2.0)
            await client.send(wire.Ping(nonce=9))
            with trio.fail_after(5):
                while not isinstance(await client.next_frame(), wire.Pong):
                    pass
