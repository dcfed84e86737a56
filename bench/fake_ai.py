"""A fake LLM/TTS service speaking DESIGN §4, for tests and benchmarks.

It streams like the real thing (SSE tokens paced after a time to first token; PCM paced faster than
real time), checks the same authentication, records every request, and fails on demand
(``POST /_fake/config``) so that tests can drive every error path of the clients. It is a small
HTTP/1.1 server on raw trio streams with h11: streaming and abrupt disconnects are then exactly what
the code says, with no framework in between.

Run it: ``python -m bench.fake_ai --port 8090 [--ttft-ms 300] [--tokens-per-s 40] ...``.
In a test: ``async with run_fake_ai(FakeAiConfig(ttft_ms=0)) as fake: ... fake.url ...``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import re
import struct
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import h11
import numpy as np
import trio

from voicegrow.aiauth import verify_signature
from voicegrow.language import detect_language

__all__ = ["FakeAi", "FakeAiConfig", "LLM_MODES", "TTS_MODES", "main", "run_fake_ai", "tone"]

LLM_MODES = ("ok", "http_500", "timeout", "broken_sse", "error_object", "slow")
TTS_MODES = ("ok", "http_500", "timeout")
PCM_RATE = 24000
MAX_BODY_BYTES = 1 << 20
RECORDED_HEADERS = ("authorization", "x-timestamp", "x-nonce", "x-signature", "content-type", "accept")


@dataclass
class FakeAiConfig:
    """Behaviour of the fake; mutable while it runs (directly, or by ``POST /_fake/config``).

    LLM modes: ``ok``; ``http_500``; ``timeout`` (never answers); ``broken_sse`` (two tokens, then a
    malformed event and a dropped connection); ``error_object`` (two tokens, then an ``error``
    object); ``slow`` (ten times the TTFT, a tenth of the token rate). TTS modes: ``ok``,
    ``http_500``, ``timeout``. ``tts_answer_format`` ``asked`` honours ``response_format``; ``wav``
    or ``pcm`` force one (to test clients against servers that ignore the request).

    Function calling, when a request offers ``tools`` and ends with the user's message:
    ``tool_calls`` (a list of ``{"name", "arguments"}``, arguments as JSON text or an object) are
    streamed as OpenAI does (id and name first, the arguments in fragments), after
    ``tool_preface`` text if set; else with ``tool_triggers`` on, the built-in phrases of
    :mod:`voicegrow.tools.offline_rules` ("set a timer for 3 seconds", "音量调小一点") call the
    matching tool if it is offered. A request that ends with tool results is answered with them
    ("The tool said: …"), so a test hears what the tool returned.
    """

    host: str = "127.0.0.1"
    port: int = 0
    ttft_ms: float = 300.0
    tokens_per_s: float = 40.0
    reply: str | None = None
    tts_ms_per_char: float = 60.0
    tts_first_chunk_ms: float = 50.0
    tts_chunk_bytes: int = 4800
    tts_speedup: float = 10.0
    tts_answer_format: str = "asked"
    tts_wav_rate: int = PCM_RATE
    api_key: str = ""
    secret_key: str = ""
    llm_mode: str = "ok"
    tts_mode: str = "ok"
    model: str = "fake-llm"
    tool_calls: list[dict[str, Any]] | None = None
    tool_preface: str = ""
    tool_triggers: bool = False
    #: A fixture directory (``manifest.json`` + WAVs): a sentence that is some clip's text is spoken
    #: with that clip's voice instead of the tone, so a microphone that hears the reply hears speech.
    tts_clips_dir: str = ""

    def update(self, changes: dict[str, Any]) -> None:
        """Apply ``POST /_fake/config`` changes; ValueError names what is wrong."""
        names = {f.name for f in dataclasses.fields(self)} - {"host", "port"}
        unknown = set(changes) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        if changes.get("llm_mode", self.llm_mode) not in LLM_MODES:
            raise ValueError(f"llm_mode must be one of {LLM_MODES}")
        if changes.get("tts_mode", self.tts_mode) not in TTS_MODES:
            raise ValueError(f"tts_mode must be one of {TTS_MODES}")
        if changes.get("tts_answer_format", self.tts_answer_format) not in ("asked", "pcm", "wav"):
            raise ValueError("tts_answer_format must be asked, pcm or wav")
        calls = changes.get("tool_calls", self.tool_calls)
        if calls is not None and not (isinstance(calls, list) and all(
                isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] for c in calls)):
            raise ValueError("tool_calls must be null or a list of {name, arguments} objects")
        for name, value in changes.items():
            setattr(self, name, value)


@dataclass
class _Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


class _Responder:
    """Writes one HTTP response through h11: whole, streamed, or cut off."""

    def __init__(self, conn: h11.Connection, stream: trio.abc.Stream) -> None:
        self.conn = conn
        self.stream = stream
        self.aborted = False

    async def start(self, status: int, content_type: str, length: int | None = None) -> None:
        headers = [("content-type", content_type), ("cache-control", "no-cache")]
        if length is not None:
            headers.append(("content-length", str(length)))
        await self._send(h11.Response(status_code=status, headers=headers))

    async def write(self, data: bytes) -> None:
        await self._send(h11.Data(data=data))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def whole(self, status: int, content_type: str, body: bytes) -> None:
        await self.start(status, content_type, len(body))
        await self.write(body)
        await self.end()

    async def json(self, status: int, obj: object) -> None:
        await self.whole(status, "application/json", json.dumps(obj, ensure_ascii=False).encode())

    async def error(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        await self.json(status, {"error": {"message": message, "type": kind, "code": status}})

    async def abort(self) -> None:
        """Drop the connection mid-response, as a crashing upstream would."""
        self.aborted = True
        await self.stream.aclose()

    async def _send(self, event: Any) -> None:
        data = self.conn.send(event)
        if data:
            await self.stream.send_all(data)


class FakeAi:
    """The running fake: ``url``, the live ``config`` and the ``requests`` it has seen."""

    def __init__(self, config: FakeAiConfig) -> None:
        self.config = config
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self.open_connections = 0  # lets tests see that a cancelled client hung up

    # -- connection handling ------------------------------------------------------------------------

    async def serve_connection(self, stream: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        self.open_connections += 1
        async with stream:
            try:
                while True:
                    request = await self._read_request(conn, stream)
                    if request is None:
                        return
                    responder = _Responder(conn, stream)
                    await self._dispatch(request, responder)
                    if responder.aborted or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                        return
                    conn.start_next_cycle()
            except (trio.BrokenResourceError, trio.ClosedResourceError, h11.ProtocolError):
                return
            finally:
                self.open_connections -= 1

    @staticmethod
    async def _read_request(conn: h11.Connection, stream: trio.abc.Stream) -> _Request | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await stream.receive_some(65536))
            elif isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    return None
            elif isinstance(event, h11.EndOfMessage) and request is not None:
                headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in request.headers}
                path = request.target.decode("latin-1").split("?", 1)[0]
                return _Request(request.method.decode("ascii"), path, headers, bytes(body))
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _dispatch(self, request: _Request, out: _Responder) -> None:
        if request.path.startswith("/_fake/"):
            await self._control(request, out)
            return
        routes = {("GET", "/v1/models"): self._models,
                  ("POST", "/v1/chat/completions"): self._chat,
                  ("POST", "/v1/audio/speech"): self._speech}
        handler = routes.get((request.method, request.path))
        if handler is None:
            known = {path for _, path in routes}
            await out.error(405 if request.path in known else 404, f"no route {request.method} {request.path}")
            return
        body_json = self._record(request)
        auth_error = self.requests[-1]["auth_error"]
        if auth_error:
            await out.error(401, auth_error, "authentication_error")
        elif request.method == "POST" and not isinstance(body_json, dict):
            await out.error(400, "the body must be a JSON object")
        else:
            await handler(body_json, out)

    def _record(self, request: _Request) -> Any:
        try:
            body_json = json.loads(request.body) if request.body else None
        except ValueError:
            body_json = None
        cfg = self.config
        auth_error = verify_signature(request.headers, request.method, request.path, request.body,
                                      cfg.api_key, cfg.secret_key)
        self.requests.append({
            "method": request.method, "path": request.path, "body": body_json, "time": time.time(),
            "headers": {k: v for k, v in request.headers.items() if k in RECORDED_HEADERS},
            "auth_error": auth_error,
        })
        return body_json

    async def _control(self, request: _Request, out: _Responder) -> None:
        if request.path == "/_fake/requests" and request.method == "GET":
            await out.json(200, self.requests)
        elif request.path == "/_fake/requests" and request.method == "DELETE":
            self.requests.clear()
            await out.json(200, {"cleared": True})
        elif request.path == "/_fake/config" and request.method == "GET":
            await out.json(200, dataclasses.asdict(self.config))
        elif request.path == "/_fake/config" and request.method == "POST":
            try:
                changes = json.loads(request.body or b"{}")
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object")
                self.config.update(changes)
            except ValueError as exc:
                await out.error(400, str(exc))
                return
            await out.json(200, dataclasses.asdict(self.config))
        else:
            await out.error(404, f"no route {request.method} {request.path}")

    # -- the API ----------------------------------------------------------------------------------

    async def _models(self, _body: Any, out: _Responder) -> None:
        await out.json(200, {"object": "list",
                             "data": [{"id": self.config.model, "object": "model", "owned_by": "fake_ai"}]})

    async def _chat(self, body: dict[str, Any], out: _Responder) -> None:
        cfg = self.config
        mode = cfg.llm_mode
        if await _injected_failure(mode, out):
            return
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            await out.error(400, "messages must be a non-empty list")
            return
        calls = _tool_calls_for(cfg, body, messages)
        if calls and body.get("stream") is True:
            await self._stream_tool_calls(calls, out)
            return
        last = messages[-1] if isinstance(messages[-1], dict) else {}
        if last.get("role") == "tool":
            reply = tool_result_reply(messages)
        else:
            reply = cfg.reply or canned_reply(_last_user_text(messages))
        tokens = split_tokens(reply)
        ttft_s, tokens_per_s = cfg.ttft_ms / 1000, max(cfg.tokens_per_s, 0.001)
        if mode == "slow":
            ttft_s, tokens_per_s = ttft_s * 10, tokens_per_s / 10
        if body.get("stream") is not True:
            await trio.sleep(ttft_s + len(tokens) / tokens_per_s)
            await out.json(200, _completion(cfg.model, reply))
            return
        await out.start(200, "text/event-stream")
        await out.write(b": fake_ai keepalive\n\n")
        await trio.sleep(ttft_s)
        for index, token in enumerate(tokens):
            if index:
                await trio.sleep(1 / tokens_per_s)
            if index == 2 and mode == "broken_sse":
                await out.write(b'data: {"choices": [{"delta": {"content": "bro\n\n')
                await out.abort()
                return
            if index == 2 and mode == "error_object":
                await out.write(_sse({"error": {"message": "injected error", "type": "server_error"}}))
                await out.end()
                return
            delta = {"role": "assistant", "content": token} if index == 0 else {"content": token}
            await out.write(_sse(_chunk(cfg.model, delta, None)))
        await out.write(_sse(_chunk(cfg.model, {}, "stop")))
        await out.write(b"data: [DONE]\n\n")
        await out.end()

    async def _stream_tool_calls(self, calls: list[dict[str, Any]], out: _Responder) -> None:
        cfg = self.config
        await out.start(200, "text/event-stream")
        await trio.sleep(cfg.ttft_ms / 1000)
        for token in split_tokens(cfg.tool_preface):
            await out.write(_sse(_chunk(cfg.model, {"content": token}, None)))
            await trio.sleep(1 / max(cfg.tokens_per_s, 0.001))
        for index, call in enumerate(calls):
            arguments = call.get("arguments", "{}")
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            head = {"index": index, "id": f"call_fake_{index}", "type": "function",
                    "function": {"name": call["name"], "arguments": ""}}
            await out.write(_sse(_chunk(cfg.model, {"role": "assistant", "tool_calls": [head]}, None)))
            third = max(1, len(arguments) // 3)
            for start in range(0, len(arguments), third):
                fragment = {"index": index, "function": {"arguments": arguments[start:start + third]}}
                await out.write(_sse(_chunk(cfg.model, {"tool_calls": [fragment]}, None)))
        await out.write(_sse(_chunk(cfg.model, {}, "tool_calls")))
        await out.write(b"data: [DONE]\n\n")
        await out.end()

    async def _speech(self, body: dict[str, Any], out: _Responder) -> None:
        cfg = self.config
        if await _injected_failure(cfg.tts_mode, out):
            return
        text = body.get("input")
        if not isinstance(text, str) or not text.strip():
            await out.error(400, "input must be non-empty text")
            return
        fmt = body.get("response_format", "pcm") if cfg.tts_answer_format == "asked" else cfg.tts_answer_format
        if fmt not in ("pcm", "wav"):
            await out.error(400, "response_format must be pcm or wav")
            return
        rate = PCM_RATE if fmt == "pcm" else cfg.tts_wav_rate
        spoken = clip_speech(cfg.tts_clips_dir, text, rate) if cfg.tts_clips_dir else None
        pcm = spoken if spoken is not None else tone(round(len(text) * cfg.tts_ms_per_char / 1000 * rate), rate)
        audio = wav_header(len(pcm), rate) + pcm if fmt == "wav" else pcm
        await out.start(200, "audio/wav" if fmt == "wav" else "audio/pcm")
        await trio.sleep(cfg.tts_first_chunk_ms / 1000)
        step = max(1, cfg.tts_chunk_bytes)
        for start in range(0, len(audio), step):
            if start:
                await trio.sleep(step / (2 * rate) / max(cfg.tts_speedup, 0.001))
            await out.write(audio[start:start + step])
        await out.end()


async def _injected_failure(mode: str, out: _Responder) -> bool:
    """Fail the way ``mode`` says, if it says so: a 500, or no answer until the client gives up."""
    if mode == "http_500":
        await out.error(500, "injected failure", "server_error")
        return True
    if mode == "timeout":
        try:
            while await out.stream.receive_some(65536):
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await out.abort()
        return True
    return False


def _last_user_text(messages: Sequence[Any]) -> str:
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return str(message.get("content") or "")
    return ""


_CJK = "\u3400-\u9fff\uf900-\ufaff"


def _tool_calls_for(cfg: FakeAiConfig, body: dict[str, Any], messages: Sequence[Any]) -> list[dict[str, Any]]:
    """The calls to make for this request (see FakeAiConfig), or none."""
    tools = body.get("tools")
    last = messages[-1] if isinstance(messages[-1], dict) else {}
    if not isinstance(tools, list) or not tools or last.get("role") != "user" or body.get("tool_choice") == "none":
        return []
    if cfg.tool_calls:
        return list(cfg.tool_calls)
    if not cfg.tool_triggers:
        return []
    from voicegrow.tools.offline_rules import match

    text = _last_user_text(messages)
    found = match(text, detect_language(text))
    offered = {t.get("function", {}).get("name") for t in tools if isinstance(t, dict)}
    return [{"name": found[0], "arguments": found[1]}] if found and found[0] in offered else []


def tool_result_reply(messages: Sequence[Any]) -> str:
    """The answer after tool calls: the results read out, in the user's language."""
    results = []
    for message in reversed(messages):
        if not isinstance(message, dict) or message.get("role") != "tool":
            break
        results.insert(0, str(message.get("content") or ""))
    joined = "; ".join(results)
    if detect_language(_last_user_text(messages)) == "zh":
        return f"工具返回：{joined}。"
    return f"The tool said: {joined}."


