"""Voice latency: end of speech to the first reply character and to the first byte of spoken reply, on the offline
default, for the console and for the WebSocket (Realtime API) path; and how often partial transcripts come.

    .venv/bin/python benchmarks/voice.py [--questions 8] [--config FILE] [--skip console|websocket]

Each question (espeak-ng, about 3 s, followed by silence) is delivered at speaking pace, as a microphone would:
- console: played into ``assistant chat``'s VoiceChat through the file source (``input.realtime``), with voice out
  on (the speaker sink's synthesis, without a sound card);
- websocket: sent at 24 kHz PCM16 in 100 ms pieces to a real ``assistant serve`` on 127.0.0.1 with the Realtime API's
  defaults (server VAD, ``output_modalities: ["audio"]``); the clock stops at the first ``response.output_audio.delta``.
The endpointer has to wait out the VAD's silence window (``vad.min_silence_ms``) in real time, and that wait is part
of every figure. Breakdown: end of speech -> transcript (silence window + Whisper), -> first reply character
(prompt + first token), -> first audio byte (the first sentence completed and synthesized). The peer, measured in
the same run on the same transcripts and models, is the glue script of today's tools (text-generation-webui's
whisper_stt + silero_tts: record until silence, transcribe, generate the whole reply, then speak it whole).
Targets on this 2-core CPU: end of speech -> first audio median <= 2.5 s over WebSocket; a partial transcript at least
once per 1.5 s of speech.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUESTIONS = [
    "What is the capital of France?",
    "How many days are there in a week?",
    "What color is the sky on a clear day?",
    "Can you name a large animal in Africa?",
    "What do bees make from flowers?",
    "How many legs does a spider have?",
    "What is the opposite of hot?",
    "Which planet is closest to the sun?",
    "What language is spoken in Brazil?",
    "How many minutes are in an hour?",
]
TRAILING_SILENCE_S = 6.0  # after each question: the reply finishes before the next one starts (no barge-in)
LEAD_S = 0.3
WS_RATE = 24_000  # Hz: the Realtime API's audio/pcm
CHUNK_S = 0.1
OVERRIDES = ["input.barge_in=false", "llm.sampling.temperature=0", "llm.sampling.max_new_tokens=64"]


def make_questions(count: int, folder: Path) -> list[tuple[Path, float]]:
    """(wav at 16 kHz with lead-in and trailing silence, seconds of speech) per question."""
    made = []
    for index, question in enumerate(QUESTIONS[:count]):
        raw, path = folder / f"q{index}.raw.wav", folder / f"q{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(raw), question], check=True)
        speech_s = float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                                         "csv=p=0", str(raw)], capture_output=True, text=True).stdout)  # fmt: skip
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-af",
                        f"adelay={int(LEAD_S * 1000)},apad=pad_dur={TRAILING_SILENCE_S}", "-ar", "16000", "-ac", "1",
                        str(path)], check=True)  # fmt: skip
        made.append((path, speech_s))
    return made


class Collector:
    """A console sink that keeps each turn's metrics and the partial transcripts' times."""

    def __init__(self) -> None:
        self.turns: list[tuple[str, Any]] = []
        self.partials: list[float] = []

    def partial(self, text) -> None:
        self.partials.append(time.monotonic())

    def transcript(self, text) -> None:
        pass

    def delta(self, text) -> None:
        pass

    def audio(self, audio) -> None:
        pass

    def interrupted(self) -> None:
        pass

    def turn_done(self, transcript, reply, metrics) -> None:
        self.turns.append((transcript, metrics))
        print(f"  console {transcript!r}: first char {metrics.speech_end_to_first_char_ms:.0f} ms, first audio "
              f"{metrics.speech_end_to_first_audio_ms or float('nan'):.0f} ms",
              file=sys.stderr, flush=True)  # fmt: skip

    def error(self, message) -> None:
        print(f"  error: {message}", file=sys.stderr)

    def notice(self, message) -> None:
        pass


def console_path(config, files: list[tuple[Path, float]]) -> tuple[list[dict[str, float]], list[str], float]:
    from assistant import registry
    from assistant.chat import ChatSession
    from assistant.conversation import Conversation
    from assistant.tts.base import Speech
    from assistant.voice import VoiceChat

    model = registry.create("llm", config.llm.backend, config.llm)
    transcriber = registry.create("asr", config.asr.backend, config.asr)
    collector = Collector()
    source = registry.create("source", "file", config.input, [str(f) for f, _ in files])
    voice = VoiceChat(source, VoiceChat.build_segmenter(config), transcriber,
                      ChatSession(model, Conversation(config.llm.system), config.llm.sampling), [collector],
                      config=config, speech=Speech.from_config(config.tts))  # fmt: skip
    print(f"console: playing {len(files)} questions at speaking pace ...", file=sys.stderr)
    voice.run()
    rows = [{"transcript": m.speech_end_to_transcript_ms, "first_char": m.speech_end_to_first_char_ms,
             "first_audio": m.speech_end_to_first_audio_ms or float("nan")} for _, m in collector.turns]  # fmt: skip
    speech_total = sum(s for _, s in files)
    rate = len(collector.partials) / speech_total if speech_total else 0.0
    model.close()
    return rows, [t for t, _ in collector.turns], rate


def websocket_path(config_file: str | None, files: list[tuple[Path, float]]) -> tuple[list[dict[str, float]], float]:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "assistant", "serve", "--port", str(port)]
    command += ["--config", config_file] if config_file else []
    for override in OVERRIDES:
        command += ["--set", override]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.3)
        print(f"websocket: sending {len(files)} questions at 24 kHz at speaking pace ...", file=sys.stderr)
        return asyncio.run(_websocket_turns(f"ws://127.0.0.1:{port}/v1/realtime", files))
    finally:
        server.terminate()
        server.wait(timeout=30)


async def _websocket_turns(url: str, files: list[tuple[Path, float]]) -> tuple[list[dict[str, float]], float]:
    import websockets

    rows, partials = [], 0
    async with websockets.connect(url, max_size=None) as ws:
        json.loads(await ws.recv())  # session.created
        for path, speech_s in files:
            pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-ar", str(WS_RATE), "-ac", "1",
                                  "-f", "s16le", "-"], capture_output=True, check=True).stdout  # fmt: skip
            speech_end_byte = int((LEAD_S + speech_s) * WS_RATE) * 2
            times: dict[str, float] = {}
            sending = asyncio.create_task(_send_paced(ws, pcm, speech_end_byte, times))
            async with asyncio.timeout(120):
                while True:
                    event = json.loads(await ws.recv())
                    kind, now = event["type"], time.monotonic()
                    if kind == "conversation.item.input_audio_transcription.delta":
                        partials += 1
                    elif kind == "conversation.item.input_audio_transcription.completed":
                        times.setdefault("transcript", now)
                    elif kind == "response.output_audio_transcript.delta":
                        times.setdefault("first_char", now)
                    elif kind == "response.output_audio.delta":
                        times.setdefault("first_audio", now)
                    elif kind == "error":
                        print(f"  error: {event['error']['message']}", file=sys.stderr)
                    elif kind == "response.done":
                        break
            await sending
            end = times["speech_end"]
            keys = ("transcript", "first_char", "first_audio")
            row = {key: (times.get(key, float("nan")) - end) * 1000 for key in keys}
            print(f"  websocket {path.name}: first char {row['first_char']:.0f} ms, first audio "
                  f"{row['first_audio']:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
            rows.append(row)
    return rows, partials / sum(s for _, s in files)


async def _send_paced(ws: Any, pcm: bytes, speech_end_byte: int, times: dict[str, float]) -> None:
    """``pcm`` in 100 ms appends at speaking pace; ``times["speech_end"]``: when the last speech sample was due."""
    step = int(WS_RATE * CHUNK_S) * 2
    started = time.monotonic()
    times["speech_end"] = started + speech_end_byte / 2 / WS_RATE
    for index, offset in enumerate(range(0, len(pcm), step)):
        await asyncio.sleep(max(0.0, started + index * CHUNK_S - time.monotonic()))
        await ws.send(json.dumps({"type": "input_audio_buffer.append",
                                  "audio": base64.b64encode(pcm[offset : offset + step]).decode()}))  # fmt: skip


def glue_peer(config, transcripts: list[str], transcript_ms: list[float]) -> list[dict[str, float]]:
    """The whole reply, then the whole reply spoken: what a glue script of today's tools shows and says."""
    from assistant import registry
    from assistant.messages import Message
    from assistant.tts.base import Speech

    model = registry.create("llm", config.llm.backend, config.llm)
    speech = Speech.from_config(config.tts)
    speech.synthesize("Warm up.")
    rows = []
    for transcript, heard_ms in zip(transcripts, transcript_ms, strict=True):
        started = time.monotonic()
        reply, _ = model.complete([Message("system", config.llm.system or ""), Message("user", transcript)],
                                  config.llm.sampling)  # fmt: skip
        replied = time.monotonic()
        speech.synthesize(reply.strip() or "ok")
        spoken = time.monotonic()
        rows.append({"transcript": heard_ms, "first_char": heard_ms + (replied - started) * 1000,
                     "first_audio": heard_ms + (spoken - started) * 1000})  # fmt: skip
    model.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--config", help="YAML configuration (default: the offline default)")
    parser.add_argument("--skip", choices=["console", "websocket"], action="append", default=[])
    args = parser.parse_args()

    from assistant.config import load_config

    config = load_config(args.config, ["input.realtime=true", *OVERRIDES])
    results: dict[str, list[dict[str, float]]] = {}
    partial_rates: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as folder:
        files = make_questions(args.questions, Path(folder))
        transcripts: list[str] = []
        if "console" not in args.skip:
            results["assistant chat --speak (console)"], transcripts, partial_rates["console"] = console_path(
                config, files)  # fmt: skip
        if "websocket" not in args.skip:
            results["assistant serve /v1/realtime (WebSocket)"], partial_rates["websocket"] = websocket_path(
                args.config, files)  # fmt: skip
        if transcripts:
            heard = [row["transcript"] for row in next(iter(results.values()))]
            results["glue script (whole reply, then spoken)"] = glue_peer(config, transcripts, heard)
    print_table(results, partial_rates, statistics.median(s for _, s in files), config)
    return 0 if results else 1


