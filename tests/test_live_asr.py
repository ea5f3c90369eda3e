"""transcribe_live: a live turn's final transcript on an encoder window cut to the utterance (faster-whisper)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from assistant.asr import faster_whisper
from assistant.asr.base import LiveTranscriber
from assistant.asr.edges import Edges
from assistant.asr.faster_whisper import FasterWhisperTranscriber, live_frames
from assistant.audio.decode import load_audio
from assistant.config import AsrConfig, load_config
from assistant.errors import ConfigError
from assistant.messages import Audio, Transcript
from tests.conftest import require_offline_models, speak

# questions of benchmarks/voice.py that the 30 s window hears word for word at 130 wpm
AGREED = ["How many days are there in a week?", "What color is the sky on a clear day?",
          "How many legs does a spider have?", "What do bees make from flowers?"]  # fmt: skip
PAD = np.zeros(3200, np.float32)  # 0.2 s: the silence an endpointed utterance keeps on each side


def words(text: str) -> list[str]:
    return "".join(c if c.isalnum() or c.isspace() else " " for c in text.lower()).split()


def test_the_window_is_the_utterance_rounded_up_to_a_second_plus_three() -> None:
    assert live_frames(1) == 400  # 10 ms frames: 0.01 s -> 1 s + 3 s
    assert live_frames(320) == 700  # a 3.2 s question: a 7 s window instead of 30 s
    assert live_frames(400) == 700
    assert live_frames(2900) == 3000  # never beyond Whisper's window


class _Routed(FasterWhisperTranscriber):
    """The routing of ``transcribe_live`` without a model: a window "fails" for audio of 1.5 s."""

    def __init__(self, config: AsrConfig) -> None:  # no model
        self._config = config
        self._on_cuda = False
        self.windowed: list[list[float]] = []
        self.full: list[list[float]] = []

    def supports_language(self, language: str) -> bool:
        return language == "en"

    def _windowed(self, audios: Sequence[Audio], language: str | None) -> list[Transcript | None]:
        self.windowed.append([a.duration_s for a in audios])
        return [None if a.duration_s == 1.5 else Transcript(f"window {a.duration_s:g}", "en") for a in audios]

    def transcribe_many(self, audios: Sequence[Audio], **options: Any) -> list[Transcript]:  # type: ignore[override]
        assert options == {"language": options["language"], "timestamps": False}
        self.full.append([a.duration_s for a in audios])
        return [Transcript(f"full {a.duration_s:g}", "en") for a in audios]


def _seconds(*durations: float) -> list[Audio]:
    return [Audio(np.zeros(int(d * 16000), np.float32)) for d in durations]


def test_short_utterances_take_the_window_the_rest_the_30_s_window_in_order() -> None:
    routed = _Routed(AsrConfig(batch_size=2))
    assert isinstance(routed, LiveTranscriber)
    texts = [t.text for t in routed.transcribe_live(_seconds(3, 25, 1.5, 4, 2), language=None)]
    assert texts == ["window 3", "full 25", "full 1.5", "window 4", "window 2"]
    assert routed.windowed == [[3, 1.5], [4, 2]]  # batches of asr.batch_size, long ones left out
    assert routed.full == [[25, 1.5]]  # over LIVE_MAX_S, or failed the thresholds: one call to the final path


def test_live_window_full_is_the_final_path_itself() -> None:
    assert load_config(overrides=["asr.live_window=full"]).asr.live_window == "full"
    with pytest.raises(ConfigError, match=r"asr\.live_window: 'short' is not one of auto, full"):
        load_config(overrides=["asr.live_window=short"])
    routed = _Routed(AsrConfig(live_window="full"))
    assert [t.text for t in routed.transcribe_live(_seconds(3), language="en")] == ["full 3"]
    assert routed.windowed == []
    with pytest.raises(Exception, match="does not know language 'xx'"):
        routed.transcribe_live(_seconds(3), language="xx")


# --- the real Whisper base weights --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transcriber() -> FasterWhisperTranscriber:
    require_offline_models("whisper-base")
    return FasterWhisperTranscriber(AsrConfig())


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> list[Audio]:
    """The questions as the voice benchmark speaks them (espeak-ng, 130 wpm), with the endpointer's pads."""
    folder = tmp_path_factory.mktemp("questions")
    spoken = [load_audio(speak(q, folder / f"q{i}.wav", words_per_minute=130)).samples for i, q in enumerate(AGREED)]
    return [Audio(np.concatenate([PAD, samples, PAD])) for samples in spoken]


