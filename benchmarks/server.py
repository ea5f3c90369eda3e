"""Server load: N concurrent WebSocket sessions doing spoken turns, and HTTP transcription throughput.

    .venv/bin/python benchmarks/server.py [--sessions 1,4,16] [--turns 2] [--config FILE]

Starts ``assistant serve`` on 127.0.0.1 with the offline default models (or ``--config``). Every session streams a
spoken question (espeak-ng, about 3 s) at speaking pace in 100 ms PCM16 frames, then silence, waits for the reply,
and repeats. End of speech is when the client sent the last frame of speech; the server's VAD silence window is
inside the figure. The peer is the same server with one session (N=1), measured in the same run.
HTTP: concurrent ``POST /v1/audio/transcriptions`` of the same question, audio seconds transcribed per second.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from assistant.io.client import TEXT_SESSION_16K

QUESTIONS = ["What is the capital of France?", "How many days are there in a week?", "What do bees make?"]
FRAME_BYTES = 3200  # 100 ms of PCM16 at 16 kHz
SILENCE_S = 1.2


def pcm_of(text: str, folder: Path, index: int) -> bytes:
    wav = folder / f"q{index}.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(wav), text], check=True)
    return subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(wav), "-ar", "16000", "-ac", "1", "-f", "s16le",
                           "-"], capture_output=True, check=True).stdout  # fmt: skip


async def session(url: str, questions: list[bytes], turns: int, latencies: list[float], errors: list[str]) -> int:
    import websockets

    done = 0
    async with websockets.connect(url, max_size=None) as ws:
        await ws.recv()
        await ws.send(json.dumps(TEXT_SESSION_16K))
        for turn in range(turns):
            pcm = questions[turn % len(questions)] + b"\0" * int(SILENCE_S * 32000)
            speech_end = 0.0
            speech_bytes = len(questions[turn % len(questions)])
            started = time.monotonic()
            for offset in range(0, len(pcm), FRAME_BYTES):
                await asyncio.sleep(max(0.0, started + offset / 32000 - time.monotonic()))  # speaking pace
                await ws.send(pcm[offset : offset + FRAME_BYTES])
                if offset + FRAME_BYTES >= speech_bytes and not speech_end:
                    speech_end = time.monotonic()
            first = 0.0
            async with asyncio.timeout(300):
                while True:
                    event = json.loads(await ws.recv())
                    if event["type"] == "response.output_text.delta" and not first:
                        first = time.monotonic()
                    elif event["type"] == "error":
                        errors.append(event["error"]["code"])
                        break
                    elif event["type"] == "response.done":
                        done += 1
                        latencies.append((first or time.monotonic()) - speech_end)
                        break
    return done


async def run_sessions(url: str, count: int, questions: list[bytes], turns: int) -> dict[str, float]:
    latencies: list[float] = []
    errors: list[str] = []
    started = time.monotonic()
    results = await asyncio.gather(*(session(url, questions, turns, latencies, errors) for _ in range(count)),
                                   return_exceptions=True)  # fmt: skip
    wall = time.monotonic() - started
    completed = sum(r for r in results if isinstance(r, int))
    errors += [type(r).__name__ for r in results if isinstance(r, BaseException)]
    ordered = sorted(latencies)
    return {
        "sessions": count, "turns": completed, "turns_per_s": completed / wall,
        "p50_ms": statistics.median(ordered) * 1000 if ordered else float("nan"),
        "p95_ms": ordered[max(0, round(0.95 * len(ordered)) - 1)] * 1000 if ordered else float("nan"),
        "errors": len(errors),
    }  # fmt: skip


def http_throughput(base: str, wav: Path, requests: int, concurrency: int) -> tuple[float, float, int]:
    from openai import OpenAI

    api = OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=300)
    audio_s = float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0",
                                    str(wav)], capture_output=True, text=True).stdout)  # fmt: skip

    def one(_: int) -> bool:
        try:
            with wav.open("rb") as audio:
                api.audio.transcriptions.create(model="whisper-1", file=audio)
            return True
        except Exception:
            return False

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
        outcomes = list(pool.map(one, range(requests)))
    wall = time.monotonic() - started
    return requests / wall, audio_s * sum(outcomes) / wall, outcomes.count(False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", default="1,4,16")
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--config")
    args = parser.parse_args()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "assistant", "serve", "--port", str(port), "--set", "server.max_pending=64",
               "--set", "server.max_sessions=64", "--set", "asr.language=en",
               "--set", "llm.sampling.max_new_tokens=48", "--set", "llm.sampling.temperature=0"]  # fmt: skip
    if args.config:
        command += ["--config", args.config]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base, url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}/v1/realtime"
    try:
        for _ in range(600):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                time.sleep(0.2)
        with tempfile.TemporaryDirectory() as folder:
            questions = [pcm_of(q, Path(folder), i) for i, q in enumerate(QUESTIONS)]
            rows = []
            for count in (int(n) for n in args.sessions.split(",")):
                print(f"{count} sessions ...", file=sys.stderr, flush=True)
                rows.append(asyncio.run(run_sessions(url, count, questions, args.turns)))
            wav = Path(folder) / "q0.wav"
            http = http_throughput(base, wav, requests=8, concurrency=4)
    finally:
        server.terminate()
        server.wait(timeout=30)
    single = rows[0]["p50_ms"] if rows else float("nan")
    print(f"\nassistant serve, offline default models, {args.turns} spoken turns per session, this machine's CPU\n")
    print("| sessions | turns | turns/s | p50 end of speech -> first reply char | p95 | p50 vs 1 session | errors |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sessions']} | {row['turns']} | {row['turns_per_s']:.2f} | {row['p50_ms']:.0f} ms | "
              f"{row['p95_ms']:.0f} ms | {row['p50_ms'] / single:.1f}x | {row['errors']} |")  # fmt: skip
    print(
        f"\nHTTP /v1/audio/transcriptions, 8 requests, 4 concurrent: {http[0]:.2f} requests/s, "
        f"{http[1]:.1f} audio s per s, {http[2]} errors"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
