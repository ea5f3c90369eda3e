"""ASR backend on faster-whisper (CTranslate2): int8 on CPU, float16 on CUDA."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from assistant.asr.base import for_request, language_error
from assistant.asr.edges import silent_edges_many, silent_edges_one
from assistant.asr.quality import Verdict, compression_ratio, verdict
from assistant.config import AsrConfig, Task
from assistant.errors import AsrError, ConfigError, ModelLoadError
from assistant.messages import Audio, Segment, Transcript, Word
from assistant.models import hub_unreachable, resolve_model

# live partials (transcribe_partial): the encoder sees the audio's own length, not Whisper's 30 s window
FULL_WINDOW_FRAMES = 3000  # 30 s of 10 ms mel frames: Whisper's window
PARTIAL_STEP_FRAMES = 200  # the window grows in 2 s steps
PARTIAL_MARGIN_FRAMES = 200  # and keeps 2 s of silence after the speech
# live finals (transcribe_live): the same idea with the final path's decoding; the window is the audio rounded up to
# 1 s plus 3 s after it (with no margin Whisper base repeats itself and fails the thresholds; benchmarks/live_asr.py)
LIVE_STEP_FRAMES = 100
LIVE_MARGIN_FRAMES = 300
LIVE_MAX_S = 20.0  # longer utterances keep the 30 s window (measured up to 17 s: same words, 2.3x cheaper there)
# asr.batch_size 0: windows per batch. On a CPU each extra window costs ~120 MB (the encoder's 1500x1500 attention
# per head) for a few per cent of speed (benchmarks/asr.py): one at a time keeps memory under the plain script's.
AUTO_BATCH_CPU, AUTO_BATCH_CUDA = 1, 16
WINDOW_S = 30.0  # windows up to this long are decoded in batches
MIN_REST_S = 0.5  # a window's undecoded rest shorter than this is not decoded again
# faster-whisper's defaults for attaching punctuation to the neighbouring word
PREPEND_PUNCTUATIONS = "\"'“¿([{-"
APPEND_PUNCTUATIONS = "\"'.。,，!！?？:：”)]}、"
PARTIAL_MIN_TOKENS, PARTIAL_TOKENS_PER_S, PARTIAL_MAX_TOKENS = 16, 8, 448  # decode length: speech is ~3 tokens/s
BEST_OF = 5  # samples drawn per window at a temperature above 0 (faster-whisper's and openai/whisper's best_of)


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
        self._on_cuda = device == "cuda"
        if config.seed is not None:  # before the model's threads first sample: each seeds its generator then
            ctranslate2.set_random_seed(config.seed)
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
        return self._config.batch_size or (AUTO_BATCH_CUDA if self._on_cuda else AUTO_BATCH_CPU)

    def supports_language(self, language: str) -> bool:
        return language in self._model.supported_languages

    @silent_edges_many
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
        """Windows of at most 30 s are decoded together in one batch (see ``_batched``); longer ones, and windows whose
        batched result fails Whisper's quality checks, go through faster-whisper's sequential decoding with its
        temperature fallback. With ``language=None`` each window detects its own language. Segments carry the
        decode's own ``seek``, ``tokens``, ``temperature``, ``avg_logprob``, ``compression_ratio`` and
        ``no_speech_prob`` (faster-whisper's, or, from a batch, the values of CTranslate2's result that was kept)."""
        if language and not self.supports_language(language):
            raise AsrError(language_error(language, self._config.model))
        config = for_request(self._config, prompt, temperatures)
        results: list[Transcript | None] = [None] * len(audios)
        short = [i for i, audio in enumerate(audios) if audio.duration_s <= WINDOW_S]
        for first in range(0, len(short), self.batch_size):
            indexes = short[first : first + self.batch_size]
            batch = [audios[i] for i in indexes]
            batched = self._batched(batch, language, task, timestamps, word_timestamps, config)
            for index, transcript in zip(indexes, batched, strict=True):
                results[index] = transcript
        for index, result in enumerate(results):
            if result is None:
                results[index] = self._transcribe(audios[index], language, task, timestamps, word_timestamps, config)
        return [result for result in results if result is not None]

    def _batched(
        self, audios: Sequence[Audio], language: str | None, task: Task, timestamps: bool, words: bool,
        config: AsrConfig,
    ) -> list[Transcript]:  # fmt: skip
        """One encoder pass for the whole batch, the language of each window read from that same pass (no second
        encode, unlike ``WhisperModel.transcribe``), one batched greedy/beam decode per language. This is
        faster-whisper's ``BatchedInferencePipeline`` idea; unlike it, a window that fails the compression-ratio or
        log-probability check is redone sequentially with the temperature fallback (openai/whisper's rule)."""
        from faster_whisper.audio import pad_or_trim

        model = self._model
        features = np.stack([pad_or_trim(model.feature_extractor(a.samples)[..., :-1]) for a in audios])
        encoded = model.encode(features)
        guesses = self._languages(encoded, len(audios), language)
        groups: dict[str, list[int]] = {}
        for index, (code, _probability) in enumerate(guesses):
            groups.setdefault(code, []).append(index)
        results: list[Transcript] = [Transcript("", None)] * len(audios)
        for code, indexes in groups.items():
            group_encoded = encoded if len(groups) == 1 else model.encode(features[indexes])
            decoded = self._decode(group_encoded, [audios[i] for i in indexes], code, task, timestamps, words, config)
            rests: dict[int, float] = {}
            for index, outcome in zip(indexes, decoded, strict=True):
                if outcome is None:  # failed the quality checks: sequential decoding with fallback
                    transcript = self._transcribe(audios[index], code, task, timestamps, words, config)
                else:
                    transcript, rest = outcome
                    if rest is not None:
                        rests[index] = rest
                probability = guesses[index][1] if language is None else None
                results[index] = replace(transcript, language=code, language_probability=probability)
            for index, transcript in self._rests(audios, rests, code, task, timestamps, words, config).items():
                results[index] = _joined(results[index], transcript, rests[index])
        return results

    def _rests(
        self,
        audios: Sequence[Audio],
        rests: dict[int, float],
        language: str,
        task: Task,
        timestamps: bool,
        words: bool,
        config: AsrConfig,
    ) -> dict[int, Transcript]:
        """Decode what one pass left: Whisper ended a window's decode early (its last timestamp short of the end),
        where sequential Whisper would seek to that timestamp and go on."""
        if not rests:
            return {}
        indexes = list(rests)
        cut = [Audio(audios[i].samples[int(rests[i] * audios[i].sample_rate) :], audios[i].sample_rate)
               for i in indexes]  # fmt: skip
        again = self.transcribe_many(cut, language=language, task=task, timestamps=timestamps, word_timestamps=words,
                                     prompt=config.initial_prompt, temperatures=config.temperatures)  # fmt: skip
        return dict(zip(indexes, again, strict=True))

    def _languages(self, encoded: object, count: int, language: str | None) -> list[tuple[str, float]]:
        if language is not None:
            return [(language, 1.0)] * count
        if not self._model.model.is_multilingual:
            return [("en", 1.0)] * count
        return [(ranked[0][0][2:-2], float(ranked[0][1])) for ranked in self._model.model.detect_language(encoded)]

    def _decode(
        self, encoded: object, audios: Sequence[Audio], language: str, task: Task, timestamps: bool, words: bool,
        config: AsrConfig,
    ) -> list[tuple[Transcript, float | None] | None]:  # fmt: skip
        """Decode a batch in one language at the ladder's first temperature: each window's transcript, and where its
        undecoded rest starts (seconds; None when the whole window was decoded); None for a window whose result
        needs the temperature fallback."""
        from faster_whisper.tokenizer import Tokenizer
        from faster_whisper.transcribe import get_suppressed_tokens

        model = self._model
        tokenizer = Tokenizer(model.hf_tokenizer, model.model.is_multilingual, task=task, language=language)
        previous = tokenizer.encode(" " + config.initial_prompt.strip()) if config.initial_prompt else []
        prompt = model.get_prompt(tokenizer, previous, without_timestamps=not timestamps)
        temperature = config.temperatures[0]
        results = model.model.generate(
            encoded, [list(prompt) for _ in audios], max_length=model.max_length, suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]), return_scores=True, return_no_speech_prob=True,
            **_sampling(temperature, config.beam_size),
        )  # fmt: skip
        pieces: list[list[dict[str, Any]]] = []
        decodes: list[_Decode] = []
        rests: list[float | None] = []
        for audio, result in zip(audios, results, strict=True):
            tokens = result.sequences_ids[0]
            text = tokenizer.decode([t for t in tokens if t < tokenizer.eot])
            avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)  # faster-whisper's, length_penalty 1
            decodes.append(_Decode(temperature, avg_logprob, compression_ratio(text), result.no_speech_prob))
            ok = decodes[-1].verdict(config) == "ok"
            frames = min(FULL_WINDOW_FRAMES, int(np.ceil(audio.duration_s)) * model.frames_per_second)
            split, seek, _single = model._split_segments_by_timestamps(
                tokenizer=tokenizer, tokens=tokens, time_offset=0.0, segment_size=frames,
                segment_duration=audio.duration_s, seek=0,
            )  # fmt: skip
            pieces.append(split if ok else [])
            seek_s = seek / model.frames_per_second
            rests.append(seek_s if ok and 0 < seek_s < audio.duration_s - MIN_REST_S else None)
        if words:
            self._align(pieces, tokenizer, encoded, audios)
        return [
            None if decode.verdict(config) == "fallback" else (_transcript(tokenizer, split, audio, language, decode),
                                                                 rest)
            for audio, split, decode, rest in zip(audios, pieces, decodes, rests, strict=True)
        ]  # fmt: skip

    def _align(self, pieces: list[list[dict[str, Any]]], tokenizer: Any, encoded: object,
               audios: Sequence[Audio]) -> None:  # fmt: skip
        """Word times from the cross-attention alignment heads (faster-whisper's ``add_word_timestamps``)."""
        frames = [min(FULL_WINDOW_FRAMES, round(a.duration_s * self._model.frames_per_second)) for a in audios]
        padded = [split or [{"seek": 0, "start": 0.0, "end": 0.0, "tokens": []}] for split in pieces]
        self._model.add_word_timestamps(padded, tokenizer, encoded, frames, PREPEND_PUNCTUATIONS,
                                        APPEND_PUNCTUATIONS, 0.0)  # fmt: skip

    @silent_edges_one
    def transcribe_partial(self, audio: Audio, *, language: str | None) -> Transcript:
        """A quick transcript of a short utterance in progress, for live partials: the encoder runs on the audio's
        own length (rounded up, plus 2 s) instead of Whisper's 30 s window, one greedy pass, no timestamps, no
        fallback. About 5x cheaper than ``transcribe_many`` for a few seconds of speech on a CPU; slightly rougher
        (the model was trained on 30 s windows), so never used for a final transcript. The idea is whisper.cpp's
        ``audio_ctx`` (a shortened encoder context for real-time use)."""
        from faster_whisper.tokenizer import Tokenizer

        model = self._model
        features = model.feature_extractor(audio.samples)  # (mel bins, 10 ms frames)
        frames = live_frames(features.shape[-1], PARTIAL_STEP_FRAMES, PARTIAL_MARGIN_FRAMES)
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

    def transcribe_live(self, audios: Sequence[Audio], *, language: str | None) -> list[Transcript]:
        """A live turn's final transcript at the cost of the utterance: ``transcribe_many(audios, language=language,
        timestamps=False)`` with the encoder run on a window cut to the utterance (its length rounded up to 1 s, plus
        3 s of silence: ``live_frames``) instead of Whisper's 30 s, then the final path's own decoding (beam size,
        first temperature, compression-ratio, log-probability and no-speech checks). A window that fails the checks,
        an utterance over ``LIVE_MAX_S`` and ``asr.live_window: full`` go through ``transcribe_many`` (the 30 s window
        and its temperature fallback), never through sampling on the short window. A batch shares the window of its
        longest utterance. On this 2-core CPU a 3 s question costs about 5x less (0.19x), at the same WER on the
        voice benchmark's questions (benchmarks/live_asr.py). The idea is whisper.cpp's ``audio_ctx``; unlike
        ``transcribe_partial`` its result is a final."""
        if language and not self.supports_language(language):
            raise AsrError(language_error(language, self._config.model))
        results: list[Transcript | None] = [None] * len(audios)
        if self._config.live_window == "auto":
            short = [i for i, audio in enumerate(audios) if audio.duration_s <= LIVE_MAX_S]
            for first in range(0, len(short), self.batch_size):
                indexes = short[first : first + self.batch_size]
                windowed = self._windowed([audios[i] for i in indexes], language)
                for index, transcript in zip(indexes, windowed, strict=True):
                    results[index] = transcript
        full = [i for i, result in enumerate(results) if result is None]
        if full:
            again = self.transcribe_many([audios[i] for i in full], language=language, timestamps=False)
            for index, transcript in zip(full, again, strict=True):
                results[index] = transcript
        return [result for result in results if result is not None]

    @silent_edges_many  # transcribe_live's own decode; its 30 s fallback is transcribe_many, padded there
    def _windowed(self, audios: Sequence[Audio], language: str | None) -> list[Transcript | None]:
        """``_batched`` on a shortened window, without timestamps: each utterance's transcript, or None where the
        decode failed the quality checks (or left a rest undecoded) and the 30 s window must redo it."""
        model = self._model
        mels = [model.feature_extractor(a.samples)[..., :-1] for a in audios]  # (mel bins, 10 ms frames) each
        frames = max(live_frames(mel.shape[-1]) for mel in mels)
        features = np.zeros((len(mels), mels[0].shape[0], frames), dtype=np.float32)  # zeros: as pad_or_trim pads
        for index, mel in enumerate(mels):
            features[index, :, : min(frames, mel.shape[-1])] = mel[:, :frames]
        encoded = model.encode(features)
        guesses = self._languages(encoded, len(audios), language)
        groups: dict[str, list[int]] = {}
        for index, (code, _probability) in enumerate(guesses):
            groups.setdefault(code, []).append(index)
        results: list[Transcript | None] = [None] * len(audios)
        for code, indexes in groups.items():
            group_encoded = encoded if len(groups) == 1 else model.encode(features[indexes])
            decoded = self._decode(group_encoded, [audios[i] for i in indexes], code, "transcribe", False, False,
                                   self._config)  # fmt: skip
            for index, outcome in zip(indexes, decoded, strict=True):
                if outcome is not None and outcome[1] is None:
                    probability = guesses[index][1] if language is None else None
                    results[index] = replace(outcome[0], language=code, language_probability=probability)
        return results

    def _transcribe(
        self, audio: Audio, language: str | None, task: Task, timestamps: bool, words: bool, config: AsrConfig
    ) -> Transcript:
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
            word_timestamps=words,
            vad_filter=False,  # the pipeline's own VAD stage has already cut the audio
        )
        found = tuple(_segment(s, info.language) for s in segments if s.text.strip())
        probability = info.language_probability if language is None else None
        return Transcript(" ".join(s.text for s in found), info.language, found, audio.duration_s, probability)


