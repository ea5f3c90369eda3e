"""Saved conversations under ``server.conversation_dir``: where each lives and how clients list, read, rename, delete
and export them (``/v1/conversations``, shaped like OpenAI's Conversations API: ``conversation`` objects with
``metadata``, ``items`` as message items; listing and export are this server's additions).

With API keys, each key's conversations live in a folder of their own (the first 16 hex digits of the key's
SHA-256), so one client can neither list nor open another's. Ids are file names and nothing else.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from assistant.conversation import Conversation
from assistant.errors import AssistantError, ConfigError, ConversationError, NotFoundError
from assistant.messages import Message

CONVERSATION_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a file name under server.conversation_dir, nothing more
MAX_TITLE_CHARS = 200


@dataclass(frozen=True)
class ConversationStore:
    """The folder of saved conversations."""

    root: Path

    def folder(self, key: str) -> Path:
        return self.root / (hashlib.sha256(key.encode()).hexdigest()[:16] if key else "")

    def path_of(self, key: str, conversation_id: str) -> Path:
        """The file of ``conversation_id`` for ``key``; ConfigError for an id that is not one of ours."""
        if not CONVERSATION_ID.fullmatch(conversation_id):
            raise ConfigError("conversation id: 1-64 letters, digits, '-' or '_' (the id session.created gave)")
        return self.folder(key) / f"{conversation_id}.json"

    def load(self, key: str, conversation_id: str) -> Conversation:
        path = self.path_of(key, conversation_id)
        if not path.is_file():
            raise NotFoundError(f"no conversation '{conversation_id}'; GET /v1/conversations lists yours")
        return Conversation.load(path)

    def listing(self, key: str) -> list[dict[str, Any]]:
        """Every readable conversation of ``key``, the most recently changed first (unreadable files are skipped:
        opening one by id says what is wrong with it)."""
        found = []
        folder = self.folder(key)
        for path in folder.glob("*.json") if folder.is_dir() else ():
            if not CONVERSATION_ID.fullmatch(path.stem):
                continue
            try:
                found.append(describe(path.stem, Conversation.load(path), path.stat().st_mtime))
            except (AssistantError, OSError):
                continue
        return sorted(found, key=lambda item: item["updated_at"], reverse=True)

    def rename(self, key: str, conversation_id: str, metadata: Any) -> dict[str, Any]:
        """OpenAI's update: ``metadata`` holds the title (the only key kept); an empty title clears it."""
        if not isinstance(metadata, dict) or set(metadata) - {"title"}:
            raise ConfigError('metadata: give {"title": "..."}; no other key is kept')
        title = metadata.get("title")
        if title is not None and (not isinstance(title, str) or len(title) > MAX_TITLE_CHARS):
            raise ConfigError(f"metadata.title: a string of at most {MAX_TITLE_CHARS} characters")
        conversation = self.load(key, conversation_id)
        conversation.title = title.strip() if title and title.strip() else None
        path = conversation.save(self.path_of(key, conversation_id))
        return describe(conversation_id, conversation, path.stat().st_mtime)

    def delete(self, key: str, conversation_id: str) -> None:
        path = self.path_of(key, conversation_id)
        if not path.is_file():
            raise NotFoundError(f"no conversation '{conversation_id}'; GET /v1/conversations lists yours")
        try:
            path.unlink()
        except OSError as exc:
            raise ConversationError(f"conversation '{conversation_id}' was not deleted: {exc.strerror}") from None


def describe(conversation_id: str, conversation: Conversation, updated_at: float) -> dict[str, Any]:
    """OpenAI's ``conversation`` object, with this server's ``title`` (the name to show), ``updated_at`` and
    ``message_count``."""
    return {
        "id": conversation_id, "object": "conversation", "created_at": conversation.created_at,
        "metadata": {"title": conversation.title} if conversation.title else {},
        "title": conversation.summary(), "updated_at": int(updated_at), "message_count": len(conversation.turns),
    }  # fmt: skip


def _message_items(suffix: str, message: Message) -> list[dict[str, Any]]:
    """One message as OpenAI's items: a ``message``; an assistant turn's calls as ``function_call`` items and a tool
    result as a ``function_call_output``, as the Conversations API shows them."""
    if message.role == "tool":
        return [{"type": "function_call_output", "id": f"fco_{suffix}", "call_id": message.tool_call_id,
                 "output": message.content, "status": "completed"}]  # fmt: skip
    found = []
    if message.content or not message.tool_calls:
        found.append(
            {
                "type": "message",
                "id": f"msg_{suffix}",
                "role": message.role,
                "status": "incomplete" if message.cut else "completed",
                "content": [_text_part(message)],
            }
        )
    found += [{"type": "function_call", "id": f"fc_{suffix}_{number}", "call_id": call.id, "name": call.name,
               "arguments": call.arguments, "status": "completed"}
              for number, call in enumerate(message.tool_calls)]  # fmt: skip
    return found


def _text_part(message: Message) -> dict[str, Any]:
    """The message's text as OpenAI's content part: ``input_text`` for what people and instructions said,
    ``output_text`` (with its ``annotations``, none here) for the model's."""
    if message.role == "assistant":
        return {"type": "output_text", "text": message.content, "annotations": []}
    return {"type": "input_text", "text": message.content}


def items(conversation_id: str, conversation: Conversation, *, order: str = "desc", limit: int = 20,
          after: str | None = None) -> dict[str, Any]:  # fmt: skip
    """The messages as OpenAI's conversation items (a cut reply is ``incomplete``), paged as OpenAI pages them:
    ``order`` desc (newest first, OpenAI's default) or asc, ``limit`` 1-100, ``after`` an item id."""
    if order not in ("asc", "desc"):
        raise ConfigError(f"order {order!r}: choose asc or desc")
    if not 1 <= limit <= 100:
        raise ConfigError(f"limit {limit}: give 1 to 100")
    every = [item for index, message in enumerate(conversation.turns)
             for item in _message_items(f"{conversation_id[:8]}_{index}", message)]  # fmt: skip
    if order == "desc":
        every.reverse()
    if after is not None:
        ids = [item["id"] for item in every]
        if after not in ids:
            raise ConfigError(f"after {after!r}: not an item of conversation '{conversation_id}'")
        every = every[ids.index(after) + 1 :]
    data = every[:limit]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(every) > limit}  # fmt: skip
