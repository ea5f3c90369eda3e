"""Fuzz tier: generated input into the config loader, the audio decoder entry point, the chat template renderer,
the conversation file reader and the WebSocket event parser. Anything but the project's own errors (with a code) is
a bug. Bounded by hypothesis settings so the tier stays fast in CI; FUZZ_EXAMPLES raises the count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.reliability
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from assistant.config import Config, build, load_config  # noqa: E402
from assistant.conversation import Conversation  # noqa: E402
from assistant.errors import AssistantError  # noqa: E402
from assistant.llm.templates import BUILTIN_TEMPLATES, JinjaTemplate  # noqa: E402
from assistant.messages import Message  # noqa: E402

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
section_names = st.sampled_from(["asr", "vad", "llm", "tts", "chat", "input", "output", "server", "transcribe", "x"])
field_names = st.sampled_from(["model", "backend", "sampling", "temperature", "batch_size", "sinks", "port",
                               "template", "stop", "speaker", "voice", "speed", "english_voice", "chinese_voice",
                               "threshold", "formats", "api_key", "nope"])  # fmt: skip


def code_of(exc: AssistantError) -> str:
    assert exc.code and exc.code != "error", f"error without a specific code: {exc!r}"
    return exc.code


@FUZZ
@given(st.dictionaries(section_names, st.dictionaries(field_names, json_values, max_size=4), max_size=4))
def test_config_structures(data: dict) -> None:
    try:
        build(Config, data, "")
    except AssistantError as exc:
        assert code_of(exc) == "config"


@FUZZ
@given(st.lists(st.text(max_size=40), max_size=4))
def test_config_overrides(overrides: list[str]) -> None:
    try:
        load_config(overrides=overrides)
    except AssistantError as exc:
        assert code_of(exc) == "config"


@FUZZ
@given(st.binary(max_size=4096))
def test_config_file_bytes(tmp_path_factory: pytest.TempPathFactory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_bytes(raw)
    try:
        load_config(path)
    except AssistantError as exc:
        assert code_of(exc) == "config"


messages = st.lists(
    st.builds(Message, st.sampled_from(["system", "user", "assistant"]), st.text(max_size=60), st.booleans()),
    max_size=8,
)


@FUZZ
@given(st.sampled_from(sorted(BUILTIN_TEMPLATES)), messages, st.booleans())
def test_builtin_templates(name: str, conversation: list[Message], continue_last: bool) -> None:
    try:
        rendered = BUILTIN_TEMPLATES[name].render(conversation, continue_last=continue_last)
    except AssistantError as exc:
        assert code_of(exc) == "template"
        return
    assert isinstance(rendered, str)


@FUZZ
@given(st.text(max_size=200), messages, st.booleans())
def test_model_templates_from_arbitrary_jinja(source: str, conversation: list[Message], continue_last: bool) -> None:
    try:
        JinjaTemplate(source, bos_token="<s>", eos_token="</s>").render(conversation, continue_last=continue_last)
    except AssistantError as exc:
        assert code_of(exc) == "template"


@FUZZ
@given(json_values)
def test_conversation_files(data: object) -> None:
    try:
        Conversation.from_json(data)
    except AssistantError as exc:
        assert code_of(exc) == "conversation"


@FUZZ
@given(st.one_of(st.text(max_size=300), json_values.map(json.dumps), st.builds(
    lambda kind, extra: json.dumps({"type": kind, **extra}),
    st.sampled_from(["session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                     "conversation.item.create", "response.create", "response.cancel", "auth", "??"]),
    st.dictionaries(st.sampled_from(["audio", "item", "session", "api_key"]), json_values, max_size=3))))  # fmt: skip
def test_websocket_event_parser(text: str) -> None:
    from assistant.io.realtime import parse_event

    try:
        event = parse_event(text)
    except AssistantError as exc:
        assert code_of(exc) == "config"
        return
    assert isinstance(event, dict) and isinstance(event["type"], str)


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(st.binary(min_size=0, max_size=2048), st.sampled_from([".wav", ".mp3", ".m4a", ".ogg", ".bin"]))
def test_audio_decoder_entry_point(tmp_path_factory: pytest.TempPathFactory, raw: bytes, suffix: str) -> None:
    from assistant.audio.decode import load_audio

    path: Path = tmp_path_factory.mktemp("audio") / f"input{suffix}"
    path.write_bytes(raw)
    try:
        load_audio(path)
    except AssistantError as exc:
        assert code_of(exc) == "audio-decode"
