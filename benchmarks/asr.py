"""ASR speed and memory: each backend against the plain transformers pipeline script users run today.

    .venv/bin/python benchmarks/asr.py [--minutes 3] [--audio FILE] [--systems baseline,whisper-hf,faster-whisper]

Every system transcribes the same audio in its own process (so peak RSS is its own), after loading its model
once; the table gives x real time (audio s / wall s), peak RSS, and the speed ratio to the baseline, plus the word error
rate against the script the speech was synthesised from (when the benchmark made the speech itself).
The baseline is the 30-line script from today's guides: pydub converts m4a to mp3, then
``pipeline("automatic-speech-recognition", chunk_length_s=30, batch_size=16, return_timestamps=True)`` runs on the
same Whisper weights (converted to transformers format), float32 on CPU, fp16 on CUDA.
"""

from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SENTENCES = [
    "Good morning everyone and welcome to the weekly planning meeting.",
    "First we will review the budget for the next quarter.",
    "The marketing team asked for more time to finish the campaign.",
    "Our sales in the northern region grew by twelve percent.",
    "Please send your comments on the report before Friday.",
    "The new office will open in the spring of next year.",
    "We need two more engineers to support the mobile application.",
    "Customer feedback on the latest release has been very positive.",
    "The training session for new staff is planned for Tuesday afternoon.",
    "Let us take a short break and continue in ten minutes.",
    "The server upgrade went smoothly and no data was lost.",
    "Thank you all for your hard work during this busy month.",
]
SYSTEMS = ("baseline", "whisper-hf", "faster-whisper")


def make_speech(minutes: float, folder: Path) -> tuple[Path, str]:
    """Spoken sentences (espeak-ng) with short pauses, repeated to ``minutes`` of audio, as an m4a."""
    import numpy as np
    import soundfile

    from assistant.audio.decode import load_audio

    clips = []
    for index, sentence in enumerate(SENTENCES):
        raw = folder / f"s{index}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(raw), sentence], check=True)
        clips.append(load_audio(raw).samples)
    rng = np.random.default_rng(0)
    pieces, text, total = [], [], 0.0
    while total < minutes * 60:
        index = len(text) % len(SENTENCES)
        pause = np.zeros(int(rng.uniform(0.4, 1.5) * 16000), np.float32)
        pieces += [clips[index], pause]
        text.append(SENTENCES[index])
        total += (len(clips[index]) + len(pause)) / 16000
    wav = folder / "speech.wav"
    soundfile.write(str(wav), np.concatenate(pieces), 16000)
    m4a = folder / "speech.m4a"
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-i", str(wav), "-c:a", "aac", str(m4a)], check=True)
    return m4a, " ".join(text)


def run_system(system: str, audio: Path) -> dict[str, float | str]:
    """Load, then time one transcription of ``audio``; runs in a child process."""
    started = time.perf_counter()
    if system == "baseline":
        text, audio_s, wall_s = _baseline(audio, started)
        load_s = wall_s[0]
        wall = wall_s[1]
    else:
        from assistant.config import load_config
        from assistant.pipeline import TranscriptionPipeline

        pipeline = TranscriptionPipeline.from_config(load_config(overrides=[f"asr.backend={system}"]))
        load_s = time.perf_counter() - started
        begin = time.perf_counter()
        result = pipeline.transcribe_file(audio)
        wall = time.perf_counter() - begin
        text, audio_s = result.transcript.text, result.transcript.audio_s
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"system": system, "text": text, "audio_s": audio_s, "wall_s": wall, "load_s": load_s, "rss_mb": peak_rss_mb}


def _baseline(audio: Path, started: float) -> tuple[str, float, tuple[float, float]]:
    """The script from today's guides, on the same weights the product uses offline."""
    import torch
    from pydub import AudioSegment
    from transformers import pipeline
    from transformers.utils import logging

    from assistant.asr.whisper_hf import _model_source
    from assistant.audio.decode import probe
    from assistant.models import resolve_model

    logging.set_verbosity_error()
    model_dir = _model_source(resolve_model("whisper-base"))
    pipe = pipeline(
        "automatic-speech-recognition",
        model=model_dir,
        dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
        device="cuda:0" if torch.cuda.is_available() else "cpu",
    )
    load_s = time.perf_counter() - started
    begin = time.perf_counter()
    # the guides convert first: the pipeline's ffmpeg_read pipes the file through stdin, which m4a cannot take
    mp3 = audio.with_suffix(".baseline.mp3")
    AudioSegment.from_file(str(audio)).export(str(mp3), format="mp3")
    output = pipe(str(mp3), chunk_length_s=30, batch_size=16, return_timestamps=True)
    wall = time.perf_counter() - begin
    return output["text"], probe(audio).duration_s or 0.0, (load_s, wall)


def word_error_rate(heard: str, reference: str) -> float:
    """Word-level edit distance / reference words (lower case, punctuation dropped; numerals not normalised)."""

    def words(text: str) -> list[str]:
        return re.sub(r"[^\w\s']", " ", text.lower()).split()

    hyp, ref = words(heard), words(reference)
    previous = list(range(len(hyp) + 1))
    for i, ref_word in enumerate(ref, start=1):
        current = [i]
        for j, hyp_word in enumerate(hyp, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ref_word != hyp_word)))
        previous = current
    return previous[-1] / max(1, len(ref))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of synthesised speech (default 3)")
    parser.add_argument("--audio", type=Path, help="use this file instead of synthesised speech")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {SYSTEMS}")
    parser.add_argument("--run", choices=SYSTEMS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_system(args.run, args.audio)))
        return

    with tempfile.TemporaryDirectory() as folder:
        audio, reference = (args.audio, "") if args.audio else make_speech(args.minutes, Path(folder))
        rows = []
        for system in args.systems.split(","):
            child = subprocess.run(
                [sys.executable, __file__, "--run", system, "--audio", str(audio)], capture_output=True, text=True
            )
            if child.returncode != 0:
                print(f"{system} failed:\n{child.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print_table(rows, reference)


def print_table(rows: list[dict], reference: str) -> None:
    baseline = next((r for r in rows if r["system"] == "baseline"), None)
    header = f"{'system':16} {'audio s':>8} {'load s':>7} {'wall s':>7} {'x realtime':>10} {'peak RSS MB':>11} "
    header += f"{'vs baseline':>11} {'WER':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        speed = row["audio_s"] / row["wall_s"]
        ratio = f"{baseline['wall_s'] / row['wall_s']:.2f}x" if baseline else "n/a"
        wer = f"{word_error_rate(row['text'], reference):.3f}" if reference else "n/a"
        print(
            f"{row['system']:16} {row['audio_s']:8.1f} {row['load_s']:7.1f} {row['wall_s']:7.1f} {speed:10.1f} "
            f"{row['rss_mb']:11.0f} {ratio:>11} {wer:>6}"
        )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
