"""Prompt formats: each built-in's exact string for a multi-turn conversation with a system prompt."""

from __future__ import annotations

import pytest

from assistant.errors import TemplateError
from assistant.llm.templates import BUILTIN_TEMPLATES, JinjaTemplate, choose_template, guess_builtin
from assistant.messages import Message

CONVERSATION = [
    Message("system", "你是助手。"),
    Message("user", "你好"),
    Message("assistant", "你好！有什么可以帮你？"),
    Message("user", "1+1=?"),
]

EXPECTED = {
    "llama2-chinese": (
        "<s>System: 你是助手。\n</s><s>Human: 你好\n</s><s>Assistant: 你好！有什么可以帮你？\n</s>"
        "<s>Human: 1+1=?\n</s><s>Assistant: "
    ),
    "llama-2-chat": (
        "<s>[INST] <<SYS>>\n你是助手。\n<</SYS>>\n\n你好 [/INST] 你好！有什么可以帮你？ </s><s>[INST] 1+1=? [/INST]"
    ),
    "gemma": (
        "<bos><start_of_turn>user\n你是助手。\n\n你好<end_of_turn>\n<start_of_turn>model\n你好！有什么可以帮你？<end_of_turn>\n"
        "<start_of_turn>user\n1+1=?<end_of_turn>\n<start_of_turn>model\n"
    ),
    "chatml": (
        "<|im_start|>system\n你是助手。<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n"
        "<|im_start|>assistant\n你好！有什么可以帮你？<|im_end|>\n<|im_start|>user\n1+1=?<|im_end|>\n"
        "<|im_start|>assistant\n"
    ),
    "alpaca": (
        "你是助手。\n\n### Instruction:\n你好\n\n### Response:\n你好！有什么可以帮你？\n\n"
        "### Instruction:\n1+1=?\n\n### Response:\n"
    ),
}

CONTINUED = {
    "llama2-chinese": "<s>Human: 讲个故事\n</s><s>Assistant: 从前有座山",
    "llama-2-chat": "<s>[INST] 讲个故事 [/INST] 从前有座山",
    "gemma": "<bos><start_of_turn>user\n讲个故事<end_of_turn>\n<start_of_turn>model\n从前有座山",
    "chatml": "<|im_start|>user\n讲个故事<|im_end|>\n<|im_start|>assistant\n从前有座山",
    "alpaca": "### Instruction:\n讲个故事\n\n### Response:\n从前有座山",
}


def test_every_builtin_is_pinned() -> None:
    assert set(EXPECTED) == set(BUILTIN_TEMPLATES) == set(CONTINUED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_renders_multi_turn_with_system(name: str) -> None:
    assert BUILTIN_TEMPLATES[name].render(CONVERSATION) == EXPECTED[name]


@pytest.mark.parametrize("name", sorted(CONTINUED))
def test_builtin_leaves_the_last_reply_open_to_continue(name: str) -> None:
    messages = [Message("user", "讲个故事"), Message("assistant", "从前有座山")]
    assert BUILTIN_TEMPLATES[name].render(messages, continue_last=True) == CONTINUED[name]


def test_gemma_without_system_starts_with_the_user() -> None:
    rendered = BUILTIN_TEMPLATES["gemma"].render([Message("user", "hi")])
    assert rendered == "<bos><start_of_turn>user\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_a_new_reply_needs_a_user_message_last() -> None:
    with pytest.raises(TemplateError, match="end with a user or tool message"):
        BUILTIN_TEMPLATES["chatml"].render([Message("user", "a"), Message("assistant", "b")])


CHATML_JINJA = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
NO_SYSTEM_JINJA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)


def test_model_template_renders_like_the_builtin_it_matches() -> None:
    assert JinjaTemplate(CHATML_JINJA).render(CONVERSATION) == EXPECTED["chatml"]


def test_model_template_continue_cuts_the_end_of_turn_marker() -> None:
    messages = [Message("user", "讲个故事"), Message("assistant", "从前有座山")]
    assert JinjaTemplate(CHATML_JINJA).render(messages, continue_last=True) == CONTINUED["chatml"]


def test_template_refusing_a_system_role_gets_it_folded_into_the_first_turn() -> None:
    rendered = JinjaTemplate(NO_SYSTEM_JINJA, bos_token="<bos>").render(
        [Message("system", "Be brief."), Message("user", "hi")]
    )
    assert rendered == "<bos><start_of_turn>user\nBe brief.\n\nhi<end_of_turn>\n<start_of_turn>model\n"


def test_broken_model_template_is_a_clear_error() -> None:
    with pytest.raises(TemplateError, match="does not parse"):
        JinjaTemplate("{% for %}")


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("FlagAlpha/Atom-7B-Chat", "llama2-chinese"),
        ("FlagAlpha/Llama2-Chinese-13b-Chat", "llama2-chinese"),
        ("meta-llama/Llama-2-7b-chat-hf", "llama-2-chat"),
        ("LinkSoul/Chinese-Llama-2-7b", "llama-2-chat"),
        ("hfl/chinese-alpaca-2-7b", "llama-2-chat"),
        ("google/gemma-2b-it", "gemma"),
        ("Qwen/Qwen2.5-7B-Instruct", "chatml"),
        ("ymcui/chinese-alpaca-7b", "alpaca"),
    ],
)
def test_auto_guesses_from_the_model_name(model: str, expected: str) -> None:
    guessed = guess_builtin(model)
    assert guessed is not None and guessed.name == expected


def test_auto_prefers_the_models_own_template() -> None:
    own = JinjaTemplate(CHATML_JINJA)
    assert choose_template("auto", model_ref="FlagAlpha/Atom-7B-Chat", model_template=own) is own
    assert choose_template("gemma", model_ref="x", model_template=own) is BUILTIN_TEMPLATES["gemma"]


def test_auto_refuses_to_guess_blindly() -> None:
    with pytest.raises(TemplateError, match="set llm.template to one of"):
        choose_template("auto", model_ref="/models/my-merge", model_template=None)
    with pytest.raises(TemplateError, match="has no chat template"):
        choose_template("tokenizer", model_ref="/models/my-merge", model_template=None)
    with pytest.raises(TemplateError, match="unknown template"):
        choose_template("vicuna", model_ref="x", model_template=None)