@dataclass(frozen=True)
class _Decode:
    """What one batched decode of a window gave, besides its tokens: its segments carry these values."""

    temperature: float
    avg_logprob: float
    compression_ratio: float
    no_speech_prob: float

    def verdict(self, config: AsrConfig) -> Verdict:
        return verdict(config, self.compression_ratio, self.avg_logprob, self.no_speech_prob)


def _sampling(temperature: float, beam_size: int) -> dict[str, Any]:
    """CTranslate2's options for one temperature, as faster-whisper's ``generate_with_fallback`` sets them: beam
    search (or greedy) at 0, else sampling from the whole distribution, the best of ``BEST_OF`` samples."""
    if temperature > 0:
        return {"beam_size": 1, "num_hypotheses": BEST_OF, "sampling_topk": 0, "sampling_temperature": temperature}
    return {"beam_size": beam_size}


def _segment(segment: Any, language: str) -> Segment:
    """A faster-whisper segment (sequential decoding) as ours, with its own decoding values."""
    return Segment(segment.start, segment.end, segment.text.strip(), _words(segment.words or ()), language,
                   seek=segment.seek, tokens=tuple(segment.tokens), temperature=segment.temperature,
                   avg_logprob=segment.avg_logprob, compression_ratio=segment.compression_ratio,
                   no_speech_prob=segment.no_speech_prob)  # fmt: skip


