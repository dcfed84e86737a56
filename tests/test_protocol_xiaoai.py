"""The open-xiaoai codec: golden strings from the Rust client's source, round trips, refusals, helpers.

Golden strings were derived by hand from idootop/open-xiaoai (commit bc3396c) — serde derive field
order and ``skip_serializing_if`` in ``packages/client-rust/src/services/connect/data.rs``, nested
``serde_json::Value`` maps sorted (serde_json without ``preserve_order``, Cargo.lock), the answers in
``src/bin/client.rs`` and ``connect/handler.rs``; see docs/xiaoai.md for line numbers.
"""

from __future__ import annotations

import json
import os
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicegrow.protocol import xiaoai as proto
from voicegrow.protocol.xiaoai import (
    AudioConfig,
    Event,
    InstructionLine,
    InstructionNewFile,
    KwsKeyword,
    KwsStarted,
    PlayingState,
    RecognizeResult,
    Request,
    RequestTracker,
    Response,
    Stream,
    XiaoaiError,
    XiaoaiErrorCode,
    decode_binary,
    decode_text,
    encode_stream,
    encode_text,
)

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")

# (message, exact text) pairs; comments name the Rust source each shape comes from.
GOLDEN_TEXT = [
    # examples/xiaozhi/src/server.rs: call_remote("start_recording", json!(AudioConfig{…})):
    # Request{id, command, payload} in data.rs order, the payload a Value map with sorted keys.
    (Request("R1", "start_recording", AudioConfig().to_payload()),
     '{"Request":{"id":"R1","command":"start_recording","payload":{"bits_per_sample":16,"buffer_size":1440,'
     '"channels":1,"pcm":"noop","period_size":360,"sample_rate":16000}}}'),
    # data.rs: Request.payload has no skip_serializing_if, so None is written as null.
    (Request("R2", "stop_recording", None), '{"Request":{"id":"R2","command":"stop_recording","payload":null}}'),
    # services/speaker.rs run_shell: payload json!(script), a JSON string.
    (Request("R3", "run_shell", "echo $(micocfg_model) $(micocfg_sn)"),
     '{"Request":{"id":"R3","command":"run_shell","payload":"echo $(micocfg_model) $(micocfg_sn)"}}'),
    # data.rs Response::success() with the request's id (handler.rs `Response { id, ..resp }`).
    (Response("R1", 0, "success"), '{"Response":{"id":"R1","code":0,"msg":"success"}}'),
    # client.rs get_version: Response::from_data(json!(VERSION)); code and msg skipped.
    (Response("R4", data="1.0.0"), '{"Response":{"id":"R4","data":"1.0.0"}}'),
    # client.rs run_shell: from_data(json!(CommandResult)) -> Value map, keys sorted.
    (Response("R3", data={"stdout": "LX06 27473/716890001\n", "stderr": "", "exit_code": 0}),
     '{"Response":{"id":"R3","data":{"exit_code":0,"stderr":"","stdout":"LX06 27473/716890001\\n"}}}'),
    # rpc.rs on_request: unknown command -> Err("command not found") -> Response::from_error (code -1).
    (Response("R5", -1, "command not found"), '{"Response":{"id":"R5","code":-1,"msg":"command not found"}}'),
    # client.rs kws monitor: send_event("kws", json!(KwsMonitorEvent::Keyword(..))), externally tagged.
    (Event("E1", "kws", {"Keyword": "小爱同学"}), '{"Event":{"id":"E1","event":"kws","data":{"Keyword":"小爱同学"}}}'),
    (Event("E2", "kws", "Started"), '{"Event":{"id":"E2","event":"kws","data":"Started"}}'),
    # monitor/playing.rs: PlayingMonitorEvent unit variants.
    (Event("E3", "playing", "Idle"), '{"Event":{"id":"E3","event":"playing","data":"Idle"}}'),
    # monitor/file.rs FileMonitorEvent::NewLine(String) for instruction.log lines.
    (Event("E4", "instruction", {"NewLine": '{"header":{"name":"RecognizeResult"}}'}),
     '{"Event":{"id":"E4","event":"instruction","data":{"NewLine":"{\\"header\\":{\\"name\\":\\"RecognizeResult\\"}}"}}}'),
    (Event("E5", "instruction", "NewFile"), '{"Event":{"id":"E5","event":"instruction","data":"NewFile"}}'),
    # data.rs Event.data is skipped when None.
    (Event("E6", "custom"), '{"Event":{"id":"E6","event":"custom"}}'),
]


