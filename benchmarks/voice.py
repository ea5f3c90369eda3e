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

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.asr import word_error_rate

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
TRAILING_SILENCE_S = 4.5  # after each question: the reply finishes before the next one starts (no barge-in)
LEAD_S = 0.3
WS_RATE = 24_000  # Hz: the Realtime API's audio/pcm
CHUNK_S = 0.1
OVERRIDES = ["llm.sampling.temperature=0", "llm.sampling.max_new_tokens=64"]
CONSOLE_OVERRIDES = ["input.realtime=true", "input.barge_in=false"]  # files follow each other: no barge-in


def make_questions(count: int, folder: Path) -> list[tuple[Path, float, str]]:
    """(wav at 16 kHz with lead-in and trailing silence, seconds to the end of speech, the words) per question."""
    made = []
    for index, question in enumerate(QUESTIONS[:count]):
        raw, path = folder / f"q{index}.raw.wav", folder / f"q{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(raw), question], check=True)
        made.append((*as_spoken(raw, path), question))
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


def console_path(config, files: list[tuple[Path, float, str]]) -> tuple[list[dict[str, Any]], list[str], float]:
    from assistant import registry
    from assistant.chat import ChatSession
    from assistant.conversation import Conversation
    from assistant.tts.base import Speech
    from assistant.voice import VoiceChat

    model = registry.create("llm", config.llm.backend, config.llm)
    transcriber = registry.create("asr", config.asr.backend, config.asr)
    collector = Collector()
    source = registry.create("source", "file", config.input, [str(f) for f, _, _ in files])
    voice = VoiceChat(source, VoiceChat.build_segmenter(config), transcriber,
                      ChatSession(model, Conversation(config.llm.system), config.llm.sampling), [collector],
                      config=config, speech=Speech.from_config(config.tts))  # fmt: skip
    print(f"console: playing {len(files)} questions at speaking pace ...", file=sys.stderr)
    voice.run()
    rows = [{"transcript": m.speech_end_to_transcript_ms, "first_char": m.speech_end_to_first_char_ms,
             "first_audio": m.speech_end_to_first_audio_ms or float("nan"), "server": {
                 "endpoint_ms": m.endpoint_ms, "asr_start_ms": m.asr_start_ms, "asr_ms": m.asr_ms,
                 "first_token_ms": m.first_token_ms, "first_char_ms": m.speech_end_to_first_char_ms}}
            for _, m in collector.turns]  # fmt: skip
    speech_total = sum(end - LEAD_S for _, end, _ in files)
    rate = len(collector.partials) / speech_total if speech_total else 0.0
    model.close()
    return rows, [t for t, _ in collector.turns], rate


PAUSED = [  # (before the pause, pause s, after it): hesitations mid-sentence, which must not end the turn
    ("I would like to know", 0.7, "what the capital of France is."),
    ("Can you tell me the time in Tokyo and", 0.8, "the weather there?"),
    ("I have a question about", 0.7, "the planets in our solar system."),
    ("What is the biggest city in China and", 0.7, "how many people live there?"),
    ("Tell me something about the moon because", 0.8, "I am curious."),
    ("Please name three fruits that are red, um,", 0.8, "like apples."),
    ("How do I make a cup of tea with", 0.6, "milk and sugar?"),
    ("My favourite animal is the", 0.7, "elephant. What is yours?"),
]
MODES = {  # name -> server overrides
    "preemptive (turn.preemptive, semantic_vad rules)": [],
    "no preemption, semantic_vad rules": ["turn.preemptive=false"],
    "no preemption, fixed 500 ms window": ["turn.preemptive=false", "turn.detector=fixed"],
}


def make_paused(count: int, folder: Path) -> list[tuple[Path, float, str]]:
    """(wav at 16 kHz, seconds from its start to the end of speech, the words) per hesitating question: its two
    parts spoken apart, with exactly the pause between them (espeak-ng's own silence at their edges trimmed)."""
    import soundfile

    made = []
    for index, (before, pause_s, after) in enumerate(PAUSED[:count]):
        pieces, rate = [], 0
        for part, text in (("a", before), ("b", after)):
            raw = folder / f"p{index}{part}.raw.wav"
            subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(raw), text], check=True)
            samples, rate = soundfile.read(str(raw), dtype="float32")
            loud = np.flatnonzero(np.abs(samples) > 0.01)
            pieces.append(samples[loud[0] : loud[-1] + 1])
        gap = np.zeros(int(pause_s * rate), np.float32)
        joined = folder / f"p{index}.joined.wav"
        soundfile.write(str(joined), np.concatenate([pieces[0], gap, pieces[1]]), rate)
        path = folder / f"p{index}.wav"
        made.append((*as_spoken(joined, path), f"{before} {after}"))
    return made


