"""Live finals: what recognising one short spoken question costs, by encoder window, at what word error rate.

    .venv/bin/python benchmarks/live_asr.py [--repeats 3] [--more]

The utterances are the voice benchmark's questions (``benchmarks/voice.py``'s ``QUESTIONS``), spoken as that file
does (``espeak-ng -v en-us -s 130``), each with the 0.2 s of silence on both sides an endpointed utterance has
(``vad.speech_pad_ms``). ``--more`` adds the same questions in five more voices and speeds and twelve longer
sentences (``benchmarks/asr.py``'s): 72 utterances, for a WER less at the mercy of one word. Every option
recognises every utterance in turn (interleaved, so other load on the machine spreads over all of them), with the
offline default (faster-whisper whisper-base int8, ``asr.threads`` 0 = all cores), language detected:

* ``full``: today's final, ``transcribe_many([audio], timestamps=False)``: Whisper's 30 s window, greedy, the
  temperature fallback when the thresholds fail.
* ``live``: ``transcribe_live`` as shipped (``asr.live_window: auto``): the encoder window is the utterance rounded
  up to 1 s plus 3 s of silence; the final path's decoding and thresholds; a window that fails them is redone by
  ``full`` (counted in ``to 30 s``).
* ``window S+M``: the same with other windows (utterance rounded up to S seconds, plus M seconds), and ``window 10 s``
  (a fixed 10 s window), to show why the shipped one was chosen.
* ``partial``: ``transcribe_partial`` (the 2+2 s window, greedy, no thresholds, no fallback): the live partials' pass,
  never a final; for reference.

A smaller model for the live path (Whisper tiny) is not among the offline models (``assistant models``; only an
English-only tiny.en exists on PyPI), so it is not measured. Table: median and p90 milliseconds per utterance over
all repeats, the ratio of the medians to ``full`` in the same run, the WER over all utterances and repeats (case and
punctuation ignored), and how many decodes went on to the 30 s window.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAD_S = 0.2  # silence kept on both sides of an endpointed utterance (vad.speech_pad_ms)
RATE = 16_000
MORE_VOICES = [("en-us", 150), ("en-us", 170), ("en-gb", 130), ("en-us+f3", 140), ("en-us+m3", 120)]
WINDOWS = {"window 2+2 s": (200, 200), "window 1+0 s": (100, 0), "window 10 s": (1000, 0)}


@dataclass
class Option:
    name: str
    run: Callable[[object], tuple[str, int]]  # audio -> (text, decodes sent on to the 30 s window)
    millis: list[float] = field(default_factory=list)
    errors: float = 0.0  # word errors over all runs
    words: int = 0
    fallbacks: int = 0


def spoken(text: str, voice: str, rate: int, folder: Path, name: str) -> np.ndarray:
    """``text`` by espeak-ng at 16 kHz mono, with ``PAD_S`` of silence on both sides (float32 samples)."""
    from assistant.audio.decode import load_audio

    raw, wav = folder / f"{name}.raw.wav", folder / f"{name}.wav"
    subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-w", str(raw), text], check=True)
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-ar", str(RATE), "-ac", "1", str(wav)],
                   check=True)  # fmt: skip
    pad = np.zeros(int(PAD_S * RATE), np.float32)
    return np.concatenate([pad, load_audio(wav).samples, pad])


def utterances(more: bool, folder: Path) -> list[tuple[str, np.ndarray]]:
    """(reference text, samples) per utterance: the questions at 130 wpm, and with ``more`` the rest."""
    from asr import SENTENCES
    from voice import QUESTIONS

    items = [(question, "en-us", 130) for question in QUESTIONS]
    if more:
        items += [(question, voice, rate) for voice, rate in MORE_VOICES for question in QUESTIONS]
        items += [(sentence, "en-us", 150) for sentence in SENTENCES]
    return [(text, spoken(text, voice, rate, folder, f"u{i}")) for i, (text, voice, rate) in enumerate(items)]


@contextmanager
def window(step_frames: int, margin_frames: int) -> Iterator[None]:
    """``transcribe_live`` with another window rule for the duration of the block."""
    from assistant.asr import faster_whisper

    kept = faster_whisper.LIVE_STEP_FRAMES, faster_whisper.LIVE_MARGIN_FRAMES
    faster_whisper.LIVE_STEP_FRAMES, faster_whisper.LIVE_MARGIN_FRAMES = step_frames, margin_frames
    try:
        yield
    finally:
        faster_whisper.LIVE_STEP_FRAMES, faster_whisper.LIVE_MARGIN_FRAMES = kept


def options() -> list[Option]:
    from assistant.asr.faster_whisper import FasterWhisperTranscriber
    from assistant.config import AsrConfig
    from assistant.messages import Audio

    transcriber = FasterWhisperTranscriber(AsrConfig())
    full_calls = [0]
    transcribe_many = transcriber.transcribe_many

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        full_calls[0] += 1
        return transcribe_many(*args, **kwargs)

    transcriber.transcribe_many = counted  # type: ignore[method-assign]

    def full(audio: Audio) -> tuple[str, int]:
        return transcribe_many([audio], language=None, timestamps=False)[0].text, 0

    def live(audio: Audio) -> tuple[str, int]:
        before = full_calls[0]
        text = transcriber.transcribe_live([audio], language=None)[0].text
        return text, full_calls[0] - before

    def windowed(step: int, margin: int) -> Callable[[Audio], tuple[str, int]]:
        def run(audio: Audio) -> tuple[str, int]:
            with window(step, margin):
                return live(audio)

        return run

    def partial(audio: Audio) -> tuple[str, int]:
        return transcriber.transcribe_partial(audio, language=None).text, 0

    made = [Option("full (30 s window)", full), Option("live (1+3 s, shipped)", live)]  # type: ignore[arg-type]
    made += [Option(name, windowed(*frames)) for name, frames in WINDOWS.items()]  # type: ignore[arg-type]
    return [*made, Option("partial (2+2 s, no fallback)", partial)]  # type: ignore[arg-type]


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))]


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of every option on every utterance (default 3)")
    parser.add_argument("--more", action="store_true", help="72 utterances instead of the 10 questions (slower)")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from asr import word_error_rate

    from assistant.messages import Audio

    with tempfile.TemporaryDirectory() as temp:
        spoken_ = utterances(args.more, Path(temp))
    audios = [(text, Audio(samples)) for text, samples in spoken_]
    lengths = [audio.duration_s for _, audio in audios]
    print(f"{len(audios)} utterances, {statistics.median(lengths):.1f} s median ({min(lengths):.1f}-"
          f"{max(lengths):.1f} s with the pads); {args.repeats} repeats; {os.cpu_count()} CPUs; load average "
          f"{load_average()}")  # fmt: skip
    chosen = options()
    for option in chosen:  # warm-up: first calls allocate
        option.run(audios[0][1])
    for _ in range(args.repeats):
        for text, audio in audios:
            for option in chosen:
                started = time.perf_counter()
                heard, fallbacks = option.run(audio)
                option.millis.append((time.perf_counter() - started) * 1000)
                option.errors += word_error_rate(heard, text) * len(text.split())
                option.words += len(text.split())
                option.fallbacks += fallbacks
    print(f"load average after: {load_average()}")
    base = statistics.median(chosen[0].millis)
    print("| option | median ms | p90 ms | vs 30 s window | WER | to 30 s |")
    print("|---|---:|---:|---:|---:|---:|")
    for option in chosen:
        median = statistics.median(option.millis)
        cells = [option.name, f"{median:.0f}", f"{p90(option.millis):.0f}", f"{median / base:.2f}x",
                 f"{option.errors / option.words:.3f}", f"{option.fallbacks}/{len(option.millis)}"]  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