def _transcript(tokenizer: Any, pieces: Sequence[dict[str, Any]], audio: Audio, language: str,
                decode: _Decode) -> Transcript:  # fmt: skip
    found = []
    for piece in pieces:
        text = tokenizer.decode([t for t in piece["tokens"] if t < tokenizer.eot]).strip()
        if text:
            words = tuple(
                Word(w["word"], float(w["start"]), float(w["end"]), float(w["probability"]))
                for w in piece.get("words", ())
            )
            found.append(Segment(float(piece["start"]), float(piece["end"]), text, words, language,
                                 seek=int(piece["seek"]), tokens=tuple(int(t) for t in piece["tokens"]),
                                 temperature=decode.temperature, avg_logprob=float(decode.avg_logprob),
                                 compression_ratio=decode.compression_ratio,
                                 no_speech_prob=float(decode.no_speech_prob)))  # fmt: skip
    return Transcript(" ".join(s.text for s in found), language, tuple(found), audio.duration_s)


def _joined(first: Transcript, rest: Transcript, offset_s: float) -> Transcript:
    """A window's transcript followed by that of its rest, which started ``offset_s`` into the window."""
    segments = first.segments + tuple(segment.shifted(offset_s) for segment in rest.segments)
    return replace(first, text=" ".join(s.text for s in segments), segments=segments)


def _words(words: Sequence[Any]) -> tuple[Word, ...]:
    return tuple(Word(w.word, w.start, w.end, w.probability) for w in words)


def live_frames(frames: int, step: int = LIVE_STEP_FRAMES, margin: int = LIVE_MARGIN_FRAMES) -> int:
    """The shortened encoder window for ``frames`` mel frames of audio (10 ms each): rounded up to ``step``, plus
    ``margin`` of silence, at most Whisper's 3000. ``transcribe_live``'s by default; ``transcribe_partial`` passes
    its own step and margin."""
    return min(FULL_WINDOW_FRAMES, -(-frames // step) * step + margin)


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
