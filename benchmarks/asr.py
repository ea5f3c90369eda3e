"""ASR end to end: our default ``assistant transcribe`` command against the peers' own scripts, on one file.

    .venv/bin/python benchmarks/asr.py [--minutes 3] [--audio FILE] [--repeats 3]
        [--systems ours,faster-whisper,faster-whisper-batched,transformers,whisper-hf]

Every figure is a whole process, measured from outside the way a user meets a command: wall seconds from the start
of the child process to its exit (imports + model load + decoding + writing the transcript), and the child's own peak
RSS (``os.wait4`` on that child). Each system runs ``--repeats`` times, interleaved (A B C D A B C D ...) so that load
from other users of the machine spreads over all of them; the table gives the median wall, the largest peak RSS, x
real time (audio seconds / median wall), both as ratios to the plain faster-whisper script, and the word error rate
against the script the speech was synthesised from (espeak-ng, when the benchmark made the speech itself).

Systems, all on the same Whisper base weights:

* ``ours``: ``python -m assistant transcribe FILE --quiet --format txt --output-dir DIR``, default config
  (faster-whisper whisper-base int8 on CPU, Silero VAD on onnxruntime, batched decoding).
* ``faster-whisper``: the plain script users write, ``WhisperModel(path, device="cpu", compute_type="int8")`` and
  ``model.transcribe(file, vad_filter=True)``, segment texts joined into a txt (``PEER_SCRIPTS``).
* ``faster-whisper-batched``: the same with ``BatchedInferencePipeline(model).transcribe(file, batch_size=8)``.
* ``transformers``: the pipeline script from today's guides: pydub converts m4a to mp3, then
  ``pipeline("automatic-speech-recognition", chunk_length_s=30, batch_size=16, return_timestamps=True)`` on the
  weights converted to transformers format, float32 on CPU.
* ``whisper-hf``: ours with ``--set asr.backend=whisper-hf``.

The peers' scripts import neither this benchmark nor the ``assistant`` package, so their RSS is their own; the
model directories are resolved here, in the parent, and passed on their command lines.

Targets (checked by this benchmark, not by the tests): ``ours`` median wall <= 1.0x the plain faster-whisper
script's, peak RSS <= its + 10%, WER no worse than its.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
SYSTEMS = ("ours", "faster-whisper", "faster-whisper-batched", "transformers", "whisper-hf")
REFERENCE = "faster-whisper"  # the ratios are to this row
TARGET_WALL_RATIO = 1.0  # ours / faster-whisper, median wall
TARGET_RSS_RATIO = 1.10  # ours / faster-whisper, peak RSS

# The peers' scripts as users write them; run as ``python script.py AUDIO MODEL_DIR OUT_DIR``.
PEER_SCRIPTS: dict[str, str] = {
    "faster-whisper": """
import sys
from pathlib import Path

from faster_whisper import WhisperModel

audio, model_dir, out_dir = sys.argv[1:4]
model = WhisperModel(model_dir, device="cpu", compute_type="int8")
segments, info = model.transcribe(audio, vad_filter=True)
text = "\\n".join(segment.text.strip() for segment in segments)
(Path(out_dir) / (Path(audio).stem + ".txt")).write_text(text + "\\n", encoding="utf-8")
""",
    "faster-whisper-batched": """
import sys
from pathlib import Path

from faster_whisper import BatchedInferencePipeline, WhisperModel

audio, model_dir, out_dir = sys.argv[1:4]
model = WhisperModel(model_dir, device="cpu", compute_type="int8")
pipeline = BatchedInferencePipeline(model)
segments, info = pipeline.transcribe(audio, batch_size=8)
text = "\\n".join(segment.text.strip() for segment in segments)
(Path(out_dir) / (Path(audio).stem + ".txt")).write_text(text + "\\n", encoding="utf-8")
""",
    "transformers": """
import sys
from pathlib import Path

import torch
from pydub import AudioSegment
from transformers import pipeline

