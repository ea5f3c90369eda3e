"""`assistant chat` by voice as users run it: files played in as speech, and a real sounddevice stream from a
virtual microphone (a PulseAudio null sink fed by paplay), with Whisper base and the SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import require, require_offline_models, require_tool, speak, write_wav

pytestmark = pytest.mark.real_model

FAST_CHAT = ["--model", "smollm2-135m", "--set", "asr.language=en", "--set", "llm.sampling.temperature=0",
             "--set", "llm.sampling.max_new_tokens=16", "--set", "llm.system=Answer briefly."]  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def offline_models() -> None:
    require_offline_models("smollm2-135m", "whisper-base")


@pytest.fixture(scope="module")
def questions(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    folder = tmp_path_factory.mktemp("questions")
    return [
        speak("What is the capital of France?", folder / "france.wav", words_per_minute=120),
        speak("Name three colors of the rainbow.", folder / "rainbow.wav", words_per_minute=120),
    ]


def chat(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "assistant", "chat", *FAST_CHAT, *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, env=env)


def turns(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines()] if log.exists() else []


def test_audio_files_are_spoken_turns_with_metrics(questions: list[Path], tmp_path: Path) -> None:
    import numpy as np

    noise = write_wav(tmp_path / "noise.wav", np.random.default_rng(0).normal(0, 0.02, 32000))
    log = tmp_path / "turns.jsonl"
    result = chat("--audio", str(questions[0]), str(noise), str(questions[1]), "--log", str(log), "--verbose")
    assert result.returncode == 0, result.stderr
    recorded = turns(log)
    assert len(recorded) == 2  # the noise took no turn
    assert "capital" in recorded[0]["transcript"].lower() and "rainbow" in recorded[1]["transcript"].lower()
    assert recorded[0]["reply"] and recorded[0]["speech_end_to_first_char_ms"] > 0
    assert result.stdout.count("you: ") == 2 and result.stderr.count("end of speech -> transcript") == 2


def test_a_speaker_recorded_far_too_quietly_is_heard(questions: list[Path], tmp_path: Path) -> None:
    """The live path normalises the level before its VAD and Whisper: a question 45 dB too quiet is a turn."""
    quiet = tmp_path / "quiet.wav"
    subprocess.run([require_tool("ffmpeg"), "-loglevel", "error", "-i", str(questions[0]), "-af", "volume=-45dB",
                    str(quiet)], check=True)  # fmt: skip
    log = tmp_path / "turns.jsonl"
    result = chat("--audio", str(quiet), "--log", str(log))
    assert result.returncode == 0, result.stderr
    recorded = turns(log)
    assert len(recorded) == 1 and "capital" in recorded[0]["transcript"].lower(), recorded


def test_unreadable_file_fails_its_turn_only(questions: list[Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken.m4a"
    broken.write_bytes(b"not audio at all")
    result = chat("--audio", str(broken), str(questions[0]))
    assert result.returncode == 1
    assert "audio-decode" in result.stderr and "capital" in result.stdout.lower()


def test_a_missing_microphone_is_a_clear_error() -> None:
    result = chat("--set", "input.source=microphone", "--device", "no-such-microphone")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "audio-source: no microphone: 'no-such-microphone' not found" in result.stderr


@pytest.fixture
def virtual_microphone(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A PulseAudio server of our own with a null sink; its monitor is the microphone ALSA's 'pulse' device reads."""
    pulseaudio = require_tool("pulseaudio")
    require_tool("paplay")
    require(importlib.util.find_spec("sounddevice") is not None, "sounddevice is not installed")
    runtime = tmp_path / "pulse-runtime"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime), "PULSE_RUNTIME_PATH": str(runtime / "pulse")}
    daemon = subprocess.Popen(
        [pulseaudio, "--daemonize=no", "--exit-idle-time=-1", "-n", "--load=module-native-protocol-unix",
         "--load=module-null-sink sink_name=room", "--load=module-always-sink", "--log-level=error"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while subprocess.run(["pactl", "info"], env=env, capture_output=True).returncode != 0:
        assert time.monotonic() < deadline and daemon.poll() is None, "pulseaudio did not start"
        time.sleep(0.2)
    subprocess.run(["pactl", "set-default-source", "room.monitor"], env=env, check=True)
    env["ASSISTANT_TEST_PULSE_PID"] = str(daemon.pid)
    yield env
    daemon.kill()
    daemon.wait(timeout=10)


def test_microphone_turns_from_a_virtual_capture_device(
    virtual_microphone: dict[str, str], questions: list[Path], tmp_path: Path
) -> None:
    env = virtual_microphone
    log = tmp_path / "turns.jsonl"
    command = [sys.executable, "-m", "assistant", "chat", *FAST_CHAT, "--set", "input.source=microphone",
               "--device", "pulse", "--log", str(log), "--verbose"]  # fmt: skip
    process = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        _wait(lambda: any("listening on" in line for line in stderr), 120, "the microphone never opened", stderr)
        subprocess.run(["paplay", "--device=room", str(questions[0])], env=env, check=True, timeout=30)
        _wait(lambda: len(turns(log)) >= 1, 120, "no turn was taken", stderr)
        assert "capital" in turns(log)[0]["transcript"].lower()
        # the device vanishes mid-session: the session ends with a clear error instead of hanging
        os.kill(int(env["ASSISTANT_TEST_PULSE_PID"]), signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    reader.join(timeout=10)
    assert "audio-source: " in "".join(stderr) and "Traceback" not in "".join(stderr)


def _wait(condition: Callable[[], bool], seconds: float, what: str, stderr: list[str]) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what}; stderr: {''.join(stderr)[-2000:]}"
        time.sleep(0.2)


def test_speak_says_the_reply(questions: list[Path], tmp_path: Path) -> None:
    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    spoken = tmp_path / "spoken"
    result = chat("--audio", str(questions[0]), "--speak", "--set", f"output.speaker.save_dir={spoken}")
    assert result.returncode == 0, result.stderr
    assert list(spoken.glob("sentence-*.wav"))