def as_spoken(source: Path, path: Path) -> tuple[Path, float]:
    """``source`` at 16 kHz mono in ``path``, with ``LEAD_S`` of silence before and ``TRAILING_SILENCE_S`` after:
    (path, seconds to its end of speech)."""
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(source), "-af",
                    f"adelay={int(LEAD_S * 1000)},apad=pad_dur={TRAILING_SILENCE_S}", "-ar", "16000", "-ac", "1",
                    str(path)], check=True)  # fmt: skip
    return path, speech_end_s(path)


def speech_end_s(path: Path) -> float:
    """Seconds from the start of ``path`` to its last audible sample: the end of speech. (espeak-ng ends its files
    with about 0.5 s of silence; a clock started at the end of the file would hide that much latency.)"""
    import soundfile

    samples, rate = soundfile.read(str(path), dtype="float32")
    loud = np.flatnonzero(np.abs(samples) > 0.01)
    return float(loud[-1] + 1) / rate if len(loud) else 0.0


def websocket_path(config_file: str | None, files: list[tuple[Path, float, str]],
                   overrides: list[str]) -> tuple[list[dict[str, Any]], float, dict[str, float]]:  # fmt: skip
    """Rows per question, partial transcripts per second of speech, and the server's preemptive-reply counts."""
    import socket
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "assistant", "serve", "--port", str(port)]
    command += ["--config", config_file] if config_file else []
    for override in [*OVERRIDES, *overrides]:
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
        print(f"websocket {' '.join(overrides) or '(defaults)'}: {len(files)} questions at speaking pace ...",
              file=sys.stderr)  # fmt: skip
        rows, rate = asyncio.run(_websocket_turns(f"ws://127.0.0.1:{port}/v1/realtime", files))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        counts = {sample.labels["outcome"]: sample.value for family in text_string_to_metric_families(exposition)
                  if family.name == "assistant_preemptive_replies" for sample in family.samples
                  if sample.name.endswith("_total")}  # fmt: skip
        return rows, rate, counts
    finally:
        server.terminate()
        server.wait(timeout=30)


async def _websocket_turns(url: str, files: list[tuple[Path, float, str]]) -> tuple[list[dict[str, Any]], float]:
    import websockets

    rows, partials = [], 0
    async with websockets.connect(url, max_size=None) as ws:
        json.loads(await ws.recv())  # session.created
        for path, speech_end_s, words in files:
            pcm = subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(path), "-ar", str(WS_RATE), "-ac", "1",
                                  "-f", "s16le", "-"], capture_output=True, check=True).stdout  # fmt: skip
            times: dict[str, float] = {}
            sending = asyncio.create_task(_send_paced(ws, pcm, int(speech_end_s * WS_RATE) * 2, times))
            turns, transcripts, metrics, open_responses, completed, asked = 0, [], {}, 0, 0, ""
            async with asyncio.timeout(120):
                while not (sending.done() and "done" in times and not open_responses):
                    try:
                        event = json.loads(await asyncio.wait_for(ws.recv(), 0.2))
                    except TimeoutError:
                        continue
                    kind, now = event["type"], time.monotonic()
                    if kind == "conversation.item.input_audio_transcription.delta":
                        partials += 1
                    elif kind == "input_audio_buffer.committed":
                        turns += 1
                    elif kind == "conversation.item.input_audio_transcription.completed":
                        transcripts.append(event["transcript"])
                        times["transcript"] = now
                    elif kind == "conversation.item.done" and event["item"].get("role") == "user":
                        content = event["item"]["content"][0]
                        asked = content.get("transcript") or content.get("text") or ""  # the turn as it stands
                    elif kind == "response.created":
                        open_responses += 1
                    elif kind == "response.output_audio_transcript.delta":
                        times.setdefault(f"first_char{turns}", now)
                    elif kind == "response.output_audio.delta":
                        times.setdefault(f"first_audio{turns}", now)
                    elif kind == "error":
                        print(f"  error: {event['error']['message']}", file=sys.stderr)
                    elif kind == "response.done":
                        open_responses -= 1
                        times["done"] = now
                        completed += event["response"]["status"] in ("completed", "incomplete")
                        metrics = event["response"].get("metrics") or {}
            await sending
            end = times["speech_end"]
            row = {
                key: (times.get(f"{key}{turns}", float("nan")) - end) * 1000 for key in ("first_char", "first_audio")
            }
            # split: the question got more than one finished answer (a reply to a fragment that was not taken
            # back); the WER is that of the user message the last answer answered, the words joined or not
            row |= {"transcript": (times.get("transcript", float("nan")) - end) * 1000, "split": completed != 1,
                    "wer": word_error_rate(asked, words), "server": metrics}  # fmt: skip
            print(f"  {path.name}: {turns} utterance(s), {completed} answer(s), first char {row['first_char']:.0f} "
                  f"ms, first audio {row['first_audio']:.0f} ms, preemptive {metrics.get('preemptive')}, asked "
                  f"{asked!r}" + (f", heard as {transcripts}" if turns > 1 else ""), file=sys.stderr,
                  flush=True)  # fmt: skip
            rows.append(row)
    return rows, partials / sum(end - LEAD_S for _, end, _ in files)


