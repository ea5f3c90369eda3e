"""Scale-out paths on one machine: remote recognition against a second local server, and batch transcription on a
local Ray instance, each against the plain local run measured in the same run (the peer).

    .venv/bin/python benchmarks/scale.py [--minutes 3] [--files 6] [--in-flight 1,2,4]

Remote: ``assistant transcribe --set asr.backend=openai`` of the ASR benchmark's meeting speech (``--minutes``)
against ``assistant serve`` on 127.0.0.1 (Whisper base, the same model as the local run), with 1, 2 and 4 windows
in flight. Ray: ``--files`` copies of a 30-second excerpt, ``assistant transcribe --ray`` (2 actors with 1 thread
each) against one local process (1 thread, and all cores). Wall seconds of the whole command (Ray's start and the
actors' model loads included), and audio seconds per wall second. On a 2-core machine the remote server shares the
cores with the client, so this measures the path's overhead, not a cluster's gain.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def make_speech(minutes: float, folder: Path) -> Path:
    spec = importlib.util.spec_from_file_location("asr_benchmark", ROOT / "benchmarks" / "asr.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return Path(module.make_speech(minutes, folder)[0])


def transcribe(paths: list[Path], out: Path, *extra: str) -> float:
    """Wall seconds of one ``assistant transcribe`` run (a fresh process: its model load is included)."""
    command = [sys.executable, "-m", "assistant", "transcribe", *map(str, paths), "--format", "txt", "--quiet",
               "--output-dir", str(out), *extra]  # fmt: skip
    started = time.monotonic()
    subprocess.run(command, check=True, capture_output=True)
    return time.monotonic() - started


def start_server() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "assistant", "serve", "--port", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return process, f"http://127.0.0.1:{port}/v1"
        except OSError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the remote server did not start in 120 s")


def duration_s(path: Path) -> float:
    from assistant.audio.decode import probe

    return probe(path).duration_s or 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=3.0, help="meeting speech for the remote runs")
    parser.add_argument("--files", type=int, default=6, help="30-second files for the Ray runs")
    parser.add_argument("--in-flight", default="1,2,4", help="asr.max_in_flight values")
    args = parser.parse_args()
    rows: list[tuple[str, str, float, float]] = []  # (path, run, audio s, wall s)
    with tempfile.TemporaryDirectory() as folder:
        work = Path(folder)
        speech = make_speech(args.minutes, work)
        audio = duration_s(speech)
        rows.append(("remote", "local (peer)", audio, transcribe([speech], work / "local")))
        process, base = start_server()
        try:
            for count in [int(n) for n in args.in_flight.split(",")]:
                wall = transcribe([speech], work / f"remote{count}", "--set", "asr.backend=openai",
                                  "--set", f"asr.base_url={base}", "--set", "asr.model=whisper-base",
                                  "--set", f"asr.max_in_flight={count}")  # fmt: skip
                rows.append(("remote", f"{count} in flight", audio, wall))
        finally:
            process.terminate()
            process.wait(timeout=30)
        clips = []
        for index in range(args.files):
            clip = work / f"clip{index}.m4a"
            subprocess.run(["ffmpeg", "-loglevel", "error", "-y", "-ss", str(30 * index), "-t", "30", "-i", str(speech),
                            "-c", "copy", str(clip)], check=True)  # fmt: skip
            clips.append(clip)
        clips_s = sum(duration_s(clip) for clip in clips)
        rows.append(("ray", "local, 1 thread (peer)", clips_s,
                     transcribe(clips, work / "plain1", "--set", "asr.threads=1")))  # fmt: skip
        rows.append(("ray", "local, all cores", clips_s, transcribe(clips, work / "plain")))
        rows.append(("ray", "--ray local, 2 actors x 1 thread", clips_s,
                     transcribe(clips, work / "ray", "--ray", "--set", "transcribe.ray_workers=2")))  # fmt: skip
    print_table(rows)


def print_table(rows: list[tuple[str, str, float, float]]) -> None:
    peers = {path: wall for path, run, _, wall in rows if "peer" in run}
    print("\n| path | run | audio s | wall s | audio s per wall s | wall vs peer |\n|---|---|---|---|---|---|")
    for path, run, audio, wall in rows:
        print(f"| {path} | {run} | {audio:.0f} | {wall:.1f} | {audio / wall:.1f} | {wall / peers[path]:.2f}x |")


if __name__ == "__main__":
    main()
