"""ASR backend on transformers' Whisper: fp16 + SDPA on CUDA, float32 on CPU.

Long audio goes through ``WhisperForConditionalGeneration.generate`` with the whole (unclipped) features and an
attention mask: the sequential long-form algorithm transformers recommends, which seeks on predicted timestamps
instead of stitching overlapping 30 s chunks (the pipeline's ``chunk_length_s`` path, which has known timestamp and
boundary bugs). Windows of several pieces are decoded in one batch, long-form included.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from assistant.asr.base import for_request, language_error
from assistant.asr.edges import silent_edges_many
from assistant.asr.quality import Verdict, compression_ratio, verdict
from assistant.asr.words import words_of_segment
from assistant.config import AsrConfig, Task
from assistant.devices import pick_attention, pick_device, pick_dtype, quiet_model_libraries
from assistant.errors import AsrError, ConfigError, ModelLoadError
from assistant.messages import FRAMES_PER_S, SAMPLE_RATE, Audio, Segment, Transcript, Word
from assistant.models import ModelLocation, cache_dir, hub_unreachable, resolve_model

_WINDOW_FRAMES = 3000  # mel frames in Whisper's 30 s window
_HOP_SAMPLES = 160  # audio samples per mel frame (10 ms at 16 kHz)
# transformers measures compression on token bytes, openai/whisper on text; its docs pair 1.35 with openai's 2.4.
_TOKEN_COMPRESSION_PER_TEXT_COMPRESSION = 1.35 / 2.4
_TIME_PRECISION_S = 0.02  # seconds per Whisper timestamp token
MAX_PROMPT_TOKENS = 223  # of a prompt: half Whisper's 448-token context, less <|startofprev|>


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

    def _detect(self, logits: Any) -> list[tuple[str, float]]:
        """Each window's most likely language and its probability, from the decoder's first step (its logits at
        the start-of-transcript token) over the language tokens only, as openai/whisper's ``detect_language``
        (transformers' returns no probabilities)."""
        import torch

        codes = list(self._languages)
        ids = torch.tensor([self._languages[code] for code in codes], device=logits.device)
        probabilities = torch.softmax(logits[:, ids], dim=-1)
        best = probabilities.argmax(dim=-1)
        return [(codes[int(i)], float(probabilities[row, i])) for row, i in enumerate(best)]

    def _first_step(self, encoded: Any, decoder_input: list[int]) -> Any:
        """The decoder's logits (float32) at the last token of ``decoder_input`` for every window of the batch."""
        import torch

        start = torch.tensor([decoder_input] * encoded.last_hidden_state.shape[0], device=self._device)
        return self._model(encoder_outputs=encoded, decoder_input_ids=start).logits[:, -1].float()

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
        """Windows of similar length are decoded in batches; with ``language=None`` each window's language is
        detected first (from the same encoder pass) and the batch decodes each in its own language. Segments carry
        the decode's ``seek``, ``tokens``, ``temperature``, ``avg_logprob``, ``compression_ratio`` and
        ``no_speech_prob`` (see ``_decoded``; windows over 30 s: see ``_long_form``)."""
        if language and not self.supports_language(language):
            raise AsrError(language_error(language, self._config.model))
        config = for_request(self._config, prompt, temperatures)
        order = sorted(range(len(audios)), key=lambda i: -len(audios[i].samples))  # similar lengths batch together
        results: dict[int, Transcript] = {}
        for first in range(0, len(order), self.batch_size):
            indexes = order[first : first + self.batch_size]
            batch = [audios[i] for i in indexes]
            decoded = self._transcribe_batch(batch, language, task, word_timestamps, config)
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
        self, audios: Sequence[Audio], language: str | None, task: Task, words: bool, config: AsrConfig
    ) -> list[Transcript]:
        """One encoder pass for the batch; its first decoder step gives each window's language (when not given)
        and no-speech probability; then ``_decoded``'s temperature fallback. Windows over 30 s: ``_long_form``."""
        import torch

        inputs = self._features(audios)
        long_form = inputs["input_features"].shape[-1] > _WINDOW_FRAMES
        generation = self._model.generation_config
        with torch.inference_mode():
            encoded = None
            if not (long_form and language):  # long-form decoding encodes each 30 s itself
                encoded = self._model.get_encoder()(inputs["input_features"][:, :, :_WINDOW_FRAMES])
            start = [generation.decoder_start_token_id]
            logits = self._first_step(encoded, start) if encoded is not None and not language else None
            guesses: list[tuple[str, float | None]] = (
                [(language, None)] * len(audios) if logits is None else list(self._detect(logits))
            )
            codes = [code for code, _ in guesses]
            if long_form or encoded is None:
                decodes = self._long_form(inputs, codes, task, words, config)
            else:
                # openai/whisper's no_speech_prob: the no-speech token at the start-of-transcript position, after
                # the prompt when there is one (transformers' WhisperNoSpeechDetection reads the same place)
                prompt = self._prompt_ids(config)
                if logits is None or prompt:
                    logits = self._first_step(encoded, [*prompt, *start])
                no_speech = torch.softmax(logits, dim=-1)[:, generation.no_timestamps_token_id - 1]
                decodes = self._decoded(encoded, inputs["attention_mask"], codes, task, words, config,
                                        [float(p) for p in no_speech])  # fmt: skip
        transcripts = []
        for audio, (segments, decode), (code, probability) in zip(audios, decodes, guesses, strict=True):
            found = [self._segment(segment, code, words, decode) for segment in segments]
            kept = tuple(segment for segment in found if segment.text)
            transcripts.append(Transcript(" ".join(s.text for s in kept), code, kept, audio.duration_s, probability))
        return transcripts

    def _decoded(self, encoded: Any, attention_mask: Any, codes: list[str], task: Task, words: bool,
                 config: AsrConfig, no_speech: list[float]) -> list[tuple[list[dict[str, Any]], _Decode]]:  # fmt: skip
        """openai/whisper's temperature fallback over a batch of windows of at most 30 s: all are decoded at the
        ladder's first temperature, those whose decode fails the checks (``assistant.asr.quality.verdict``)
        again at the next, the rest kept; a decode judged silence gives no segments; at the last temperature the
        decode is kept whatever it is. Each window's segments, with the values of the decode kept."""
        from transformers.modeling_outputs import BaseModelOutput

        kept: dict[int, tuple[list[dict[str, Any]], _Decode]] = {}
        pending = list(range(len(codes)))
        for step, temperature in enumerate(config.temperatures):
            options = self._generate_options([codes[i] for i in pending], task, config, temperature)
            options.update(output_scores=True, return_dict_in_generate=True)  # the scores give avg_logprob
            if words:  # cross-attention times per token
                options["return_token_timestamps"] = True
            subset = BaseModelOutput(last_hidden_state=encoded.last_hidden_state[pending])
            with self._seeded():
                output = self._model.generate(encoder_outputs=subset, attention_mask=attention_mask[pending],
                                              **options)  # fmt: skip
            again = []
            for index, segments in zip(pending, output["segments"], strict=True):
                decode = self._decode_values(segments, temperature, no_speech[index])
                judged = decode.verdict(config)
                if judged == "fallback" and step < len(config.temperatures) - 1:
                    again.append(index)
                else:
                    kept[index] = ([] if judged == "silence" else segments, decode)
            pending = again
            if not pending:
                break
        return [kept[i] for i in range(len(codes))]

    def _decode_values(self, segments: list[dict[str, Any]], temperature: float, no_speech: float) -> _Decode:
        """The values of one window's decode: openai/whisper's ``avg_logprob`` (the mean log-probability of the
        generated tokens, end of text included, under the decoder's processed scores with the temperature undone,
        as transformers' ``_retrieve_avg_logprobs``) and ``compression_ratio`` (of the decoded text)."""
        if not segments:  # nothing generated at all
            return _Decode(temperature, None, None, no_speech)
        result = segments[0]["result"]
        scores, sequence = result["scores"], [int(t) for t in result["sequences"]]
        generated = sequence[len(sequence) - len(scores) :]
        end = self._model.generation_config.eos_token_id
        text_tokens = generated[: generated.index(end)] if end in generated else generated
        counted = generated[: len(text_tokens) + 1]  # with the end of text, when it came
        text = self._processor.tokenizer.decode(text_tokens, skip_special_tokens=True).strip()
        logprob = _sum_logprobs(scores, counted, temperature) / (len(text_tokens) + 1)
        return _Decode(temperature, logprob, compression_ratio(text), no_speech)

    def _long_form(self, inputs: dict[str, Any], codes: list[str], task: Task, words: bool,
                   config: AsrConfig) -> list[tuple[list[dict[str, Any]], _Decode]]:  # fmt: skip
        """Windows over 30 s (no VAD): transformers' sequential long-form ``generate``, which seeks on timestamps
        and runs the temperature fallback itself. It keeps neither which temperature it used nor the no-speech
        probability, and its scores would be held for every 30 s it decodes: its segments carry only ``seek`` and
        ``tokens`` (and ``temperature`` when the ladder has one step)."""
        options = self._generate_options(codes, task, config, config.temperatures)
        if words:  # cross-attention times per token, and the scores for each token's probability
            options.update(return_token_timestamps=True, output_scores=True, return_dict_in_generate=True)
        with self._seeded():
            output = self._model.generate(**inputs, **options)
        only = config.temperatures[0] if len(config.temperatures) == 1 else None
        return [(segments, _Decode(only, None, None, None)) for segments in output["segments"]]

    def _segment(self, segment: dict[str, Any], language: str, words: bool, decode: _Decode) -> Segment:
        tokenizer = self._processor.tokenizer
        tokens = [int(t) for t in segment["tokens"]]
        text = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        start, end = float(segment["start"]), float(segment["end"])
        found: tuple[Word, ...] = ()
        if words and text:  # kept inside the segment Whisper's timestamp tokens give
            found = tuple(
                replace(w, start_s=min(max(w.start_s, start), end), end_s=min(max(w.end_s, start), end))
                for w in words_of_segment(tokenizer, segment, language)
            )
        first = self._model.generation_config.no_timestamps_token_id + 1  # <|0.00|>
        seek_s = start - (tokens[0] - first) * _TIME_PRECISION_S if tokens and tokens[0] >= first else start
        return Segment(start, end, text, found, language, seek=round(seek_s * FRAMES_PER_S), tokens=tuple(tokens),
                       temperature=decode.temperature, avg_logprob=decode.avg_logprob,
                       compression_ratio=decode.compression_ratio, no_speech_prob=decode.no_speech_prob)  # fmt: skip

    @contextlib.contextmanager
    def _seeded(self) -> Iterator[None]:
        """torch's generator seeded with ``asr.seed`` for one ``generate`` call (the fallback samples from it), and
        given back as it was afterwards, so that the same audio gives the same text on every call and no other
        user of torch's global generator sees a change. ``asr.seed: null``: left alone."""
        import torch

        if self._config.seed is None:
            yield
            return
        device = torch.device(self._device)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
            torch.manual_seed(self._config.seed)
            yield

    def _prompt_ids(self, config: AsrConfig) -> list[int]:
        """``<|startofprev|>`` and the prompt's last ``MAX_PROMPT_TOKENS`` tokens (Whisper's context holds no
        more; openai/whisper and OpenAI's API keep the end too); [] without a prompt."""
        if not config.initial_prompt:
            return []
        ids = [int(t) for t in self._processor.get_prompt_ids(config.initial_prompt, return_tensors="np")]
        return [ids[0], *ids[1:][-MAX_PROMPT_TOKENS:]]

    def _generate_options(self, language: list[str], task: Task, config: AsrConfig,
                          temperature: float | tuple[float, ...]) -> dict[str, Any]:  # fmt: skip
        """``generate``'s options; one ``temperature``: no fallback inside transformers (``_decoded`` runs it), a
        ladder: transformers' own (long-form), with the thresholds it needs."""
        options: dict[str, Any] = {
            "task": task,
            "language": language,
            "return_timestamps": True,
            "return_segments": True,
            "num_beams": config.beam_size,
            "condition_on_prev_tokens": config.condition_on_previous_text,
        }
        if isinstance(temperature, tuple) and len(temperature) > 1:
            options.update(temperature=temperature, logprob_threshold=config.logprob_threshold,
                           no_speech_threshold=config.no_speech_threshold)  # fmt: skip
            if config.compression_ratio_threshold is not None:
                options["compression_ratio_threshold"] = (
                    config.compression_ratio_threshold * _TOKEN_COMPRESSION_PER_TEXT_COMPRESSION
                )
        else:
            options["temperature"] = temperature[0] if isinstance(temperature, tuple) else temperature
        prompt = self._prompt_ids(config)
        if prompt:
            import torch

            options["prompt_ids"] = torch.tensor(prompt, device=self._device)
        return options


