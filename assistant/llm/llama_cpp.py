"""Chat backend on llama.cpp (llama-cpp-python): GGUF files, the route users take on CPUs.

llama-cpp-python's ``generate`` keeps the KV cache of the previous prompt and evaluates only what follows the longest
common prefix, so a long conversation is not encoded again every turn. Prompts come from our template renderer (the
GGUF's own ``tokenizer.chat_template`` through the same Jinja settings as transformers, or a built-in).

JSON output (``JsonOutput``) is a llama.cpp grammar: llama-cpp-python's JSON-schema converter writes it (GBNF), with
three of its rules brought up to upstream llama.cpp's (string characters, a pattern's '.', whitespace), and the sampler
checks only the sampled token against it the way llama.cpp's own server does (``GrammarCheckedSampler``), not the
whole vocabulary every step.
"""

from __future__ import annotations

import ctypes
import functools
import json
import math
import os
import random
import weakref
from collections.abc import Iterator
from typing import Any

from assistant.config import LlmConfig, SamplingConfig
from assistant.errors import ConfigError, LlmError, ModelLoadError
from assistant.llm.base import TokenChatModel
from assistant.llm.constrained import SPACE_GBNF, CompiledCache, SchemaError
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
            self._llm = _llama_class()(
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
        self._grammars: CompiledCache[Any] = CompiledCache(self._compile_grammar)

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

    def prepare_output(self, output: JsonOutput, field: str = "response_format") -> None:
        self._grammars.get(output, field)

    def sample(self, prompt_ids: list[int], params: SamplingConfig, output: JsonOutput | None = None) -> Iterator[int]:
        grammar = self._grammars.get(output) if output is not None else None
        self._cached = self._common_prefix(prompt_ids)
        self._llm.set_seed(params.seed if params.seed is not None else random.randrange(2**31))
        return self._llm.generate(
            prompt_ids,
            temp=params.temperature,
            top_k=params.top_k,
            top_p=params.top_p,
            min_p=0.0,
            repeat_penalty=params.repetition_penalty,
            # with a grammar the JSON decides where the reply ends: forbidding the end there would leave the grammar
            # no token at all (llama.cpp aborts the process on a token its grammar rejects)
            logits_processor=None if grammar else self._suppress_end(len(prompt_ids), params.min_new_tokens),
            grammar=grammar,
        )

    def _compile_grammar(self, schema_text: str, strict: bool) -> Any:
        """The schema as a llama.cpp grammar, checked by llama.cpp's own GBNF parser (a grammar it cannot parse
        would otherwise reach the sampler as a null pointer). ``strict`` refuses keywords the grammar would leave
        out; without it they are left to the model."""
        from llama_cpp.llama_grammar import LlamaGrammar, json_schema_to_gbnf

        unenforced = list(_unenforced(json.loads(schema_text))) if strict else []
        if unenforced:
            raise SchemaError(
                f"the schema uses {', '.join(unenforced)}, which backend llama-cpp cannot enforce (its grammars "
                "hold the structure, types, enum, const, lengths and patterns, not numeric ranges or uniqueness); "
                "leave them out, set strict to false to have the rest enforced, or use backend hf"
            )
        try:
            gbnf = _upstream_rules(json_schema_to_gbnf(schema_text))
        except (AssertionError, AttributeError, ValueError, KeyError, TypeError, RecursionError) as exc:
            reason = str(exc) or type(exc).__name__
            raise SchemaError(f"llama.cpp cannot turn the schema into a grammar ({reason})") from None
        parsed = self._llama_cpp.llama_sampler_init_grammar(self._vocab, gbnf.encode("utf-8"), b"root")
        if not parsed:
            raise SchemaError("llama.cpp cannot parse the grammar made from the schema")
        self._llama_cpp.llama_sampler_free(parsed)
        return LlamaGrammar.from_string(gbnf, verbose=False)

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
        self._llm._sampler = None  # frees the last reply's grammar while the vocabulary it points to still exists
        self._llm.close()


# JSON Schema keywords that constrain values but that llama-cpp-python's converter leaves out of the grammar: a schema
# using them would get replies that break it, so it is refused by name instead.
_UNENFORCED = frozenset(
    {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "uniqueItems", "contains",
     "minContains", "maxContains", "not", "if", "then", "else", "patternProperties", "propertyNames",
     "minProperties", "maxProperties", "dependentRequired", "dependentSchemas", "dependencies",
     "unevaluatedProperties", "unevaluatedItems", "additionalItems"}
)  # fmt: skip
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")
_SUBSCHEMAS = ("items", "prefixItems", "anyOf", "oneOf", "allOf", "additionalProperties")


def _unenforced(schema: Any, path: str = "") -> Iterator[str]:
    """Each keyword the grammar would not enforce, with where it is (``minimum at /properties/age``); a ``required``
    name missing from ``properties`` too (the converter drops it)."""
    if isinstance(schema, list):
        for index, item in enumerate(schema):
            yield from _unenforced(item, f"{path}/{index}")
        return
    if not isinstance(schema, dict):
        return
    where = path or "/"
    for key, value in schema.items():
        if key in _UNENFORCED:
            yield f"'{key}' at {where}"
        elif key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                yield from _unenforced(sub, f"{path}/{key}/{name}")
        elif key in _SUBSCHEMAS:
            yield from _unenforced(value, f"{path}/{key}")
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
        if isinstance(properties, dict) and name not in properties:
            yield f"'required' name '{name}' that is not in properties at {where}"


# Rules of llama-cpp-python's converter (a copy of llama.cpp's json_schema_to_grammar.py from early 2024) replaced by
# those of upstream llama.cpp: string characters exclude the control characters JSON forbids inside strings (the old
# rule let a raw newline in, and json.loads refuses it), a pattern's '.' excludes the quote and backslash that would
# end or break the string, and whitespace is upstream's (see SPACE_GBNF).
_RULES = {
    "char": r'[^"\\\x7F\x00-\x1F] | [\\] (["\\bfnrt] | "u" [0-9a-fA-F]{4})',
    "dot": r'[^"\\\x7F\x00-\x1F]',
    "space": SPACE_GBNF,
}


def _upstream_rules(gbnf: str) -> str:
    lines = []
    for line in gbnf.splitlines():
        name = line.split(" ::= ", 1)[0]
        lines.append(f"{name} ::= {_RULES[name]}" if name in _RULES else line)
    return "\n".join(lines)


@functools.cache
def _llama_class() -> Any:
    """llama_cpp.Llama with grammar sampling done by GrammarCheckedSampler (defined here: llama_cpp is imported
    only when this backend is used)."""
    import llama_cpp

    class Llama(llama_cpp.Llama):  # type: ignore[misc]
        def _init_sampler(self, *args: Any, grammar: Any = None, **kwargs: Any) -> Any:
            chain = super()._init_sampler(*args, **kwargs)
            return chain if grammar is None else GrammarCheckedSampler(self, chain, grammar)

    return Llama


class GrammarCheckedSampler:
    """Grammar-constrained sampling the way llama.cpp's own server and CLI do it (``common_sampler_sample`` in
    common/sampling.cpp): sample with the plain chain, then ask the grammar about that one token; only when it is
    rejected, mask the whole vocabulary with the grammar and sample again.

    llama-cpp-python puts the grammar inside the chain instead, so every step matches all ~150k tokens of Qwen2.5's
    vocabulary against the grammar: about 30 ms a token on two CPU cores, 40% of the decode speed. A model writing
    the JSON its prompt asks for nearly always samples an allowed token, so the check costs one token's match.
    ``generate`` calls ``sample(ctx, idx)``, as on its own sampler chain."""

    def __init__(self, llama: Any, chain: Any, grammar: Any) -> None:
        import llama_cpp
        import numpy as np

        self._lib = llama_cpp
        self._chain = chain  # llama-cpp-python's LlamaSampler: penalties, top-k/p, temperature, dist or greedy
        self._grammar = llama_cpp.llama_sampler_init_grammar(
            llama._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
        if not self._grammar:
            raise LlmError("llama.cpp could not parse the JSON grammar")
        weakref.finalize(self, llama_cpp.llama_sampler_free, self._grammar)
        self._n_vocab = llama.n_vocab()
        self._candidates = (llama_cpp.llama_token_data * self._n_vocab)()
        self._view = np.ctypeslib.as_array(self._candidates)  # fields id, logit, p over the same memory
        self._ids = np.arange(self._n_vocab, dtype=np.int32)
        self._one = llama_cpp.llama_token_data()

    def sample(self, ctx: Any, idx: int = -1) -> int:
        import numpy as np

        logits = np.ctypeslib.as_array(self._lib.llama_get_logits_ith(ctx.ctx, idx), shape=(self._n_vocab,))
        token = self._pick(logits, self._chain.sampler)
        if not self._allows(token):
            token = self._pick(logits, self._grammar, self._chain.sampler)
        self._lib.llama_sampler_accept(self._grammar, token)
        self._chain.accept(token)
        return token

    def _pick(self, logits: Any, *samplers: Any) -> int:
        """The token the samplers select from the full candidate list."""
        lib = self._lib
        self._view["id"] = self._ids  # the samplers sort the candidates in place
        self._view["logit"] = logits
        self._view["p"] = 0.0
        candidates = lib.llama_token_data_array(
            data=ctypes.cast(self._candidates, lib.llama_token_data_p), size=self._n_vocab, selected=-1, sorted=False
        )
        for sampler in samplers:
            lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        if candidates.selected < 0:
            raise LlmError("llama.cpp's sampler selected no token")
        return int(candidates.data[candidates.selected].id)

    def _allows(self, token: int) -> bool:
        lib = self._lib
        self._one.id, self._one.logit, self._one.p = token, 1.0, 0.0
        single = lib.llama_token_data_array(data=ctypes.pointer(self._one), size=1, selected=-1, sorted=False)
        lib.llama_sampler_apply(self._grammar, ctypes.byref(single))
        return not math.isinf(self._one.logit)