def canned_reply(user_text: str) -> str:
    """Several sentences in the user's language, so that sentence streaming can be observed."""
    heard = user_text.strip().rstrip("。！？!?.，, ")
    if detect_language(user_text) == "zh":
        return f"你说的是：{heard}。这是测试用的假助手。我会分几句话回答，方便观察流式输出。再见！"
    return (f'You said: "{heard}". This is the fake assistant speaking. It answers in several '
            "sentences, so that streaming can be observed. Goodbye for now!")


def split_tokens(text: str) -> list[str]:
    """Token-sized pieces that join back to ``text``: words with their spaces, or one or two hanzi."""
    return re.findall(f"[{_CJK}]{{1,2}}|[^{_CJK}\\s]+\\s*|\\s+", text)


def _chunk(model: str, delta: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": int(time.time()),
            "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _completion(model: str, reply: str) -> dict[str, Any]:
    return {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                         "finish_reason": "stop"}]}


def _sse(obj: object) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


@functools.lru_cache(maxsize=8)
def _clip_voices(directory: str, rate: int) -> dict[str, bytes]:
    """Clip text → its audio at ``rate``, for :func:`clip_speech` (read once per directory)."""
    from voicegrow.audio import read_wav, resample

    entries = json.loads((Path(directory) / "manifest.json").read_text(encoding="utf-8"))
    voices: dict[str, bytes] = {}
    for entry in entries:
        samples, clip_rate = read_wav(Path(directory) / entry["file"])
        voices.setdefault(entry["text"].strip(), resample(samples, clip_rate, rate).astype("<i2").tobytes())
    return voices