async def _send_paced(ws: Any, pcm: bytes, speech_end_byte: int, times: dict[str, float]) -> None:
    """``pcm`` in 100 ms appends at speaking pace; ``times["speech_end"]``: when the last speech sample was due.
    The file ends with ``TRAILING_SILENCE_S`` of silence, time for the reply."""
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
    parser.add_argument("--questions", type=int, default=8, help="plain spoken questions (at most 10)")
    parser.add_argument("--paused", type=int, default=8, help="questions with a hesitation in them (at most 8)")
    parser.add_argument("--config", help="YAML configuration (default: the offline default)")
    parser.add_argument("--modes", default="all", help="comma-separated mode numbers (1-3) or all")
    parser.add_argument("--skip", choices=["console", "websocket", "glue"], action="append", default=[])
    args = parser.parse_args()

    from assistant.config import load_config

    config = load_config(args.config, [*CONSOLE_OVERRIDES, *OVERRIDES])
    modes = list(MODES) if args.modes == "all" else [list(MODES)[int(n) - 1] for n in args.modes.split(",")]
    results: dict[str, list[dict[str, Any]]] = {}
    partial_rates: dict[str, float] = {}
    counts: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as folder:
        questions = make_questions(args.questions, Path(folder))
        files = questions + make_paused(args.paused, Path(folder))
        if "websocket" not in args.skip:
            for mode in modes:
                results[mode], partial_rates[mode], counts[mode] = websocket_path(args.config, files, MODES[mode])
        if "console" not in args.skip:
            name = "console: assistant chat --speak (preemptive)"
            results[name], _, partial_rates[name] = console_path(config, questions)
        if "glue" not in args.skip and results:
            plain = next(iter(results.values()))[: len(questions)]
            words = [text for _, _, text in questions]
            results["glue script (whole reply, then spoken)"] = glue_peer(
                config, words, [r["transcript"] for r in plain]
            )
    print_table(results, partial_rates, counts, len(questions), config)
    return 0 if results else 1


def _median(values: list[float]) -> float:
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def _p90(values: list[float]) -> float:
    kept = sorted(v for v in values if v == v)
    return kept[max(0, round(0.9 * len(kept)) - 1)] if kept else float("nan")


def print_table(results: dict[str, list[dict[str, Any]]], partial_rates: dict[str, float],
                counts: dict[str, dict[str, float]], plain: int, config) -> None:  # fmt: skip
    rows_of = next(iter(results.values()), [])
    print(
        f"\n{len(rows_of)} spoken questions ({plain} plain, {len(rows_of) - plain} with a 0.6-0.8 s hesitation), "
        f"{config.asr.backend} {config.asr.model} + {config.llm.backend} {config.llm.model} + Piper "
        f"{config.tts.english_voice}, this machine's CPU; times from the end of speech, turns that were not split\n"
    )
    print("| path | first reply char: median | p90 | first reply audio: median | p90 | turns split | WER | "
          "preemptive replies used / wasted / cancelled |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        whole = [row for row in rows if not row.get("split")]
        split = sum(1 for row in rows if row.get("split"))
        wer = _median([row["wer"] for row in rows]) if rows and "wer" in rows[0] else float("nan")
        outcome = counts.get(name, {})
        used = " / ".join(f"{outcome.get(key, 0):.0f}" for key in ("used", "wasted", "cancelled")) if outcome else "-"
        char, audio = [r["first_char"] for r in whole], [r["first_audio"] for r in whole]
        print(f"| {name} | {_median(char):.0f} ms | {_p90(char):.0f} ms | {_median(audio):.0f} ms | "
              f"{_p90(audio):.0f} ms | {split} of {len(rows)} | {wer:.1%} | {used} |")  # fmt: skip
    print("\nBreakdown (medians, ms from the end of speech; server-side clocks from `response.metrics`):\n")
    print("| path | turn ended | recognition started | recognition ran | prefill + first token | server first char |"
          " delivery (client - server) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        served = [row for row in rows if row.get("server") and not row.get("split")]
        if not served:
            continue

        def field(key: str, served: list[dict[str, Any]] = served) -> float:
            return _median([row["server"].get(key) if row["server"].get(key) is not None else float("nan")
                            for row in served])  # fmt: skip

        delivery = _median([row["first_char"] - row["server"]["first_char_ms"] for row in served])
        print(f"| {name} | {field('endpoint_ms'):.0f} | {field('asr_start_ms'):.0f} | {field('asr_ms'):.0f} | "
              f"{field('first_token_ms'):.0f} | {field('first_char_ms'):.0f} | {delivery:.0f} |")  # fmt: skip
    for path, rate in partial_rates.items():
        every = f"{1 / rate:.2f} s" if rate else "never"
        print(f"\npartial transcripts ({path}): {rate:.2f} per second of speech (one every {every})")


if __name__ == "__main__":
    sys.exit(main())
