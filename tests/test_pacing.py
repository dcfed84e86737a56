"""The audio pacer and the outbox, on trio's mock clock (deterministic: no wall-clock timing)."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from voicegrow.streaming.outbox import Outbox, SlowReader
from voicegrow.streaming.pacer import AudioPacer

RATE = 24000


def _pcm(seconds: float) -> bytes:
    return b"\x01\x00" * int(RATE * seconds)


async def test_pacer_stays_a_lead_ahead_of_playback(autojump_clock: trio.testing.MockClock) -> None:
    sent: list[tuple[float, int]] = []

    async def send(chunk: bytes) -> None:
        sent.append((trio.current_time(), len(chunk)))

    pacer = AudioPacer(send, sample_rate=RATE, lead_s=0.2, chunk_ms=40)
    start = trio.current_time()
    await pacer.feed(_pcm(2.0))
    await pacer.flush()
    assert sum(n for _, n in sent) == len(_pcm(2.0))
    # Never more than the lead (plus one chunk) ahead of the playhead.
    queued = 0.0
    for at, n in sent:
        assert queued - (at - start) <= 0.2 + 1e-6
        queued += n / 2 / RATE
    # Sending took about the audio's length minus the lead, not zero (no burst).
    assert sent[-1][0] - start == pytest.approx(2.0 - 0.2 - 0.04, abs=0.05)
    before = trio.current_time()
    await pacer.wait_played()
    assert trio.current_time() - start == pytest.approx(2.0, abs=0.01)
    assert trio.current_time() > before


async def test_pacer_restarts_its_clock_after_an_underrun(autojump_clock: trio.testing.MockClock) -> None:
    times: list[float] = []

    async def send(chunk: bytes) -> None:
        times.append(trio.current_time())

    pacer = AudioPacer(send, sample_rate=RATE, lead_s=0.1, chunk_ms=40)
    await pacer.feed(_pcm(0.08))
    await trio.sleep(5.0)  # TTS stalls: the device plays everything and runs dry
    resumed = trio.current_time()
    await pacer.feed(_pcm(0.08))
    assert times[-2] == resumed  # sent at once, not held back by the stale clock
    assert pacer.remaining_playback_s() == pytest.approx(0.08, abs=1e-6)


async def test_outbox_sends_in_order_and_drops_interrupted_audio(autojump_clock: trio.testing.MockClock) -> None:
    got: list[bytes | str] = []
    gate = trio.Event()

    async def send(message: bytes | str) -> None:
        await gate.wait()
        got.append(message)

    outbox = Outbox(send, size=16, slow_reader_timeout_s=5)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(outbox.run)
        await outbox.put("event-1")
        await outbox.put_audio(b"turn1-a", 1)
        await outbox.put_audio(b"turn1-b", 1)
        await outbox.put_audio(b"turn2-a", 2)
        outbox.drop_audio_through(1)  # barge-in on turn 1 while its audio is queued
        await outbox.put_audio(b"turn1-late", 1)
        await outbox.put("tts_stop")
        gate.set()
        await outbox.drain()
        await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert got == ["event-1", b"turn2-a", "tts_stop"]
    assert outbox.dropped_audio == 3


async def test_outbox_gives_up_on_a_reader_that_never_reads(autojump_clock: trio.testing.MockClock) -> None:
    async def never(message: bytes | str) -> None:
        await trio.sleep_forever()

    outbox = Outbox(never, size=4, slow_reader_timeout_s=3)
    with pytest.raises(SlowReader):
        for _ in range(10):
            await outbox.put(b"x")  # nobody drains: the fifth put waits, then gives up
    assert trio.current_time() == pytest.approx(3) and outbox.stalled.is_set()


async def test_outbox_stall_lets_its_owner_cancel_the_session(autojump_clock: trio.testing.MockClock) -> None:
    async def never(message: bytes | str) -> None:
        await trio.sleep_forever()

    stalls: list[float] = []
    outbox = Outbox(never, size=2, slow_reader_timeout_s=7, wait_when_stalled=True)
    with trio.CancelScope() as session:
        async def owner() -> None:
            await outbox.stalled.wait()
            stalls.append(trio.current_time())
            session.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(owner)
            nursery.start_soon(outbox.run)
            for _ in range(10):
                await outbox.put(b"x")  # the stalled put waits for the owner instead of raising
    assert session.cancelled_caught and stalls == [pytest.approx(7)]