def print_table(results: dict[str, list[dict[str, float]]], partial_rates: dict[str, float], question_s: float,
                config) -> None:  # fmt: skip
    def median(rows: list[dict[str, float]], key: str) -> float:
        values = [row[key] for row in rows if row[key] == row[key]]
        return statistics.median(values) if values else float("nan")

    def p90(rows: list[dict[str, float]], key: str) -> float:
        values = sorted(row[key] for row in rows if row[key] == row[key])
        return values[max(0, round(0.9 * len(values)) - 1)] if values else float("nan")

    print(f"\n{len(next(iter(results.values()), []))} spoken questions (median {question_s:.1f} s of speech), "
          f"{config.asr.backend} {config.asr.model} + {config.llm.backend} {config.llm.model} + Piper "
          f"{config.tts.english_voice}, silence window {config.vad.min_silence_ms} ms, "
          "this machine's CPU\n")  # fmt: skip
    print("| path | end of speech -> transcript | -> first reply char | -> first audio byte: median | p90 | "
          "first audio vs glue script |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    glue = results.get("glue script (whole reply, then spoken)")
    for name, rows in results.items():
        ratio = median(glue, "first_audio") / median(rows, "first_audio") if glue else float("nan")
        print(
            f"| {name} | {median(rows, 'transcript'):.0f} ms | {median(rows, 'first_char'):.0f} ms | "
            f"{median(rows, 'first_audio'):.0f} ms | {p90(rows, 'first_audio'):.0f} ms | {ratio:.1f}x |"
        )
    for path, rate in partial_rates.items():
        every = f"{1 / rate:.2f} s" if rate else "never"
        print(f"\npartial transcripts ({path}): {rate:.2f} per second of speech (one every {every}; "
              f"input.partial_interval_s {config.input.partial_interval_s:g})")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
