"""The data admin API over a running Persistence, through Quart's test client."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from quart_trio import QuartTrio

from tests.service_fixtures import StorageTarget, free_port, running
from tests.test_storage_behaviour import PCM_IN, PCM_OUT, delivered, make_turn
from voicegrow.http.admin_api import make_data_blueprint, parse_since
from voicegrow.storage import Persistence
from voicegrow.audio import wav_bytes

BASE = 1_700_000_000.0  # 2023-11-14T22:13:20Z


def make_app(p: Persistence) -> QuartTrio:
    app = QuartTrio(__name__)
    app.register_blueprint(make_data_blueprint(p))
    return app


async def get_json(client: Any, url: str, status: int = 200) -> dict[str, Any]:
    response = await client.get(url)
    assert response.status_code == status, await response.get_data()
    assert response.mimetype == "application/json"
    return await response.get_json()


async def populate(p: Persistence) -> list[Any]:
    turns = [make_turn(device="dev-1", started_at=BASE + i) for i in range(5)]
    turns.append(make_turn(device="dev-2", session="sess-2", started_at=BASE + 100))
    for device in ("dev-1", "dev-2"):
        await p.device_seen(device, {"protocol": "xiaoai"})
    for turn in turns:
        await p.submit_turn(turn, PCM_IN, 16000, PCM_OUT, 24000)
    await delivered(p)
    return turns


async def test_listing_paging_fetching_and_audio(storage_target: StorageTarget) -> None:
    async with running(storage_target.persistence()) as p:
        turns = await populate(p)
        client = make_app(p).test_client()

        first = await get_json(client, "/api/v1/devices?limit=1")
        assert [d["device_id"] for d in first["devices"]] == ["dev-1"] and first["next_cursor"]
        second = await get_json(client, f"/api/v1/devices?limit=1&cursor={first['next_cursor']}")
        assert [d["device_id"] for d in second["devices"]] == ["dev-2"] and second["next_cursor"] is None
        assert first["devices"][0]["turn_count"] == 5

        ids, cursor = [], ""
        while True:
            page = await get_json(client, f"/api/v1/conversations?device_id=dev-1&limit=2&cursor={cursor}")
            ids += [t["turn_id"] for t in page["turns"]]
            if not page["next_cursor"]:
                break
            cursor = page["next_cursor"]
        assert ids == [t.turn_id for t in reversed(turns[:5])]

        iso = await get_json(client, "/api/v1/conversations?device_id=dev-1&since=2023-11-14T22:13:23Z")
        unix = await get_json(client, f"/api/v1/conversations?device_id=dev-1&since={BASE + 3}")
        assert [t["turn_id"] for t in iso["turns"]] == [t["turn_id"] for t in unix["turns"]] == [
            turns[4].turn_id, turns[3].turn_id]

        one = await get_json(client, f"/api/v1/conversations/{turns[0].turn_id}")
        assert {k: one[k] for k in turns[0].to_dict()} == turns[0].to_dict()
        assert one["started_at_iso"] == "2023-11-14T22:13:20.000+00:00"
        assert one["timings_ms"] == {"asr": 210.5, "llm_first_token": 480.0, "turn": 1900.25}

        url = one["audio_in_url"]
        if storage_target.kind == "real":
            async with httpx.AsyncClient() as http:
                fetched = await http.get(url)
            assert fetched.status_code == 200 and fetched.content == wav_bytes(PCM_IN, 16000)
        else:
            response = await client.get(url)
            assert response.status_code == 200 and response.mimetype == "audio/wav"
            assert await response.get_data() == wav_bytes(PCM_IN, 16000)
            missing = await client.get("/api/v1/audio/dev-1/none.wav")
            assert missing.status_code == 404


@pytest.mark.parametrize("query, code", [
    ("limit=0", "invalid_limit"), ("limit=abc", "invalid_limit"), ("limit=201", "invalid_limit"),
    ("limit=-1", "invalid_limit"), ("since=yesterday", "invalid_since"), ("since=nan", "invalid_since"),
    ("since=-5", "invalid_since"), ("cursor=%21%21", "invalid_cursor"), ("cursor=WyJ4Il0", "invalid_cursor"),
    (f"device_id={'x' * 129}", "invalid_device_id"),
])
async def test_bad_queries_are_400_with_a_reason(embedded_target: StorageTarget, query: str, code: str) -> None:
    async with running(embedded_target.persistence()) as p:
        body = await get_json(make_app(p).test_client(), f"/api/v1/conversations?{query}", 400)
        assert body["error"] == code and body["reason"]


async def test_unknown_ids_are_404(embedded_target: StorageTarget) -> None:
    async with running(embedded_target.persistence()) as p:
        client = make_app(p).test_client()
        body = await get_json(client, "/api/v1/conversations/" + "0" * 32, 404)
        assert body["error"] == "not_found"
        response = await client.delete("/api/v1/devices/nobody/data")
        assert response.status_code == 404 and (await response.get_json())["error"] == "not_found"
        body = await get_json(client, "/api/v1/devices?cursor=zzz", 400)
        assert body["error"] == "invalid_cursor"


async def test_delete_erases_a_device(storage_target: StorageTarget) -> None:
    async with running(storage_target.persistence()) as p:
        turns = await populate(p)
        await p.save_history("dev-1", [{"role": "user", "content": "hi"}])
        client = make_app(p).test_client()
        response = await client.delete("/api/v1/devices/dev-1/data")
        assert response.status_code == 200
        report = await response.get_json()
        assert {k: report[k] for k in ("turns", "devices", "audio_objects", "history_keys", "pending")} == {
            "turns": 5, "devices": 1, "audio_objects": 10, "history_keys": 1, "pending": []}
        assert (await get_json(client, "/api/v1/conversations?device_id=dev-1"))["turns"] == []
        await get_json(client, f"/api/v1/conversations/{turns[0].turn_id}", 404)
        remaining = await get_json(client, "/api/v1/conversations")
        assert [t["device_id"] for t in remaining["turns"]] == ["dev-2"]
        assert (await client.delete("/api/v1/devices/dev-1/data")).status_code == 404


async def test_an_unreachable_database_is_503_and_deletion_is_accepted(
        embedded_target: StorageTarget, mysql_db: dict[str, Any]) -> None:
    settings = embedded_target.settings(**{**mysql_db, "mysql_port": free_port()})
    async with running(embedded_target.persistence(settings=settings, delete_wait_s=0.3)) as p:
        client = make_app(p).test_client()
        body = await get_json(client, "/api/v1/conversations", 503)
        assert body["error"] == "storage_unavailable"
        response = await client.delete("/api/v1/devices/dev-1/data")
        assert response.status_code == 202
        assert (await response.get_json())["pending"] == ["mysql"]


def test_parse_since_accepts_iso_and_unix_seconds() -> None:
    assert parse_since("1700000000") == parse_since("2023-11-14T22:13:20Z") == parse_since("2023-11-14T22:13:20")
    assert parse_since("2023-11-15T06:13:20+08:00") == BASE
