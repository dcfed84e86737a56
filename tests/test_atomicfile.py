"""The one atomic-write helper keeps both callers' semantics: private spool records, a readable model cache."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from voicegrow import atomicfile
from voicegrow.atomicfile import atomic_write


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_default_mode_is_private_and_mode_is_applied(tmp_path: Path) -> None:
    private, shared = tmp_path / "record.rec", tmp_path / "model.json"
    atomic_write(private, b"secret")
    atomic_write(shared, b"{}", mode=0o644)
    assert (private.read_bytes(), _mode(private)) == (b"secret", 0o600)
    assert (shared.read_bytes(), _mode(shared)) == (b"{}", 0o644)


def test_replaces_content_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "a"
    atomic_write(target, b"old")
    atomic_write(target, b"new", fsync=False)
    assert target.read_bytes() == b"new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_a_failed_write_keeps_the_old_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "a"
    atomic_write(target, b"old")

    def broken(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomicfile.os, "replace", broken)
    with pytest.raises(OSError):
        atomic_write(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]


def test_fsync_off_syncs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    monkeypatch.setattr(atomicfile.os, "fsync", lambda fd: calls.append(fd))
    atomic_write(tmp_path / "a", b"x", fsync=False)
    assert calls == []
    atomic_write(tmp_path / "b", b"x")
    assert len(calls) == 2  # the file and its directory


def test_a_directory_that_cannot_be_synced_is_not_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = atomicfile.os.fsync

    def refuse_dirs(fd: int) -> None:
        if stat.S_ISDIR(atomicfile.os.fstat(fd).st_mode):
            raise OSError(22, "Invalid argument")
        real(fd)

    monkeypatch.setattr(atomicfile.os, "fsync", refuse_dirs)
    atomic_write(tmp_path / "a", b"x")
    assert (tmp_path / "a").read_bytes() == b"x"
