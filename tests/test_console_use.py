"""The console as people use it (issue 21): speech with no lead-in keeps its first word, the same audio gives the same
transcript on every run; text in any encoding; a pasted paragraph is one turn; a quiet exit from a microphone chat."""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, Config, VadConfig
from assistant.pipeline import TranscriptionPipeline
from tests.conftest import require_offline_models, speak, write_wav
from tests.test_voice_cli import virtual_microphone  # noqa: F401 - the fixture, a PulseAudio null sink's monitor

pytestmark = pytest.mark.real_model

BACKENDS = ["faster-whisper", "whisper-hf"]
CHAT = [sys.executable, "-m", "assistant", "chat", "--model", "smollm2-135m", "--set", "llm.sampling.temperature=0",
        "--set", "llm.sampling.max_new_tokens=8"]  # fmt: skip
QUESTION = "北京是哪个国家的首都？"  # smollm2-135m answers it in Chinese
NOT_TEXT = b"\x1f\x8b\x08\x00\xe2\x9cze\x00\x03"  # a gzip header: no encoding makes text of it
PASTE_START, PASTE_END = b"\x1b[200~", b"\x1b[201~"  # what a terminal in bracketed paste mode puts around a paste
PASTE_MODE_ON, PASTE_MODE_OFF = b"\x1b[?2004h", b"\x1b[?2004l"


@pytest.fixture(scope="module")
def smollm() -> None:
    require_offline_models("smollm2-135m")


def user_turns(saved: Path) -> list[str]:
    messages = json.loads(saved.read_text(encoding="utf-8"))["messages"]
    return [message["content"] for message in messages if message["role"] == "user"]


@pytest.mark.parametrize("console", ["utf-8", "ascii", "gbk"])
def test_a_gbk_pipe_is_read_and_nothing_printed_ends_the_session(smollm: None, console: str, tmp_path: Path) -> None:
    """GBK piped in under a UTF-8 locale (detected), or on a GBK console (the locale's); a line that is no text
    fails its own turn; a reply the console cannot show (Chinese on ASCII) is shown with "?" instead."""
    saved = tmp_path / "chat.json"
    stdin = QUESTION.encode("gbk") + b"\n" + NOT_TEXT + b"\n" + b"What is 2+2?\n"
    env = {**os.environ, "PYTHONIOENCODING": console} if console != "utf-8" else None
    result = subprocess.run([*CHAT, "--text", "--save", str(saved)], input=stdin, capture_output=True, env=env,
                            timeout=300)  # fmt: skip
    stderr = result.stderr.decode(errors="replace")
    assert result.returncode == 1, stderr  # the line that is no text failed; the others were answered
    assert "Traceback" not in stderr and stderr.count("input-encoding: cannot tell the text encoding") == 1, stderr
    assert user_turns(saved) == [QUESTION, "What is 2+2?"]
    assert len(result.stdout.splitlines()) >= 2
    if console == "ascii":  # the Chinese reply, shown as well as an ASCII console can
        assert result.stdout.isascii() and b"??" in result.stdout


