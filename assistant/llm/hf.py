"""Chat backend on transformers: fp16/bf16 on GPUs (spread over all of them with ``device: auto``), float32 on CPU,
8-bit / 4-bit weights through bitsandbytes (the portable default: nf4, double quant) or torchao (``llm.quant_method:
torchao``: int4 weight-only on the tinygemm CUDA kernel, which torch.compile fuses; int8 weight-only anywhere), LoRA
adapters through peft.

The decode loop is our own rather than ``generate()``: it keeps the KV cache of the previous prompt and, on the next
turn, feeds only the tokens after the longest common prefix (the history is not encoded again every turn); it stops
within one token when the consumer stops reading; and it needs no thread and queue for streaming. ``llm.cache:
static`` preallocates the cache for the whole context; ``llm.compile`` also compiles the one-token decode step
(torch.compile, CUDA graphs on GPUs), the fast path for batch-1 decode; the default stays the portable eager loop.

JSON output (``JsonOutput``) is enforced with llguidance, the constrained-decoding library vLLM and SGLang use: each
step it computes the bitmask of tokens that keep the text a prefix of a JSON value obeying the schema, which is
applied to the logits before any sampling processor (``TokenMask``).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from assistant.config import LlmConfig, SamplingConfig
from assistant.devices import pick_attention, pick_device, pick_dtype, quiet_model_libraries
from assistant.errors import ConfigError, LlmError, ModelLoadError
from assistant.llm.base import TokenChatModel
from assistant.llm.constrained import SPACE_REGEX, CompiledCache, SchemaError
from assistant.llm.structured import JsonOutput
from assistant.llm.templates import JinjaTemplate, choose_template
from assistant.models import ModelLocation, gguf_file, hub_unreachable, resolve_model


class HFChatModel(TokenChatModel):
    def __init__(self, config: LlmConfig) -> None:
        import torch

        quiet_model_libraries()
        self._config = config
        self._torch = torch
        self.context_tokens = config.context_tokens
        if config.threads:
            torch.set_num_threads(config.threads)
        self._device = pick_device(config.device, "llm")
        self._dtype = _model_dtype(config, self._device)
        location = resolve_model(config.model, sha256=config.sha256)
        self._tokenizer, self._model = self._load(location)
        self._model.eval()
        self._input_device = self._model.get_input_embeddings().weight.device
        self._end_ids = _end_token_ids(self._tokenizer, self._model)
        own = self._tokenizer.chat_template if isinstance(self._tokenizer.chat_template, str) else None
        model_template = (
            JinjaTemplate(own, bos_token=self._tokenizer.bos_token or "", eos_token=self._tokenizer.eos_token or "")
            if own
            else None
        )
        self.template = choose_template(config.template, model_ref=config.model, model_template=model_template)
        self._cache: Any = None  # KV cache holding exactly the ids in self._cache_ids
        self._cache_ids: list[int] = []
        self._cached = 0
        self._static = config.cache == "static" or config.compile
        # compiled single-token decode over a static cache: fixed shapes, so CUDA graphs can replay each step
        self._decode_step = (
            # graph breaks are allowed: bitsandbytes' quantized matmuls are not traceable
            torch.compile(self._model.forward, mode="reduce-overhead") if config.compile else None
        )
        self._matchers: CompiledCache[Any] = CompiledCache(self._compile_matcher)

    @property
    def description(self) -> str:
        quantized = f" {self._config.quantize}" if self._config.quantize != "none" else ""
        if quantized and self._config.quant_method != "bitsandbytes":
            quantized += f" {self._config.quant_method}"
        dtype = str(self._dtype).removeprefix("torch.")
        cache = " compiled" if self._config.compile else (" static-cache" if self._static else "")
        return f"hf {self._config.model}{quantized} {dtype} {self._device}{cache} template={self.template.name}"

    # --- loading -------------------------------------------------------------------------------------------------

    def _load(self, location: ModelLocation) -> tuple[Any, Any]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        source, extra = _source(location)
        if location.format == "gguf" and self._config.quantize != "none":
            raise ConfigError(
                "llm.quantize: a GGUF file is already quantized and transformers dequantizes it; use "
                "backend llama-cpp for GGUF files, or quantize: none"
            )
        options: dict[str, Any] = {
            "dtype": self._dtype,
            "attn_implementation": pick_attention(self._config.attention, self._device),
        }
        options |= self._placement()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, **extra)
            model = AutoModelForCausalLM.from_pretrained(source, **extra, **options)
        except OSError as exc:
            if location.format == "hub":
                raise hub_unreachable(self._config.model, exc, offline="qwen2.5-0.5b") from None
            raise ModelLoadError(f"cannot load '{self._config.model}' with transformers: {exc}") from None
        except (RuntimeError, ValueError, ImportError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if self._config.quantize != "none":  # bitsandbytes present but without a backend for this device
                raise ModelLoadError(
                    f"llm.quantize {self._config.quantize} cannot run here ({reason}); set llm.quantize: none, or use "
                    "a GGUF file with backend llama-cpp"
                ) from None
            raise ModelLoadError(f"cannot load '{self._config.model}' with transformers: {reason}") from None
        if "device_map" not in options:
            model = model.to(self._device)
        if self._config.adapter:
            tokenizer, model = _with_adapter(Path(self._config.adapter).expanduser(), tokenizer, model)
        return tokenizer, model

    def _placement(self) -> dict[str, Any]:
        """Where the weights go: quantization and multi-GPU spreading are both chosen here."""
        options: dict[str, Any] = {}
        if self._config.quantize != "none":
            quantization = _torchao_config if self._config.quant_method == "torchao" else _bnb_config
            options["quantization_config"] = quantization(self._config, self._device)
        if self._device == "cuda":
            options["device_map"] = "auto"  # spread over every visible GPU when one is not enough
        elif self._config.quantize != "none":
            options["device_map"] = self._device
        return options

    # --- the TokenChatModel hooks --------------------------------------------------------------------------------

    def tokenize(self, text: str) -> list[int]:
        return list(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        return str(self._tokenizer.decode(ids, skip_special_tokens=True))

    def is_end(self, token: int) -> bool:
        return token in self._end_ids

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def prepare_output(self, output: JsonOutput, field: str = "response_format") -> None:
        self._matchers.get(output, field)

    def sample(self, prompt_ids: list[int], params: SamplingConfig, output: JsonOutput | None = None) -> Iterator[int]:
        mask = None
        if output is not None:
            mask = TokenMask(self._matchers.get(output).deep_copy(), self._guidance_tokenizer.vocab_size)
        try:
            yield from self._sample(prompt_ids, params, mask)
        except self._torch.OutOfMemoryError:
            # the half-written KV cache is already dropped; give its memory back so the next turn can run
            self._cache, self._cache_ids = None, []
            if self._torch.cuda.is_available():
                self._torch.cuda.empty_cache()
            raise

    def _sample(self, prompt_ids: list[int], params: SamplingConfig, mask: TokenMask | None = None) -> Iterator[int]:
        torch = self._torch
        with torch.inference_mode():
            new_ids = self._reuse_cache(prompt_ids)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=self._input_device).manual_seed(params.seed)
            processors = _logits_processors(params)
            seen = torch.tensor([prompt_ids], device=self._input_device)
            suppressed = torch.tensor(sorted(self._end_ids), device=self._input_device)
            for step in range(params.max_new_tokens + 1):
                logits = self._forward(new_ids)
                if mask is not None:  # the JSON decides where the reply ends: min_new_tokens does not apply
                    mask.apply(logits)
                elif step < params.min_new_tokens:
                    logits[:, suppressed] = -float("inf")
                logits = processors(seen, logits)
                if params.temperature == 0:
                    token = logits.argmax(dim=-1, keepdim=True)
                else:
                    probabilities = torch.softmax(logits, dim=-1)
                    token = torch.multinomial(probabilities, num_samples=1, generator=generator)
                if mask is not None:
                    mask.consume(int(token))
                yield int(token)
                seen = torch.cat([seen, token], dim=-1)
                new_ids = [int(token)]

    @functools.cached_property
    def _guidance_tokenizer(self) -> Any:
        """llguidance's view of the vocabulary, ending on our end-of-generation ids (built on first use: about a
        second for a 150k vocabulary)."""
        try:
            import llguidance.hf
        except ImportError as exc:
            raise SchemaError(f"backend hf needs llguidance for JSON output ({exc}): pip install llguidance") from None
        try:
            return llguidance.hf.from_tokenizer(self._tokenizer, eos_token=sorted(self._end_ids) or None)
        except ValueError as exc:  # a slow (Python) tokenizer: llguidance reads the Rust tokenizers' JSON
            raise SchemaError(f"llguidance cannot read this model's tokenizer ({exc})") from None

    def _compile_matcher(self, schema_text: str, strict: bool) -> Any:
        """A matcher for the schema at its start; each reply constrains a copy of it. Without ``strict``,
        llguidance leaves the keywords it does not implement to the model (its ``lenient`` option)."""
        import llguidance

        options = {"whitespace_pattern": SPACE_REGEX, "lenient": not strict}
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema_text, defaults=options)
        except ValueError as exc:
            raise SchemaError(f"the schema must be a JSON object ({exc})") from None
        matcher = llguidance.LLMatcher(self._guidance_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SchemaError(f"llguidance cannot enforce the schema: {_first_line(matcher.get_error())}")
        return matcher

    def _reuse_cache(self, prompt_ids: list[int]) -> list[int]:
        """Keep the cache's longest common prefix with the prompt; return the ids still to feed."""
        common = 0
        limit = min(len(self._cache_ids), len(prompt_ids) - 1)  # at least one token must be fed for logits
        while common < limit and self._cache_ids[common] == prompt_ids[common]:
            common += 1
        if self._cache is None or common == 0:
            self._cache, self._cache_ids, common = self._new_cache(), [], 0
        elif common < len(self._cache_ids):
            if self._static:  # rewind the write position; slots past it are masked, then overwritten
                for layer in self._cache.layers:
                    if layer.is_initialized:
                        layer.cumulative_length.fill_(common)
            else:
                self._cache.crop(common - len(self._cache_ids))  # transformers 5: a negative count drops that many
            self._cache_ids = self._cache_ids[:common]
        self._cached = common
        return prompt_ids[common:]

    def _new_cache(self) -> Any:
        from transformers import DynamicCache, StaticCache

        if self._static:
            return StaticCache(config=self._model.config, max_cache_len=self.context_tokens)
        return DynamicCache(config=self._model.config)

    def _forward(self, ids: list[int]) -> Any:
        """Logits of the last position after feeding ``ids``; the cache is dropped if the forward is interrupted."""
        torch = self._torch
        cache, self._cache = self._cache, None  # an exception or Ctrl-C mid-forward leaves a half-updated cache
        inputs = torch.tensor([ids], device=self._input_device)
        start = len(self._cache_ids)
        positions = torch.arange(start, start + len(ids), device=self._input_device)
        forward = self._decode_step if len(ids) == 1 and self._decode_step is not None else self._model
        extra: dict[str, Any] = {}
        if self._static:
            # slots past the end may hold an older turn's tokens: mask them explicitly (SDPA would otherwise skip
            # the mask for one-token steps); the mask has the cache's full, fixed length, so compiled steps keep
            # one shape
            mask = torch.zeros(1, self.context_tokens, dtype=torch.long, device=self._input_device)
            mask[:, : start + len(ids)] = 1
            extra["attention_mask"] = mask
        output = forward(input_ids=inputs, past_key_values=cache, cache_position=positions, use_cache=True,
                         logits_to_keep=1, **extra)  # fmt: skip
        self._cache = cache if self._static else output.past_key_values
        self._cache_ids.extend(ids)
        return output.logits[:, -1, :].float()

    def close(self) -> None:
        self._cache = None
        del self._model
        if self._torch.cuda.is_available():
            self._torch.cuda.empty_cache()


