"""Fault tier: what goes wrong around a running `assistant serve`, and what must hold when it does.

Each fault ends in a clear error for the affected turn or request only, and the server keeps serving:
a backend raising mid-stream and running out of memory (injected into a real transformers model behind a real
server on 127.0.0.1), a client killed mid-upload and mid-reply, ffmpeg killed mid-decode, the conversation
directory full or read-only (a small tmpfs of the test's own), and ``kill -9`` of the server or of a writer in the
middle of saving a conversation (the file on disk is always the previous one or the new one, never broken)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assistant.conversation import Conversation
from tests.conftest import meeting_speech, require, require_offline_models, require_tool, speak
from tests.conftest import served_chat_model as served
from tests.test_server import ANSWERED, events_until, free_port, start_server, ws_url

pytestmark = [pytest.mark.real_model, pytest.mark.reliability]
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")


def health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{base}/health", timeout=10) as response:
        return dict(json.loads(response.read()))


def open_sessions(base: str) -> float:
    """The server's open-sessions gauge, read with Prometheus' own parser (/health tells strangers only "ok")."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
        families = text_string_to_metric_families(response.read().decode())
        return float(next(s.value for f in families for s in f.samples if s.name == "assistant_open_sessions"))


async def typed_turn(ws: Any, text: str) -> list[dict[str, Any]]:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": text}}))
    await ws.send(json.dumps({"type": "response.create"}))
    return await events_until(ws, "response.done")


# --- a failing backend, injected into a real model behind a real server -------------------------------------------


class Faults:
    """Makes the model's forward pass raise once, on the n-th call after ``arm``."""

    def __init__(self, model: Any) -> None:
        self._forward = model.forward
        self._countdown: int | None = None
        self._error: BaseException | None = None
        model.forward = self._call

    def arm(self, error: BaseException, after_calls: int) -> None:
        self._error, self._countdown = error, after_calls

    def _call(self, *args: Any, **kwargs: Any) -> Any:
        if self._countdown is not None:
            self._countdown -= 1
            if self._countdown <= 0:
                self._countdown = None
                assert self._error is not None
                raise self._error
        return self._forward(*args, **kwargs)


@pytest.fixture(scope="module")
def faulty_server(tiny_chat_model: Path) -> Iterator[tuple[str, Faults]]:
    """The real app on uvicorn in this process, its chat model a tiny transformers model we can make fail."""
    import uvicorn

    require_offline_models("whisper-base")
    from assistant.config import Config, LlmConfig, SamplingConfig, ServerConfig
    from assistant.io.server import Services, create_app, deadline_protocol
    from assistant.llm.hf import HFChatModel
    from assistant.pipeline import TranscriptionPipeline
    from assistant.tts import Speech
    from assistant.worker import ModelWorker

    sampling = SamplingConfig(temperature=0, max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.0)
    llm = LlmConfig(backend="hf", model=str(tiny_chat_model), system=None, context_tokens=512, sampling=sampling)
    config = Config(llm=llm, server=ServerConfig(port=free_port()))
    chat_model = HFChatModel(llm)
    faults = Faults(chat_model._model)
    services = Services(config, chat_model, TranscriptionPipeline.from_config(config), ModelWorker(4), (),
                        Speech.from_config(config.tts), ModelWorker(4, name="speech-worker"))  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(create_app(services), host="127.0.0.1", port=config.server.port,
                                           log_level="warning", http=deadline_protocol(30)))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{config.server.port}", faults
    server.should_exit = True
    thread.join(timeout=30)


def test_backend_raising_mid_stream_fails_that_request_only(faulty_server: tuple[str, Faults]) -> None:
    import torch

    base, faults = faulty_server
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "你好"}]
    faults.arm(RuntimeError("CUDA error: an illegal memory access was encountered"), after_calls=4)
    received = []
    with pytest.raises(openai.APIError, match="generation failed: RuntimeError: CUDA error"):
        for chunk in api.chat.completions.create(model=served(api), messages=messages, stream=True):
            received.append(chunk)
    assert len(received) > 1  # it failed in the middle of the stream, after some text
    faults.arm(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), after_calls=3)
    with pytest.raises(openai.InternalServerError, match="ran out of memory.*llm.context_tokens") as failed:
        api.chat.completions.create(model=served(api), messages=messages)
    assert failed.value.status_code == 500
    answer = api.chat.completions.create(model=served(api), messages=messages)  # the next request is served as usual
    assert answer.choices[0].message.content and answer.usage and answer.usage.completion_tokens == 12


