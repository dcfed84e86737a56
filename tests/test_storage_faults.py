"""Backends that go away and come back: nothing crashes, writes wait in the spool, then land once."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from tests.service_fixtures import ServerProcess, StorageTarget, free_port, running
from tests.test_storage_behaviour import PCM_IN, PCM_OUT, delivered, make_turn
from voicegrow.metrics import Metrics
from voicegrow.storage import SessionRecord
from voicegrow.audio import wav_bytes
from voicegrow.storage.spool import Spool


async def until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    with trio.fail_after(seconds):
        while not condition():
            await trio.sleep(0.02)


def gauge(metrics: Metrics, name: str, component: str) -> float | None:
    return metrics.registry.get_sample_value(name, {"component": component})


async def forward_tcp(listen_port: int, target_port: int, *,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """A loopback TCP forwarder: "the database appears on the port it was configured with"."""
    async def pipe(source: trio.SocketStream, sink: trio.SocketStream) -> None:
        async for chunk in source:
            await sink.send_all(chunk)
        await sink.send_eof()

    async def handle(client: trio.SocketStream) -> None:
        async with client, await trio.open_tcp_stream("127.0.0.1", target_port) as upstream:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pipe, client, upstream)
                nursery.start_soon(pipe, upstream, client)

    await trio.serve_tcp(handle, listen_port, host="127.0.0.1", task_status=task_status)


async def test_redis_stopped_and_restarted(private_redis: ServerProcess, embedded_target: StorageTarget) -> None:
    metrics = Metrics()
    settings = embedded_target.settings(redis_host="127.0.0.1", redis_port=private_redis.port)
    p = embedded_target.persistence(settings=settings, metrics=metrics, state_timeout_s=0.5)
    history = [{"role": "user", "content": "你好"}]
    async with running(p):
        await p.save_history("dev-1", history)
        assert await p.load_history("dev-1") == history
        assert p.health()["redis"]["status"] == "ok"

        await trio.to_thread.run_sync(private_redis.stop)
        assert await p.load_history("dev-1") == []
        await p.save_history("dev-1", history)
        await p.claim_device("dev-1", "sess-1")
        await p.release_device("dev-1", "sess-1")
        assert await p.live_session("dev-1") is None
        assert p.health()["redis"]["status"] == "degraded"
        assert gauge(metrics, "voicegrow_component_up", "redis") == 0.5
        turn = make_turn()  # the rest of persistence carries on
        await p.submit_turn(turn, PCM_IN, 16000, b"", 24000)
        await delivered(p)
        assert await p.get_turn(turn.turn_id) is not None

        await trio.to_thread.run_sync(private_redis.start)
        await until(lambda: p.health()["redis"]["status"] == "ok")
        assert gauge(metrics, "voicegrow_component_up", "redis") == 1.0
        await p.save_history("dev-1", history)
        assert await p.load_history("dev-1") == history


async def test_s3_stopped_and_restarted(private_s3: ServerProcess, embedded_target: StorageTarget) -> None:
    """moto keeps objects in memory, so a restarted server starts empty: the objects spooled during the
    outage (and the bucket) must be there afterwards, each exactly once."""
    metrics = Metrics()
    settings = embedded_target.settings(minio_endpoint=f"127.0.0.1:{private_s3.port}", minio_bucket="vg-fault",
                                        minio_access_key="testing", minio_secret_key="testing")
    p = embedded_target.persistence(settings=settings, metrics=metrics)
    async with running(p):
        before = make_turn(started_at=1_700_000_000.0)
        await p.submit_turn(before, PCM_IN, 16000, PCM_OUT, 24000)
        await delivered(p)
        assert p.health()["minio"]["status"] == "ok"

        await trio.to_thread.run_sync(private_s3.stop)
        during = [make_turn(started_at=1_700_000_001.0 + i) for i in range(2)]
        for turn in during:
            await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
        await until(lambda: p.health()["minio"]["status"] == "degraded")
        assert p.health()["minio"]["spool_depth"] == 4
        assert gauge(metrics, "voicegrow_spool_depth", "minio") == 4
        assert gauge(metrics, "voicegrow_component_up", "minio") == 0.5
        # records are not held up by the object store
        await until(lambda: p.health()["mysql"]["spool_depth"] == 0)
        for turn in during:
            assert await p.get_turn(turn.turn_id) == turn.to_dict()

        await trio.to_thread.run_sync(private_s3.start)
        await delivered(p)
        assert p.health()["minio"] == {**p.health()["minio"], "status": "ok", "spool_depth": 0}
        assert gauge(metrics, "voicegrow_spool_depth", "minio") == 0
        keys = await p.blobs.keys()
        expected = sorted(k for t in during for k in (t.audio_in_key, t.audio_out_key) if k)
        assert keys == expected
        for turn in during:
            assert await p.blobs.get(turn.audio_out_key or "") == wav_bytes(PCM_OUT, 24000)


async def test_mysql_on_a_closed_port_then_reachable(mysql_db: dict[str, Any],
                                                     embedded_target: StorageTarget) -> None:
    port = free_port()
    metrics = Metrics()
    p = embedded_target.persistence(settings=embedded_target.settings(**{**mysql_db, "mysql_port": port}),
                                    metrics=metrics)
    async with running(p):
        assert p.health()["mysql"]["status"] == "degraded"
        await p.session_started(SessionRecord("sess-1", "dev-1", "native", "::1", 1_700_000_000.0))
        turns = [make_turn(started_at=1_700_000_000.0 + i) for i in range(3)]
        for turn in turns:
            await p.submit_turn(turn, PCM_IN, 16000, b"", 24000)
        assert p.health()["mysql"]["spool_depth"] == 4
        assert gauge(metrics, "voicegrow_spool_depth", "mysql") == 4
        assert p.health()["minio"]["spool_depth"] == 0 or p.health()["minio"]["status"] == "embedded"

        async with trio.open_nursery() as nursery:
            await nursery.start(forward_tcp, port, mysql_db["mysql_port"])
            await delivered(p)
            assert p.health()["mysql"]["status"] == "ok"
            assert await p.records.count_rows("turns", "dev-1") == 3
            assert await p.records.count_rows("sessions", "dev-1") == 1
            for turn in turns:
                assert await p.get_turn(turn.turn_id) == turn.to_dict()
            nursery.cancel_scope.cancel()


async def test_a_restart_replays_the_spool_into_the_real_database(mysql_db: dict[str, Any],
                                                                  embedded_target: StorageTarget) -> None:
    closed = embedded_target.settings(**{**mysql_db, "mysql_port": free_port()})
    turns = [make_turn(started_at=1_700_000_000.0 + i) for i in range(4)]
    async with running(embedded_target.persistence(settings=closed)) as p:
        for turn in turns:
            await p.submit_turn(turn, b"", 16000, b"", 24000)
        assert p.health()["mysql"]["spool_depth"] == 4
    assert len(list((embedded_target.spool_dir / "mysql").glob("*.rec"))) == 4

    p = embedded_target.persistence(settings=embedded_target.settings(**mysql_db))
    async with running(p):
        await delivered(p)
        assert await p.records.count_rows("turns", "dev-1") == 4
        assert [t["turn_id"] for t in (await p.list_turns("dev-1")).items] == [t.turn_id for t in reversed(turns)]
    assert list((embedded_target.spool_dir / "mysql").glob("*.rec")) == []


async def test_records_a_backend_refuses_are_set_aside_without_blocking(embedded_target: StorageTarget) -> None:
    spool = Spool(embedded_target.spool_dir / "mysql")  # left behind by an earlier run
    await spool.open()
    await spool.append({"op": "no_such_operation"})
    await spool.append({"op": "turn"}, b"")
    damaged = sorted((embedded_target.spool_dir / "mysql").glob("*.rec"))[-1]
    damaged.write_bytes(damaged.read_bytes() + b"tail")

    p = embedded_target.persistence(max_attempts=2)
    async with running(p):
        turn = make_turn()
        await p.submit_turn(turn, b"", 16000, b"", 24000)
        await delivered(p)
        assert await p.get_turn(turn.turn_id) == turn.to_dict()
        assert p.health()["mysql"]["rejected"] == 2
    reasons = sorted(r.read_text() for r in (embedded_target.spool_dir / "mysql" / "rejected").glob("*.reason"))
    assert "unknown operation" in reasons[0] and "corrupt" in reasons[1]
