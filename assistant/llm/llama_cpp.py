"""Chat backend on llama.cpp (llama-cpp-python): GGUF files, the route users take on CPUs.

llama-cpp-python's ``generate`` keeps the KV cache of the previous prompt and evaluates only what follows the longest
common prefix, so a long conversation is not encoded again every turn. Prompts come from our template renderer (the
GGUF's own ``tokenizer.chat_template`` through the same Jinja settings as transformers, or a built-in).
"""

from __future__ import annotations

import functools
import os
import random
from collections.abc import Iterator
from typing import Any

from assistant.config import LlmConfig, SamplingConfig
from assistant.errors import ConfigError, ModelLoadError
from assistant.llm.base import TokenChatModel
from assistant.llm.structured import JsonOutput
from assistant.llm.templates import JinjaTemplate, choose_template
from assistant.models import gguf_file, resolve_model


class LlamaCppChatModel(TokenChatModel):
    def __init__(self, config: LlmConfig) -> None:
        try:
            import llama_cpp
        except ImportError:
            raise ModelLoadError(
                "backend llama-cpp needs llama-cpp-python; install it with 'pip install llama-cpp-python' "
                "(it compiles llama.cpp: a few minutes, needs cmake and a C++ compiler)"
            ) from None
        self._llama_cpp = llama_cpp
        self._config = config
        location = resolve_model(config.model, sha256=config.sha256)
        if location.format == "hub":
            raise ConfigError(
                f"llm.model '{config.model}': backend llama-cpp reads a local GGUF file; download one (e.g. with "
                "'hf download REPO FILE.gguf') and give its path, or use backend hf for hub ids"
            )
        if location.format != "gguf":
            raise ConfigError(
                f"llm.model '{config.model}' is a {location.format} model; backend llama-cpp needs a GGUF file "
                "(use backend hf for transformers directories)"
            )
        self._path = gguf_file(location)
        self.context_tokens = config.context_tokens
        try:
            self._llm = llama_cpp.Llama(
                model_path=str(self._path),
                n_ctx=config.context_tokens,
                n_batch=config.batch_tokens,
                n_threads=config.threads or os.cpu_count() or 1,
                n_gpu_layers=config.gpu_layers,
                verbose=False,
            )
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(
                f"llama.cpp cannot load '{self._path}' ({exc}); check that it is a complete GGUF file of an "
                "architecture this llama-cpp-python supports"
            ) from None
        self._vocab = self._llm._model.vocab
        self.template = choose_template(config.template, model_ref=config.model, model_template=self._own_template())
        self._cached = 0

    def _own_template(self) -> JinjaTemplate | None:
        source = self._llm.metadata.get("tokenizer.chat_template")
        if not source:
            return None
        bos = self._token_text(self._llm.token_bos())
        eos = self._token_text(self._llm.token_eos())
        return JinjaTemplate(source, bos_token=bos, eos_token=eos)

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

    @property
    def description(self) -> str:
        where = f"gpu_layers={self._config.gpu_layers}" if self._config.gpu_layers else "cpu"
        return f"llama-cpp {self._config.model} {where} template={self.template.name}"

    def tokenize(self, text: str) -> list[int]:
        return list(self._llm.tokenize(text.encode("utf-8"), add_bos=False, special=True))

    def decode(self, ids: list[int]) -> str:
        return self._llm.detokenize(ids).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(self._llama_cpp.llama_vocab_is_eog(self._vocab, token))

    @property
    def cached_tokens(self) -> int:
        return self._cached

    def sample(self, prompt_ids: list[int], params: SamplingConfig, output: JsonOutput | None = None) -> Iterator[int]:
        self._cached = self._common_prefix(prompt_ids)
        self._llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        return self._llm.generate(
            prompt_ids,
            temp=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            repeat_penalty=params.repetition_penalty,
            logits_processor=self._suppress_end(len(prompt_ids), params.min_new_tokens),
        )

    def _common_prefix(self, prompt_ids: list[int]) -> int:
        cached = self._llm._input_ids[: self._llm.n_tokens]
        common = 0
        for held, wanted in zip(cached, prompt_ids, strict=False):
            if held != wanted:
                break
            common += 1
        return min(common, len(prompt_ids) - 1)

    def _suppress_end(self, prompt_length: int, min_new_tokens: int) -> Any:
        """A logits processor that forbids end-of-generation tokens for the first ``min_new_tokens`` tokens."""
        if min_new_tokens <= 0:
            return None
        import numpy as np

        ends = self._end_tokens

        def suppress(input_ids: np.ndarray, scores: np.ndarray) -> np.ndarray:
            if len(input_ids) - prompt_length < min_new_tokens:
                scores[ends] = -np.inf
            return scores

        return self._llama_cpp.LogitsProcessorList([suppress])

    @functools.cached_property
    def _end_tokens(self) -> list[int]:
        """Every end-of-generation id in the vocabulary (a scan of the whole vocabulary: done once)."""
        return [token for token in range(self._llm.n_vocab()) if self.is_end(token)]

    def close(self) -> None:
        self._llm.close()
