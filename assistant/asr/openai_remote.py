"""Recognition on a remote server's ``/v1/audio/transcriptions`` (``asr.backend: openai``).

vLLM, speaches, OpenAI and another ``assistant serve`` all answer OpenAI's transcription API. Decoding, the VAD and the
placement of results on the file's timeline stay here; each speech window (at most 30 s, what Whisper takes in one
pass) is sent as a 16 kHz PCM16 WAV with ``response_format=verbose_json``, up to ``asr.max_in_flight`` at once so
the server can batch them. Its segments and words come back relative to the window, exactly as a local backend's
do. The official ``openai`` client does the HTTP: it retries 408/429/5xx, timeouts and lost connections with
backoff, honouring ``Retry-After`` (``asr.max_retries``); what is still refused becomes an AsrError carrying the
server's own message.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from assistant.asr.base import for_request
from assistant.asr.language import WHISPER_LANGUAGES, language_code
from assistant.config import AsrConfig, Task
from assistant.errors import AsrError
from assistant.messages import Audio, Segment, Transcript, Word
from assistant.remote import connect


class OpenAITranscriber:
    """A Transcriber whose model runs on an OpenAI-compatible server."""

    def __init__(self, config: AsrConfig) -> None:
        remote = connect("asr", config.base_url, config.api_key, timeout_s=config.timeout_s,
                         max_retries=config.max_retries, example="http://127.0.0.1:8000/v1")  # fmt: skip
        self._openai, self._client, self._base_url = remote.openai, remote.client, remote.base_url
        self._config = config
        self._pool = ThreadPoolExecutor(config.max_in_flight, thread_name_prefix="asr-remote")
        self._plain = False  # the server refused verbose_json (older vLLM): plain json, one segment per window

    @property
    def description(self) -> str:
        return f"openai {self._config.model} at {self._base_url}"

    @property
    def batch_size(self) -> int:
        """Windows handed over per call: all of them go out at once (``asr.batch_size`` when set)."""
        return self._config.batch_size or self._config.max_in_flight

    def supports_language(self, language: str) -> bool:
        return language in WHISPER_LANGUAGES

    def transcribe_many(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        task: Task = "transcribe",
        timestamps: bool = True,
        word_timestamps: bool = False,
        prompt: str | None = None,
        temperatures: tuple[float, ...] | None = None,
    ) -> list[Transcript]:
        """One request per window, ``asr.max_in_flight`` at a time; results in order. AsrError names the server and
        gives its message when a window is refused after the retries. The server runs its own fallback from the
        ladder's first temperature (OpenAI's ``temperature``)."""
        config = for_request(self._config, prompt, temperatures)
        return list(self._pool.map(lambda audio: self._one(audio, language, task, word_timestamps, config), audios))

    def _one(self, audio: Audio, language: str | None, task: Task, word_timestamps: bool,
             config: AsrConfig) -> Transcript:  # fmt: skip
        options: dict[str, Any] = {
            "model": config.model, "file": ("window.wav", _wav(audio), "audio/wav"),
            "response_format": "json" if self._plain else "verbose_json", "temperature": config.temperatures[0],
        }  # fmt: skip
        if config.initial_prompt:
            options["prompt"] = config.initial_prompt
        if task != "translate" and language:
            options["language"] = language
        if task != "translate" and word_timestamps and not self._plain:
            options["timestamp_granularities"] = ["segment", "word"]
        try:
            response = self._request(task, options)
        except self._openai.BadRequestError as exc:
            if self._plain or "verbose_json" not in _message_of(exc):
                raise AsrError(self._refused(exc, audio)) from None
            self._plain = True  # the server knows only json: the window becomes one segment (no word times)
            return self._one(audio, language, task, word_timestamps, config)
        except self._openai.APIStatusError as exc:
            raise AsrError(self._refused(exc, audio)) from None
        except self._openai.APIConnectionError as exc:  # includes timeouts, after the retries
            raise AsrError(f"cannot reach {self._base_url} ({type(exc).__name__}: {exc}); is the server up? "
                           f"(retried {self._config.max_retries} times, asr.max_retries)") from None  # fmt: skip
        return transcript_of(response, audio.duration_s, "en" if task == "translate" else language)

    def _request(self, task: Task, options: dict[str, Any]) -> Any:
        if task == "translate":
            return self._client.audio.translations.create(**options)
        return self._client.audio.transcriptions.create(**options)

    def _refused(self, exc: Any, audio: Audio) -> str:
        return (f"{self._base_url} refused a {audio.duration_s:.1f} s window with HTTP {exc.status_code}: "
                f"{_message_of(exc)}{_hint(exc.status_code)}")  # fmt: skip


def transcript_of(response: Any, duration_s: float, language: str | None) -> Transcript:
    """OpenAI's verbose_json (as the SDK returns it, or a plain dict) as a Transcript of one window, in ``language``
    when it was given (else the one the server detected, as a code). Words are taken from each segment when the
    server nests them there (speaches), else from the top-level list (OpenAI, vLLM, assistant serve), each given
    to the segment it falls in. The decoding values of OpenAI's segments (``seek``, ``tokens``, ``temperature``,
    ``avg_logprob``, ``compression_ratio``, ``no_speech_prob``) are kept where the server gives them."""
    data = response.model_dump() if hasattr(response, "model_dump") else dict(response)
    code = language or language_code(data.get("language"))
    loose = [_word(w) for w in data.get("words") or []]
    segments = []
    for item in data.get("segments") or []:
        start, end = float(item["start"]), float(item["end"])
        nested = item.get("words")
        words = [_word(w) for w in nested] if nested else [w for w in loose if start <= (w.start_s + w.end_s) / 2 < end]
        segments.append(Segment(start, min(end, duration_s), str(item.get("text", "")), tuple(words), code,
                                **_decoding(item)))  # fmt: skip
    text = str(data.get("text") or "").strip()
    if not segments and text:  # a server that returns text only: one segment over the window
        segments.append(Segment(0.0, duration_s, " " + text, tuple(loose), code))
    return Transcript(text, code, tuple(segments), duration_s)


def _decoding(item: dict[str, Any]) -> dict[str, Any]:
    """A verbose_json segment's decoding values as Segment's fields; a value the server left out or sent as
    something else stays None."""

    def number(key: str) -> float | None:
        value = item.get(key)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    seek, tokens = number("seek"), item.get("tokens")
    whole = isinstance(tokens, list) and all(isinstance(t, int) for t in tokens)
    kept = tuple(tokens) if whole else None
    return {"seek": None if seek is None else round(seek), "tokens": kept, "temperature": number("temperature"),
            "avg_logprob": number("avg_logprob"), "compression_ratio": number("compression_ratio"),
            "no_speech_prob": number("no_speech_prob")}  # fmt: skip


def _word(item: dict[str, Any]) -> Word:
    probability = item.get("probability")
    return Word(str(item.get("word", "")), float(item["start"]), float(item["end"]),
                None if probability is None else float(probability))  # fmt: skip


def _wav(audio: Audio) -> bytes:
    import soundfile

    buffer = io.BytesIO()
    soundfile.write(buffer, audio.samples, audio.sample_rate, subtype="PCM_16", format="WAV")
    return buffer.getvalue()


def _message_of(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        return str(body.get("message") or body)
    return str(body or exc.message)


def _hint(status: int) -> str:
    return {
        401: " (check asr.api_key)",
        404: " (check asr.base_url and asr.model; --task translate needs the server's /v1/audio/translations)",
        413: " (the server's upload limit is below one window; raise it there or lower asr.chunk_s)",
        429: " (the server's rate limit; raise asr.max_retries to wait out its Retry-After)",
    }.get(status, "")
