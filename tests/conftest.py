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