def clip_speech(directory: str, text: str, rate: int) -> bytes | None:
    """The fixture clip whose text ``text`` is, at ``rate``; None when no clip says it."""
    return _clip_voices(directory, rate).get(text.strip())


def tone(samples: int, rate: int) -> bytes:
    """A soft C-major chord with 10 ms fades: clearly not silence, pleasant if someone listens."""
    t = np.arange(samples) / rate
    signal = sum(np.sin(2 * math.pi * f * t) for f in (261.63, 329.63, 392.0)) / 3
    fade = min(samples // 2, rate // 100)
    if fade:
        ramp = np.linspace(0.0, 1.0, fade)
        signal[:fade] *= ramp
        signal[samples - fade:] *= ramp[::-1]
    return (signal * 0.3 * 32767).astype("<i2").tobytes()


def wav_header(data_bytes: int, rate: int) -> bytes:
    """A 44-byte header for mono s16le PCM."""
    return struct.pack("<4sI4s4sIHHIIHH4sI", b"RIFF", 36 + data_bytes, b"WAVE", b"fmt ", 16, 1, 1, rate,
                       rate * 2, 2, 16, b"data", data_bytes)


@asynccontextmanager
async def run_fake_ai(config: FakeAiConfig | None = None) -> AsyncIterator[FakeAi]:
    """Serve the fake in a nursery for the duration of the block (port 0: a free port)."""
    fake = FakeAi(config or FakeAiConfig())
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            partial(trio.serve_tcp, fake.serve_connection, fake.config.port, host=fake.config.host))
        port = listeners[0].socket.getsockname()[1]
        fake.url = f"http://{fake.config.host}:{port}"
        try:
            yield fake
        finally:
            nursery.cancel_scope.cancel()