audio, model_dir, out_dir = sys.argv[1:4]
pipe = pipeline(
    "automatic-speech-recognition",
    model=model_dir,
    dtype=torch.float16 if torch.cuda.is_available() else torch.float32,
    device="cuda:0" if torch.cuda.is_available() else "cpu",
)
# the guides convert first: the pipeline's ffmpeg_read pipes the file through stdin, which m4a cannot take
mp3 = Path(out_dir) / (Path(audio).stem + ".mp3")
AudioSegment.from_file(audio).export(str(mp3), format="mp3")
output = pipe(str(mp3), chunk_length_s=30, batch_size=16, return_timestamps=True)
(Path(out_dir) / (Path(audio).stem + ".txt")).write_text(output["text"].strip() + "\\n", encoding="utf-8")
""",
}


@dataclass
class Runs:
    """Every measured run of one system."""

    system: str
    walls: list[float] = field(default_factory=list)  # seconds, process start to exit
    rss_mib: list[float] = field(default_factory=list)  # the child's own peak RSS
    texts: list[str] = field(default_factory=list)
    failure: str = ""


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


def model_dirs(systems: list[str]) -> dict[str, str]:
    """The CTranslate2 directory ours loads, and (only when ``transformers`` runs) its transformers conversion."""
    from assistant.models import resolve_model

    location = resolve_model("whisper-base")
    dirs = {"ct2": str(location.path)}
    if "transformers" in systems:
        from assistant.asr.whisper_hf import _model_source

        dirs["hf"] = _model_source(location)  # converted once into the cache, as whisper-hf does
    return dirs


def peer_script(scripts: Path, system: str) -> Path:
    """Where the peer's script is written: a name no module it imports has (``transformers.py`` would shadow)."""
    return scripts / f"peer_{system.replace('-', '_')}.py"


def command(system: str, audio: Path, out_dir: Path, scripts: Path, dirs: dict[str, str]) -> list[str]:
    """The command line one run of ``system`` executes."""
    if system in ("ours", "whisper-hf"):
        line = [sys.executable, "-m", "assistant", "transcribe", str(audio), "--quiet", "--format", "txt"]
        line += ["--output-dir", str(out_dir)]
        return line + (["--set", "asr.backend=whisper-hf"] if system == "whisper-hf" else [])
    model = dirs["hf"] if system == "transformers" else dirs["ct2"]
    return [sys.executable, str(peer_script(scripts, system)), str(audio), model, str(out_dir)]


def measure(line: list[str], cwd: Path, log: Path) -> tuple[float, float, int]:
    """Run ``line`` to its exit: (wall seconds, the child's own peak RSS in MiB, exit code)."""
    with log.open("w") as sink:
        started = time.perf_counter()
        child = subprocess.Popen(line, cwd=cwd, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)  # reaped here; keeps Popen from waiting again
    return wall, usage.ru_maxrss / 1024, child.returncode


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


def load_average() -> str:
    """The first three fields of /proc/loadavg (1, 5 and 15 minutes)."""
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def run_all(systems: list[str], audio: Path, repeats: int, folder: Path) -> list[Runs]:
    """``repeats`` interleaved rounds over ``systems``; a system that fails once is dropped from later rounds."""
    dirs = model_dirs(systems)
    scripts = folder / "scripts"
    scripts.mkdir()
    for name, source in PEER_SCRIPTS.items():
        peer_script(scripts, name).write_text(source.lstrip(), encoding="utf-8")
    work = folder / "cwd"  # children start here: nothing in the working directory can shadow an import
    work.mkdir()
    results = {system: Runs(system) for system in systems}
    for round_ in range(repeats):
        for system in systems:
            runs = results[system]
            if runs.failure:
                continue
            out_dir = folder / f"out-{system}-{round_}"  # fresh: no earlier transcript is found or overwritten
            out_dir.mkdir()
            log = folder / f"log-{system}-{round_}.txt"
            line = command(system, audio, out_dir, scripts, dirs)
            wall, rss, code = measure(line, work, log)
            transcript = out_dir / f"{audio.stem}.txt"
            if code != 0 or not transcript.exists():
                runs.failure = f"exit {code}: {shlex.join(line)}\n{log.read_text(errors='replace')[-2000:]}"
                print(f"{system} failed ({runs.failure})", file=sys.stderr)
                continue
            runs.walls.append(wall)
            runs.rss_mib.append(rss)
            runs.texts.append(transcript.read_text(encoding="utf-8"))
            print(f"round {round_ + 1}/{repeats} {system:23} {wall:7.1f} s {rss:7.0f} MiB", file=sys.stderr)
    return [results[system] for system in systems]


