"""Growing past one machine: thin front-end replicas (every stage remote) in front of a real `assistant serve` on
127.0.0.1, sharing one conversation directory; a conversation started on one replica resumes on the other, and is
never open on two at once (a lock across processes)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from assistant.conversation import Conversation
from assistant.tts.openai_remote import read_wav
from tests.conftest import require_offline_models, speak
from tests.test_load import rss_mb
from tests.test_server import events_until, start_server, ws_url

pytestmark = [pytest.mark.real_model, pytest.mark.slow]
websockets = pytest.importorskip("websockets")
openai = pytest.importorskip("openai")


def remote_stages(base: str) -> list[str]:
    """Every stage of a replica on the server at ``base``: chat, recognition and speech."""
    settings = {"llm.backend": "openai", "llm.base_url": f"{base}/v1", "asr.backend": "openai",
                "asr.base_url": f"{base}/v1", "asr.model": "whisper-base", "tts.backend": "openai",
                "tts.base_url": f"{base}/v1"}  # fmt: skip
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def test_two_thin_replicas_share_conversations_and_never_open_one_twice(tmp_path: Path) -> None:
    require_offline_models("smollm2-135m", "whisper-base")
    folder = tmp_path / "shared-conversations"
    backend, base = start_server()
    replicas = []
    try:
        for _ in range(2):
            replicas.append(start_server(*remote_stages(base), "--set", f"server.conversation_dir={folder}"))
        (first, first_base), (_, second_base) = replicas
        assert rss_mb(first.pid) < 300, "a replica with every stage remote loads no model"
        # speech through the replica comes from the server behind it, as any OpenAI client would ask for it
        api = openai.OpenAI(base_url=f"{first_base}/v1", api_key="x", max_retries=0, timeout=60)
        wav = api.audio.speech.create(model="tts-1", voice="alloy", input="Hello from the back.", response_format="wav")
        spoken = read_wav(wav.read(), "replica")
        assert spoken.sample_rate == 24000 and spoken.duration_s > 0.5

        async def conversation() -> str:
            async with websockets.connect(ws_url(first_base)) as ws:
                conversation_id = json.loads(await ws.recv())["session"]["conversation_id"]
                item = {"role": "user", "content": "My name is Ada."}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                await ws.send(json.dumps({"type": "response.create"}))
                done = (await events_until(ws, "response.done", timeout=120))[-1]
                assert done["response"]["status"] in ("completed", "incomplete")
                # open here: the other replica refuses it (the lock is the operating system's, across processes)
                async with websockets.connect(f"{ws_url(second_base)}?conversation={conversation_id}") as other:
                    refused = json.loads(await other.recv())
                    assert refused["type"] == "error" and "open in another session" in refused["error"]["message"]
            async with websockets.connect(f"{ws_url(second_base)}?conversation={conversation_id}") as ws:
                created = json.loads(await ws.recv())
                assert created["session"]["history_messages"] == 3  # system prompt, the question, the reply
                item = {"role": "user", "content": "What is my name?"}
                await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
                await ws.send(json.dumps({"type": "response.create"}))
                await events_until(ws, "response.done", timeout=120)
            return str(conversation_id)

        conversation_id = asyncio.run(conversation())
        saved = Conversation.load(folder / f"{conversation_id}.json")
        assert [t.role for t in saved.turns] == ["user", "assistant", "user", "assistant"]
        assert saved.turns[0].content == "My name is Ada." and saved.turns[2].content == "What is my name?"
    finally:
        for process, _ in [*replicas, (backend, base)]:
            process.terminate()
            process.wait(timeout=30)


def test_a_streamed_wav_with_no_length_is_read_to_its_end() -> None:
    """OpenAI streams WAV with 0xFFFFFFFF as the RIFF and data lengths."""
    import struct

    import numpy as np

    samples = (np.sin(np.arange(2400) / 5) * 16000).astype("<i2").tobytes()
    pcm16_mono_24k = struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000, 2, 16)
    header = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + pcm16_mono_24k
    streamed = header + b"data" + struct.pack("<I", 0xFFFFFFFF) + samples
    audio = read_wav(streamed, "test")
    assert audio.sample_rate == 24000 and len(audio.samples) == 2400


def test_batch_on_a_local_ray_instance_writes_what_a_local_run_writes(tmp_path: Path) -> None:
    """`assistant transcribe --ray` (two actors on a local Ray instance) against the plain local run: the same text
    for every file, the same failure line for a broken one, the same exit code."""
    import subprocess
    import sys

    require_offline_models("whisper-base")
    pytest.importorskip("ray")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for index, sentence in enumerate(["The budget for next year is ready.", "Lunch is served at noon on Fridays.",
                                      "We will hire two engineers in March."]):  # fmt: skip
        speak(sentence, inputs / f"clip{index}.wav")
    (inputs / "broken.mp3").write_bytes(b"not audio at all")
    runs = {}
    for name, extra in {"local": [], "ray": ["--ray", "--set", "transcribe.ray_workers=2"]}.items():
        out = tmp_path / name
        command = [sys.executable, "-m", "assistant", "transcribe", str(inputs), "--format", "json", "--output-dir",
                   str(out), "--set", "asr.threads=1", "--quiet", *extra]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        texts = {p.stem: json.loads(p.read_text())["text"] for p in out.glob("*.json")}
        failed = [line for line in done.stderr.splitlines() if line.startswith("audio-decode:")]
        runs[name] = (done.returncode, texts, failed)
    assert runs["ray"] == runs["local"], runs
    code, texts, failed = runs["local"]
    assert code == 1 and len(texts) == 3 and len(failed) == 1 and str(inputs / "broken.mp3") in failed[0]


def test_the_compose_deployment_matches_the_replica_configuration() -> None:
    """What can be checked of docs/deploy without Docker: the replica config points at the compose services, and the
    files the compose file and the Dockerfile name exist."""
    from urllib.parse import urlparse

    import yaml

    from assistant.config import load_config

    root = Path(__file__).parents[1]
    compose = yaml.safe_load((root / "docs" / "deploy" / "compose.yaml").read_text())
    replica = load_config(root / "configs" / "replica-vllm.yaml")
    services = compose["services"]
    for stage in (replica.asr, replica.llm, replica.tts):
        assert urlparse(stage.base_url).hostname in services, stage
    assert replica.server.conversation_dir == "/conversations"
    assert "conversations:/conversations" in services["assistant"]["volumes"]
    dockerfile = (root / "docs" / "deploy" / "Dockerfile").read_text()
    assert "configs/replica-vllm.yaml" in dockerfile and (root / "docs" / "deploy" / "nginx.conf").is_file()
    for line in dockerfile.splitlines():
        if line.startswith("COPY "):
            assert all((root / part).exists() for part in line.split()[1:-1]), line
