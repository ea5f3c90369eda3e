"""Speech from a remote server's ``/v1/audio/speech`` (``tts.backend: openai``): Kokoro-FastAPI, speaches, OpenAI,
another ``assistant serve``. The voice name goes to the server as it is; audio comes back as WAV (PCM16 at the
server's rate). The official ``openai`` client does the HTTP and its retries (429 after Retry-After, 5xx, lost
connections); a refusal becomes an OutputError (ConfigError for an unknown voice) with the server's message."""

from __future__ import annotations

import io
import wave
from typing import TYPE_CHECKING

import numpy as np

from assistant.errors import ConfigError, OutputError
from assistant.messages import Audio
from assistant.remote import connect

if TYPE_CHECKING:
    from assistant.config import TtsConfig

OPENAI_RATE = 24_000  # Hz: what OpenAI's speech API returns; the real rate is read from each WAV header


class OpenAISynthesizer:
    """One voice of a remote speech server."""

    def __init__(self, voice: str, config: TtsConfig) -> None:
        remote = connect("tts", config.base_url, config.api_key, timeout_s=config.timeout_s, max_retries=2,
                         example="http://127.0.0.1:8880/v1 (Kokoro-FastAPI)")  # fmt: skip
        self._openai, self._client, self._base_url = remote.openai, remote.client, remote.base_url
        self._model = config.model
        base_url = remote.base_url
        self.voice = voice
        self.sample_rate = OPENAI_RATE
        self.description = f"openai {config.model} voice {voice} at {base_url}"

    def synthesize(self, text: str, *, speed: float = 1.0) -> Audio:
        try:
            response = self._client.audio.speech.create(model=self._model, voice=self.voice, input=text, speed=speed,
                                                        response_format="wav")  # fmt: skip
        except self._openai.APIStatusError as exc:
            body = exc.body if isinstance(exc.body, dict) else {}
            message = str(body.get("message") or exc.message)
            error = ConfigError if exc.status_code == 400 and "voice" in message.lower() else OutputError
            raise error(f"{self._base_url} refused speech with HTTP {exc.status_code}: {message}") from None
        except self._openai.APIConnectionError as exc:
            raise OutputError(
                f"cannot reach {self._base_url} ({type(exc).__name__}); is the speech server up?"
            ) from None
        audio = read_wav(response.read(), self._base_url)
        self.sample_rate = audio.sample_rate
        return audio


def read_wav(data: bytes, source: str) -> Audio:
    """PCM16 WAV bytes as mono float32. Streamed WAVs (OpenAI's) carry 0xFFFFFFFF as their length: the frames are
    read to the end of the data, whatever the header says."""
    try:
        with wave.open(io.BytesIO(data)) as wav:
            rate, channels, width = wav.getframerate(), wav.getnchannels(), wav.getsampwidth()
            frames = wav.readframes(wav.getnframes())
    except (wave.Error, EOFError) as exc:
        raise OutputError(f"{source} sent audio that is not a PCM WAV ({exc})") from None
    if width != 2:
        raise OutputError(f"{source} sent {8 * width}-bit WAV; expected 16-bit PCM")
    samples = np.frombuffer(frames[: len(frames) // (2 * channels) * 2 * channels], dtype="<i2")
    mono = samples.reshape(-1, channels).mean(axis=1) / 32768.0
    return Audio(mono.astype(np.float32), rate)