@pytest.mark.parametrize(("message", "text"), GOLDEN_TEXT)
def test_text_messages_are_byte_exact(message, text):
    assert encode_text(message) == text
    assert decode_text(text) == message
    assert decode_text(text.encode("utf-8")) == message


def test_stream_is_byte_exact():
    # message.rs send_stream: serde_json::to_vec(&Stream::new("record", bytes, None)); data skipped.
    stream = Stream("S1", "record", bytes([0, 1, 9, 10, 99, 100, 255]))
    golden = b'{"id":"S1","tag":"record","bytes":[0,1,9,10,99,100,255]}'
    assert encode_stream(stream) == golden
    assert decode_binary(golden) == stream
    assert encode_stream(Stream("S2", "play", b"")) == b'{"id":"S2","tag":"play","bytes":[]}'
    with_data = Stream("S3", "play", b"\x07", {"b": 1, "a": [True, None]})
    assert encode_stream(with_data) == b'{"id":"S3","tag":"play","bytes":[7],"data":{"a":[true,null],"b":1}}'
    assert decode_binary(encode_stream(with_data)) == with_data


def test_serde_string_escapes_match():
    # serde_json escapes only '"', '\\' and C0 controls (\b \f \n \r \t short, others \u00xx); raw UTF-8.
    event = Event("E", "x", 'a"b\\c\b\f\n\r\t\x00\x1f\x7f/é😀\u2028')
    assert encode_text(event) == (
        '{"Event":{"id":"E","event":"x","data":"a\\"b\\\\c\\b\\f\\n\\r\\t\\u0000\\u001f\x7f/é😀\u2028"}}')


def test_decoding_is_lenient_where_serde_is():
    assert decode_text('{ "Request" : { "command":"get_version", "id":"1", "extra": 5 } }') == Request(
        "1", "get_version", None)
    assert decode_text('{"Response":{"id":"2","code":null,"msg":null,"data":null}}') == Response("2")
    assert decode_binary(b' {"tag":"play","bytes":[ 1 , 2 ],"id":"s","data":null,"more":{}} ') == Stream(
        "s", "play", b"\x01\x02")


REFUSED_TEXT = [
    (b"\xff\xfe", XiaoaiErrorCode.INVALID_UTF8),
    ("{", XiaoaiErrorCode.INVALID_JSON),
    ('{"Request":{"id":"1","command":"x","payload":NaN}}', XiaoaiErrorCode.INVALID_JSON),
    ('{"Event":{"id":"1","event":"e","data":' + "1" * 5000 + "}}", XiaoaiErrorCode.INVALID_JSON),
    ("[" * 100_000 + "]" * 100_000, XiaoaiErrorCode.TOO_DEEP),
    ("[]", XiaoaiErrorCode.BAD_SHAPE),
    ('{"Request":{},"Event":{}}', XiaoaiErrorCode.BAD_SHAPE),
    ('{"Request":[1]}', XiaoaiErrorCode.BAD_SHAPE),
    ('{"Stream":{"id":"1","tag":"play","bytes":[]}}', XiaoaiErrorCode.UNKNOWN_MESSAGE),
    ('{"Hello":{}}', XiaoaiErrorCode.UNKNOWN_MESSAGE),
    ('{"Request":{"command":"x"}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Request":{"id":1,"command":"x"}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Request":{"id":"\\ud800","command":"x"}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Response":{"id":"1","code":1.0}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Response":{"id":"1","code":2147483648}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Response":{"id":"1","code":true}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Event":{"id":"1"}}', XiaoaiErrorCode.BAD_FIELD),
    ('{"Event":{"id":"1","event":"e","data":"' + "x" * proto.MAX_MESSAGE_BYTES + '"}}', XiaoaiErrorCode.TOO_LARGE),
]


