"""The ChatModel contract, and the token-stream machinery the local backends (hf, llama-cpp) share.

``ChatModel.stream(messages, params)`` returns a ``Reply``: an iterator of text deltas that are always whole
characters (a CJK character whose UTF-8 bytes span several tokens is held back until it is complete), ending on
end-of-sequence, a stop string, ``max_new_tokens`` or a cancel event. When it ends, ``reply.stats`` says how it went.
"""

from __future__ import annotations

import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from assistant.config import SamplingConfig
from assistant.errors import AssistantError, LlmError, PromptTooLongError
from assistant.llm.structured import JsonOutput, ToolPlan
from assistant.llm.templates import PromptFormat
from assistant.messages import Message, ReplyStats, ToolCall, ToolUse

REPLACEMENT = "\ufffd"  # what a decoder prints for bytes that are not (yet) a whole UTF-8 character


def generation_failed(exc: BaseException) -> AssistantError:
    """What a failed generation tells the client: our own errors as they are, anything else as ``llm-failed`` with
    its cause; running out of memory (CUDA or host) with the settings that make a turn need less."""
    if isinstance(exc, AssistantError):
        return exc
    if type(exc).__name__ == "OutOfMemoryError" or isinstance(exc, MemoryError):
        return LlmError(
            f"the model ran out of memory while generating ({type(exc).__name__}); this turn is lost, the "
            "conversation is kept. Lower llm.context_tokens or llm.sampling.max_new_tokens, or quantize the model "
            "(llm.quantize: 4bit)"
        )
    detail = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return LlmError(f"generation failed: {type(exc).__name__}{': ' + detail if detail else ''}")


class Reply:
    """The text deltas of one reply as they are generated; ``text``, ``tool_calls`` and ``stats`` are complete once
    it ends. A backend's generator may also yield a ToolCall the moment a call is complete: it goes to
    ``tool_calls`` and the consumer sees an empty delta then (its cue to look)."""

    def __init__(self, produce: Callable[[Reply], Iterator[str | ToolCall]]) -> None:
        self.stats = ReplyStats(finish_reason="cancelled")
        self.tool_calls: list[ToolCall] = []
        self._parts: list[str] = []
        self._deltas = produce(self)

    def __iter__(self) -> Reply:
        return self

    def __next__(self) -> str:
        delta = next(self._deltas)
        if isinstance(delta, ToolCall):
            self.tool_calls.append(delta)
            return ""
        self._parts.append(delta)
        return delta

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def close(self) -> None:
        """Stop generating now (the generator's clean-up runs and ``stats`` is filled in)."""
        self._deltas.close()


class ChatModel(Protocol):
    description: str
    context_tokens: int

    def count_tokens(self, messages: Sequence[Message]) -> int:
        """Tokens of the prompt these messages render to (a trailing assistant message is left open)."""
        ...

    def stream(
        self,
        messages: Sequence[Message],
        params: SamplingConfig,
        *,
        continue_last: bool = False,
        cancel: threading.Event | None = None,
        output: JsonOutput | None = None,
        tool_use: ToolUse | None = None,
    ) -> Reply:
        """The reply to ``messages``. ``output`` constrains it to JSON; ``tool_use`` offers functions, whose calls
        come in ``reply.tool_calls`` (finish_reason ``tool_calls``). Raises PromptTooLongError (prompt over the
        window) and TemplateError (the prompt format cannot hold these messages or tools) before any generation,
        for local backends at the call."""
        ...

    def close(self) -> None:
        """Free the model's memory (and connections)."""
        ...