class _Spy:
    """Counts calls to the transcriber's final path (the 30 s window), keeping what each returned."""

    def __init__(self, transcriber: FasterWhisperTranscriber, monkeypatch: pytest.MonkeyPatch) -> None:
        self.returned: list[list[Transcript]] = []
        original = transcriber.transcribe_many

        def transcribe_many(audios: Sequence[Audio], **options: Any) -> list[Transcript]:
            self.returned.append(original(audios, **options))
            return self.returned[-1]

        monkeypatch.setattr(transcriber, "transcribe_many", transcribe_many)


@pytest.mark.real_model
def test_live_final_hears_the_words_of_the_30_s_window(transcriber, questions, monkeypatch) -> None:
    full = [transcriber.transcribe_many([q], language=None, timestamps=False)[0] for q in questions]
    spy = _Spy(transcriber, monkeypatch)
    live = [transcriber.transcribe_live([q], language=None)[0] for q in questions]
    assert spy.returned == [], "every window passed the thresholds: no second, 30 s pass"
    for question, whole, quick in zip(AGREED, full, live, strict=True):
        assert words(quick.text) == words(whole.text) == words(question)
        assert quick.language == "en" and quick.language_probability is not None
        assert len(quick.segments) == 1 and quick.segments[0].temperature == 0.0
    together = transcriber.transcribe_live(questions, language="en")  # a batch shares its longest one's window
    assert [words(t.text) for t in together] == [words(q) for q in AGREED]


@pytest.mark.real_model
def test_a_long_utterance_keeps_the_30_s_window(transcriber, questions, monkeypatch) -> None:
    long = Audio(np.concatenate([questions[0].samples, np.zeros(19 * 16000, np.float32)]))
    assert long.duration_s > faster_whisper.LIVE_MAX_S
    spy = _Spy(transcriber, monkeypatch)
    result = transcriber.transcribe_live([long], language="en")[0]
    assert len(spy.returned) == 1 and result is spy.returned[0][0]
    assert words(result.text) == words(AGREED[0])


@pytest.mark.real_model
def test_a_window_failing_the_thresholds_is_redone_on_the_30_s_window(transcriber, questions, monkeypatch) -> None:
    """No decode has a mean log-probability above 0: the window fails, and the final path (30 s window, then the
    temperature fallback) decides, not sampling on the short window."""
    monkeypatch.setattr(transcriber, "_config", replace(transcriber._config, logprob_threshold=0.0))
    decoded: list[int] = []
    original = transcriber._decode

    def decode(encoded: Any, audios: Sequence[Audio], *args: Any) -> Any:
        decoded.append(int(encoded.shape[-2]))  # encoder positions: 2 per 10 ms mel frame
        return original(encoded, audios, *args)

    monkeypatch.setattr(transcriber, "_decode", decode)
    spy = _Spy(transcriber, monkeypatch)
    result = transcriber.transcribe_live([questions[1]], language="en")[0]
    padded = Edges.around(questions[1]).pad(questions[1])  # the silence every window gets (assistant.asr.edges)
    mel_frames = transcriber._model.feature_extractor(padded.samples)[..., :-1].shape[-1]
    assert decoded[0] == live_frames(mel_frames) // 2  # the short window first
    assert decoded[1:] and all(positions == 1500 for positions in decoded[1:])  # then only 30 s windows
    assert len(spy.returned) == 1 and result is spy.returned[0][0]