@pytest.mark.parametrize(("raw", "code"), REFUSED_TEXT)
def test_bad_text_is_refused_with_a_code(raw, code):
    with pytest.raises(XiaoaiError) as caught:
        decode_text(raw)
    assert caught.value.code is code


REFUSED_BINARY = [
    (b'{"id":"1","tag":"record","bytes":[256]}', XiaoaiErrorCode.BYTE_OUT_OF_RANGE),
    (b'{"id":"1","tag":"record","bytes":[-1]}', XiaoaiErrorCode.BYTE_OUT_OF_RANGE),
    (b'{"id":"1","tag":"record","bytes":[99999999999999999999999]}', XiaoaiErrorCode.BYTE_OUT_OF_RANGE),
    (b'{"id":"1","tag":"record","bytes":[1.0]}', XiaoaiErrorCode.BAD_FIELD),
    (b'{"id":"1","tag":"record","bytes":[true]}', XiaoaiErrorCode.BAD_FIELD),
    (b'{"id":"1","tag":"record","bytes":"AAE="}', XiaoaiErrorCode.BAD_FIELD),
    (b'{"id":"1","tag":"record","bytes":[007]}', XiaoaiErrorCode.INVALID_JSON),
    (b'{"id":"1","tag":"record","bytes":[1,,2]}', XiaoaiErrorCode.INVALID_JSON),
    (b'{"id":"1","tag":"record","bytes":[1,2,]}', XiaoaiErrorCode.INVALID_JSON),
    (b'{"id":"1","tag":"record","bytes":[1]}x', XiaoaiErrorCode.INVALID_JSON),
    (b'{"id":"1\x01","tag":"record","bytes":[1]}', XiaoaiErrorCode.INVALID_JSON),
    (b'{"tag":"record","bytes":[1]}', XiaoaiErrorCode.BAD_FIELD),
    (b'{"id":"1","bytes":[1]}', XiaoaiErrorCode.BAD_FIELD),
    (b'{"id":"\xc3","tag":"record","bytes":[1]}', XiaoaiErrorCode.INVALID_UTF8),
    (b"[1,2]", XiaoaiErrorCode.BAD_SHAPE),
    (b"", XiaoaiErrorCode.INVALID_JSON),
    (b'{"id":"1","tag":"record","bytes":[' + b"0," * 600_000 + b"0]}", XiaoaiErrorCode.TOO_LARGE),
]


@pytest.mark.parametrize(("raw", "code"), REFUSED_BINARY)
def test_bad_streams_are_refused_with_a_code(raw, code):
    with pytest.raises(XiaoaiError) as caught:
        decode_binary(raw)
    assert caught.value.code is code


def test_encoding_refuses_what_serde_could_not_have_written():
    for bad in (Request("1", "x", float("nan")), Request("1", "x", {1: 2, "a": 3}), Request("1", "x", object()),
                Request(1, "x"), Response("1", code=2**40), Event("1", "\ud800"), Stream("1", "play", b"")):
        with pytest.raises(XiaoaiError) as caught:
            encode_text(bad)  # type: ignore[arg-type]
        assert caught.value.code is XiaoaiErrorCode.UNENCODABLE
    with pytest.raises(XiaoaiError):
        encode_stream(Stream("1", "play", "not bytes"))  # type: ignore[arg-type]


# -- properties -----------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
ids = st.text(max_size=40)
messages = st.one_of(
    st.builds(Request, ids, st.text(max_size=20), json_values),
    st.builds(Response, ids, st.none() | st.integers(-(2**31), 2**31 - 1), st.none() | st.text(max_size=30),
              json_values),
    st.builds(Event, ids, st.text(max_size=20), json_values),
)


@given(messages)
def test_text_round_trip(message):
    text = encode_text(message)
    assert decode_text(text) == message
    assert encode_text(decode_text(text)) == text


@given(ids, st.text(max_size=10), st.binary(max_size=3000), json_values)
def test_stream_round_trip(stream_id, tag, pcm, data):
    stream = Stream(stream_id, tag, pcm, data)
    raw = encode_stream(stream)
    assert decode_binary(raw) == stream
    # The same bytes as a plain json.dumps of the fields in data.rs order (the array path is numpy's).
    dump = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), sort_keys=True).encode
    reference = f'{{"id":{dump(stream_id)},"tag":{dump(tag)},"bytes":{dump(list(pcm))}'
    reference += ("}" if data is None else f',"data":{dump(data)}}}')
    assert raw == reference.encode()