class IncrementalDetokenizer:
    """Turns token ids into text deltas without ever splitting a character.

    Decoding a window of recent ids twice (without and with the new id) and emitting the difference works for
    byte-level BPE and SentencePiece byte-fallback alike, including the leading-space rules of SentencePiece; a delta
    that still ends in an incomplete UTF-8 sequence is held back until the next ids complete it.
    """

    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self._decode = decode
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # ids before this are already emitted

    def push(self, token: int) -> str:
        self._ids.append(token)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith(REPLACEMENT):
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :].replace(REPLACEMENT, "")

    def flush(self) -> str:
        """What is left when generation ends; bytes that never became a character are dropped, not printed."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset :])
        self._prefix_offset = self._read_offset = len(self._ids)
        return new_text[len(prefix_text) :].replace(REPLACEMENT, "")


class StopMatcher:
    """Cuts the stream before the first stop string, holding back text that might be the start of one."""

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped or not self._stops:
            return "" if self.stopped else text
        self._held += text
        hits = [position for stop in self._stops if (position := self._held.find(stop)) >= 0]
        if hits:
            self.stopped = True
            emitted, self._held = self._held[: min(hits)], ""
            return emitted
        keep = self._partial_suffix_length()
        emitted = self._held[: len(self._held) - keep]
        self._held = self._held[len(self._held) - keep :]
        return emitted

    def flush(self) -> str:
        emitted, self._held = ("" if self.stopped else self._held), ""
        return emitted

    def _partial_suffix_length(self) -> int:
        longest = 0
        for stop in self._stops:
            for length in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:length]):
                    longest = length
                    break
        return longest


class TokenChatModel(ABC):
    """A chat model that runs in this process: render -> tokenize -> sample ids -> whole-character deltas."""

    description: str
    context_tokens: int
    template: PromptFormat

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Ids of a rendered prompt (special-token text parsed, no extra BOS added)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Text of generated ids, special tokens left out."""

    @abstractmethod
    def is_end(self, token: int) -> bool:
        """Whether the token ends a turn (EOS / end-of-generation)."""

    @abstractmethod
    def sample(self, prompt_ids: list[int], params: SamplingConfig, output: JsonOutput | None = None) -> Iterator[int]:
        """New token ids, one at a time, for as long as they are consumed. Reuses cached prompt state if it can.
        With ``output`` only tokens that keep the text a prefix of a JSON value obeying its schema are allowed, and
        once the value is complete only an end-of-generation token."""

    @property
    def cached_tokens(self) -> int:
        """Prompt tokens of the current reply served from the previous turn's cache (set during ``sample``)."""
        return 0

    def prepare_output(self, output: JsonOutput, field: str = "response_format") -> None:  # noqa: B027
        """Compile ``output``'s constraint before any generation (backends cache it), so that a schema the backend
        cannot enforce is refused at the call: ConfigError naming ``field``, the request field it came from."""

    def close(self) -> None:  # noqa: B027 - backends without resources need nothing
        """Free the model."""

    def render(
        self, messages: Sequence[Message], *, continue_last: bool = False, tool_use: ToolUse | None = None
    ) -> str:
        """The prompt text: the template's rendering, with the opening of a forced tool call after it when
        ``tool_use`` requires one (see ``assistant.llm.tools``)."""
        plan = ToolPlan.of(self.template, tool_use)
        return self.template.render(messages, continue_last=continue_last, tools=plan.shown) + plan.prefill

    def count_tokens(self, messages: Sequence[Message], tool_use: ToolUse | None = None) -> int:
        open_reply = bool(messages) and messages[-1].role == "assistant" and not messages[-1].tool_calls
        return len(self.tokenize(self.render(messages, continue_last=open_reply, tool_use=tool_use)))

    def stream(
        self,
        messages: Sequence[Message],
        params: SamplingConfig,
        *,
        continue_last: bool = False,
        cancel: threading.Event | None = None,
        output: JsonOutput | None = None,
        tool_use: ToolUse | None = None,
    ) -> Reply:
        plan = ToolPlan.of(self.template, tool_use)
        prompt_ids = self.tokenize(self.render(messages, continue_last=continue_last, tool_use=tool_use))
        room = self.context_tokens - len(prompt_ids)
        if room < 1:
            raise PromptTooLongError(
                f"the prompt is {len(prompt_ids)} tokens but the context holds {self.context_tokens}; shorten the "
                "conversation or raise llm.context_tokens",
                prompt_tokens=len(prompt_ids),
                context_tokens=self.context_tokens,
            )
        limit = min(room, params.max_new_tokens)
        constraint = plan.constraint or output
        if constraint is not None:
            self.prepare_output(constraint, "tools" if plan.constraint else "response_format")
        if not plan.parses:
            return Reply(lambda reply: self._deltas(reply, prompt_ids, params, limit, cancel, constraint))
        return Reply(
            lambda reply: plan.calls(reply, self._deltas(reply, prompt_ids, params, limit, cancel, constraint))
        )

    def complete(
        self, messages: Sequence[Message], params: SamplingConfig, output: JsonOutput | None = None
    ) -> tuple[str, ReplyStats]:
        """The whole reply at once, decoded once at the end (no stop strings): the non-streaming peer of ``stream``
        (benchmarks compare the two)."""
        started = time.perf_counter()
        prompt_ids = self.tokenize(self.render(messages))
        limit = min(self.context_tokens - len(prompt_ids), params.max_new_tokens)
        generated: list[int] = []
        first_s, finish = 0.0, "length"
        tokens = self.sample(prompt_ids, params, output)
        try:
            for token in tokens:
                first_s = first_s or time.perf_counter() - started
                if self.is_end(token):
                    finish = "stop"
                    break
                generated.append(token)
                if len(generated) >= limit:
                    break
        finally:
            tokens.close()
        text = self.decode(generated).replace(REPLACEMENT, "")
        total_s = time.perf_counter() - started
        return text, ReplyStats(len(prompt_ids), self.cached_tokens, len(generated), first_s, total_s, finish)

    def _deltas(
        self,
        reply: Reply,
        prompt_ids: list[int],
        params: SamplingConfig,
        limit: int,
        cancel: threading.Event | None,
        output: JsonOutput | None = None,
    ) -> Iterator[str]:
        started = time.perf_counter()
        detokenizer = IncrementalDetokenizer(self.decode)
        stops = StopMatcher((*params.stop, *self.template.stop_strings))
        count, first_s, finish = 0, 0.0, "cancelled"
        tokens = self.sample(prompt_ids, params, output)
        try:
            for token in tokens:
                first_s = first_s or time.perf_counter() - started
                if self.is_end(token):
                    finish = "stop"
                    break
                count += 1
                if text := stops.feed(detokenizer.push(token)):
                    yield text
                if stops.stopped:
                    finish = "stop"
                    break
                if count >= limit:
                    finish = "length"
                    break
                if cancel is not None and cancel.is_set():
                    break
            if tail := stops.feed(detokenizer.flush()) + stops.flush():
                yield tail
        finally:
            tokens.close()
            total_s = time.perf_counter() - started
            reply.stats = ReplyStats(len(prompt_ids), self.cached_tokens, count, first_s, total_s, finish)
