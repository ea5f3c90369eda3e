"""ASR backend on faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from assistant.asr.base import language_error
from assistant.config import AsrConfig, Task
from assistant.errors import AsrError, ConfigError, ModelLoadError
from assistant.messages import Audio, Segment, Transcript
from assistant.models import hub_unreachable, resolve_model

# live partials (transcribe_partial): the encoder sees the audio's own length, not Whisper's 30 s window
FULL_WINDOW_FRAMES = 3000  # 30 s of 10 ms mel frames: Whisper's window
PARTIAL_STEP_FRAMES = 200  # the window grows in 2 s steps
PARTIAL_MARGIN_FRAMES = 200  # and keeps 2 s of silence after the speech
PARTIAL_MIN_TOKENS, PARTIAL_TOKENS_PER_S, PARTIAL_MAX_TOKENS = 16, 8, 448  # decode length: speech is ~3 tokens/s


class FasterWhisperTranscriber:
    def __init__(self, config: AsrConfig) -> None:
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise ModelLoadError(
                f"the faster-whisper backend is not installed ({exc}); install it with 'pip install faster-whisper'"
            ) from None
        location = resolve_model(config.model, sha256=config.sha256)
        if location.format == "hf":
            raise ConfigError(
                f"asr.model '{config.model}' is a transformers model; faster-whisper needs a CTranslate2 one: use "
                "asr.backend=whisper-hf, or convert it with 'ct2-transformers-converter'"
            )
        device, index = _device(config.device, ctranslate2.get_cuda_device_count())
        compute_type = _compute_type(config.dtype, device)
        self._config = config
        where = config.device if device == "cuda" else "cpu"
        self._description = f"faster-whisper {config.model} {compute_type} {where}"
        try:
            self._model = WhisperModel(
                str(location.path) if location.path else config.model,
                device=device,
                device_index=index,
                compute_type=compute_type,
                cpu_threads=config.threads or (os.cpu_count() or 1),
            )
        except Exception as exc:  # the hub client raises many types; all mean "could not get the model"
            if location.path is None:
                raise hub_unreachable(config.model, exc) from None
            raise ModelLoadError(f"cannot load '{config.model}' with faster-whisper: {exc}") from None

    @property
    def description(self) -> str:
        return self._description

    @property
    def batch_size(self) -> int:
        return 1  # windows are decoded one after another; CTranslate2 uses every core on each

    def supports_language(self, language: str) -> bool:
        return language in self._model.supported_languages

    def detect_language(self, audio: Audio) -> str:
        language, _probability, _all = self._model.detect_language(audio.samples)
        return language

    def transcribe_many(
        self, audios: Sequence[Audio], *, language: str | None, task: Task = "transcribe", timestamps: bool = True
    ) -> list[Transcript]:
        return [self._transcribe(audio, language, task, timestamps) for audio in audios]

    def transcribe_partial(self, audio: Audio, *, language: str | None) -> Transcript:
        """A quick transcript of a short utterance in progress, for live partials: the encoder runs on the audio's
        own length (rounded up, plus 2 s) instead of Whisper's 30 s window, one greedy pass, no timestamps, no
        fallback. About 5x cheaper than ``transcribe_many`` for a few seconds of speech on a CPU; slightly rougher
        (the model was trained on 30 s windows), so never used for a final transcript. The idea is whisper.cpp's
        ``audio_ctx`` (a shortened encoder context for real-time use)."""
        from faster_whisper.tokenizer import Tokenizer

        model = self._model
        features = model.feature_extractor(audio.samples)  # (mel bins, 10 ms frames)
        frames = min(FULL_WINDOW_FRAMES, -(-features.shape[-1] // PARTIAL_STEP_FRAMES) * PARTIAL_STEP_FRAMES
                     + PARTIAL_MARGIN_FRAMES)  # fmt: skip
        window = np.zeros((features.shape[0], frames), dtype=np.float32)
        window[:, : min(frames, features.shape[-1])] = features[:, :frames]
        encoded = model.encode(window)
        if language is None:
            language = model.model.detect_language(encoded)[0][0][0][2:-2]  # "<|en|>" -> "en"
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language)
        prompt = [*tokenizer.sot_sequence, tokenizer.no_timestamps]
        max_tokens = min(PARTIAL_MAX_TOKENS, PARTIAL_MIN_TOKENS + int(audio.duration_s * PARTIAL_TOKENS_PER_S))
        result = model.model.generate(encoded, [prompt], beam_size=1, max_length=max_tokens, suppress_blank=True,
                                      suppress_tokens=[-1])  # fmt: skip
        text = tokenizer.decode(result[0].sequences_ids[0]).strip()
        return Transcript(text, language, (), audio.duration_s)

    def _transcribe(self, audio: Audio, language: str | None, task: Task, timestamps: bool) -> Transcript:
        config = self._config
        if language and not self.supports_language(language):
            raise AsrError(language_error(language, config.model))
        segments, info = self._model.transcribe(
            audio.samples,
            language=language,
            task=task,
            beam_size=config.beam_size,
            temperature=list(config.temperatures),
            compression_ratio_threshold=config.compression_ratio_threshold,
            log_prob_threshold=config.logprob_threshold,
            no_speech_threshold=config.no_speech_threshold,
            condition_on_previous_text=config.condition_on_previous_text,
            initial_prompt=config.initial_prompt,
            without_timestamps=not timestamps,
            vad_filter=False,  # the pipeline's own VAD stage has already cut the audio
        )
        found = tuple(Segment(s.start, s.end, s.text.strip()) for s in segments if s.text.strip())
        return Transcript(
            text=" ".join(s.text for s in found), language=info.language, segments=found, audio_s=audio.duration_s
        )


def _device(device: str, cuda_count: int) -> tuple[str, int]:
    if device == "auto":
        return ("cuda", 0) if cuda_count > 0 else ("cpu", 0)
    if device == "cpu":
        return "cpu", 0
    index = int(device.partition(":")[2] or 0)
    if index >= cuda_count:
        raise ConfigError(f"asr.device {device!r}: no such CUDA device ({cuda_count} found); use 'auto' or 'cpu'")
    return "cuda", index


def _compute_type(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if device == "cuda" else "int8"
    return dtype
