"""Prompt formats: a conversation (list of Message) -> the exact prompt string a chat model was trained on.

A model's own chat template (transformers ``tokenizer_config.json``, GGUF ``tokenizer.chat_template``) is rendered
here with the same sandboxed Jinja settings transformers uses, so every backend renders prompts one way. Models
without one (FlagAlpha Atom / Llama2-Chinese, many LoRA merges, old GGUF conversions) get a named built-in format.
``auto`` takes the model's own template, else a built-in chosen from the model's name, else refuses: a silently wrong
prompt format is worse than an error.

Rendered prompts contain their special tokens as text (``<s>``, ``<|im_start|>``); backends tokenize them with
special-token parsing on and without adding another BOS. No torch here.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from assistant.errors import TemplateError
from assistant.messages import Message, Tool, ToolCall


class PromptFormat(Protocol):
    name: str
    stop_strings: tuple[str, ...]  # end-of-turn text a model may print instead of its end-of-sequence token

    def render(self, messages: Sequence[Message], *, continue_last: bool = False, tools: Sequence[Tool] = ()) -> str:
        """The prompt for the next reply; with ``continue_last`` the final assistant message is left open; ``tools``
        are described to the model (templates that have a tool format only)."""
        ...


# --- built-in formats ---------------------------------------------------------------------------------------------

Renderer = Callable[[str | None, list[Message], bool], str]


def _llama2_chinese(system: str | None, turns: list[Message], open_last: bool) -> str:
    """FlagAlpha Atom / Llama2-Chinese: ``<s>Human: {user}\\n</s><s>Assistant: {reply}\\n</s>``."""
    parts = [f"<s>System: {system}\n</s>"] if system else []
    for index, turn in enumerate(turns):
        if turn.role == "user":
            parts.append(f"<s>Human: {turn.content}\n</s>")
        elif _is_open(index, turns, open_last):
            parts.append(f"<s>Assistant: {turn.content}")
        else:
            parts.append(f"<s>Assistant: {turn.content}\n</s>")
    if not open_last:
        parts.append("<s>Assistant: ")
    return "".join(parts)


def _llama2_chat(system: str | None, turns: list[Message], open_last: bool) -> str:
    """Meta Llama-2-chat: ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {reply} </s>``."""
    parts = []
    pending_system = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if system else ""
    for index, turn in enumerate(turns):
        if turn.role == "user":
            parts.append(f"<s>[INST] {pending_system}{turn.content.strip()} [/INST]")
            pending_system = ""
        elif _is_open(index, turns, open_last):
            parts.append(f" {turn.content}")
        else:
            parts.append(f" {turn.content.strip()} </s>")
    return "".join(parts)


def _gemma(system: str | None, turns: list[Message], open_last: bool) -> str:
    """Gemma-it turns; Gemma has no system role, so the system prompt opens the first user turn."""
    parts = ["<bos>"]
    folded = fold_system(system, turns)
    for index, turn in enumerate(folded):
        role = "user" if turn.role == "user" else "model"
        if _is_open(index, folded, open_last):
            parts.append(f"<start_of_turn>{role}\n{turn.content}")
        else:
            parts.append(f"<start_of_turn>{role}\n{turn.content.strip()}<end_of_turn>\n")
    if not open_last:
        parts.append("<start_of_turn>model\n")
    return "".join(parts)


def _chatml(system: str | None, turns: list[Message], open_last: bool) -> str:
    """ChatML (Qwen, Yi, many fine-tunes): ``<|im_start|>{role}\\n{content}<|im_end|>\\n``."""
    parts = [f"<|im_start|>system\n{system}<|im_end|>\n"] if system else []
    for index, turn in enumerate(turns):
        if _is_open(index, turns, open_last):
            parts.append(f"<|im_start|>{turn.role}\n{turn.content}")
        else:
            parts.append(f"<|im_start|>{turn.role}\n{turn.content}<|im_end|>\n")
    if not open_last:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)


def _alpaca(system: str | None, turns: list[Message], open_last: bool) -> str:
    """Alpaca / Chinese-Alpaca (llama.cpp ``-ins``): ``### Instruction:\\n{user}\\n\\n### Response:\\n{reply}``."""
    parts = [f"{system}\n\n"] if system else []
    for index, turn in enumerate(turns):
        if turn.role == "user":
            parts.append(f"### Instruction:\n{turn.content}\n\n### Response:\n")
        elif _is_open(index, turns, open_last):
            parts.append(turn.content)
        else:
            parts.append(f"{turn.content}\n\n")
    return "".join(parts)


