"""Silero VAD on onnxruntime: blocks and live streams agree, streams keep their own state, no torch anywhere."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from assistant.asr.vad import FRAME_SAMPLES, SileroVad
from assistant.audio.decode import load_audio
from assistant.config import VadConfig
from assistant.errors import VadError
from assistant.messages import Audio
from tests.conftest import require, silence, speak, write_wav

pytest.importorskip("faster_whisper.vad", reason="faster-whisper is not installed")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")

TOLERANCE = 1e-5  # the same ONNX graph on the same inputs; only float summation order may differ


@pytest.fixture(scope="module")
def speech(tmp_path_factory) -> np.ndarray:
    """1 s of silence, a spoken sentence, 2 s of silence, another, 1 s of silence (16 kHz float32)."""
    folder = tmp_path_factory.mktemp("vad")
    one = load_audio(speak("The quick brown fox jumps over the lazy dog.", folder / "one.wav")).samples
    two = load_audio(speak("Please close the door when you leave.", folder / "two.wav")).samples
    return np.concatenate([silence(1.0), one, silence(2.0), two, silence(1.0)])


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    return SileroVad(VadConfig())


def _batch_probabilities(samples: np.ndarray) -> np.ndarray:
    """Per-frame probabilities as ``speech_spans`` computes them (faster-whisper's batched call on padded audio)."""
    from faster_whisper.vad import get_vad_model

    padded = np.pad(samples, (0, FRAME_SAMPLES - len(samples) % FRAME_SAMPLES))
    return np.asarray(get_vad_model()(padded)).reshape(-1)


def _stream_probabilities(score, samples: np.ndarray) -> np.ndarray:
    frames = len(samples) // FRAME_SAMPLES
    return np.array([score(samples[i * FRAME_SAMPLES : (i + 1) * FRAME_SAMPLES]) for i in range(frames)])


def test_streaming_frame_by_frame_scores_as_one_batch_call(vad, speech) -> None:
    streamed = _stream_probabilities(vad.frame_probability(), speech)
    batch = _batch_probabilities(speech)
    # every whole frame; faster-whisper zeroes the tail of the last (padded) frame of a batch, so that one may differ
    count = min(len(streamed), len(batch) - 1)
    np.testing.assert_allclose(streamed[:count], batch[:count], atol=TOLERANCE)
    assert (streamed > 0.5).any() and (streamed[: 16000 // FRAME_SAMPLES] < 0.5).all()  # speech, and silence first


def test_streams_keep_their_own_state_and_share_one_session(vad, speech) -> None:
    alone = _stream_probabilities(vad.frame_probability(), speech)
    first, second = vad.frame_probability(), SileroVad(VadConfig()).frame_probability()
    assert first._session is second._session  # one onnxruntime session for every stream in the process
    reversed_speech = speech[::-1].copy()
    interleaved = []
    for i in range(len(speech) // FRAME_SAMPLES):
        frame = slice(i * FRAME_SAMPLES, (i + 1) * FRAME_SAMPLES)
        interleaved.append(first(speech[frame]))
        second(reversed_speech[frame])  # another stream in between must not disturb the first one's state
    np.testing.assert_allclose(interleaved, alone, atol=TOLERANCE)


def test_streams_in_threads_agree_with_one_alone(vad, speech) -> None:
    alone = _stream_probabilities(vad.frame_probability(), speech)
    results: list[np.ndarray | None] = [None] * 4

    def run(index: int) -> None:
        results[index] = _stream_probabilities(vad.frame_probability(), speech)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(results))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for result in results:
        np.testing.assert_allclose(result, alone, atol=TOLERANCE)


def test_reset_starts_the_stream_afresh(vad, speech) -> None:
    score = vad.frame_probability()
    head = speech[: 40 * FRAME_SAMPLES]
    first = _stream_probabilities(score, head)
    score.reset()
    np.testing.assert_allclose(_stream_probabilities(score, head), first, atol=TOLERANCE)


def test_spans_are_seconds_from_the_start_of_the_source(vad, speech) -> None:
    spans = vad.speech_spans(Audio(speech, start_s=100.0))
    assert len(spans) == 2
    assert 100.5 < spans[0].start_s < 101.2  # speech starts after 1 s of silence; 200 ms of pad before it
    assert spans[0].end_s < spans[1].start_s
    assert spans[1].end_s <= 100.0 + len(speech) / 16000
    assert vad.speech_spans(Audio(silence(5.0))) == []
    assert vad.speech_spans(Audio(np.zeros(0, np.float32))) == []


def test_threshold_and_durations_come_from_the_config(speech) -> None:
    long_pauses = SileroVad(VadConfig(min_silence_ms=3000)).speech_spans(Audio(speech))
    assert len(long_pauses) == 1  # the 2 s pause no longer splits the speech
    strict = SileroVad(VadConfig(threshold=0.99, min_speech_ms=5000)).speech_spans(Audio(speech))
    assert strict == []


def test_other_rates_and_frame_sizes_are_refused_with_the_fix(vad) -> None:
    with pytest.raises(VadError, match=r"needs 16 kHz audio, got 8000 Hz; 8 kHz is not supported"):
        vad.speech_spans(Audio(np.zeros(8000, np.float32), sample_rate=8000))
    with pytest.raises(VadError, match="frames of 512 samples"):
        vad.frame_probability()(np.zeros(256, np.float32))


def test_missing_faster_whisper_names_the_install(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "faster_whisper.vad", None)  # import raises ImportError
    with pytest.raises(VadError, match=r"pip install faster-whisper onnxruntime"):
        SileroVad(VadConfig())


TRANSCRIBE_WITHOUT_TORCH = """
import sys
import assistant.cli
from assistant.config import load_config
from assistant.pipeline import TranscriptionPipeline
config = load_config()
assert (config.asr.backend, config.vad.enabled, config.vad.backend) == ("faster-whisper", True, "silero"), config
result = TranscriptionPipeline.from_config(config).transcribe_file(sys.argv[1])
print(result.transcript.text)
heavy = sorted(name for name in ("torch", "transformers", "silero_vad") if name in sys.modules)
print("HEAVY", heavy)
"""


@pytest.mark.real_model
@pytest.mark.slow
def test_default_transcription_never_imports_torch(tmp_path: Path) -> None:
    from assistant.models import OFFLINE_BUNDLES, bundle_status

    require(bundle_status(OFFLINE_BUNDLES["whisper-base"]) != "not installed", "offline whisper-base not installed")
    spoken = load_audio(speak("hello world", tmp_path / "hello.wav")).samples
    clip = write_wav(tmp_path / "clip.wav", np.concatenate([silence(1.0), spoken, silence(1.0)]))
    done = subprocess.run([sys.executable, "-c", TRANSCRIBE_WITHOUT_TORCH, str(clip)], capture_output=True,
                          text=True, timeout=300, cwd=Path(__file__).parent.parent)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "hello" in done.stdout.lower()
    assert "HEAVY []" in done.stdout, done.stdout


def test_onnx_runtime_telemetry_is_off(tmp_path):
    """Official onnxruntime builds report usage (1DS) and keep an offline cache in $TMPDIR unless told not to."""
    code = "import assistant.asr.vad as v; from assistant.config import VadConfig; v.SileroVad(VadConfig())"
    environment = {k: value for k, value in os.environ.items() if k != "ORT_DISABLE_TELEMETRY"}
    subprocess.run([sys.executable, "-c", code], check=True, env={**environment, "TMPDIR": str(tmp_path)})
    assert list(tmp_path.iterdir()) == [], "onnxruntime left its telemetry files behind"