@dataclass(frozen=True)
class _Decode:
    """One window's decode, as its segments report it (None: not known, see ``_long_form``)."""

    temperature: float | None
    avg_logprob: float | None
    compression_ratio: float | None
    no_speech_prob: float | None

    def verdict(self, config: AsrConfig) -> Verdict:
        if self.avg_logprob is None or self.compression_ratio is None or self.no_speech_prob is None:
            return "ok"
        return verdict(config, self.compression_ratio, self.avg_logprob, self.no_speech_prob)


def _sum_logprobs(scores: Sequence[Any], tokens: Sequence[int], temperature: float) -> float:
    """The summed log-probabilities of ``tokens``, one per step of ``scores`` (the processed logits, divided by
    the temperature when sampling: multiplied back, as openai/whisper takes them before the temperature)."""
    import torch

    if not tokens:
        return 0.0
    steps = torch.stack([scores[i].reshape(-1) for i in range(len(tokens))]).float()
    logprobs = torch.log_softmax(steps * (temperature if temperature > 0 else 1.0), dim=-1)
    chosen = torch.tensor(tokens, device=logprobs.device).unsqueeze(-1)
    return float(logprobs.gather(-1, chosen).sum())


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
    """How many 30 s windows fit in free VRAM: encoder activations, the decoder's KV cache and the scores of every
    step (``_decoded`` keeps them for ``avg_logprob``), per window."""
    if not device.startswith("cuda"):
        return AUTO_BATCH_CPU
    import torch

    free, _total = torch.cuda.mem_get_info(torch.device(device))
    width = torch.tensor([], dtype=dtype).element_size()
    d_model, layers = model_config.d_model, model_config.decoder_layers
    per_window = _ENCODER_FRAMES * d_model * width * _ACTIVATION_FACTOR
    per_window += _DECODER_TOKENS * 2 * layers * d_model * width  # self-attention KV
    per_window += _ENCODER_FRAMES * 2 * layers * d_model * width  # cross-attention KV
    per_window += _DECODER_TOKENS * model_config.vocab_size * width  # each step's scores, kept for avg_logprob
    return max(1, min(AUTO_BATCH_MAX, int(free * _HEADROOM // per_window)))
