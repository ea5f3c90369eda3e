"""ASR backend on transformers' Whisper: fp16 + SDPA on CUDA, float32 on CPU.

Long audio goes through ``WhisperForConditionalGeneration.generate`` with the whole (unclipped) features and an
attention mask: the sequential long-form algorithm transformers recommends, which seeks on predicted timestamps
instead of stitching overlapping 30 s chunks (the pipeline's ``chunk_length_s`` path, which has known timestamp and
boundary bugs). Windows of several pieces are decoded in one batch, long-form included.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from assistant.asr.base import language_error
from assistant.asr.words import words_of_segment
from assistant.config import AsrConfig, Task
from assistant.devices import pick_attention, pick_device, pick_dtype, quiet_model_libraries
from assistant.errors import AsrError, ConfigError, ModelLoadError
from assistant.messages import SAMPLE_RATE, Audio, Segment, Transcript, Word
from assistant.models import ModelLocation, cache_dir, hub_unreachable, resolve_model

_WINDOW_FRAMES = 3000  # mel frames in Whisper's 30 s window
_HOP_SAMPLES = 160  # audio samples per mel frame (10 ms at 16 kHz)
# transformers measures compression on token bytes, openai/whisper on text; its docs pair 1.35 with openai's 2.4.
_TOKEN_COMPRESSION_PER_TEXT_COMPRESSION = 1.35 / 2.4


class WhisperHFTranscriber:
    def __init__(self, config: AsrConfig) -> None:
        import torch

        quiet_model_libraries()
        from transformers import WhisperForConditionalGeneration, WhisperProcessor

        self._config = config
        self._device = pick_device(config.device, "asr")
        self._dtype = pick_dtype(config.dtype, self._device, "asr")
        if config.threads:
            torch.set_num_threads(config.threads)
        source = _model_source(resolve_model(config.model, sha256=config.sha256))
        try:
            self._processor = WhisperProcessor.from_pretrained(source)
            self._model = WhisperForConditionalGeneration.from_pretrained(
                source, dtype=self._dtype, attn_implementation=pick_attention(config.attention, self._device)
            ).to(self._device)
        except OSError as exc:
            if not Path(source).exists():
                raise hub_unreachable(config.model, exc) from None
            raise ModelLoadError(f"cannot load '{config.model}' with transformers: {exc}") from None
        self._model.eval()
        self._auto_batch = 0
        self._languages = {
            token.strip("<|>"): token_id for token, token_id in self._model.generation_config.lang_to_id.items()
        }

    @property
    def description(self) -> str:
        dtype = str(self._dtype).removeprefix("torch.")
        return f"whisper-hf {self._config.model} {dtype} {self._device} {self._model.config._attn_implementation}"

    @property
    def batch_size(self) -> int:
        if self._config.batch_size == 0:
            self._auto_batch = self._auto_batch or auto_batch_size(self._model.config, self._device, self._dtype)
            return self._auto_batch
        return self._config.batch_size

    def supports_language(self, language: str) -> bool:
        return language in self._languages

    def _detect(self, features: Any) -> list[tuple[str, float]]:
        """Each window's most likely language and its probability: the decoder's first step over the language
        tokens only, as openai/whisper's ``detect_language`` (transformers' returns no probabilities)."""
        import torch

        model = self._model
        windows = features[:, :, :_WINDOW_FRAMES]
        start = torch.full((windows.shape[0], 1), model.generation_config.decoder_start_token_id, device=self._device)
        with torch.inference_mode():
            logits = model(input_features=windows, decoder_input_ids=start).logits[:, -1].float()
        codes = list(self._languages)
        ids = torch.tensor([self._languages[code] for code in codes], device=logits.device)
        probabilities = torch.softmax(logits[:, ids], dim=-1)
        best = probabilities.argmax(dim=-1)
        return [(codes[int(i)], float(probabilities[row, i])) for row, i in enumerate(best)]

    def transcribe_many(
        self,
        audios: Sequence[Audio],
        *,
        language: str | None,
        task: Task = "transcribe",
        timestamps: bool = True,
        word_timestamps: bool = False,
    ) -> list[Transcript]:
        """Windows of similar length are decoded in batches; with ``language=None`` each window's language is
        detected first (one extra encoder pass per batch) and the batch decodes each in its own language."""
        if language and not self.supports_language(language):
            raise AsrError(language_error(language, self._config.model))
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i].samples))  # similar lengths batch together
        results: dict[int, Transcript] = {}
        for first in range(0, len(order), self.batch_size):
            indexes = order[first : first + self.batch_size]
            batch = [audios[i] for i in indexes]
            decoded = self._transcribe_batch(batch, language, task, word_timestamps)
            for index, transcript in zip(indexes, decoded, strict=True):
                results[index] = transcript
        return [results[i] for i in range(len(audios))]

    def _features(self, audios: Sequence[Audio]) -> dict[str, Any]:
        arrays = [audio.samples for audio in audios]
        longest = max(len(a) for a in arrays)
        if longest > _WINDOW_FRAMES * _HOP_SAMPLES:  # long-form: keep every frame, mask the padding
            inputs = self._processor(
                arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt", truncation=False, padding="longest",
                return_attention_mask=True,
            )  # fmt: skip
        else:
            inputs = self._processor(arrays, sampling_rate=SAMPLE_RATE, return_tensors="pt", return_attention_mask=True)
        return {
            "input_features": inputs["input_features"].to(self._device, self._dtype),
            "attention_mask": inputs["attention_mask"].to(self._device),
        }

    def _transcribe_batch(
        self, audios: Sequence[Audio], language: str | None, task: Task, words: bool
    ) -> list[Transcript]:
        import torch

        inputs = self._features(audios)
        guesses = self._detect(inputs["input_features"]) if language is None else [(language, None)] * len(audios)
        options = self._generate_options([code for code, _ in guesses], task)
        if words:  # cross-attention times per token, and the scores for each token's probability
            options.update(return_token_timestamps=True, output_scores=True, return_dict_in_generate=True)
        with torch.inference_mode():
            output = self._model.generate(**inputs, **options)
        transcripts = []
        for audio, segments, (code, probability) in zip(audios, output["segments"], guesses, strict=True):
            found = [self._segment(segment, code, words) for segment in segments]
            kept = tuple(segment for segment in found if segment.text)
            transcripts.append(Transcript(" ".join(s.text for s in kept), code, kept, audio.duration_s, probability))
        return transcripts

    def _segment(self, segment: dict[str, Any], language: str, words: bool) -> Segment:
        tokenizer = self._processor.tokenizer
        text = tokenizer.decode(segment["tokens"], skip_special_tokens=True).strip()
        start, end = float(segment["start"]), float(segment["end"])
        found: tuple[Word, ...] = ()
        if words and text:  # kept inside the segment Whisper's timestamp tokens give
            found = tuple(
                replace(w, start_s=min(max(w.start_s, start), end), end_s=min(max(w.end_s, start), end))
                for w in words_of_segment(tokenizer, segment, language)
            )
        return Segment(start, end, text, found, language)

    def _generate_options(self, language: str | list[str] | None, task: Task) -> dict[str, Any]:
        config = self._config
        options: dict[str, Any] = {
            "task": task,
            "language": language,
            "return_timestamps": True,
            "return_segments": True,
            "num_beams": config.beam_size,
            "condition_on_prev_tokens": config.condition_on_previous_text,
            "temperature": config.temperatures if len(config.temperatures) > 1 else config.temperatures[0],
            "logprob_threshold": config.logprob_threshold,
            "no_speech_threshold": config.no_speech_threshold,
        }
        if config.compression_ratio_threshold is not None:
            options["compression_ratio_threshold"] = (
                config.compression_ratio_threshold * _TOKEN_COMPRESSION_PER_TEXT_COMPRESSION
            )
        if config.initial_prompt:
            options["prompt_ids"] = self._processor.get_prompt_ids(config.initial_prompt, return_tensors="pt").to(
                self._device
            )
        return options


def _model_source(location: ModelLocation) -> str:
    """A directory (or hub id) transformers can load; CTranslate2 models are converted once into the cache."""
    if location.format == "hub":
        return location.ref
    assert location.path is not None
    if location.format == "hf":
        return str(location.path)
    if location.format != "ct2":
        raise ConfigError(f"asr.model '{location.ref}' is a {location.format} file, not a Whisper model")
    from assistant.asr.ct2_to_hf import convert_ct2_whisper, is_converted

    model_bin = location.path / "model.bin"
    stamp = f"{model_bin.stat().st_size}-{model_bin.stat().st_mtime_ns}"
    target = cache_dir() / "converted" / f"{location.path.name}-{stamp}"
    if not is_converted(target):
        convert_ct2_whisper(location.path, target)
    return str(target)


AUTO_BATCH_CPU = 4  # CPU: more windows per batch do not run faster
AUTO_BATCH_MAX = 64
_ENCODER_FRAMES = 1500  # encoder positions of a 30 s window
_ACTIVATION_FACTOR = 24  # peak encoder activations per layer-free (d_model x frames) tensor, measured order of size
_DECODER_TOKENS = 448  # longest decoder sequence
_HEADROOM = 0.8  # share of free memory the batch may use


def auto_batch_size(model_config: Any, device: str, dtype: Any) -> int:
    """How many 30 s windows fit in free VRAM: encoder activations plus the decoder's KV cache, per window."""
    if not device.startswith("cuda"):
        return AUTO_BATCH_CPU
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    width = torch.tensor([], dtype=dtype).element_size()
    d_model, layers = model_config.d_model, model_config.decoder_layers
    per_window = _ENCODER_FRAMES * d_model * width * _ACTIVATION_FACTOR
    per_window += _DECODER_TOKENS * 2 * layers * d_model * width  # self-attention KV
    per_window += _ENCODER_FRAMES * 2 * layers * d_model * width  # cross-attention KV
    return max(1, min(AUTO_BATCH_MAX, int(free * _HEADROOM // per_window)))
