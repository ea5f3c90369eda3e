"""Voice activity detection with Silero VAD: which stretches of a block hold speech."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from assistant.config import VadConfig
from assistant.errors import VadError
from assistant.messages import Audio, Span


class SileroVad:
    """Silero VAD (the JIT model bundled in the ``silero-vad`` package; no download)."""

    def __init__(self, config: VadConfig) -> None:
        try:
            from silero_vad import load_silero_vad
        except ImportError as exc:
            raise VadError(f"silero-vad is not installed ({exc}); install it with 'pip install silero-vad'") from None
        self._config = config
        self._model = load_silero_vad(onnx=False)

    def speech_spans(self, audio: Audio) -> list[Span]:
        """Speech in ``audio``, in seconds from the start of ``audio``'s source."""
        import torch
        from silero_vad import get_speech_timestamps

        if audio.sample_rate not in (8000, 16000):
            raise VadError(f"silero VAD needs 8 or 16 kHz audio, got {audio.sample_rate} Hz")
        with torch.inference_mode():
            stamps = get_speech_timestamps(
                torch.from_numpy(audio.samples),
                self._model,
                threshold=self._config.threshold,
                sampling_rate=audio.sample_rate,
                min_speech_duration_ms=self._config.min_speech_ms,
                min_silence_duration_ms=self._config.min_silence_ms,
                speech_pad_ms=self._config.speech_pad_ms,
            )
        self._model.reset_states()
        rate = audio.sample_rate
        return [Span(audio.start_s + s["start"] / rate, audio.start_s + s["end"] / rate) for s in stamps]

    def frame_probability(self) -> Callable[[np.ndarray], float]:
        """A streaming scorer for 512-sample frames at 16 kHz, with its own state (one per live stream)."""
        import torch
        from silero_vad import load_silero_vad

        model = load_silero_vad(onnx=False)  # the JIT model keeps recurrent state: one instance per stream

        def probability(frame: np.ndarray) -> float:
            with torch.inference_mode():
                return float(model(torch.from_numpy(frame), 16000))

        return probability