def test_out_of_memory_mid_reply_fails_that_turn_and_keeps_the_conversation(
    faulty_server: tuple[str, Faults],
) -> None:
    import torch

    base, faults = faulty_server

    async def session() -> None:
        async with websockets.connect(ws_url(base)) as ws:
            await events_until(ws, "session.created")
            assert (await typed_turn(ws, "第一个问题"))[-1]["response"]["status"] in ANSWERED
            faults.arm(torch.OutOfMemoryError("CUDA out of memory"), after_calls=5)
            failed = await typed_turn_until_error(ws, "第二个问题")
            assert failed["error"]["code"] == "llm-failed" and "ran out of memory" in failed["error"]["message"]
            assert (await typed_turn(ws, "第三个问题"))[-1]["response"]["status"] in ANSWERED
            await ws.send(json.dumps({"type": "session.update", "session": {}}))
            updated = (await events_until(ws, "session.updated"))[-1]
            assert updated["session"]["history_messages"] == 4  # turns 1 and 3; the failed turn left no trace

    asyncio.run(session())


async def typed_turn_until_error(ws: Any, text: str) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "conversation.item.create", "item": {"role": "user", "content": text}}))
    await ws.send(json.dumps({"type": "response.create"}))
    error = (await events_until(ws, "error"))[-1]
    # as in the Realtime API, every response ends with response.done: here with status failed and the same error
    done = (await events_until(ws, "response.done"))[-1]["response"]
    assert done["status"] == "failed" and done["status_details"]["error"]["code"] == error["error"]["code"]
    return error


# --- a real server process and what happens around it -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_disk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 256 KB tmpfs of our own, so the conversation directory can really fill up and really turn read-only."""
    folder = tmp_path_factory.mktemp("small-disk")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True)
    require(mounted.returncode == 0, f"cannot mount a tmpfs here (root with CAP_SYS_ADMIN needed): {mounted.stderr!r}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


@dataclasses.dataclass
class RunningServer:
    base: str
    process: subprocess.Popen
    uploads: Path  # its TMPDIR, where uploads are spooled


@pytest.fixture(scope="module")
def server(small_disk: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    require_offline_models("smollm2-135m", "whisper-base")
    uploads = tmp_path_factory.mktemp("server-tmp")
    process, base = start_server(
        "--set", f"server.conversation_dir={small_disk / 'conversations'}", "--set", "transcribe.block_s=60",
        "--set", "llm.sampling.max_new_tokens=16", env={**os.environ, "TMPDIR": str(uploads)},
    )  # fmt: skip
    yield RunningServer(base, process, uploads)
    process.terminate()
    process.wait(timeout=30)


def run_client(code: str) -> subprocess.Popen:
    """A client in its own process, so the test can kill it like a crashing app or a pulled cable."""
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, text=True)


def test_client_killed_mid_upload_leaves_nothing_behind(server: RunningServer) -> None:
    base = server.base
    port = base.rsplit(":", 1)[1]
    uploader = run_client(f"""
        import socket, time
        s = socket.create_connection(("127.0.0.1", {port}))
        boundary = "xyz"
        head = (f"--{{boundary}}\\r\\nContent-Disposition: form-data; name=\\"file\\"; filename=\\"a.wav\\"\\r\\n"
                "Content-Type: audio/wav\\r\\n\\r\\n").encode()
        s.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\\r\\nHost: 127.0.0.1:{port}\\r\\n"
                   f"Content-Length: 5000000\\r\\n"
                   f"Content-Type: multipart/form-data; boundary={{boundary}}\\r\\n\\r\\n").encode() + head)
        s.sendall(b"\\0" * 2_000_000)
        print("sent", flush=True)
        time.sleep(60)
    """)
    try:
        assert uploader.stdout is not None and uploader.stdout.readline().strip() == "sent"
        wait_for(lambda: spooled_uploads(server) > 0)  # the upload is being spooled to a temporary file
    finally:
        uploader.send_signal(signal.SIGKILL)
        uploader.wait()
    wait_for(lambda: spooled_uploads(server) == 0)  # the partial upload was dropped, its file closed
    assert not any(server.uploads.iterdir())
    assert health(base)["status"] == "ok"


def test_a_client_that_leaves_mid_transcription_stops_its_work(server: RunningServer, tmp_path: Path) -> None:
    """Uploads are transcribed one at a time: if an abandoned one ran on, the next client's upload would wait for
    all of it (the trial saw a 300 s client timeout, then the SDK's retry queued the same file behind itself)."""
    long_file, _ = meeting_speech(10, tmp_path)  # about 40 s of work on this CPU
    short = speak("What is the capital of France?", tmp_path / "short.wav", words_per_minute=120)
    impatient = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=4)
    with pytest.raises(openai.APITimeoutError), long_file.open("rb") as audio:
        impatient.audio.transcriptions.create(model="whisper-1", file=audio)  # gives up after 4 s and hangs up
    started = time.monotonic()
    patient = openai.OpenAI(base_url=f"{server.base}/v1", api_key="x", max_retries=0, timeout=120)
    with short.open("rb") as audio:
        text = patient.audio.transcriptions.create(model="whisper-1", file=audio).text
    waited = time.monotonic() - started
    assert "capital" in text.lower() and waited < 15, f"the next upload waited {waited:.1f} s ({text!r})"