def _is_open(index: int, turns: list[Message], open_last: bool) -> bool:
    return open_last and index == len(turns) - 1


def fold_system(system: str | None, turns: Sequence[Message]) -> list[Message]:
    """The turns with the system prompt prepended to the first user turn (for formats without a system role)."""
    folded = list(turns)
    if system and folded and folded[0].role == "user":
        folded[0] = Message("user", f"{system}\n\n{folded[0].content}")
    elif system:
        folded.insert(0, Message("user", system))
    return folded


@dataclass(frozen=True)
class BuiltinTemplate:
    name: str
    description: str
    stop_strings: tuple[str, ...]
    renderer: Renderer
    name_pattern: str  # regex matched against a model reference by ``auto``

    def render(self, messages: Sequence[Message], *, continue_last: bool = False, tools: Sequence[Tool] = ()) -> str:
        if tools or any(m.role == "tool" or m.tool_calls for m in messages):
            raise TemplateError(
                f"the built-in template '{self.name}' has no format for tools or tool turns; use a model whose own "
                "chat template supports tools (Qwen2.5 does)",
                param="tools" if tools else "messages",
            )
        system, turns = split_system(messages)
        _check_last(turns, continue_last)
        return self.renderer(system, turns, continue_last)


BUILTIN_TEMPLATES: dict[str, BuiltinTemplate] = {
    template.name: template
    for template in (
        BuiltinTemplate(
            "llama2-chinese",
            "FlagAlpha Atom / Llama2-Chinese: <s>Human: ... </s><s>Assistant: ...",
            ("</s>", "<s>Human:"),
            _llama2_chinese,
            r"atom|llama2-chinese|flagalpha",
        ),
        BuiltinTemplate(
            "llama-2-chat",
            "Meta Llama-2-chat and Chinese-Alpaca-2: [INST] <<SYS>> ... <</SYS>> ... [/INST]",
            ("</s>", "[INST]"),
            _llama2_chat,
            r"llama-?2.*chat|chinese-alpaca-2|chinese-llama-2",
        ),
        BuiltinTemplate(
            "gemma",
            "Gemma-it: <start_of_turn>user ... <end_of_turn>, system folded into the first user turn",
            ("<end_of_turn>", "<start_of_turn>"),
            _gemma,
            r"gemma",
        ),
        BuiltinTemplate(
            "chatml",
            "ChatML (Qwen, Yi): <|im_start|>role ... <|im_end|>",
            ("<|im_end|>", "<|im_start|>"),
            _chatml,
            r"qwen|chatml|\byi-",
        ),
        BuiltinTemplate(
            "alpaca",
            "Alpaca / Chinese-Alpaca (llama.cpp -ins): ### Instruction: ... ### Response:",
            ("### Instruction:",),
            _alpaca,
            r"alpaca",
        ),
    )
}

TEMPLATE_CHOICES: tuple[str, ...] = ("auto", "tokenizer", *BUILTIN_TEMPLATES)


def split_system(messages: Sequence[Message]) -> tuple[str | None, list[Message]]:
    """The system prompt (system messages joined) and the other turns, in order."""
    system = "\n\n".join(m.content for m in messages if m.role == "system") or None
    return system, [m for m in messages if m.role != "system"]


def _check_last(turns: Sequence[Message], continue_last: bool) -> None:
    expected = ("assistant",) if continue_last else ("user", "tool")
    if not turns or turns[-1].role not in expected:
        what = "continuing a reply" if continue_last else "a new reply"
        raise TemplateError(f"{what} needs the conversation to end with a {' or '.join(expected)} message")


# --- the model's own (Jinja) chat template ------------------------------------------------------------------------


