"""Level normalisation: quiet speech is brought up, noise and loud audio are left alone."""

import numpy as np
import pytest

from assistant.audio.level import MAX_GAIN_DB, StreamLevel, frame_levels, gain_db, normalize
from assistant.messages import Audio
from tests.conftest import silence, tone

RNG = np.random.default_rng(0)


def _speechlike(seconds: float, amplitude: float) -> np.ndarray:
    """Bursts of tone with gaps of near silence (a noise floor 60 dB below the bursts)."""
    pieces = []
    for _ in range(int(seconds / 0.5)):
        pieces += [tone(0.3, amplitude=amplitude), 1e-3 * amplitude * RNG.standard_normal(3200).astype(np.float32)]
    return np.concatenate(pieces)


@pytest.mark.parametrize("db", [40, 50])
def test_quiet_speech_is_raised_towards_the_target(db):
    quiet = _speechlike(5, 0.3 * 10 ** (-db / 20))
    louder, gain = normalize(Audio(quiet))
    assert gain >= db - 15
    assert np.percentile(frame_levels(louder.samples), 95) > -35


def test_loud_audio_and_digital_silence_are_untouched():
    loud = Audio(_speechlike(5, 0.3))
    assert normalize(loud)[0] is loud
    assert normalize(Audio(silence(3)))[1] == 0.0


@pytest.mark.parametrize("level", [1e-4, 1e-3, 1e-2])
def test_stationary_noise_is_not_amplified_into_something_loud(level):
    noise = (level * RNG.standard_normal(16000 * 5)).astype(np.float32)
    before = np.percentile(frame_levels(noise), 95)
    louder, gain = normalize(Audio(noise))
    assert np.percentile(frame_levels(louder.samples), 95) <= max(before, -50.0), "noise stays quiet"
    assert gain <= MAX_GAIN_DB


def test_gain_is_never_negative():
    assert gain_db(np.array([-3.0, -1.0], np.float32)) == 0.0


def test_a_live_stream_follows_the_level_smoothly():
    level = StreamLevel()
    quiet = _speechlike(6, 0.3 * 10 ** (-45 / 20))
    gains = []
    for start in range(0, len(quiet), 1600):  # 100 ms pieces, as a microphone delivers them
        level.apply(quiet[start : start + 1600])
        gains.append(level.gain_db)
    assert gains[-1] > 25, "raised within seconds"
    steps = np.diff(gains)
    assert np.all(np.abs(steps) <= 2.0 + 1e-6), "at most 20 dB/s: no pumping within a word"