def test_several_lines_typed_with_a_backslash_are_one_message(smollm: None, tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    result = subprocess.run([*CHAT, "--text", "--save", str(saved)], input=b"one\\\ntwo\\\nthree\nfour\n",
                            capture_output=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert user_turns(saved) == ["one\ntwo\nthree", "four"]


class Terminal:
    """A pseudo-terminal running a command, playing the terminal: it wraps a paste in the bracketed paste markers
    only while the program has asked for them (``ESC[?2004h``), as terminals do."""

    def __init__(self, command: list[str]) -> None:
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the command on the terminal
            os.execv(command[0], command)
        self.output = b""
        self._seen = 0  # how much of the output read_until has looked at

    def read_until(self, wanted: bytes, seconds: float = 120) -> None:
        """Read until the terminal shows ``wanted`` at the end of what came since the last call."""
        deadline = time.monotonic() + seconds
        while not (len(self.output) > self._seen and self.output.endswith(wanted)):
            assert time.monotonic() < deadline, f"no {wanted!r} on the terminal: {self.output[-800:]!r}"
            if select.select([self.fd], [], [], 0.2)[0]:
                self.output += os.read(self.fd, 4096)
        self._seen = len(self.output)

    @property
    def paste_mode(self) -> bool:
        return self.output.rfind(PASTE_MODE_ON) > self.output.rfind(PASTE_MODE_OFF)

    def paste(self, text: str) -> None:
        data = text.replace("\n", "\r").encode()  # the terminal sends Enter as CR
        os.write(self.fd, PASTE_START + data + PASTE_END if self.paste_mode else data)

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def wait(self, seconds: float = 60) -> int:
        deadline = time.monotonic() + seconds
        while True:
            with_status = os.waitpid(self.pid, os.WNOHANG)
            if with_status[0]:
                return os.waitstatus_to_exitcode(with_status[1])
            assert time.monotonic() < deadline, "the chat did not end"
            if select.select([self.fd], [], [], 0.2)[0]:
                with contextlib.suppress(OSError):  # the terminal closed
                    self.output += os.read(self.fd, 4096)


def test_a_pasted_paragraph_is_one_turn_at_the_prompt(smollm: None, tmp_path: Path) -> None:
    readline = pytest.importorskip("readline", reason="this Python has no readline (the backslash still works)")
    if "libedit" in (readline.__doc__ or ""):
        pytest.skip("libedit's readline has no bracketed paste (the backslash still works)")
    saved = tmp_path / "chat.json"
    terminal = Terminal([*CHAT, "--text", "--save", str(saved)])
    terminal.read_until(b"> ")
    terminal.paste("Here is my shopping list:\neggs\nmilk\nbread")
    terminal.type("\r")  # Enter sends it
    terminal.read_until(b"> ")
    terminal.type("and\\\rcheese\r")  # a message typed over two lines
    terminal.read_until(b"> ")
    terminal.type("/quit\r")
    assert terminal.wait() == 0
    assert user_turns(saved) == ["Here is my shopping list:\neggs\nmilk\nbread", "and\ncheese"]
    assert not terminal.paste_mode  # the terminal is left as it was


def test_leaving_a_microphone_chat_prints_nothing(smollm: None, virtual_microphone: dict[str, str]) -> None:  # noqa: F811
    """Ctrl-C on a live microphone chat: the resampler and the stream are freed, nothing is printed after it."""
    require_offline_models("whisper-base")
    command = [*CHAT, "--set", "input.source=microphone", "--device", "pulse"]
    process = subprocess.Popen(command, env=virtual_microphone, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    deadline = time.monotonic() + 120
    while not any("listening on" in line for line in stderr):
        assert time.monotonic() < deadline and process.poll() is None, "".join(stderr)
        time.sleep(0.2)
    time.sleep(1.0)  # capturing
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=60) == 0
    reader.join(timeout=10)
    assert stderr[-1].startswith("listening on") and len(stderr) == 1, "".join(stderr)


def trimmed(path: Path) -> Path:
    """The clip cut to start at its first loud sample and end at its last: no lead-in, as a push-to-talk clip, a
    trimmed recording or a client-side VAD's utterance has."""
    samples = load_audio(path).samples
    loud = np.flatnonzero(np.abs(samples) > 0.02)
    return write_wav(path.with_name(f"trimmed-{path.name}"), samples[loud[0] : loud[-1] + 1])


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    require_offline_models("whisper-base")
    folder = tmp_path_factory.mktemp("clips")
    # whisper-base heard these as "What is the weather like today?" and "the S. Tell me I don't come out of cars."
    # (faster-whisper), "The S. L.M.I.N.O.C.M. outcast." (whisper-hf) before the silence in front
    return {
        "hello": trimmed(speak("Hello, what is the weather like today?", folder / "hello.wav", voice="en")),
        "cats": trimmed(speak("Yes. Tell me a joke about cats.", folder / "cats.wav", voice="en",
                              words_per_minute=190)),
        "hello-fast": trimmed(speak("Hello, what is the weather like today?", folder / "hello-fast.wav", voice="en",
                                    words_per_minute=190)),  # the live path heard "the low, what is ..."
    }  # fmt: skip


def transcribe(path: Path, backend: str, **asr: object) -> str:
    """A fresh pipeline each time (a new run as far as the models' random generators go): the file's text."""
    config = Config(asr=AsrConfig(backend=backend, language="en", **asr), vad=VadConfig())  # type: ignore[arg-type]
    return TranscriptionPipeline.from_config(config).transcribe_file(path).transcript.text


@pytest.mark.parametrize("backend", BACKENDS)
def test_speech_from_the_first_sample_keeps_its_first_word(clips: dict[str, Path], backend: str) -> None:
    texts = [transcribe(clips["hello"], backend) for _ in range(3)]
    assert texts[0].lower().startswith("hello"), texts
    assert texts[1:] == texts[:2]
    assert transcribe(clips["cats"], backend).lower().startswith("yes"), backend


def test_a_live_utterance_from_its_first_sample_keeps_its_first_word(clips: dict[str, Path]) -> None:
    """The voice paths' finals (microphone, push-to-talk, WebSocket commits) on faster-whisper's live window."""
    from assistant.asr.faster_whisper import FasterWhisperTranscriber

    transcriber = FasterWhisperTranscriber(AsrConfig(language="en"))
    utterance = load_audio(clips["hello-fast"])
    assert transcriber.transcribe_live([utterance], language="en")[0].text.lower().startswith("hello")
    assert transcriber.transcribe_many([utterance], language="en")[0].text.lower().startswith("hello")


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_sampled_fallback_gives_the_same_text_every_run(clips: dict[str, Path], backend: str) -> None:
    """Temperature 1 only: every window is sampled (as the fallback does), seeded by ``asr.seed``."""
    texts = [transcribe(clips["cats"], backend, temperatures=(1.0,)) for _ in range(3)]
    assert texts[0] and texts[1:] == texts[:2], texts
    assert texts[0].lower().startswith("ye"), texts  # "Yes" or "Yea": sampled


def test_ctrl_c_in_a_spoken_reply_ends_the_chat_quietly(smollm: None, clips: dict[str, Path]) -> None:
    """Ctrl-C while the reply is decoded on the model worker: the model is closed only once that decode has stopped
    (llama.cpp's context freed under a running decode crashed the process, about one time in two), and nothing is
    printed. Three tries, Ctrl-C as the reply starts to stream."""
    require_offline_models("whisper-base")
    command = [*CHAT, "--set", "llm.sampling.max_new_tokens=400", "--audio", str(clips["hello"])]
    for _ in range(3):
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert process.stdout is not None
        shown, deadline = b"", time.monotonic() + 120
        while len(shown.partition(b"assistant: ")[2]) < 8:  # a few characters of the reply
            assert time.monotonic() < deadline and process.poll() is None, shown
            shown += os.read(process.stdout.fileno(), 64)
        process.send_signal(signal.SIGINT)
        _rest, stderr = process.communicate(timeout=60)
        assert (process.returncode, stderr) == (0, b"")
