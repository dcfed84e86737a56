"""NativeConnection: the one sans-IO state machine both the server's driver and the client run."""

from __future__ import annotations

import pytest

from voicegrow.protocol import (
    Audio,
    AudioFormat,
    Close,
    Control,
    Error,
    ErrorCode,
    Hello,
    HelloAck,
    NativeConnection,
    Ping,
    ProtocolError,
    Role,
    encode,
)

HELLO = Hello("dev", AudioFormat(), AudioFormat(24000))
ACK = HelloAck("s-1", AudioFormat(), AudioFormat(24000), "voicegrow")


def _pump(sender: NativeConnection, receiver: NativeConnection, frame: object) -> object:
    receiver.receive_data(sender.send(frame))  # type: ignore[arg-type]
    return receiver.next_event()


def test_a_client_and_a_server_hold_a_session_through_bytes_alone() -> None:
    client, server = NativeConnection(Role.CLIENT), NativeConnection(Role.SERVER)
    assert server.next_event() is None
    assert _pump(client, server, HELLO) == HELLO and server.hello == HELLO
    assert _pump(server, client, ACK) == ACK and client.is_open and server.is_open
    audio = Audio(bytes(640), seq=1)
    assert _pump(client, server, audio) == audio
    reply = Control("asr_final", {"text": "hi", "lang": "en"}, turn_id=1)
    assert _pump(server, client, reply) == reply
    assert _pump(client, server, Close(1000)) == Close(1000)
    assert server.peer_closed and not server.we_closed and not server.is_open
    assert _pump(server, client, Close(1000)) == Close(1000)
    assert server.we_closed and client.peer_closed


def test_send_refuses_a_frame_out_of_order_and_stays_usable() -> None:
    client = NativeConnection(Role.CLIENT)
    with pytest.raises(ProtocolError) as excinfo:
        client.send(Audio(b""))
    assert excinfo.value.code is ErrorCode.UNEXPECTED_FRAME
    assert client.send(HELLO) == encode(HELLO)
    server = NativeConnection(Role.SERVER)
    server.receive_data(encode(HELLO))
    server.next_event()
    server.send(Close(1000))
    with pytest.raises(ProtocolError):
        server.send(Control("tts_stop", {"reason": "done"}))
    assert server.we_closed


def test_a_peer_out_of_order_breaks_the_connection_for_good() -> None:
    server = NativeConnection(Role.SERVER)
    server.receive_data(encode(Ping(1)))
    with pytest.raises(ProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.UNEXPECTED_FRAME
    server.receive_data(encode(HELLO))
    with pytest.raises(ProtocolError) as again:
        server.next_event()
    assert again.value.code is ErrorCode.UNEXPECTED_FRAME


@pytest.mark.parametrize(("message", "code"), [
    ("text", ErrorCode.BAD_PAYLOAD),
    (encode(HELLO) + b"\x00", ErrorCode.TRAILING_DATA),
    (encode(HELLO)[:-1], ErrorCode.TRUNCATED),
    (b"XX" + encode(HELLO)[2:], ErrorCode.BAD_MAGIC),
])
def test_message_framing_takes_exactly_one_frame_per_message(message: bytes | str, code: ErrorCode) -> None:
    server = NativeConnection(Role.SERVER)
    server.receive_data(message)
    with pytest.raises(ProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is code


def test_message_framing_enforces_the_receive_limit_not_the_send_limit() -> None:
    server = NativeConnection(Role.SERVER, max_payload=1000)
    server.receive_data(encode(HELLO))
    server.next_event()
    server.send(ACK)
    assert len(server.send(Audio(bytes(4000)))) > 4000  # what the server sends is the device's limit
    server.receive_data(encode(Audio(bytes(2000))))
    with pytest.raises(ProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.OVERSIZED


def test_stream_framing_splits_anywhere() -> None:
    client = NativeConnection(Role.CLIENT)
    data = client.send(HELLO) + client.send(Error(1, "x"))
    server = NativeConnection(Role.SERVER, framing="stream")
    frames = []
    for i in range(len(data)):
        server.receive_data(data[i:i + 1])
        while (frame := server.next_event()) is not None:
            frames.append(frame)
    assert frames == [HELLO, Error(1, "x")]
    server.receive_data(encode(Ping(1))[:5])
    server.receive_eof()
    with pytest.raises(ProtocolError) as excinfo:
        server.next_event()
    assert excinfo.value.code is ErrorCode.TRUNCATED


def test_framing_must_be_known() -> None:
    with pytest.raises(ValueError):
        NativeConnection(Role.SERVER, framing="datagram")