def parse_args(argv: Sequence[str] | None = None) -> FakeAiConfig:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_ai", description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ttft-ms", type=float, default=300.0)
    parser.add_argument("--tokens-per-s", type=float, default=40.0)
    parser.add_argument("--reply", default=None, help="fixed reply text (default: a canned echo)")
    parser.add_argument("--tts-ms-per-char", type=float, default=60.0)
    parser.add_argument("--tts-first-chunk-ms", type=float, default=50.0)
    parser.add_argument("--tool-triggers", action="store_true",
                        help="call the built-in tools on their phrases (\"set a timer for 3 seconds\")")
    parser.add_argument("--api-key", default="")
    parser.add_argument("--secret-key", default="")
    args = parser.parse_args(argv)
    return FakeAiConfig(host=args.host, port=args.port, ttft_ms=args.ttft_ms, tokens_per_s=args.tokens_per_s,
                        reply=args.reply, tts_ms_per_char=args.tts_ms_per_char,
                        tts_first_chunk_ms=args.tts_first_chunk_ms, api_key=args.api_key,
                        secret_key=args.secret_key, tool_triggers=args.tool_triggers)


async def _serve_forever(config: FakeAiConfig) -> None:
    async with run_fake_ai(config) as fake:
        print(f"fake_ai listening on {fake.url}", flush=True)
        await trio.sleep_forever()


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    try:
        trio.run(_serve_forever, config)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
