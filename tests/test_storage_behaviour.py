"""Persistence behaviour, the same over the embedded stand-ins and over MariaDB + Redis + S3 (moto)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import httpx
import pytest
import redis
import trio

from tests.service_fixtures import StorageTarget, running
from voicegrow.storage import Persistence, SessionRecord, TurnRecord
from voicegrow.audio import wav_bytes
from voicegrow.storage.spool import Spool
from voicegrow.storage.state import MemoryState
from voicegrow.tools.timers import Timer

PCM_IN = bytes(range(256)) * 20
PCM_OUT = bytes(reversed(range(256))) * 30


def make_turn(device: str = "dev-1", session: str = "sess-1", started_at: float | None = None,
              **changes: Any) -> TurnRecord:
    base: dict[str, Any] = dict(
        turn_id=uuid.uuid4().hex, session_id=session, device_id=device,
        started_at=time.time() if started_at is None else started_at, transcript="打开灯", reply_text="好的，已打开。",
        language="zh", timings_ms={"asr": 210.5, "llm_first_token": 480.0, "turn": 1900.25}, outcome="completed")
    return TurnRecord(**{**base, **changes})


async def delivered(p: Persistence) -> None:
    with trio.fail_after(10):
        await p.wait_delivered()


async def test_turns_are_found_by_text_ignoring_case_with_wildcards_taken_literally(
        storage_target: StorageTarget) -> None:
    p = storage_target.persistence()
    async with running(p):
        kitchen = make_turn(transcript="Turn on the Kitchen light", reply_text="Done: 100% on.")
        lamp = make_turn(transcript="打开台灯", reply_text="好的")
        under = make_turn(transcript="what_is that", reply_text="A bird!")
        for turn in (kitchen, lamp, under):
            await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
        await delivered(p)

        async def found(text: str, **kw: Any) -> set[str]:
            return {t["turn_id"] for t in (await p.list_turns(text=text, **kw)).items}

        assert await found("kitchen LIGHT") == {kitchen.turn_id}
        assert await found("100%") == {kitchen.turn_id}
        assert await found("%") == {kitchen.turn_id}  # a literal percent sign, not "anything"
        assert await found("_") == {under.turn_id}
        assert await found("!") == {under.turn_id}
        assert await found("台灯") == {lamp.turn_id}
        assert await found("好的", device_id="someone-else") == set()
        assert await found("nothing like this") == set()
        first = await p.list_turns(text="t", limit=1)  # in two turns: paged like any listing
        assert len(first.items) == 1 and first.next_cursor
        rest = await p.list_turns(text="t", limit=5, cursor=first.next_cursor)
        assert {t["turn_id"] for t in first.items + rest.items} == {kitchen.turn_id, under.turn_id}


async def test_records_are_written_and_read_back(storage_target: StorageTarget) -> None:
    p = storage_target.persistence()
    async with running(p):
        assert {h["status"] for h in p.health().values()} == (
            {"embedded"} if storage_target.kind == "embedded" else {"ok"})
        started = time.time()
        await p.device_seen("dev-1", {"protocol": "xiaoai", "version": "1.2"})
        await p.session_started(SessionRecord("sess-1", "dev-1", "xiaoai", "10.0.0.7", started))
        turns = [make_turn(started_at=started + i) for i in range(3)]
        for turn in turns:
            await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
        await p.record_event("dev-1", "barge_in", {"after_ms": 300}, session_id="sess-1")
        await p.session_ended("sess-1", started + 10, "client_closed")
        await p.device_seen("dev-1", {"protocol": "xiaoai", "version": "1.3"})
        await delivered(p)

        for turn in turns:
            assert turn.audio_in_key and turn.audio_in_key.endswith(f"{turn.turn_id}-in.wav")
            assert await p.get_turn(turn.turn_id) == turn.to_dict()
            assert await p.blobs.get(turn.audio_in_key) == wav_bytes(PCM_IN, 16000)
            assert await p.blobs.get(turn.audio_out_key) == wav_bytes(PCM_OUT, 24000)
        assert await p.get_turn("0" * 32) is None
        session = await p.get_session("sess-1")
        assert session is not None
        assert (session["ended_at"], session["end_reason"], session["remote_addr"]) == (
            started + 10, "client_closed", "10.0.0.7")
        devices = (await p.list_devices()).items
        assert [(d["device_id"], d["turn_count"], d["info"]["version"]) for d in devices] == [("dev-1", 3, "1.3")]
        assert devices[0]["last_turn_at"] == turns[-1].started_at
        assert await p.records.count_rows("events", "dev-1") == 1

        url = p.presigned_url(turns[0].audio_out_key)
        assert url is not None
        if storage_target.kind == "real":
            async with httpx.AsyncClient() as client:
                response = await client.get(url)
            assert response.status_code == 200 and response.content == wav_bytes(PCM_OUT, 24000)
        else:
            assert url == f"/api/v1/audio/{turns[0].audio_out_key}"
            assert await p.read_audio(turns[0].audio_out_key) == wav_bytes(PCM_OUT, 24000)


async def test_a_turn_without_audio_gets_no_audio_keys(storage_target: StorageTarget) -> None:
    p = storage_target.persistence()
    async with running(p):
        turn = make_turn(outcome="empty", transcript="", reply_text="")
        await p.submit_turn(turn, b"", 16000, b"", 24000)
        await delivered(p)
        stored = await p.get_turn(turn.turn_id)
        assert stored is not None and stored["audio_in_key"] is None and stored["audio_out_key"] is None
        assert await p.blobs.keys() == []
        with pytest.raises(ValueError):
            await p.submit_turn(make_turn(outcome="exploded"), b"", 16000, b"", 24000)


async def test_turns_page_newest_first_with_a_cursor(storage_target: StorageTarget) -> None:
    p = storage_target.persistence()
    async with running(p):
        base = 1_700_000_000.125
        times = [base + i for i in range(5)] + [base + 2, base + 2]  # equal times: the turn id breaks the tie
        turns = [make_turn(started_at=t) for t in times] + [make_turn(device="dev-2", started_at=base + 9)]
        for turn in turns:
            await p.submit_turn(turn, b"", 16000, b"", 24000)
        await delivered(p)

        seen: list[str] = []
        cursor = None
        while True:
            page = await p.list_turns("dev-1", limit=3, cursor=cursor)
            assert len(page.items) <= 3
            seen += [t["turn_id"] for t in page.items]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        expected = sorted((t for t in turns if t.device_id == "dev-1"), key=lambda t: (t.started_at, t.turn_id),
                          reverse=True)
        assert seen == [t.turn_id for t in expected]

        recent = await p.list_turns("dev-1", since=base + 3, limit=50)
        assert {t["turn_id"] for t in recent.items} == {t.turn_id for t in turns[3:5]}
        everyone = await p.list_turns(limit=50)
        assert everyone.items[0]["device_id"] == "dev-2" and len(everyone.items) == 8


async def test_deleting_a_device_erases_its_data_and_nothing_else(storage_target: StorageTarget) -> None:
    p = storage_target.persistence()
    async with running(p):
        for device in ("dev-1", "dev-2"):
            await p.device_seen(device, {})
            await p.session_started(SessionRecord(f"s-{device}", device, "native", "::1", time.time()))
            await p.record_event(device, "hello")
            for _ in range(2):
                await p.submit_turn(make_turn(device=device, session=f"s-{device}"), PCM_IN, 16000, PCM_OUT, 24000)
            await p.save_history(device, [{"role": "user", "content": "hi"}])
            await p.save_timer(Timer(f"t-{device}", device, "timer", time.time() + 60, time.time(),
                                     duration_s=60).row())
        # no waiting for delivery: the deletion queues up behind the records still in the spool
        report = await p.delete_device_data("dev-1")
        assert report == {"device_id": "dev-1", "turns": 2, "sessions": 1, "events": 1, "timers": 1, "devices": 1,
                          "audio_objects": 4, "history_keys": 1, "pending": [], "failed": []}
        await delivered(p)
        assert await p.list_timers("dev-1") == []
        assert [t["timer_id"] for t in await p.list_timers("dev-2")] == ["t-dev-2"]
        assert (await p.list_turns("dev-1")).items == []
        assert await p.load_history("dev-1") == []
        assert await p.blobs.keys("dev-1/") == []
        assert len((await p.list_turns("dev-2")).items) == 2
        assert len(await p.blobs.keys("dev-2/")) == 4
        assert await p.load_history("dev-2") == [{"role": "user", "content": "hi"}]
        assert [d["device_id"] for d in (await p.list_devices()).items] == ["dev-2"]


async def test_history_has_a_ttl_and_claims_belong_to_their_session(storage_target: StorageTarget) -> None:
    p = storage_target.persistence(settings=storage_target.settings(session_ttl_s=600, replica_id="replica-a"))
    async with running(p):
        messages = [{"role": "user", "content": "讲个故事"}, {"role": "assistant", "content": "从前……"}]
        assert await p.load_history("dev-1") == []
        await p.save_history("dev-1", messages)
        assert await p.load_history("dev-1") == messages

        await p.claim_device("dev-1", "sess-a")
        assert (await p.live_session("dev-1") or {}).get("session_id") == "sess-a"
        assert (await p.live_session("dev-1") or {}).get("replica_id") == "replica-a"
        await p.claim_device("dev-1", "sess-b")  # the device reconnected
        await p.release_device("dev-1", "sess-a")  # the old session's late release must not drop the new claim
        assert (await p.live_session("dev-1") or {}).get("session_id") == "sess-b"
        await p.release_device("dev-1", "sess-b")
        assert await p.live_session("dev-1") is None

        if storage_target.kind == "real":
            settings = storage_target.settings()
            client = redis.Redis(host=settings.redis_host, port=settings.redis_port, decode_responses=True)
            try:
                await p.claim_device("dev-1", "sess-c")
                for kind in ("history", "live"):
                    assert 0 < client.ttl(f"{storage_target.key_prefix}{kind}:dev-1") <= 600
            finally:
                client.close()


async def test_memory_state_entries_expire() -> None:
    now = [1000.0]
    state = MemoryState(clock=lambda: now[0])
    await state.save_history("d", [{"role": "user", "content": "x"}], ttl_s=10)
    await state.claim("d", "s", "r", ttl_s=5)
    now[0] += 6
    assert await state.live(["d"]) == {}
    assert await state.load_history("d") == [{"role": "user", "content": "x"}]
    now[0] += 5
    assert await state.load_history("d") == []


async def test_a_crash_between_write_and_unlink_still_writes_exactly_once(
        storage_target: StorageTarget, monkeypatch: pytest.MonkeyPatch) -> None:
    turn = make_turn()
    removed_too_late = trio.Event()
    original_remove = Spool.remove

    async def crash_before_unlink(self: Spool, seq: int) -> None:
        removed_too_late.set()
        await trio.sleep_forever()  # the process "dies" here: the backend has the record, the spool too

    monkeypatch.setattr(Spool, "remove", crash_before_unlink)
    async with running(storage_target.persistence()) as p:
        await p.submit_turn(turn, PCM_IN, 16000, b"", 24000)
        with trio.fail_after(10):
            await removed_too_late.wait()
    monkeypatch.setattr(Spool, "remove", original_remove)
    assert len(list(storage_target.spool_dir.glob("*/*.rec"))) >= 1

    async with running(storage_target.persistence()) as p:  # restart: the spool is replayed
        await delivered(p)
        assert await p.records.count_rows("turns", "dev-1") == 1
        assert await p.get_turn(turn.turn_id) == turn.to_dict()
        assert await p.blobs.keys("dev-1/") == [turn.audio_in_key]
    assert list(storage_target.spool_dir.glob("*/*.rec")) == []
