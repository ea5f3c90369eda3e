"""What the local backends share to constrain decoding to JSON: the schema a ``JsonOutput`` stands for, the
whitespace allowed between JSON tokens, and a small cache of compiled constraints.

Both backends compile the schema once (llama.cpp: a GBNF grammar; transformers: an llguidance grammar) and keep the
last few: an OpenAI client sends the same ``response_format`` or tool list with every request, and compiling a big
schema costs from milliseconds to most of a second.

``strict`` follows OpenAI's meaning: with it the reply is guaranteed to obey the whole schema, so a keyword the
backend cannot enforce (llama.cpp grammars hold no numeric ranges, for one) is refused by name; without it the
structure, types, enums and whatever else the backend can hold are enforced and such keywords are left to the model.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from assistant.errors import ConfigError
from assistant.llm.structured import JsonOutput

ANY_OBJECT: dict[str, Any] = {"type": "object"}  # OpenAI's json_object mode: a JSON object, not any JSON value

# Whitespace between JSON tokens: nothing, one space, or one or two newlines and an indent of at most 20 blanks.
# Bounded, so a weak model cannot run away in blanks until max_tokens, yet loose enough for the way models
# pretty-print JSON (forcing one layout makes them fight the mask). The rule of llama.cpp's own
# json-schema-to-grammar (SPACE_RULE in examples/json_schema_to_grammar.py upstream); the same language as a regex
# for llguidance's ``whitespace_pattern``.
SPACE_GBNF = '| " " | "\\n"{1,2} [ \\t]{0,20}'
SPACE_REGEX = r"(?: |\n{1,2}[ \t]{0,20})"

T = TypeVar("T")


def schema_of(output: JsonOutput) -> dict[str, Any]:
    """The JSON Schema the reply must obey (any object for json_object mode)."""
    return output.schema if output.schema is not None else ANY_OBJECT


def schema_text(output: JsonOutput, field: str = "response_format") -> str:
    """The schema as JSON text: the cache key, and what grammar converters read."""
    try:
        return json.dumps(schema_of(output), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field}: the schema is not JSON ({exc})", param=field) from None


class SchemaError(ValueError):
    """The backend cannot enforce this schema; the message says which part, for the client to change."""


class CompiledCache(Generic[T]):
    """The compiled constraints of the ``size`` schemas used last, by schema text and strictness.
    ``compile_schema(text, strict)`` raises SchemaError for a schema the backend cannot enforce: the client gets a
    ConfigError naming the request field the schema came from. Failures are not cached (the client fixes them)."""

    def __init__(self, compile_schema: Callable[[str, bool], T], size: int = 16) -> None:
        self._compile = compile_schema
        self._size = size
        self._entries: OrderedDict[tuple[str, bool], T] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, output: JsonOutput, field: str = "response_format") -> T:
        key = (schema_text(output, field), output.strict)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        try:
            compiled = self._compile(*key)  # outside the lock: a big schema must not hold up the others
        except SchemaError as exc:
            raise ConfigError(f"{field}: {exc}", param=field) from None
        with self._lock:
            self._entries[key] = compiled
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return compiled

    def __len__(self) -> int:
        return len(self._entries)
