"""bench latency, load and soak in tiny configurations, and the arithmetic their verdicts rest on.

Each command runs through its ``main([...])`` exactly as ``python -m bench`` would (one clip, two
sessions, a few seconds), and its JSON is checked field by field: types, nothing negative, p50 ≤ p95 ≤
p99, counts that add up, figures derived as the bench says. No timing is asserted (the machine is shared
and a loaded one is slow: speed is shown by bench/ itself); the verdicts' logic is checked with injected
figures.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import ingest, latency, load, soak
from bench.common import (
    SpeechSpan,
    beyond_last_bucket,
    histogram_quantile,
    load_clips,
    locate_speech,
    markdown_table,
    percentiles,
    select_clips,
)
from bench.load import LagHistogram
from bench.soak import growth_verdicts, rss_slope, soak_failures
from tests.conftest import make_settings

# -- helpers ---------------------------------------------------------------------------------------------


def assert_percentiles(p: dict[str, Any], *, at_least: int = 0, low: float = 0.0, high: float = math.inf) -> None:
    assert set(p) == {"n", "mean", "min", "p50", "p95", "p99", "max"}
    assert isinstance(p["n"], int) and p["n"] >= at_least
    if p["n"] == 0:
        assert all(p[k] is None for k in ("mean", "min", "p50", "p95", "p99", "max"))
        return
    assert low <= p["min"] <= p["p50"] <= p["p95"] <= p["p99"] <= p["max"] <= high, p
    assert p["min"] <= p["mean"] <= p["max"]


def assert_machine(report: dict[str, Any], command: str) -> None:
    assert report["command"] == command
    machine = report["machine"]
    assert isinstance(machine["cpu_count"], int) and machine["cpu_count"] >= 1
    assert machine["platform"] and machine["python"].count(".") == 2
    assert machine["versions"]["trio"] and machine["versions"]["faster-whisper"]
    assert isinstance(report["settings"], dict)


def run_command(command: Any, name: str, tmp_path: Path, clips: Path, *options: str) -> tuple[int, dict[str, Any]]:
    """``command.main`` with the fixtures, a JSON and a PNG; the exit code and the checked report."""
    out, png = tmp_path / f"{name}.json", tmp_path / f"{name}.png"
    code = command.main([*options, "--clips", str(clips), "--json", str(out), "--plot", str(png)])
    assert out.is_file(), f"{out} was not written"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out.read_text(encoding="utf-8"))
    assert_machine(report, name)
    return code, report


# -- the arithmetic ------------------------------------------------------------------------------------------


def test_percentiles_are_ordered_and_skip_missing_values() -> None:
    p = percentiles([5.0, None, 1.0, 3.0, float("nan"), 2.0, 4.0])
    assert p["n"] == 5 and p["p50"] == 3.0 and p["min"] == 1.0 and p["max"] == 5.0
    assert_percentiles(p)
    assert_percentiles(percentiles([]))


def test_histogram_quantile_interpolates_like_prometheus() -> None:
    buckets = [(0.01, 50.0), (0.05, 90.0), (0.1, 100.0), (math.inf, 100.0)]
    assert histogram_quantile(0.5, buckets) == pytest.approx(0.01)
    assert histogram_quantile(0.7, buckets) == pytest.approx(0.03)  # 20 of the 40 between 10 and 50 ms
    assert histogram_quantile(0.99, buckets) == pytest.approx(0.095)
    assert histogram_quantile(0.5, [(0.1, 0.0), (math.inf, 0.0)]) is None
    assert histogram_quantile(0.99, [(0.1, 1.0), (math.inf, 10.0)]) == 0.1  # in +Inf: the last finite bound
    assert beyond_last_bucket(0.99, [(0.1, 1.0), (math.inf, 10.0)])
    assert not beyond_last_bucket(0.99, buckets) and not beyond_last_bucket(0.5, [(0.1, 0.0), (math.inf, 0.0)])


def test_lag_histogram_quantiles_match_its_counts() -> None:
    lag = LagHistogram()
    for value in [0.0005] * 98 + [0.03, 0.3]:
        lag.add(value)
    assert lag.total == 100 and lag.max_s == 0.3
    assert lag.quantile(0.5) <= 0.001 < lag.quantile(0.99) <= 0.05


def test_select_clips_alternates_voices(audio_fixtures: Path) -> None:
    chosen = select_clips(load_clips(audio_fixtures), 12)
    groups = [clip.id.rsplit("-", 1)[0] for clip in chosen]
    assert groups[:3] == ["zh", "en", "en-espeak"] and groups.count("zh") == 4
    assert len({clip.id for clip in chosen}) == 12
    assert len(select_clips(chosen[:2], 5)) == 5  # cycles when asked for more


def test_markdown_table_escapes_pipes() -> None:
    table = markdown_table(["a", "b"], [["x|y", 1]])
    assert table.splitlines() == ["| a | b |", "| --- | ---: |", "| x\\|y | 1 |"]


def test_vad_replay_finds_the_speech_end_and_the_hangover(tmp_path: Path, audio_fixtures: Path) -> None:
    settings = make_settings(tmp_path)
    clip = load_clips(audio_fixtures)[0]
    pcm = np.asarray(clip.pcm, dtype="<i2").tobytes()
    span = locate_speech(pcm, settings, chunk_bytes=640)
    assert isinstance(span, SpeechSpan) and span.utterances == 1
    # The fixtures have ~0.3 s of silence before the speech and ~0.5 s after it.
    assert 0.1 < span.start_s < span.end_s < clip.duration_s
    assert 0.2 < span.trailing_s < 1.0
    frames = math.ceil(settings.vad_silence_ms / settings.vad_frame_ms)
    assert frames * settings.vad_frame_ms / 1000 <= span.hangover_s < frames * settings.vad_frame_ms / 1000 + 0.05
    assert span.paused_audio is not None and span.utterance_audio.startswith(span.paused_audio)
    # Cut differently, the same audio ends at the same place (the replay does not depend on chunking).
    assert locate_speech(pcm, settings, chunk_bytes=2880).end_s == span.end_s
    assert locate_speech(bytes(32000), settings, chunk_bytes=640) is None


def test_growth_verdicts_flag_a_slope_not_noise() -> None:
    bounds = {"fds": 16, "threads": 4, "server_tasks": 32}
    flat = [{"t_s": t, "rss_mb": 300 + (t % 3) * 5, "fds": 100 + t % 7, "threads": 9, "server_tasks": None}
            for t in range(60)]
    verdicts = growth_verdicts(flat, 10, bounds)
    assert all(verdicts[k]["ok"] for k in ("fds", "threads"))
    assert verdicts["server_tasks"]["ok"] is None  # not sampled: no verdict
    leaking = [{**s, "fds": 100 + s["t_s"] // 2} for s in flat]
    verdicts = growth_verdicts(leaking, 10, bounds)
    assert verdicts["fds"]["ok"] is False and verdicts["fds"]["growth"] > 16 and verdicts["threads"]["ok"] is True
    assert growth_verdicts(flat, 59, bounds)["fds"]["ok"] is None  # too few samples after warm-up


def test_soak_fails_on_a_verdict_that_failed_and_on_questions_unanswered() -> None:
    ok, grew, unknown = {"ok": True}, {"ok": False}, {"ok": None}  # growth verdicts
    flat, rising, short = {"ok": True}, {"ok": False}, {"ok": None}  # the RSS slope's
    assert soak_failures({"fds": ok, "threads": ok, "server_tasks": unknown}, flat, answered=5, unanswered=0) == []
    assert soak_failures({"fds": grew, "threads": ok, "server_tasks": grew}, rising, answered=5,
                         unanswered=0) == ["rss_slope", "fds", "server_tasks"]
    assert soak_failures({"fds": unknown, "threads": unknown, "server_tasks": unknown}, short, answered=0,
                         unanswered=0) == ["no_replies"]  # too few samples is no verdict, no replies is one
    assert soak_failures({"fds": ok}, flat, answered=3, unanswered=1) == ["unanswered_questions"]


def test_latency_summary_keeps_failed_turns_out_of_the_figures(tmp_path: Path) -> None:
    """Injected turns: percentiles over the turns that succeeded, the two headline methods' difference
    turn by turn, the methods used."""
    def turn(index: int, ok: bool, same_clock: float | None, device_side: float | None) -> latency.TurnMeasurement:
        t = latency.TurnMeasurement(index, f"clip-{index}", "en", "native", ok=ok,
                                    same_clock_headline_ms=same_clock, device_side_headline_ms=device_side)
        t.headline_ms = same_clock if same_clock is not None else device_side
        t.headline_method = "same_clock" if same_clock is not None else "device_side"
        t.stages_ms = {name: 10.0 * (i + 1) + index for i, (name, _) in enumerate(latency.STAGES)}
        t.overhead_ms = 2.0 * index
        return t

    turns = [turn(0, True, 800.0, 790.0), turn(1, True, 900.0, 910.0), turn(2, True, None, 1000.0),
             turn(3, False, 5000.0, 1.0)]
    summary = latency.summarize(turns, "in-process", make_settings(tmp_path))["summary"]
    assert (summary["turns"], summary["turns_ok"]) == (4, 3)
    assert summary["headline_ms"]["n"] == 3 and summary["headline_ms"]["max"] == 1000.0  # not the failed 5000
    assert summary["headline_method"] == ["device_side", "same_clock"]
    check = summary["same_clock_minus_device_side_ms"]
    assert check["n"] == 2 and (check["min"], check["max"]) == (-10.0, 10.0)
    first_stage = latency.STAGES[0][0]
    assert summary["stages_ms"][first_stage]["n"] == 3 and summary["stages_ms"][first_stage]["max"] == 12.0
    assert summary["overhead_ms"]["max"] == 4.0


def test_rss_slope_is_a_least_squares_fit_after_warm_up() -> None:
    # Samples every 6 s; a sawtooth of 10 MB (turns in flight) over a rise of 0.5 MB a minute.
    samples = [{"t_s": 6.0 * i, "rss_mb": 300 + 0.5 * (6.0 * i / 60) + (i % 5) * 2.5} for i in range(200)]
    fit = rss_slope(samples, warmup_s=60)
    assert fit["samples"] == 190
    assert fit["slope_mb_per_min"] == pytest.approx(0.5, abs=0.05)
    assert fit["stderr_mb_per_min"] > 0 and fit["fit_end_mb"] > fit["fit_start_mb"]
    # A warm-up climb before the cut does not count: flat afterwards is flat.
    warming = [{"t_s": 6.0 * i, "rss_mb": (200 + 6.0 * i if i < 10 else 260.0) + (i % 2)} for i in range(100)]
    assert abs(rss_slope(warming, warmup_s=60)["slope_mb_per_min"]) < 0.05
    assert rss_slope(samples[:3], warmup_s=60)["slope_mb_per_min"] is None


# -- the commands, tiny ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_latency_command_reports_every_stage(tmp_path: Path, audio_fixtures: Path) -> None:
    code, report = run_command(latency, "latency", tmp_path, audio_fixtures, "--turns", "1", "--warmup", "0")
    assert code == 0
    assert report["server_mode"] == "in-process" and report["settings"]["turns"] == 1
    summary = report["summary"]
    assert summary["turns"] == summary["turns_ok"] == 1
    headline = summary["headline_ms"]
    assert_percentiles(headline, at_least=1)
    assert summary["headline_method"] == ["same_clock"]
    stages = [summary["stages_ms"][name]["p50"] for name, _ in latency.STAGES]
    assert stages == sorted(stages) and stages[0] >= 0 and stages[-1] <= headline["p50"]
    for name, _ in latency.COMPONENTS:
        assert_percentiles(summary["components_ms"][name], at_least=1)
    components = summary["components_ms"]
    assert components["llm_ttft_ms"]["p50"] <= components["llm_first_sentence_ms"]["p50"]
    assert components["critical_path_ms"]["p50"] >= components["hangover_ms"]["p50"]
    overhead = summary["overhead_ms"]["p50"]
    assert overhead == pytest.approx(headline["p50"] - components["critical_path_ms"]["p50"])
    (turn,) = report["turns"]
    assert turn["ok"] and turn["transcript"].strip() and turn["reply"].strip()
    # Both clocks measured the turn; the headline is the same-clock figure, the cross-check their difference.
    assert turn["headline_method"] == "same_clock" and turn["headline_ms"] == turn["same_clock_headline_ms"]
    assert summary["same_clock_minus_device_side_ms"]["p50"] == pytest.approx(
        turn["same_clock_headline_ms"] - turn["device_side_headline_ms"])


@pytest.mark.slow
def test_load_command_with_the_asr_on_a_second_process(tmp_path: Path, audio_fixtures: Path) -> None:
    """The edge replica measured apart from its ASR pool (``SERVER_ROLE=asr``), speakers streaming only."""
    code, report = run_command(load, "load", tmp_path, audio_fixtures, "--sessions", "2", "--duration", "5",
                               "--asr-process", "--talker-share", "0")
    assert code == 0 and report["asr_process"] is True and report["talker_share"] == 0
    (step,) = report["steps"]
    assert step["sessions"] == step["connected"] == 2 and step["client"]["utterances"] == 0
    edge, pool = step["process"], step["asr_pool_process"]
    assert edge["cpu_cores"] >= 0 and pool["cpu_cores"] >= 0
    assert pool["rss_mb"] > edge["rss_mb"]  # the model lives in the pool, not in the edge


@pytest.mark.slow
def test_load_command_with_two_sessions(tmp_path: Path, audio_fixtures: Path) -> None:
    code, report = run_command(load, "load", tmp_path, audio_fixtures, "--sessions", "2", "--duration", "8")
    assert code == 0
    assert report["server_mode"] == "subprocess"
    (step,) = report["steps"]
    assert step["sessions"] == step["connected"] == 2
    assert sum(step["by_protocol"].values()) == 2
    assert step["duration_s"] >= 8
    server = step["server"]
    assert server["available"]
    assert 0 <= server["ingest_lag_p50_s"] <= server["ingest_lag_p99_s"]
    assert server["frames_received"] > 0 and server["frames_dropped"] >= 0
    assert server["ingest_lag_frames"] <= server["frames_received"]
    assert all(count >= 0 for count in server["turns"].values())
    process = step["process"]
    assert process["cpu_cores"] >= 0 and process["rss_mb"] > 50 and process["fds"] > 0 and process["threads"] >= 1
    assert step["generator_cpu_cores"] >= 0 and step["asr_queue_max"] >= 0
    client = step["client"]
    assert client["utterances"] >= client["replies"] >= 0 and client["no_reply"] >= 0
    assert client["connect_failures"] == 0 and step["ramp_connect_failures"] == 0
    assert_percentiles(client["turn_latency_s"])
    assert client["turn_latency_s"]["n"] == client["replies"]
    assert_percentiles(client["ping_rtt_s"], at_least=1)
    assert step["lag_ok"] == (server["ingest_lag_p99_s"] < report["lag_target_s"])  # and all connected
    assert report["largest_sessions_lag_ok"] == (2 if step["lag_ok"] else None)


@pytest.mark.slow
def test_ingest_command_with_two_workers(tmp_path: Path, audio_fixtures: Path) -> None:
    code, report = run_command(ingest, "ingest", tmp_path, audio_fixtures, "--workers", "2", "--speakers", "3",
                               "--duration", "6", "--ramp-s", "1", "--settle-s", "1", "--gap-s", "1")
    (run,) = report["runs"]
    assert code == 0 and run["workers"] == 2 and run["connected"] == run["speakers"] == 3
    assert run["server"]["available"] and run["server"]["frames_received"] > 0
    assert 0 <= run["server"]["ingest_lag_p50_s"] <= run["server"]["ingest_lag_p99_s"]
    assert set(run["worker_rss_mb"]) == {"0", "1"} and all(mb > 50 for mb in run["worker_rss_mb"].values())
    assert run["process"]["rss_mb"] > sum(run["worker_rss_mb"].values())  # the tree: supervisor included
    real = run["real_speaker"]
    assert real["utterances"] >= real["replies"] >= 0
    assert_percentiles(real["turn_latency_s"])


@pytest.mark.slow
def test_soak_command_short_run(tmp_path: Path, audio_fixtures: Path) -> None:
    """The server as its own process with allocation tracing, both protocols, questions, barge-ins and
    timed reconnects from two source addresses: every figure of the report is there and adds up."""
    code, report = run_command(soak, "soak", tmp_path, audio_fixtures, "--sessions", "4", "--minutes", "0.4",
                               "--warmup-s", "4", "--sample-s", "1", "--gap-min-s", "1", "--gap-max-s", "2",
                               "--talker-share", "0.5", "--barge-in", "0.5", "--reconnect-min-s", "6",
                               "--reconnect-max-s", "9", "--addresses", "2", "--trace-frames", "2")
    assert code == (0 if report["passed"] else 1)
    assert report["passed"] == (not report["failures"])
    assert report["server_mode"] == "subprocess" and report["stores"] == "embedded" and report["warmup_s"] == 4
    assert report["source_addresses"] == 2 and report["xiaoai_speakers"] is True
    samples = report["samples"]
    assert samples and report["duration_s"] == 24
    times = [s["t_s"] for s in samples]
    assert times[0] > 0 and all(a < b for a, b in zip(times, times[1:]))  # how many: as fast as the machine is
    for sample in samples:
        assert sample["rss_mb"] > 50 and sample["fds"] > 0 and sample["threads"] >= 1
        assert sample["server_tasks"] is None and sample["generator_rss_mb"] > 0  # another process
        assert 0 <= sample["sessions_connected"] <= 4
    after_warmup = [s for s in samples if s["t_s"] >= report["warmup_s"]]
    rss = report["rss"]
    assert rss["samples"] == len(after_warmup) and rss["bound_mb_per_min"] == 0.2
    assert rss == {**rss_slope(samples, report["warmup_s"]), "bound_mb_per_min": 0.2, "ok": rss["ok"]}
    if rss["slope_mb_per_min"] is None:  # fewer than two samples after the warm-up on a starved machine
        assert rss["ok"] is None and "rss_slope" not in report["failures"]
    else:
        assert rss["ok"] == (rss["slope_mb_per_min"] <= 0.2)
        assert ("rss_slope" in report["failures"]) == (not rss["ok"])
    for key in ("fds", "threads"):
        verdict = report["verdicts"][key]
        assert verdict["samples"] == len(after_warmup)
        if verdict["samples"] >= 3:
            assert verdict["growth"] == pytest.approx(verdict["end"] - verdict["start"])
            assert verdict["ok"] == (verdict["growth"] <= verdict["bound"])
        else:  # a machine so loaded that three samples did not fit: no verdict, and none failed
            assert verdict["ok"] is None and key not in report["failures"]
    assert report["verdicts"] == growth_verdicts(samples, report["warmup_s"], {
        k: report["verdicts"][k]["bound"] for k in ("fds", "threads", "server_tasks")})
    assert report["failures"] == soak_failures(report["verdicts"], rss, answered=report["questions"]["answered"],
                                               unanswered=report["questions"]["unanswered"])
    questions, activity = report["questions"], report["activity"]
    assert questions["asked"] == activity["utterances"] >= questions["answered"] == activity["replies"] >= 1
    assert ("unanswered_questions" in report["failures"]) == (questions["unanswered"] > 0)
    assert activity["reconnects"] >= 1
    assert_percentiles(report["turn_latency_s"], at_least=1)
    assert report["memory"]["rss_bytes"] > 0 and report["memory"]["malloc"]["in_use_bytes"] > 0
    memory = report["memory"]["tracing"]
    assert memory["frames"] == 2 and memory["seconds_since_baseline"] > 0 and memory["tracer_overhead_bytes"] > 0
    assert all(site["size_diff_bytes"] > 0 and site["site"] for site in memory["top"])


@pytest.mark.slow
def test_asr_command_compares_both_engines_on_one_clip_per_language(tmp_path: Path, audio_fixtures: Path) -> None:
    import json

    from bench import asr as bench_asr

    manifest = json.loads((audio_fixtures / "manifest.json").read_text(encoding="utf-8"))
    picked = [next(e for e in manifest if e["lang"] == lang) for lang in ("zh", "en")]
    clips = tmp_path / "clips"
    clips.mkdir()
    for entry in picked:
        (clips / entry["file"]).symlink_to(audio_fixtures / entry["file"])
    (clips / "manifest.json").write_text(json.dumps(picked, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "asr.json"
    code = bench_asr.main(["--clips", str(clips), "--json", str(out), "--threads", "2"])
    assert code in (0, 1)  # 1 only says the 3x target was not met on this tiny set
    report = json.loads(out.read_text(encoding="utf-8"))
    assert report["machine"]["cpu_count"] >= 1
    assert report["settings"]["model"] == "base" and report["settings"]["threads"] == 2
    assert [row["id"] for row in report["clips"]] == [e["id"] for e in picked]
    for row in report["clips"]:
        for engine in ("stock", "fast"):
            assert row[engine]["latency_s"] > 0 and 0 <= row[engine]["cer"] <= 1
    for lang in ("zh", "en"):
        summary = report["summary"][lang]
        assert summary["speedup"] > 0 and isinstance(summary["target_met"], bool)
        assert summary["stock"]["mean_latency_s"] > 0 and summary["fast"]["mean_latency_s"] > 0


@pytest.mark.slow
def test_tts_command_measures_each_voice_and_the_round_trip(tmp_path: Path) -> None:
    from bench import tts as bench_tts

    out = tmp_path / "tts.json"
    code = bench_tts.main(["--limit", "1", "--json", str(out), "--threads", "2"])
    report = json.loads(out.read_text(encoding="utf-8"))
    assert_machine(report, "tts")
    assert report["settings"]["limit"] == 1 and report["settings"]["target_cer"] == 0.15
    summaries = {s["lang"]: s for s in report["summary"]}
    assert set(summaries) == {"zh", "en"}
    for lang, summary in summaries.items():
        assert summary["sentences"] == 1 and summary["load_s"] >= 0
        assert 0 < summary["first_audio_s_mean"] <= summary["first_audio_s_max"]
        assert summary["rtf_mean"] > 0 and summary["rss_mb_after"] > 50
        assert 0 <= summary["cer_mean"] <= 1 and isinstance(summary["target_met"], bool)
    rows = {v["lang"]: v["sentences"][0] for v in report["voices"]}
    assert rows["zh"]["text"] == "好的。" and rows["en"]["text"] == "Sure."
    assert all(row["audio_s"] > 0.2 and row["heard"] for row in rows.values())
    assert code == (0 if all(s["target_met"] for s in summaries.values()) else 1)


def test_tts_round_trip_reads_whisper_times_and_numbers_as_spoken() -> None:
    from bench.tts import HOUSEHOLD_EN, HOUSEHOLD_ZH, round_trip_cer

    assert len(HOUSEHOLD_ZH) == len(HOUSEHOLD_EN) == 20
    assert round_trip_cer("It's 7:30 in the morning.", "It's 7.30 in the morning.", "en") == 0
    assert round_trip_cer("现在是上午7:30。", "现在是上午七点半", "zh") == 0
    assert round_trip_cer("音量已经调到50%。", "音量已经调到百分之五十", "zh") == 0
    assert round_trip_cer("好的。", "不好", "zh") > 0


def test_tts_held_out_sentences_are_not_household_ones() -> None:
    from bench.tts import HELD_OUT_ZH, HOUSEHOLD_ZH, _parse

    assert len(HELD_OUT_ZH) >= 8 and not set(HELD_OUT_ZH) & set(HOUSEHOLD_ZH)
    assert _parse(["--held-out"]).held_out and not _parse([]).held_out


def test_tts_vowel_onset_sentences_each_have_a_vowel_initial_syllable_inside_a_word(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from bench.tts import HELD_OUT_ZH, HOUSEHOLD_ZH, VOWEL_ONSETS_ZH, _parse
    from voicegrow.pipeline import kokoro
    from voicegrow.pipeline.textnorm import normalize

    assert len(VOWEL_ONSETS_ZH) >= 10 and not set(VOWEL_ONSETS_ZH) & (set(HOUSEHOLD_ZH) | set(HELD_OUT_ZH))
    assert _parse(["--vowel-onsets"]).vowel_onsets and not _parse([]).vowel_onsets
    phonemize = kokoro.MandarinPhonemizer()
    with_break = [phonemize(normalize(text, "zh")) for text in VOWEL_ONSETS_ZH]
    monkeypatch.setattr(kokoro, "_VOWEL_ONSET_BREAK", "")
    without = [phonemize(normalize(text, "zh")) for text in VOWEL_ONSETS_ZH]
    assert all(a != b for a, b in zip(with_break, without, strict=True))  # every sentence exercises the rule


def test_room_compares_decoding_settings_side_by_side() -> None:
    import types

    from bench import room

    settings = types.SimpleNamespace(asr_beam_size=1, asr_language="auto")
    with pytest.raises(SystemExit, match="unknown lever 'loud'"):
        room.asr_variants("beam5+loud", settings, types.SimpleNamespace(model=None))
    server = types.SimpleNamespace(model=None)
    variants = room.asr_variants("server,beam5+fallback+noprompt,stock+langgiven", settings, server)
    assert [v.name for v in variants] == ["server", "beam5+fallback+noprompt", "stock+langgiven"]
    assert variants[0].engine is server
    fast = variants[1].engine
    assert (fast.beam_size, fast.prompts, len(fast.temperatures) > 1) == (5, {}, True)
    assert variants[2].engine.name == "stock" and variants[2].language_given

    def row(asr: str, answered: bool, cpu: float) -> dict[str, Any]:
        return {"noise": "white", "snr_db": 10.0, "engine": "webrtc_floor", "asr": asr, "ended": True,
                "answered": answered, "cer": 0.1 if answered else 0.5, "endpoint_delay_s": -0.1,
                "asr_delta_s": 0.0, "asr_s": cpu * 2, "asr_cpu_s": cpu, "dropped": None, "heard_lang": "en",
                "lang": "en"}

    summary = room.summarize([row("server", True, 0.2), row("server", False, 0.2), row("beam5", True, 0.3),
                              row("beam5", True, 0.3)])
    by = {s["asr"]: s for s in summary}
    assert (by["server"]["answered"], by["beam5"]["answered"]) == (0.5, 1.0)
    assert (by["server"]["asr_cpu_s_mean"], by["beam5"]["asr_s_p50"]) == (0.2, 0.6)
    assert "| beam5 | 100% |" in room.render({"summary": summary, "television": [], "cpu_per_stream": {}})