@settings(suppress_health_check=[HealthCheck.too_slow], max_examples=300)
@given(st.binary(max_size=2000) | st.text(max_size=2000))
def test_any_input_raises_only_xiaoai_error(raw):
    for decode in (decode_binary, decode_text):
        try:
            decode(raw)
        except XiaoaiError:
            pass


_FRAME = encode_stream(Stream("0f8fad5b-d9cb-469f-a165-70867728950e", "record", bytes(range(256))))


@given(st.lists(st.tuples(st.integers(0, len(_FRAME)), st.integers(0, 3), st.binary(min_size=0, max_size=4)),
                min_size=1, max_size=4))
def test_mutated_frames_decode_as_json_would_or_raise_xiaoai_error(edits):
    """The fast path must agree with a full JSON parse on every near-miss of the client's layout."""
    raw = bytearray(_FRAME)
    for at, cut, insert in edits:
        raw[at:at + cut] = insert
    try:
        stream = decode_binary(bytes(raw))
    except XiaoaiError:
        return
    reference = json.loads(bytes(raw))
    assert (stream.id, stream.tag, list(stream.bytes), stream.data) == (
        reference["id"], reference["tag"], reference["bytes"], reference.get("data"))


def test_fast_path_agrees_with_general_path():
    pcm = os.urandom(2880)
    canonical = encode_stream(Stream("id", "record", pcm))
    assert proto._fast_stream(canonical) == Stream("id", "record", pcm)
    spaced = canonical.replace(b",", b", ")
    assert proto._fast_stream(spaced) is None
    assert decode_binary(spaced) == decode_binary(canonical)


# -- requests the server sends ------------------------------------------------------------------------


def test_request_helpers_have_the_client_payloads():
    start = proto.start_recording()
    assert UUID4.fullmatch(start.id)
    assert start.command == "start_recording"
    assert start.payload == {"pcm": "noop", "channels": 1, "bits_per_sample": 16, "sample_rate": 16000,
                             "period_size": 360, "buffer_size": 1440}
    assert proto.start_play().payload["sample_rate"] == 24000
    assert proto.start_play(sample_rate=16000).payload["sample_rate"] == 16000
    for helper, command in ((proto.stop_recording, "stop_recording"), (proto.stop_play, "stop_play"),
                            (proto.get_version, "get_version")):
        request = helper()
        assert (request.command, request.payload) == (command, None)
        assert encode_text(request).endswith(f'"command":"{command}","payload":null}}}}')
    assert proto.run_shell(proto.ABORT_XIAOAI_COMMAND).payload == "/etc/init.d/mico_aivs_lab restart >/dev/null 2>&1"
    assert proto.start_recording().id != proto.start_recording().id
    with pytest.raises(XiaoaiError):
        proto.run_shell(["rm", "-rf"])  # type: ignore[arg-type]


def test_audio_config_parses_as_serde_would():
    assert AudioConfig.from_payload(AudioConfig().to_payload()) == AudioConfig()
    assert AudioConfig.from_payload({**AudioConfig().to_payload(), "extra": 1}) == AudioConfig()
    for bad in (None, "x", {}, {**AudioConfig().to_payload(), "channels": 70000},
                {**AudioConfig().to_payload(), "sample_rate": 16000.0},
                {**AudioConfig().to_payload(), "channels": True}, {**AudioConfig().to_payload(), "pcm": None}):
        assert AudioConfig.from_payload(bad) is None
    assert AudioConfig().frame_bytes == 2880  # one record frame: 1440 samples of s16 = 90 ms at 16 kHz
    assert proto.CLIENT_DEFAULT_AUDIO_CONFIG.frame_bytes == 960


def test_device_info():
    assert proto.parse_device_info("LX06 27473/716890001\n") == {"model": "LX06", "serial": "27473/716890001"}
    assert proto.parse_device_info("OH2P\n") == {"model": "OH2P", "serial": None}
    assert proto.parse_device_info("") == {"model": None, "serial": None}
    assert proto.DEVICE_INFO_COMMAND == "echo $(micocfg_model) $(micocfg_sn)"
    assert proto.SILENCE_BUILTIN_COMMANDS == (proto.ABORT_XIAOAI_COMMAND,)


