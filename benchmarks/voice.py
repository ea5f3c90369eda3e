"""Voice latency: end of speech to the first reply character, for short spoken questions, on the offline default.

    .venv/bin/python benchmarks/voice.py [--questions 8] [--config FILE]

Each question (espeak-ng, about 3 s, followed by silence) is played into ``assistant chat``'s own VoiceChat at speaking
pace through the file source, exactly as a microphone would deliver it: the endpointer has to wait out the VAD's
silence window (``vad.min_silence_ms``) in real time before the turn starts, and that wait is part of the figure.
Breakdown per turn: end of speech -> transcript (silence window + Whisper), transcript -> first reply character
(prompt + first token). The peer, measured in the same run on the same utterances and models, is the glue script of
today's tools (text-generation-webui's whisper_stt: record until silence, transcribe, then show the reply once it is
complete): silence window + transcription + whole reply.
Target: median under 2 s for a 3-second question on this CPU.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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
TRAILING_SILENCE_S = 4.0  # after each question: the reply finishes before the next one starts (no barge-in)


def make_questions(count: int, folder: Path) -> list[Path]:
    paths = []
    for index, question in enumerate(QUESTIONS[:count]):
        raw, path = folder / f"q{index}.raw.wav", folder / f"q{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "130", "-w", str(raw), question], check=True)
        subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(raw), "-af",
                        f"adelay=300,apad=pad_dur={TRAILING_SILENCE_S}", "-ar", "16000", "-ac", "1", str(path)],
                       check=True)  # fmt: skip
        paths.append(path)
    return paths


class Collector:
    def __init__(self) -> None:
        self.turns: list[tuple[str, object]] = []

    def transcript(self, text, utterance) -> None:
        pass

    def delta(self, text) -> None:
        pass

    def turn_done(self, transcript, reply, metrics) -> None:
        self.turns.append((transcript, metrics))
        print(f"  {transcript!r}: {metrics.speech_end_to_first_char_ms:.0f} ms", file=sys.stderr, flush=True)

    def error(self, message) -> None:
        print(f"  error: {message}", file=sys.stderr)

    def notice(self, message) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--config", help="YAML configuration (default: the offline default)")
    args = parser.parse_args()

    from assistant import registry
    from assistant.chat import ChatSession
    from assistant.config import load_config
    from assistant.conversation import Conversation
    from assistant.messages import Message
    from assistant.voice import VoiceChat

    config = load_config(args.config, ["input.realtime=true", "input.barge_in=false", "llm.sampling.temperature=0",
                                       "llm.sampling.max_new_tokens=64"])  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        files = make_questions(args.questions, Path(folder))
        audio_s = [float(subprocess.run(["ffprobe", "-v", "error", "-show_entries", "format=duration", "-of",
                                         "csv=p=0", str(f)], capture_output=True, text=True).stdout)
                   - TRAILING_SILENCE_S - 0.3 for f in files]  # fmt: skip
        model = registry.create("llm", config.llm.backend, config.llm)
        transcriber = registry.create("asr", config.asr.backend, config.asr)
        collector = Collector()
        source = registry.create("source", "file", config.input, [str(f) for f in files])
        voice = VoiceChat(source, VoiceChat.build_segmenter(config), transcriber,
                          ChatSession(model, Conversation(config.llm.system), config.llm.sampling), [collector],
                          config=config)  # fmt: skip
        print(f"playing {len(files)} questions at speaking pace ...", file=sys.stderr)
        voice.run()
        ours = [m for _, m in collector.turns]
        # the peer: same silence window, same transcription time, then the whole reply before anything is shown
        glue = []
        for transcript, metrics in collector.turns:
            started = time.monotonic()
            model.complete([Message("system", config.llm.system or ""), Message("user", transcript)],
                           config.llm.sampling)  # fmt: skip
            glue.append(metrics.speech_end_to_transcript_ms + (time.monotonic() - started) * 1000)
    print_table(ours, glue, statistics.median(audio_s), config)
    return 0 if ours else 1


def print_table(ours: list, glue: list[float], question_s: float, config) -> None:
    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    total = [m.speech_end_to_first_char_ms for m in ours]
    print(f"\n{len(ours)} spoken questions (median {question_s:.1f} s of speech), {config.asr.backend} "
          f"{config.asr.model} + {config.llm.backend} {config.llm.model}, silence window "
          f"{config.vad.min_silence_ms} ms, this machine's CPU\n")  # fmt: skip
    print(
        "| system | end of speech -> transcript (median) | transcript -> first reply char (median) | "
        "end of speech -> first reply char: median | p90 | max | vs peer (median) |"
    )
    print("|---|---|---|---|---|---|---|")
    p90 = sorted(total)[max(0, round(0.9 * len(total)) - 1)] if total else float("nan")
    print(
        f"| assistant chat (streamed) | {median([m.speech_end_to_transcript_ms for m in ours]):.0f} ms | "
        f"{median([m.transcript_to_first_char_ms for m in ours]):.0f} ms | {median(total):.0f} ms | {p90:.0f} ms | "
        f"{max(total, default=float('nan')):.0f} ms | {median(glue) / median(total):.1f}x faster |"
    )
    glue_p90 = sorted(glue)[max(0, round(0.9 * len(glue)) - 1)] if glue else float("nan")
    print(
        f"| glue script (reply shown when complete) | same | - | {median(glue):.0f} ms | {glue_p90:.0f} ms | "
        f"{max(glue, default=float('nan')):.0f} ms | 1.0x |"
    )


if __name__ == "__main__":
    sys.exit(main())
