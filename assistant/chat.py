"""Where the conversation and the chat model meet: one turn at a time, with the history kept consistent.

A reply is committed to the history when its stream ends: whole when the model finished, marked ``cut`` when it was
cancelled or interrupted (Ctrl-C, a client that went away). When generation fails the history is left exactly as it
was before the turn, so a failed turn never corrupts a conversation or its saved file.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

from assistant.config import LlmConfig, SamplingConfig
from assistant.conversation import Conversation, load_persona
from assistant.errors import ConversationError
from assistant.llm.base import ChatModel, Reply, generation_failed


class ChatSession:
    """One conversation with one model. Not thread-safe: one turn at a time."""

    def __init__(self, model: ChatModel, conversation: Conversation, sampling: SamplingConfig) -> None:
        self.model = model
        self.conversation = conversation
        self.sampling = sampling

    @classmethod
    def from_config(cls, model: ChatModel, config: LlmConfig) -> ChatSession:
        persona = load_persona(config.persona) if config.persona else None
        return cls(model, Conversation(config.system, persona=persona), config.sampling)

    def resume(self, conversation: Conversation) -> None:
        """Continue a loaded conversation: it keeps this session's persona, and its system prompt when it has none."""
        conversation.persona = self.conversation.persona
        if not conversation.system:
            conversation.system = self.conversation.system
        self.conversation = conversation

    def send(self, text: str, *, cancel: threading.Event | None = None) -> Reply:
        """Add a user turn and stream the reply to it."""
        if not text.strip():
            raise ConversationError("the message is empty; type something to send")
        self.conversation.add_user(text)
        try:
            return self._reply(continue_last=False, cancel=cancel, undo=self.conversation.drop_last_user)
        except BaseException:
            self.conversation.drop_last_user()
            raise

    def reply(self, *, cancel: threading.Event | None = None) -> Reply:
        """Answer the last user message, already in the history (a Realtime client's item). A failed reply removes
        that message again, so the history is as it was before the turn."""
        last = self.conversation.turns[-1] if self.conversation.turns else None
        if last is None or last.role != "user":
            raise ConversationError("there is no user message to answer; add one first")
        try:
            return self._reply(continue_last=False, cancel=cancel, undo=self.conversation.drop_last_user)
        except BaseException:  # refused before it started (the prompt is too long): the message goes too
            self.conversation.drop_last_user()
            raise

    def regenerate(self, *, cancel: threading.Event | None = None) -> Reply:
        """Replace the last reply with a new one."""
        previous = self.conversation.drop_last_reply()
        try:
            return self._reply(
                continue_last=False,
                cancel=cancel,
                undo=lambda: self.conversation.add_reply(previous.content, cut=previous.cut),
            )
        except BaseException:
            self.conversation.add_reply(previous.content, cut=previous.cut)
            raise

    def continue_reply(self, *, cancel: threading.Event | None = None) -> Reply:
        """Extend the last reply where it stopped (a cut reply, or one that hit max_new_tokens)."""
        last = self.conversation.last_reply()
        if last is None:
            raise ConversationError("there is no reply to continue; send a message first")
        if not last.content.strip():
            return self.regenerate(cancel=cancel)
        return self._reply(continue_last=True, cancel=cancel, undo=lambda: None)

    def _reply(self, *, continue_last: bool, cancel: threading.Event | None, undo: Callable[[], object]) -> Reply:
        # room kept for the reply: max_new_tokens, but never more than half the context (a client asking for
        # 4096 or "inf" tokens gets a reply that ends at the context's end, not a prompt-too-long error)
        budget = self.model.context_tokens - min(self.sampling.max_new_tokens, self.model.context_tokens // 2)
        window = self.conversation.window(self.model.count_tokens, budget)
        inner = self.model.stream(window, self.sampling, continue_last=continue_last, cancel=cancel)
        return Reply(lambda outer: self._committed(outer, inner, undo))

    def _committed(self, outer: Reply, inner: Reply, undo: Callable[[], object]) -> Iterator[str]:
        """Pass the deltas through; record the reply in the history however the stream ends."""
        finished = False
        try:
            yield from inner
            finished = True
        except Exception as exc:
            inner.close()
            undo()
            failure = generation_failed(exc)
            if failure is exc:
                raise
            raise failure from exc
        except BaseException:  # Ctrl-C or the consumer closing the stream: keep what was said, marked cut
            inner.close()
            self.conversation.add_reply(inner.text, cut=True)
            outer.stats = inner.stats
            raise
        finally:
            if finished:
                self.conversation.add_reply(inner.text, cut=inner.stats.finish_reason == "cancelled")
                outer.stats = inner.stats
