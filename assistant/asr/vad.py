"""Voice activity detection with Silero VAD: which stretches of a block hold speech, and a speech probability per
frame of a live stream.

The model is Silero VAD v6 as an ONNX file, run by onnxruntime: the copy faster-whisper ships
(``faster_whisper/assets/silero_vad_v6.onnx``) through its VAD code (``faster_whisper.vad``, adapted there from
snakers4/silero-vad). Nothing here imports torch, so the default CPU path (faster-whisper + this VAD) never loads it.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from assistant.config import VadConfig
from assistant.endpointing import FRAME_SAMPLES  # 32 ms at 16 kHz: one probability per frame
from assistant.errors import VadError
from assistant.messages import SAMPLE_RATE, Audio, Span  # 16 kHz: the only rate the v6 ONNX model takes

CONTEXT_SAMPLES = 64  # the v6 model sees the previous frame's last 64 samples before each frame
STATE_SHAPE = (1, 1, 128)  # LSTM h and c, float32
INSTALL_HINT = "install them with 'pip install faster-whisper onnxruntime' (or pip install -e '.[asr]')"


def _load_session() -> Any:
    """The shared ``onnxruntime.InferenceSession`` of Silero VAD v6 (faster-whisper caches it: one per process).

    Raises VadError when faster-whisper or onnxruntime is missing or the model file cannot be loaded.
    """
    try:
        from faster_whisper.vad import get_vad_model
    except ImportError as exc:
        raise VadError(f"silero VAD needs faster-whisper and onnxruntime ({exc}); {INSTALL_HINT}") from None
    try:
        return get_vad_model().session
    except Exception as exc:  # RuntimeError without onnxruntime; onnxruntime's own types for a bad/missing file
        raise VadError(f"cannot load silero VAD from faster-whisper's assets ({exc}); {INSTALL_HINT}") from None


def _check_rate(sample_rate: int) -> None:
    if sample_rate != SAMPLE_RATE:
        raise VadError(
            f"silero VAD (the v6 ONNX model) needs 16 kHz audio, got {sample_rate} Hz; 8 kHz is not supported: "
            "resample to 16 kHz first (files and microphones are resampled by the decoder)"
        )


class SileroStream:
    """Speech probability of consecutive 512-sample frames of one 16 kHz stream.

    Holds the stream's own state (LSTM h and c, the last 64 samples) over a session shared by every stream; the
    same state ``faster_whisper.vad.SileroVADModel.__call__`` carries from frame to frame in one batch, so frame i
    scores as it does in ``speech_spans`` over the same audio. onnxruntime's ``InferenceSession.run`` is thread-safe,
    so streams may run in different threads; one stream must be fed from one thread at a time.
    """

    def __init__(self, session: Any) -> None:
        self._session = session
        self.reset()

    def reset(self) -> None:
        """Forget the stream so far: the next frame scores as the first of a new stream."""
        self._h = np.zeros(STATE_SHAPE, np.float32)
        self._c = np.zeros(STATE_SHAPE, np.float32)
        self._context = np.zeros(CONTEXT_SAMPLES, np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        """Probability in [0, 1] that ``frame`` (512 float32 samples at 16 kHz, 32 ms) holds speech.

        Raises VadError for a frame of another length.
        """
        if frame.shape != (FRAME_SAMPLES,):
            raise VadError(f"silero VAD scores frames of {FRAME_SAMPLES} samples (32 ms at 16 kHz), got {frame.shape}")
        window = np.concatenate([self._context, frame.astype(np.float32, copy=False)])[np.newaxis, :]
        probs, self._h, self._c = self._session.run(None, {"input": window, "h": self._h, "c": self._c})
        self._context = window[0, -CONTEXT_SAMPLES:]
        return float(probs[0])


class SileroVad:
    """Silero VAD v6 through onnxruntime (the model file ships with faster-whisper; no download, no torch)."""

    def __init__(self, config: VadConfig) -> None:
        self._config = config
        self._session = _load_session()

    def speech_spans(self, audio: Audio) -> list[Span]:
        """Speech in ``audio``, in seconds from the start of ``audio``'s source. Raises VadError unless 16 kHz."""
        from faster_whisper.vad import VadOptions, get_speech_timestamps

        _check_rate(audio.sample_rate)
        options = VadOptions(
            threshold=self._config.threshold,  # neg_threshold: threshold - 0.15, as the endpointer's hysteresis
            min_speech_duration_ms=self._config.min_speech_ms,
            min_silence_duration_ms=self._config.min_silence_ms,
            speech_pad_ms=self._config.speech_pad_ms,
            max_speech_duration_s=self._config.max_speech_s,  # cut at the last pause over 98 ms before it
        )
        samples = np.asarray(audio.samples, dtype=np.float32)
        stamps = get_speech_timestamps(samples, options, sampling_rate=SAMPLE_RATE)
        return [Span(audio.start_s + s["start"] / SAMPLE_RATE, audio.start_s + s["end"] / SAMPLE_RATE) for s in stamps]

    def frame_probability(self) -> SileroStream:
        """A streaming scorer for 512-sample frames at 16 kHz with its own state (one per live stream); every
        scorer shares this process's one onnxruntime session."""
        return SileroStream(self._session)