def spooled_uploads(server: RunningServer) -> int:
    """Files the server holds open in its temporary directory (spooled uploads are unlinked while open)."""
    folder = str(server.uploads)
    count = 0
    for descriptor in Path(f"/proc/{server.process.pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            count += os.readlink(descriptor).startswith(folder)
    return count


def wait_for(condition: Any, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def test_client_killed_mid_reply_frees_its_session_and_the_worker(server: RunningServer) -> None:
    base = server.base
    talker = run_client(f"""
        import asyncio, json, time, websockets
        async def main():
            async with websockets.connect("{ws_url(base)}") as ws:
                await ws.recv()
                longer = {{"type": "session.update", "session": {{"max_response_output_tokens": 300}}}}
                await ws.send(json.dumps(longer))
                await ws.send(json.dumps({{"type": "conversation.item.create",
                                          "item": {{"role": "user", "content": "Tell a very long story."}}}}))
                await ws.send(json.dumps({{"type": "response.create"}}))
                while json.loads(await ws.recv())["type"] != "response.output_text.delta":
                    pass
                print("streaming", flush=True)
                time.sleep(60)
        asyncio.run(main())
    """)
    assert talker.stdout is not None and talker.stdout.readline().strip() == "streaming"
    talker.send_signal(signal.SIGKILL)
    talker.wait()
    wait_for(lambda: open_sessions(base) == 0, timeout_s=15)

    async def next_client() -> None:
        started = time.monotonic()
        async with websockets.connect(ws_url(base)) as ws:
            await events_until(ws, "session.created")
            assert (await typed_turn(ws, "Hi"))[-1]["response"]["status"] in ANSWERED
        assert time.monotonic() - started < 15  # the abandoned 300-token reply did not hold the worker

    asyncio.run(next_client())


def server_children(process: subprocess.Popen, name: str) -> list[int]:
    found = []
    for task in Path(f"/proc/{process.pid}/task").iterdir():
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == name:
                    found.append(int(child))
    return found


def test_ffmpeg_killed_mid_decode_fails_that_request_only(server: RunningServer, tmp_path: Path) -> None:
    ffmpeg = require_tool("ffmpeg")
    base = server.base
    question = speak("What is the capital of France? Tell me about its history.", tmp_path / "q.wav")
    long_file = tmp_path / "long.flac"  # 3 minutes: the decode waits on Whisper block by block
    subprocess.run([ffmpeg, "-loglevel", "error", "-stream_loop", "40", "-i", str(question), "-t", "180",
                    str(long_file)], check=True)  # fmt: skip
    api = openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    outcome: dict[str, Any] = {}

    def transcribe() -> None:
        try:
            with long_file.open("rb") as f:
                outcome["text"] = api.audio.transcriptions.create(model="whisper-1", file=f).text
        except openai.APIStatusError as exc:
            outcome["error"] = exc

    request = threading.Thread(target=transcribe)
    request.start()
    deadline = time.monotonic() + 60
    while not (decoders := server_children(server.process, "ffmpeg")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert decoders, "the server never started ffmpeg"
    time.sleep(0.5)
    for pid in decoders:
        os.kill(pid, signal.SIGKILL)
    request.join(timeout=300)
    error = outcome.get("error")
    assert error is not None and "ffmpeg was killed by SIGKILL" in str(error.body), outcome
    with question.open("rb") as f:  # the next file is transcribed as usual
        assert "capital" in api.audio.transcriptions.create(model="whisper-1", file=f).text.lower()


def test_full_and_read_only_conversation_directory(server: RunningServer, small_disk: Path) -> None:
    base = server.base
    filler = small_disk / "filler"

    async def session() -> None:
        async with websockets.connect(ws_url(base)) as ws:
            created = (await events_until(ws, "session.created"))[-1]["session"]
            saved = small_disk / "conversations" / f"{created['conversation_id']}.json"
            assert (await typed_turn(ws, "One."))[-1]["response"]["status"] in ANSWERED
            assert len(Conversation.load(saved).messages()) == 3  # system + one exchange
            fill(filler)
            events = await typed_turn(ws, "Two.")
            errors = [e for e in events if e["type"] == "error"]
            assert errors and errors[0]["error"]["code"] == "output", events
            assert "No space left" in errors[0]["error"]["message"] and "not saved" in errors[0]["error"]["message"]
            assert any(e["type"] == "response.output_text.delta" for e in events)  # the reply itself was delivered
            assert len(Conversation.load(saved).messages()) == 3  # the previous file, whole
            filler.unlink()
            assert (await typed_turn(ws, "Three."))[-1]["response"]["status"] in ANSWERED
            assert len(Conversation.load(saved).messages()) == 7  # nothing lost: turn two was kept in memory
            subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
            try:
                events = await typed_turn(ws, "Four.")
                errors = [e for e in events if e["type"] == "error"]
                assert errors and "Read-only file system" in errors[0]["error"]["message"], events
            finally:
                subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
            assert (await typed_turn(ws, "Five."))[-1]["response"]["status"] in ANSWERED
            assert len(Conversation.load(saved).messages()) == 11

    asyncio.run(session())
    assert health(base)["status"] == "ok"


def fill(filler: Path) -> None:
    with contextlib.suppress(OSError), filler.open("wb") as out:  # closing flushes into a full disk too
        while True:
            out.write(b"\0" * 4096)
            out.flush()


# --- kill -9 in the middle of a save ----------------------------------------------------------------------------


def big_conversation(turns: int, marker: str, width: int = 200) -> Conversation:
    conversation = Conversation("system prompt")
    for turn in range(turns):
        conversation.add_user(f"{marker} question {turn} " + "词" * width)
        conversation.add_reply(f"{marker} answer {turn} " + "字" * 2 * width)
    return conversation


def test_kill_9_during_saves_never_leaves_a_broken_file(tmp_path: Path) -> None:
    """A writer saving two large conversations in turn is killed at random moments, 20 times; every time the file
    is one of the two, whole."""
    target = tmp_path / "conversation.json"
    versions = {"A": big_conversation(300, "A"), "B": big_conversation(301, "B")}
    for marker, conversation in versions.items():
        conversation.save(tmp_path / f"{marker}.json")
    writer_code = f"""
        import itertools, pathlib, sys
        from assistant.conversation import Conversation
        versions = [Conversation.load(pathlib.Path({str(tmp_path)!r}) / f"{{m}}.json") for m in "AB"]
        print("writing", flush=True)
        for conversation in itertools.cycle(versions):
            conversation.save({str(target)!r})
    """
    rng = random.Random(7)
    expected = {marker: conversation.to_json() for marker, conversation in versions.items()}
    for _ in range(20):
        writer = run_client(writer_code)
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        time.sleep(rng.uniform(0.05, 0.4))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        assert Conversation.load(target).to_json() in expected.values()


def test_kill_9_of_the_server_during_a_save_keeps_the_conversation_whole(tmp_path: Path) -> None:
    require_offline_models("smollm2-135m", "whisper-base")
    folder = tmp_path / "conversations"
    folder.mkdir()
    # resumed: each turn rewrites ~1.5 MB, while the prompt holds only the last few short turns
    big_conversation(3000, "S", width=40).save(folder / "long-talk.json")
    rng = random.Random(11)
    initial = len(Conversation.load(folder / "long-talk.json").messages())
    for round_number in range(2):
        before = len(Conversation.load(folder / "long-talk.json").messages())
        process, base = start_server("--set", f"server.conversation_dir={folder}",
                                     "--set", "llm.sampling.max_new_tokens=4")  # fmt: skip
        try:
            asyncio.run(talk_until_killed(base, process, rng.uniform(0.1, 1.5)))
        finally:
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            process.wait(timeout=30)
        after = Conversation.load(folder / "long-talk.json").messages()
        assert len(after) >= before and (len(after) - before) % 2 == 0, (round_number, before, len(after))
    assert len(Conversation.load(folder / "long-talk.json").messages()) > initial  # turns were saved between kills
    leftovers = [p.name for p in folder.iterdir() if p.name != "long-talk.json"]
    # only a torn temporary (and the conversation's lock file, empty), never the file itself
    assert all(name.endswith((".partial", ".json.lock")) for name in leftovers), leftovers


async def talk_until_killed(base: str, process: subprocess.Popen, after_s: float) -> None:
    from websockets.exceptions import ConnectionClosed

    killer = threading.Timer(after_s, lambda: process.send_signal(signal.SIGKILL))
    with contextlib.suppress(ConnectionClosed, OSError, TimeoutError):
        async with websockets.connect(f"{ws_url(base)}?conversation=long-talk") as ws:
            await events_until(ws, "session.created")
            await typed_turn(ws, "Go on.")
            killer.start()  # at a random moment of the next turns, each of which ends in a save
            while True:
                await typed_turn(ws, "Go on.")
    killer.cancel()