def print_table(results: list[Runs], audio_s: float, reference: str) -> None:
    """The Markdown table, one row per system that ran, then the target check for ``ours``."""
    done = [runs for runs in results if runs.walls]
    base = next((runs for runs in done if runs.system == REFERENCE), None)
    base_wall = statistics.median(base.walls) if base else 0.0
    base_rss = max(base.rss_mib) if base else 0.0

    def wer(runs: Runs) -> float | None:  # the worst over the repeats (greedy decoding: normally all equal)
        return max(word_error_rate(text, reference) for text in runs.texts) if reference else None

    print(f"| system | x real time | median wall s | peak RSS MiB | wall vs {REFERENCE} | RSS vs {REFERENCE} | WER |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for runs in done:
        wall, rss, error = statistics.median(runs.walls), max(runs.rss_mib), wer(runs)
        wall_ratio = f"{wall / base_wall:.2f}x" if base else "n/a"
        rss_ratio = f"{rss / base_rss:.2f}x" if base else "n/a"
        shown = f"{error:.3f}" if error is not None else "n/a"
        cells = [runs.system, f"{audio_s / wall:.1f}", f"{wall:.1f}", f"{rss:.0f}", wall_ratio, rss_ratio, shown]
        print("| " + " | ".join(cells) + " |")
    print()
    for runs in done:
        print(f"{runs.system}: walls {', '.join(f'{w:.1f}' for w in runs.walls)} s; "
              f"peak RSS {', '.join(f'{r:.0f}' for r in runs.rss_mib)} MiB")  # fmt: skip
    for runs in results:
        if runs.failure:
            print(f"{runs.system}: FAILED, {runs.failure.splitlines()[0]}")
    ours = next((runs for runs in done if runs.system == "ours"), None)
    if ours and base:
        wall_ratio = statistics.median(ours.walls) / base_wall
        rss_ratio = max(ours.rss_mib) / base_rss
        ours_wer, base_wer = wer(ours), wer(base)
        checks = [
            f"wall {wall_ratio:.2f}x <= {TARGET_WALL_RATIO:.2f}x: {_verdict(wall_ratio <= TARGET_WALL_RATIO)}",
            f"RSS {rss_ratio:.2f}x <= {TARGET_RSS_RATIO:.2f}x: {_verdict(rss_ratio <= TARGET_RSS_RATIO)}",
        ]
        if ours_wer is not None and base_wer is not None:
            checks.append(f"WER {ours_wer:.3f} <= {base_wer:.3f}: {_verdict(ours_wer <= base_wer)}")
        print(f"targets for ours vs {REFERENCE}: " + "; ".join(checks))


def _verdict(met: bool) -> str:
    return "met" if met else "MISSED"


def main() -> None:
    """Parse the options, make or take the audio, run the systems and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="minutes of synthesised speech (default 3)")
    parser.add_argument("--audio", type=Path, help="use this file instead of synthesised speech (no WER then)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each system, interleaved (default 3)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma-separated subset of {','.join(SYSTEMS)}")
    args = parser.parse_args()
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    unknown = sorted(set(systems) - set(SYSTEMS))
    if unknown or not systems or args.repeats < 1:
        parser.error(f"--systems takes names from {','.join(SYSTEMS)} (got {unknown or 'none'}); --repeats >= 1")

    from assistant.audio.decode import probe

    print(f"load average before: {load_average()}")
    with tempfile.TemporaryDirectory() as temp:
        folder = Path(temp)
        if args.audio:
            audio, reference = args.audio.resolve(), ""
        else:
            audio, reference = make_speech(args.minutes, folder)
        audio_s = probe(audio).duration_s or 0.0
        print(f"audio: {audio_s:.1f} s ({audio.name}); {args.repeats} interleaved runs per system; "
              f"{os.cpu_count()} CPUs; {sys.executable}")  # fmt: skip
        results = run_all(systems, audio, args.repeats, folder)
    print(f"load average after: {load_average()}")
    print()
    print_table(results, audio_s, reference)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
