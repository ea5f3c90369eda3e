"""The browser page end to end: headless Debian chromium driven by Playwright, its fake microphone fed from a wav
file, against a real `assistant serve` on 127.0.0.1. The page must show the transcript and a reply."""

from __future__ import annotations

import importlib.util
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_offline_models, require_tool, speak
from tests.test_server import start_server

pytestmark = pytest.mark.real_model
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed")
    require(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server()
    yield base
    process.terminate()
    process.wait(timeout=30)


def spoken_wav(folder: Path) -> Path:
    """A question followed by a long silence (Chromium loops its fake capture file)."""
    question = speak("What is the capital of France?", folder / "q.wav", words_per_minute=120)
    padded = folder / "fake-mic.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-y", "-i", str(question), "-af",
                    "adelay=500,apad=pad_dur=8", "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le", str(padded)],
                   check=True)  # fmt: skip
    return padded


def test_page_shows_transcript_and_reply_from_the_microphone(page_server: str, tmp_path: Path) -> None:
    from playwright.sync_api import expect, sync_playwright

    fake_mic = spoken_wav(tmp_path)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
            f"--use-file-for-fake-audio-capture={fake_mic}", "--autoplay-policy=no-user-gesture-required"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(page_server + "/")
            expect(page.locator("#status")).to_contain_text("connected", timeout=15_000)
            page.click("#handsfree")
            user = page.locator(".turn.user").first
            expect(user).to_contain_text("capital", ignore_case=True, timeout=60_000)
            reply = page.locator(".turn.assistant").first
            expect(reply).not_to_have_text("", timeout=60_000)
            page.fill("#text", "Thank you!")
            page.press("#text", "Enter")
            expect(page.locator(".turn.user", has_text="Thank you!")).to_have_count(1)
        finally:
            browser.close()
