"""Real-browser test support: a whole server in a background thread, and headless Debian Chromium.

The server (with the fake LLM/TTS of ``bench``) runs its own ``trio.run`` in a thread so that the
synchronous WebDriver calls of a test do not block it. Chromium is Debian's ``/usr/bin/chromium``,
driven by Debian's ``chromedriver`` through Selenium; nothing is downloaded. Its fake microphone reads
a fixture clip padded with silence (``--use-file-for-fake-audio-capture``, 16-bit PCM WAV, played once).
Screenshots go to ``tests/output/`` (ignored by git) for people to look at.
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
import time
import wave
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from bench.fake_ai import FakeAiConfig, run_fake_ai
from tests.conftest import REPO_ROOT, make_settings

OUTPUT_DIR = REPO_ROOT / "tests" / "output"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"


def require_chromium() -> None:
    """Fail in CI (``.ci/run`` installs both), skip on a developer machine without them."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        message = f"Debian chromium / chromium-driver not installed ({', '.join(missing)}); .ci/run installs them"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


class ServerThread:
    """``running_server`` with the fake AI service, in its own thread and trio run."""

    def __init__(self, tmp: Path, **overrides: object) -> None:
        self._tmp = tmp
        self._overrides = overrides
        self._ready: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._main, name="voicegrow-test-server", daemon=True)
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self.handle: Any = None
        self.fake_ai: FakeAiConfig | None = None  # mutable while it runs: a test may lengthen replies

    def __enter__(self) -> "ServerThread":
        self._thread.start()
        result = self._ready.get(timeout=180)
        if isinstance(result, BaseException):
            raise result
        self.handle = result
        return self

    def __exit__(self, *exc: object) -> None:
        if self._token is not None and self._stop is not None:
            trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
        self._thread.join(timeout=30)

    @property
    def url(self) -> str:
        return self.handle.http_url

    @property
    def services(self) -> Any:
        return self.handle.services

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run an async function of the server's services on its trio loop."""
        return trio.from_thread.run(fn, *args, trio_token=self._token)

    def _main(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:  # reported to the test thread
            self._ready.put(exc)

    async def _serve(self) -> None:
        from voicegrow.app import running_server

        self._token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        # Short replies (15 ms of audio a character) keep real-time playback short.
        self.fake_ai = FakeAiConfig(ttft_ms=100, tokens_per_s=80, tts_ms_per_char=15)
        async with run_fake_ai(self.fake_ai) as ai:
            settings = make_settings(self._tmp, llm_base_url=ai.url, tts_base_url=ai.url, asr_preload="true",
                                     asr_language="en", **self._overrides)
            async with running_server(settings) as handle:
                with trio.fail_after(150):
                    await handle.services.asr.warm_up()
                self._ready.put(handle)
                await self._stop.wait()


def padded_clip(source: Path, target: Path, *, lead_s: float = 1.0, tail_s: float = 4.0) -> Path:
    """The clip with silence around it, so that the VAD hears its start and its end."""
    with wave.open(str(source), "rb") as w:
        params = w.getparams()
        frames = w.readframes(params.nframes)
    silence = b"\x00" * params.sampwidth * params.nchannels
    with wave.open(str(target), "wb") as out:
        out.setparams(params)
        out.writeframes(silence * int(lead_s * params.framerate) + frames +
                        silence * int(tail_s * params.framerate))
    return target


@contextmanager
def chromium(capture_wav: Path | None = None, *, loop: bool = False, width: int = 1280,
             height: int = 900) -> Iterator[Any]:
    """Headless Chromium with a fake microphone (the clip once, or over and over with ``loop``), its
    performance log (network requests) recorded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="vg-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--autoplay-policy=no-user-gesture-required",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--user-data-dir={profile}", f"--window-size={width},{height}"):
        options.add_argument(flag)
    if capture_wav is not None:
        options.add_argument(f"--use-file-for-fake-audio-capture={capture_wav}{'' if loop else '%noloop'}")
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def screenshot(driver: Any, name: str) -> Path:
    OUTPUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUTPUT_DIR / f"{name}.png"
    driver.save_screenshot(str(path))
    return path


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, driver: Any = None) -> Any:
    """Poll ``predicate`` until it returns something truthy; on timeout, a screenshot and the console log."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = predicate()
        except Exception as exc:  # stale elements while the page redraws
            value, last_error = None, exc
        else:
            last_error = None
        if value:
            return value
        if time.monotonic() > deadline:
            detail = ""
            if driver is not None:
                screenshot(driver, f"timeout-{what.replace(' ', '-')[:40]}")
                detail = "; browser log: " + "; ".join(e["message"] for e in driver.get_log("browser"))[-2000:]
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} "
                                 f"(last error: {last_error!r}){detail}")
        time.sleep(0.2)


def network_requests(driver: Any) -> list[dict[str, Any]]:
    """The requests the page sent since the last call: url, method and headers, from the performance log."""
    import json

    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            req = message["params"]["request"]
            requests.append({"url": req["url"], "method": req["method"], "headers": req.get("headers", {})})
        elif message["method"] == "Network.requestWillBeSentExtraInfo":
            requests.append({"url": None, "method": None, "headers": message["params"].get("headers", {}),
                             "request_id": message["params"].get("requestId")})
    return requests
