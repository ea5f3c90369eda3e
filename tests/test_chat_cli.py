"""`assistant chat --text` as users script it: a subprocess, stdin piped, the offline SmolLM2 GGUF."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from assistant.errors import ModelNotFoundError
from assistant.models import OFFLINE_BUNDLES, install_bundle
from tests.conftest import require

pytestmark = pytest.mark.real_model

GREEDY = ["--set", "llm.sampling.temperature=0", "--set", "llm.sampling.max_new_tokens=24"]


@pytest.fixture(scope="module", autouse=True)
def offline_smollm() -> None:
    require(importlib.util.find_spec("llama_cpp") is not None, "llama-cpp-python is not installed")
    try:
        install_bundle(OFFLINE_BUNDLES["smollm2-135m"])
    except ModelNotFoundError as exc:
        require(False, str(exc))


def chat(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "assistant", "chat", "--text", "--model", "smollm2-135m", *GREEDY, *args]
    return subprocess.run(command, input=stdin, capture_output=True, text=True, timeout=300)


def test_piped_lines_are_turns_and_the_conversation_is_saved(tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    result = chat("--system", "You are a helpful AI assistant.", "--save", str(saved), "--verbose",
                  stdin="What is the capital of France?\n/bogus\nAnd of Italy?\n")  # fmt: skip
    assert result.returncode == 1  # one line failed (the unknown command); the others were answered
    assert "command: unknown command /bogus; /help lists the commands" in result.stderr
    assert "Paris" in result.stdout
    assert result.stderr.count("tok/s") == 2 and "cached" in result.stderr
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in data["messages"]] == ["user", "assistant", "user", "assistant"]
    assert data["system"] == "You are a helpful AI assistant."


def test_load_resumes_and_commands_edit_the_history(tmp_path: Path) -> None:
    saved = tmp_path / "chat.json"
    history = [{"role": "user", "content": "My name is Ada."}, {"role": "assistant", "content": "Hi, Ada!"}]
    saved.write_text(json.dumps({"messages": history}))
    result = chat("--load", str(saved), "--save", str(saved), stdin="/undo\n/system Be terse.\nHello\n/regenerate\n")
    assert result.returncode == 0, result.stderr
    data = json.loads(saved.read_text(encoding="utf-8"))
    assert data["messages"][0]["content"] == "Hello" and len(data["messages"]) == 2
    assert data["system"] == "Be terse." and "removed 2 messages" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "/nowhere/model.gguf"], "model-not-found: model path '/nowhere/model.gguf' does not exist"),
        (["--template", "vicuna"], "config: llm.template: 'vicuna' is not valid"),
        (["--set", "llm.sha256=" + "0" * 64], "model-checksum"),
        (["--backend", "openai"], "config: llm.base_url"),
    ],
    ids=["missing-model", "unknown-template", "bad-checksum", "openai-without-url"],
)
def test_bad_setup_is_one_clear_line_and_exit_2(args: list[str], message: str) -> None:
    if "llm.sha256" in args[-1]:
        args = ["--model", str(install_bundle(OFFLINE_BUNDLES["smollm2-135m"]) / "model.gguf"), *args]
    result = chat(*args, stdin="hi\n")
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
