"""Shared test fixtures: where the speech fixtures live, and the service fixtures plugin."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytest_plugins = ["tests.service_fixtures"]

REPO_ROOT = Path(__file__).resolve().parents[1]


def fixtures_dir() -> Path:
    """The shared speech clips: ``$VOICEGROW_FIXTURES`` or the repository's sibling ``shared/``."""
    return Path(os.environ.get("VOICEGROW_FIXTURES") or REPO_ROOT.parent / "shared" / "fixtures" / "audio")


@pytest.fixture(scope="session")
def audio_fixtures() -> Path:
    path = fixtures_dir()
    if not (path / "manifest.json").is_file():
        pytest.fail(f"speech fixtures not found at {path}; set VOICEGROW_FIXTURES")
    return path


@pytest.fixture(scope="session")
def manifest(audio_fixtures: Path) -> list[dict]:
    return json.loads((audio_fixtures / "manifest.json").read_text(encoding="utf-8"))


# -- in-process servers ---------------------------------------------------------------------------

def make_settings(tmp_path: Path, **overrides: object):
    """Settings for an in-process server on free loopback ports with embedded backends under tmp_path.

    Every utterance is heard (``LISTEN_MODE=always``): the pipeline's tests speak without a wake word;
    the listening modes' own tests (tests/test_listening.py) choose theirs."""
    from voicegrow.settings import load_settings

    env = {
        "SERVER_HOST": "127.0.0.1", "WS_PORT": "0", "HTTP_PORT": "0", "DATA_DIR": str(tmp_path / "data"),
        "ASR_MODEL_SIZE": "base", "ASR_PRELOAD": "false", "ASR_LANGUAGE": "auto", "LOG_FORMAT": "text",
        "PROTOCOL_DETECT_MS": "300", "SHUTDOWN_GRACE_S": "2",
        "LISTEN_MODE": "always",
    }
    env.update({key.upper(): str(value) for key, value in overrides.items()})
    return load_settings(env, env_file=None)


@pytest.fixture
async def embedded_server(tmp_path: Path):
    """A whole server with embedded defaults (no MySQL/Redis/S3/LLM/TTS) on free ports."""
    from voicegrow.app import running_server

    async with running_server(make_settings(tmp_path)) as handle:
        yield handle
