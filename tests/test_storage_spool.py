"""The spool: durable order, replay after reopening, set-aside of damaged records, one owner."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from voicegrow.storage.errors import CorruptSpoolRecord, SpoolLockedError
from voicegrow.storage.spool import Spool, decode_record, encode_record, lock_directory


async def test_records_come_back_in_order_with_their_payloads(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    await spool.open()
    for i in range(5):
        await spool.append({"op": "put", "i": i, "text": "你好"}, bytes([i]) * (i * 100))
    assert len(spool) == 5
    seen = []
    while (seq := spool.head()) is not None:
        header, payload = await spool.read(seq)
        seen.append((header["i"], header["text"], payload))
        await spool.remove(seq)
    assert seen == [(i, "你好", bytes([i]) * (i * 100)) for i in range(5)]
    assert list((tmp_path / "s").glob("*.rec")) == []


async def test_concurrent_appends_keep_one_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    await spool.open()
    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(spool.append, {"i": i})
    seqs = []
    while (seq := spool.head()) is not None:
        seqs.append(seq)
        await spool.remove(seq)
    assert seqs == sorted(seqs) and len(set(seqs)) == 20


async def test_reopening_replays_what_was_left_and_continues_numbering(tmp_path: Path) -> None:
    first = Spool(tmp_path / "s")
    await first.open()
    for i in range(3):
        await first.append({"i": i})
    await first.remove(first.head())
    (tmp_path / "s" / ".99.tmp").write_bytes(b"half written")  # a crash during an append

    second = Spool(tmp_path / "s")
    await second.open()
    assert len(second) == 2
    assert not list((tmp_path / "s").glob(".*.tmp"))
    new_seq = await second.append({"i": 3})
    order = []
    while (seq := second.head()) is not None:
        order.append((await second.read(seq))[0]["i"])
        await second.remove(seq)
    assert order == [1, 2, 3] and new_seq == 4


async def test_a_damaged_record_is_detected_and_set_aside(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "s")
    await spool.open()
    seq = await spool.append({"op": "turn"}, b"payload")
    path = next((tmp_path / "s").glob("*.rec"))
    path.write_bytes(path.read_bytes()[:-1] + b"X")
    with pytest.raises(CorruptSpoolRecord):
        await spool.read(seq)
    await spool.quarantine(seq, "checksum mismatch")
    assert len(spool) == 0
    assert [p.name for p in spool.rejected()] == [path.name]
    assert "checksum" in (tmp_path / "s" / "rejected" / path.with_suffix(".reason").name).read_text()


@pytest.mark.parametrize("data", [b"", b"VGSPOOL1", b"VGSPOOL1\x00\x00\x00\x09\x00\x00\x00\x00{}", b"junk" * 10])
def test_decoding_garbage_raises_the_spool_error(data: bytes) -> None:
    with pytest.raises(CorruptSpoolRecord):
        decode_record(data)


def test_encoding_round_trips() -> None:
    assert decode_record(encode_record({"a": [1, "ü"]}, b"\x00\xff")) == ({"a": [1, "ü"]}, b"\x00\xff")


def test_one_process_per_spool_directory(tmp_path: Path) -> None:
    held = lock_directory(tmp_path)
    try:
        with pytest.raises(SpoolLockedError):
            lock_directory(tmp_path)
    finally:
        held.close()
    lock_directory(tmp_path).close()