class JinjaTemplate:
    """A Hugging Face / GGUF chat template, rendered the way transformers renders it."""

    name = "tokenizer"

    def __init__(self, source: str, *, bos_token: str = "", eos_token: str = "") -> None:
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise_template_exception
        environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        try:
            self._template = environment.from_string(source)
        except TemplateSyntaxError as exc:
            raise TemplateError(
                f"the model's chat template does not parse ({exc}); set llm.template to a built-in"
            ) from None
        self._special = {"bos_token": bos_token, "eos_token": eos_token}
        self.stop_strings: tuple[str, ...] = (eos_token,) if eos_token else ()
        self.source = source

    def render(self, messages: Sequence[Message], *, continue_last: bool = False, tools: Sequence[Tool] = ()) -> str:
        _check_last(split_system(messages)[1], continue_last)
        try:
            return self._render(messages, continue_last, tools)
        except _TemplateRaised as exc:
            if "system" not in str(exc).lower():
                raise TemplateError(f"the model's chat template refused the conversation: {exc}") from None
        # templates that reject a system role (Gemma's) get it folded into the first user turn
        system, turns = split_system(messages)
        return self._render(fold_system(system, turns), continue_last, tools)

    def _render(self, messages: Sequence[Message], continue_last: bool, tools: Sequence[Tool]) -> str:
        from jinja2 import TemplateError as JinjaError

        extra = {"tools": [tool.to_openai() for tool in tools]} if tools else {}
        try:
            text = self._template.render(
                messages=[_as_template_message(m) for m in messages],
                add_generation_prompt=not continue_last,
                **self._special,
                **extra,
            )
        except _TemplateRaised:
            raise
        except JinjaError as exc:
            raise TemplateError(f"the model's chat template failed ({exc}); set llm.template to a built-in") from None
        if continue_last:
            text = _cut_after_final_message(text, messages[-1].content)
        return text


def _as_template_message(message: Message) -> dict[str, Any]:
    """A message as transformers hands it to chat templates: OpenAI's fields, a tool call's ``arguments`` parsed
    into an object (templates write them with ``tojson``; a string would come out quoted twice)."""
    rendered: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        rendered["tool_calls"] = [
            {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": _arguments(call)}}
            for call in message.tool_calls
        ]
    if message.tool_call_id is not None:
        rendered["tool_call_id"] = message.tool_call_id
    return rendered


def _arguments(call: ToolCall) -> Any:
    import json

    try:
        return json.loads(call.arguments)
    except ValueError:
        return call.arguments


class _TemplateRaised(Exception):
    """A template called raise_exception(); kept apart from syntax errors so a system-role refusal can be retried."""


def _raise_template_exception(message: str) -> None:
    raise _TemplateRaised(message)


def _tojson(value: object, indent: int | None = None) -> str:
    import json

    return json.dumps(value, ensure_ascii=False, indent=indent)


def _cut_after_final_message(text: str, content: str) -> str:
    """Drop what a template appends after the last message (its end-of-turn marker), as transformers does."""
    needle = content.strip()
    if not needle:
        raise TemplateError("there is no reply text to continue")
    position = text.rfind(needle)
    if position < 0:
        raise TemplateError("the model's chat template rewrote the last reply, so it cannot be continued")
    return text[: position + len(needle)]


# --- choosing ----------------------------------------------------------------------------------------------------


def choose_template(choice: str, *, model_ref: str, model_template: JinjaTemplate | None) -> PromptFormat:
    """The format ``llm.template`` names; ``model_template`` is the model's own, when it ships one."""
    if choice in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[choice]
    if choice == "tokenizer" or (choice == "auto" and model_template is not None):
        if model_template is None:
            raise TemplateError(
                f"model '{model_ref}' has no chat template of its own; set llm.template to one of "
                f"{', '.join(BUILTIN_TEMPLATES)}"
            )
        return model_template
    if choice == "auto":
        guessed = guess_builtin(model_ref)
        if guessed is None:
            raise TemplateError(
                f"model '{model_ref}' has no chat template and its name does not say which format it was trained on; "
                f"set llm.template to one of {', '.join(BUILTIN_TEMPLATES)}"
            )
        return guessed
    raise TemplateError(f"unknown template {choice!r}; choose one of {', '.join(TEMPLATE_CHOICES)}")


def guess_builtin(model_ref: str) -> BuiltinTemplate | None:
    name = model_ref.lower()
    for template in BUILTIN_TEMPLATES.values():
        if re.search(template.name_pattern, name):
            return template
    return None