class TokenMask:
    """The tokens one llguidance matcher allows next, applied to a row of logits, and the matcher advanced by each
    token sampled. The bitmask has a bit per tokenizer token (bit ``i % 32`` of word ``i // 32``); the logits may be
    wider (embedding matrices padded to a multiple of 64 or 128): the padding ids are never allowed. Applied with
    torch ops rather than ``llguidance.torch``, whose kernel is torch.compile'd (seconds of compiling on a CPU)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        import llguidance.numpy

        self._matcher = matcher
        self._bits = llguidance.numpy.allocate_token_bitmask(1, vocab_size)

    def apply(self, logits: Any) -> None:
        import llguidance.numpy
        import numpy as np
        import torch

        llguidance.numpy.fill_next_token_bitmask(self._matcher, self._bits, 0)
        bits = np.unpackbits(self._bits.astype("<i4").view(np.uint8), bitorder="little")
        width = logits.shape[-1]
        allowed = torch.zeros(width, dtype=torch.bool)
        shared = min(width, bits.size)
        allowed[:shared] = torch.from_numpy(bits[:shared].astype(bool))
        if not bool(allowed.any()):
            raise LlmError(f"the JSON constraint allows no token: {_first_line(self._matcher.get_error())}")
        logits.masked_fill_(~allowed.to(logits.device), -float("inf"))

    def consume(self, token: int) -> None:
        if not self._matcher.consume_token(token):
            raise LlmError(f"the JSON constraint refused token {token}: {_first_line(self._matcher.get_error())}")


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:300] if text.strip() else "no reason given"


def _source(location: ModelLocation) -> tuple[str, dict[str, Any]]:
    if location.format == "hub":
        return location.ref, {}
    assert location.path is not None
    if location.format == "gguf":
        file = gguf_file(location)
        return str(file.parent), {"gguf_file": file.name}
    if location.format != "hf":
        raise ConfigError(f"llm.model '{location.ref}' is a {location.format} model, not a chat model")
    return str(location.path), {}


def _model_dtype(config: LlmConfig, device: str) -> Any:
    """The weights' dtype; torchao's int4 kernel (tinygemm) takes bfloat16 activations only."""
    import torch

    if config.quantize == "4bit" and config.quant_method == "torchao":
        if config.dtype not in ("auto", "bfloat16"):
            raise ConfigError(
                f"llm.dtype {config.dtype}: torchao int4 computes in bfloat16 only; set llm.dtype: auto or bfloat16"
            )
        return torch.bfloat16
    return pick_dtype(config.dtype, device, "llm")


def _torchao_config(config: LlmConfig, device: str) -> Any:
    """torchao weight-only quantization: int4 groups of 128 packed for tinygemm (CUDA), or int8 per row."""
    try:
        from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig
    except ImportError as exc:
        raise ModelLoadError(
            f"llm.quant_method torchao needs torchao, which cannot be imported here ({exc}); install it with "
            "'pip install torchao' (the build matching your torch), or set llm.quant_method: bitsandbytes"
        ) from None
    from transformers import TorchAoConfig

    if config.quantize == "8bit":
        return TorchAoConfig(Int8WeightOnlyConfig())
    if not device.startswith("cuda"):
        raise ConfigError(
            "llm.quant_method torchao with quantize 4bit needs a CUDA GPU (its int4 kernel is CUDA only); on this "
            "device use quantize 8bit, or quant_method bitsandbytes"
        )
    return TorchAoConfig(Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d"))


def _bnb_config(config: LlmConfig, device: str) -> Any:
    """bitsandbytes settings; refuses clearly where bitsandbytes is missing or cannot run."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise ModelLoadError(
            f"llm.quantize {config.quantize} needs bitsandbytes, which cannot be imported here ({exc}); install it "
            "with 'pip install bitsandbytes', or set llm.quantize: none, or use a GGUF file with backend llama-cpp"
        ) from None
    from transformers import BitsAndBytesConfig

    if config.quantize == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = pick_dtype(config.compute_dtype, device, "llm.compute")
    if not device.startswith("cuda") and str(compute) != "torch.float32":
        raise ConfigError(
            f"llm.compute_dtype {config.compute_dtype}: bitsandbytes 4-bit on CPU computes in float32 only; "
            "set llm.compute_dtype: auto"
        )
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=config.quant_type,
        bnb_4bit_use_double_quant=config.double_quant,
        bnb_4bit_compute_dtype=compute,
    )


def _with_adapter(adapter: Path, tokenizer: Any, model: Any) -> tuple[Any, Any]:
    """Load a LoRA adapter; when it ships a larger (e.g. Chinese-extended) tokenizer, resize the embeddings first."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ModelLoadError("llm.adapter needs peft; install it with 'pip install peft'") from None
    from transformers import AutoTokenizer

    if not (adapter / "adapter_config.json").is_file():
        raise ModelLoadError(f"llm.adapter '{adapter}' is not a LoRA adapter directory (no adapter_config.json)")
    if any((adapter / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(adapter))
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) != rows:
        model.resize_token_embeddings(len(tokenizer))
    try:
        return tokenizer, PeftModel.from_pretrained(model, str(adapter)).eval()
    except (RuntimeError, ValueError, OSError) as exc:
        raise ModelLoadError(f"cannot load adapter '{adapter}' onto the model: {str(exc).splitlines()[0]}") from None


def _end_token_ids(tokenizer: Any, model: Any) -> set[int]:
    ids: set[int] = set()
    for value in (getattr(model.generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(int(v) for v in value)
    return ids


def _logits_processors(params: SamplingConfig) -> Any:
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
    if params.temperature > 0:
        processors.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k > 0:
            processors.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(params.top_p))
    return processors