# -- RequestTracker ------------------------------------------------------------------------------------


def test_tracker_matches_responses_and_expires_the_rest():
    tracker = RequestTracker(timeout=10.0)
    first, second, third = proto.get_version(), proto.start_recording(), proto.start_play()
    assert tracker.register(first, now=100.0) == first.id
    tracker.register(second, now=101.0)
    tracker.register(third, now=101.0, timeout=1.0)
    assert len(tracker) == 3
    assert tracker.next_deadline() == 102.0
    assert tracker.on_response(Response("someone-else", 0, "success")) is None
    reply = Response(first.id, data="1.0.0")
    assert tracker.on_response(reply) == (first, reply)
    assert tracker.on_response(reply) is None  # a duplicate answer is ignored
    assert tracker.expired(now=101.5) == []
    assert tracker.expired(now=111.0) == [third, second]
    assert len(tracker) == 0 and tracker.next_deadline() is None


def test_tracker_refuses_duplicate_ids_and_cancels_all():
    tracker = RequestTracker()
    request = proto.stop_play()
    tracker.register(request, now=0.0)
    with pytest.raises(XiaoaiError) as caught:
        tracker.register(request, now=1.0)
    assert caught.value.code is XiaoaiErrorCode.DUPLICATE_ID
    assert tracker.cancel_all() == [request] and len(tracker) == 0


# -- events ---------------------------------------------------------------------------------------------

RECOGNIZED = ('{"header":{"dialog_id":"d","id":"i","name":"RecognizeResult","namespace":"SpeechRecognizer"},'
              '"payload":{"is_final":true,"is_vad_begin":false,"results":[{"confidence":0.9,"text":"打开客厅空调"}]}}')


def test_event_parsing():
    assert proto.parse_kws("Started") == KwsStarted()
    assert proto.parse_kws({"Keyword": "你好小智"}) == KwsKeyword("你好小智")
    assert proto.parse_playing("Playing") is PlayingState.PLAYING
    assert proto.parse_instruction("NewFile") == InstructionNewFile()
    line = proto.parse_instruction({"NewLine": RECOGNIZED})
    assert isinstance(line, InstructionLine)
    assert (line.namespace, line.name) == ("SpeechRecognizer", "RecognizeResult")
    assert line.recognize == RecognizeResult("打开客厅空调", is_final=True, is_vad_begin=False, is_stop=False)
    wake = proto.parse_instruction({"NewLine": RECOGNIZED.replace("打开客厅空调", "").replace(
        '"is_final":true', '"is_final":false')})
    assert wake.recognize == RecognizeResult("", False, False, False)  # the built-in assistant was woken
    other = proto.parse_instruction({"NewLine": '{"header":{"name":"Speak","namespace":"SpeechSynthesizer"}}'})
    assert other.recognize is None and other.name == "Speak"
    not_json = proto.parse_instruction({"NewLine": "plain log text"})
    assert not_json.message is None and not_json.recognize is None
    odd = proto.parse_instruction({"NewLine": '{"header":{"name":"RecognizeResult","namespace":"SpeechRecognizer"},'
                                              '"payload":{"results":"x"}}'})
    assert odd.recognize == RecognizeResult("", False, False, False)
    assert proto.parse_event(Event("1", "kws", {"Keyword": "x"})) == KwsKeyword("x")
    assert proto.parse_event(Event("1", "future_event", 1)) is None


@pytest.mark.parametrize(("name", "data"), [
    ("kws", None), ("kws", {"Keyword": 1}), ("kws", {"Keyword": "a", "b": 1}), ("kws", "Stopped"),
    ("playing", "playing"), ("playing", None), ("playing", ["Playing"]),
    ("instruction", {"NewLine": 1}), ("instruction", "NewLine"), ("instruction", None),
])
def test_malformed_event_data_is_refused(name, data):
    with pytest.raises(XiaoaiError) as caught:
        proto.parse_event(Event("1", name, data))
    assert caught.value.code is XiaoaiErrorCode.BAD_EVENT
