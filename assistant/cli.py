"""Command line: ``assistant transcribe | chat | models``. Thin: it builds config and pipeline, and reports."""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import subprocess
import sys
import traceback
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from assistant.config import Config, load_config, to_dict
from assistant.errors import AsrError, AssistantError, ConfigError, OutputError
from assistant.files import atomic_write_text, name_fields, printable
from assistant.pipeline import FileResult, TranscriptionPipeline

if TYPE_CHECKING:
    from assistant.io.progress import Progress

# Picked from folders without a look inside: audio, then camcorder, broadcast, disc and streaming containers. MPEG-TS
# ".ts" and program stream ".ps" are left out on purpose and probed instead: TypeScript and PostScript share them.
MEDIA_SUFFIXES = frozenset(
    """.wav .wave .w64 .rf64 .bwf .mp3 .mp2 .mpa .m4a .m4b .aac .adts .flac .ogg .oga .opus .spx .wma .amr .awb
    .aiff .aif .aifc .caf .au .snd .ac3 .eac3 .ec3 .dts .mlp .thd .mka .wv .ape .tta .tak .ra .ram .gsm .voc
    .mp4 .m4v .mkv .mk3d .webm .mov .qt .avi .divx .wmv .asf .flv .f4v .f4a .3gp .3g2 .ogv .ogm .mxf .dv .nut
    .mts .m2ts .m2t .tp .trp .mpg .mpeg .mpe .m2p .vob .evo .mod .tod .rm .rmvb .wtv .dvr-ms""".split()
)
# Skipped in folders without probing: transcripts and subtitles (what this command writes next to its inputs), text,
# documents, images, archives, playlists and sidecar files. Any other extension (or none) is probed with ffprobe.
NOT_MEDIA_SUFFIXES = frozenset(
    """.txt .srt .vtt .json .jsonl .tsv .ass .ssa .sub .idx .sbv .lrc .ttml .dfxp .smi .md .rst .csv .xml .html .htm
    .yaml .yml .toml .ini .cfg .conf .log .nfo .pdf .doc .docx .odt .rtf .xls .xlsx .ods .ppt .pptx .odp .epub
    .jpg .jpeg .png .gif .bmp .webp .heic .heif .tif .tiff .svg .ico .psd .cr2 .nef .arw .dng .thm .xmp .lrf
    .zip .tar .gz .tgz .bz2 .xz .zst .7z .rar .iso .exe .dll .so .dylib .py .pyc .js .css .sh .bat .c .h .db
    .sqlite .lnk .url .torrent .m3u .m3u8 .pls .cue .sfv .md5 .sha1 .sha256 .par2 .partial""".split()
)
PROBE_TIMEOUT_S = 20  # ffprobe on one file of unknown kind; a stalled network mount must not hang the batch
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    from assistant.io.encoding import tolerant_output

    tolerant_output(sys.stdout, sys.stderr)
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except AssistantError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="assistant", description="Local, private voice assistant pipeline.")
    commands = parser.add_subparsers(dest="command", required=True)

    transcribe = commands.add_parser("transcribe", help="transcribe audio/video files to text and subtitles")
    transcribe.add_argument("paths", nargs="+", metavar="PATH", help="files, directories or glob patterns")
    _add_config_options(transcribe)
    transcribe.add_argument("--model", help="offline bundle name, local model directory or hub id (asr.model)")
    transcribe.add_argument("--backend", help="ASR backend: faster-whisper, whisper-hf, openai (remote; asr.base_url)")
    transcribe.add_argument("--language", help="zh, en, yue, ... or auto (asr.language)")
    transcribe.add_argument("--task", choices=("transcribe", "translate"), help="translate = into English")
    transcribe.add_argument("--format", help="comma-separated: txt,srt,vtt,json,tsv (transcribe.formats)")
    transcribe.add_argument("--output-dir", help="where outputs go; default: next to each input")
    transcribe.add_argument("--no-vad", action="store_true", help="transcribe silences too (vad.enabled=false)")
    transcribe.add_argument(
        "--word-timestamps", action="store_true", help="words with times and probability in JSON (asr.word_timestamps)"
    )
    transcribe.add_argument(
        "--audio-track", type=int, metavar="N", help="audio stream to transcribe, 0 = first (transcribe.audio_track); "
        "default: the one that holds the speech",
    )  # fmt: skip
    transcribe.add_argument(
        "--audio-channel", type=int, metavar="N", help="one channel of it, 0 = first (transcribe.audio_channel); "
        "default: the mix, or the clearest channel when they differ",
    )  # fmt: skip
    transcribe.add_argument("--quiet", action="store_true", help="no progress bars")
    transcribe.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                            help="fan the files out to Ray workers: 'local' (the default) starts Ray on this machine, "
                                 "an address (ray://HOST:10001) joins a cluster; transcribe.ray_workers")  # fmt: skip
    transcribe.set_defaults(handler=_transcribe)

    chat = commands.add_parser("chat", help="chat with the language model in the console (streamed replies)")
    chat.add_argument("--text", action="store_true", help="type instead of speaking (input.source=text)")
    chat.add_argument(
        "--audio", nargs="+", metavar="FILE", help="play audio files in as spoken turns (input.source=file)"
    )
    chat.add_argument("--push-to-talk", action="store_true", help="Enter starts and ends a turn (input.mode)")
    chat.add_argument("--device", help="microphone: a sounddevice name or index (input.device)")
    chat.add_argument("--log", help="also write every turn with its metrics to this JSONL file (output.log)")
    chat.add_argument("--speak", action="store_true", help="speak replies aloud as they stream (speaker sink)")
    _add_config_options(chat)
    chat.add_argument("--model", help="offline bundle, GGUF file, transformers directory or hub id (llm.model)")
    chat.add_argument("--backend", help="llama-cpp, hf or openai (llm.backend)")
    chat.add_argument("--template", help="prompt format: auto, tokenizer or a built-in (llm.template)")
    chat.add_argument("--system", help="system prompt (llm.system)")
    chat.add_argument("--persona", help="YAML character file: name, greeting, system (llm.persona)")
    chat.add_argument("--load", help="resume a saved conversation (chat.load)")
    chat.add_argument("--save", help="save the conversation to this JSON file after every turn (chat.autosave)")
    chat.add_argument("--verbose", action="store_true", help="time to first token and tokens/s after every reply")
    chat.set_defaults(handler=_chat)

    serve = commands.add_parser("serve", help="serve OpenAI-compatible HTTP, a WebSocket session and a browser page")
    _add_config_options(serve)
    serve.add_argument("--host", help="address to bind (server.host; default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="TCP port (server.port; default 8765)")
    serve.add_argument("--model", help="chat model (llm.model)")
    serve.add_argument("--asr-model", help="Whisper model (asr.model)")
    serve.set_defaults(handler=_serve)

    client = commands.add_parser("client", help="talk to an 'assistant serve' over its WebSocket session")
    client.add_argument("--url", default="ws://127.0.0.1:8765/v1/realtime", help="the server's /v1/realtime URL")
    client.add_argument("--api-key", help="the server's API key (default: ASSISTANT_API_KEY)")
    mode = client.add_mutually_exclusive_group()
    mode.add_argument("--audio", nargs="+", metavar="FILE", help="stream audio files as speech")
    mode.add_argument("--mic", action="store_true", help="stream the microphone")
    mode.add_argument("--text", action="store_true", help="type turns (the default)")
    client.add_argument("--device", help="microphone: a sounddevice name or index")
    client.set_defaults(handler=_client)

    models = commands.add_parser("models", help="list the offline model bundles and whether they are installed")
    models.add_argument("--verify", action="store_true", help="assemble and check each installed bundle's sha256")
    models.set_defaults(handler=_models)
    return parser


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML configuration file (see configs/)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one option, e.g. asr.beam_size=5"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    parser.add_argument("--debug", action="store_true", help="print tracebacks of unexpected errors")


def _text(value: str | None) -> str | None:
    """A flag's value as a YAML string, whatever it looks like."""
    return None if value is None else json.dumps(value)


def _flag_overrides(flags: dict[str, str | None], args: argparse.Namespace) -> list[str]:
    """Command-line flags as ``key=value`` overrides, followed by the explicit ``--set`` ones (which win)."""
    return [f"{key}={value}" for key, value in flags.items() if value is not None] + list(args.set)


def _overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "asr.model": _text(args.model),
        "asr.backend": args.backend,
        "asr.language": args.language,
        "asr.task": args.task,
        "transcribe.formats": args.format,
        "transcribe.output_dir": args.output_dir,
        "vad.enabled": "false" if args.no_vad else None,
        "asr.word_timestamps": "true" if args.word_timestamps else None,
        "transcribe.audio_track": args.audio_track,
        "transcribe.audio_channel": args.audio_channel,
    }
    return _flag_overrides(flags, args)


def _chat_overrides(args: argparse.Namespace) -> list[str]:
    flags = {
        "llm.model": args.model,
        "llm.backend": args.backend,
        "llm.template": args.template,
        "llm.persona": args.persona,
        "chat.load": args.load,
        "chat.autosave": args.save,
        "input.source": "text" if args.text else "file" if args.audio else None,
        "input.mode": "push-to-talk" if args.push_to_talk else None,
        "input.device": args.device,
        "output.log": args.log,
        "output.sinks": _sinks(args),
    }
    return _flag_overrides(flags, args)


def _sinks(args: argparse.Namespace) -> str | None:
    extra = [name for name, wanted in (("jsonl", args.log), ("speaker", args.speak)) if wanted]
    return f"[{', '.join(['console', *extra])}]" if extra else None


def _chat(args: argparse.Namespace) -> int:
    config = load_config(args.config, _chat_overrides(args))
    if args.system is not None:  # free text: kept out of the YAML-parsed overrides
        config = dataclasses.replace(config, llm=dataclasses.replace(config.llm, system=args.system or None))
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        return EXIT_OK
    from assistant import registry
    from assistant.chat import ChatSession
    from assistant.conversation import Conversation
    from assistant.io.console import ConsoleOptions, run_console

    resumed = Conversation.load(config.chat.load) if config.chat.load else None  # a bad file fails before the load
    session = ChatSession.from_config(registry.create("llm", config.llm.backend, config.llm), config.llm)
    if resumed is not None:
        session.resume(resumed)
    interactive = sys.stdin.isatty()
    failures = 0
    if _input_source(config, args.audio, interactive) != "text":
        from assistant.voice_cli import run_voice

        failures, fall_back = run_voice(config, session, args.audio or [], verbose=args.verbose)
        if not fall_back:
            session.model.close()
            return EXIT_SOME_FAILED if failures else EXIT_OK
    if interactive:
        print(f"{session.model.description}; /help lists the commands", file=sys.stderr)
    options = ConsoleOptions(verbose=args.verbose, interactive=interactive, autosave=config.chat.autosave)
    failures += run_console(session, options)
    session.model.close()
    return EXIT_SOME_FAILED if failures and not interactive else EXIT_OK


def _input_source(config: Config, audio: Sequence[str] | None, interactive: bool) -> str:
    """text | file | microphone: ``auto`` is the microphone when there is one and someone is at the terminal."""
    source = config.input.source
    if source == "file" and not audio:
        raise ConfigError("input.source file needs the files: assistant chat --audio FILE...")
    if source != "auto":
        return source
    if not interactive:
        return "text"
    from assistant.io.microphone import find_microphone

    try:
        find_microphone(config.input.device)
    except AssistantError as exc:
        print(f"{exc}; typing instead", file=sys.stderr)
        return "text"
    return "microphone"


def _client(args: argparse.Namespace) -> int:
    import asyncio

    from assistant.io.client import run_client

    key = args.api_key or os.environ.get("ASSISTANT_API_KEY")
    return asyncio.run(run_client(args.url, api_key=key, audio=args.audio or [], mic=args.mic, device=args.device))


def _serve(args: argparse.Namespace) -> int:
    # names are text as typed: YAML would read "::" (IPv6's any-address) as a mapping, "no" as false
    flags = {"server.host": _text(args.host), "server.port": args.port, "llm.model": _text(args.model),
             "asr.model": _text(args.asr_model)}  # fmt: skip
    config = load_config(args.config, _flag_overrides(flags, args))
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        return EXIT_OK
    from assistant.io.server import serve

    serve(config)
    return EXIT_OK


def _transcribe(args: argparse.Namespace) -> int:
    config = load_config(args.config, _overrides(args))
    if args.print_config:
        print(json.dumps(to_dict(config), indent=2, ensure_ascii=False))
        return EXIT_OK
    inputs, problems = expand_inputs(args.paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    if not inputs:
        if problems:
            print(f"{len(problems)} of {len(problems)} inputs failed", file=sys.stderr)
        return EXIT_SOME_FAILED if problems else EXIT_USAGE

    from assistant.io.progress import Progress

    failures = len(problems)
    namer = OutputNamer(config)
    if args.ray is not None:
        failures += _transcribe_on_ray(config, args.ray, inputs, namer, quiet=args.quiet, debug=args.debug)
    else:
        pipeline = TranscriptionPipeline.from_config(config)
        with Progress(inputs, enabled=not args.quiet) as progress:
            for path in inputs:
                result = _transcribe_here(path, pipeline, progress)
                failures += not _report(path, result, namer, pipeline.transcriber.description, progress, args.debug)
    if failures:
        print(f"{failures} of {len(inputs) + len(problems)} inputs failed", file=sys.stderr)
    return EXIT_SOME_FAILED if failures else EXIT_OK


def _transcribe_here(path: Path, pipeline: TranscriptionPipeline, progress: Progress) -> FileResult | Exception:
    try:
        return pipeline.transcribe_file(path, on_progress=progress.file_progress(path))
    except Exception as exc:  # one broken file must not stop the batch
        return exc


def _transcribe_on_ray(config: Config, address: str, inputs: list[Path], namer: OutputNamer, *, quiet: bool,
                       debug: bool) -> int:  # fmt: skip
    """The files on a pool of Ray workers (assistant.ray_batch), reported as a local run reports them; the count of
    failed files."""
    from assistant.io.progress import Progress
    from assistant.ray_batch import Failure, RayPool

    failures = 0
    with RayPool(config, address) as pool, Progress(inputs, enabled=not quiet) as progress:
        progress.print(pool.description)
        for path, result in pool.transcribe(inputs, progress.running):
            outcome = result.error if isinstance(result, Failure) else result
            failures += not _report(path, outcome, namer, pool.model, progress, debug)
    return failures


def _report(path: Path, result: FileResult | Exception, namer: OutputNamer, description: str, progress: Progress,
            debug: bool) -> bool:  # fmt: skip
    """Write one input's outputs and print one line either way; False when it failed.

    A failure while writing is reported as an output error (``output:``), never as a failed transcription.
    """
    try:
        if isinstance(result, Exception):
            return _report_failure(progress, path, result, AsrError.code, debug=debug)
        try:
            written = namer.write(path, result, description)
        except Exception as exc:  # a full disk or a read-only folder is not the recogniser's fault
            return _report_failure(progress, path, exc, OutputError.code, debug=debug)
    finally:
        progress.file_done(path)
    audio_s, wall_s = result.transcript.audio_s, result.timings.total_s
    speed = f"{audio_s / wall_s:.1f}x real time" if wall_s > 0 else ""
    outputs = ", ".join(printable(str(target)) for target in written)
    progress.print(f"{printable(str(path))}: {audio_s:.1f} s in {wall_s:.1f} s ({speed}) -> {outputs}")
    for warning in result.warnings:
        progress.print(f"warning: '{printable(str(path))}': {warning}")
    return True


def _report_failure(progress: Progress, path: Path, exc: Exception, code: str, *, debug: bool) -> bool:
    """One line for a failed input: an AssistantError's own code and message, else ``code`` and the exception."""
    shown = printable(str(path))
    if isinstance(exc, AssistantError):
        message = printable(exc.message)
        where = "" if shown in message else f"'{shown}': "
        progress.print(f"{exc.code}: {where}{message}")
        return False
    progress.print(f"{code}: '{shown}': unexpected {type(exc).__name__}: {printable(str(exc))}")
    if debug:
        progress.print("".join(traceback.format_exception(exc)))
    return False


def expand_inputs(patterns: Sequence[str]) -> tuple[list[Path], list[str]]:
    """Files as given, media files under directories (recursively), and glob matches.

    Also returns one error line per problem: a pattern that matched nothing, a directory that holds no media (with
    what was skipped there and why).
    """
    found: list[Path] = []
    problems: list[str] = []
    for pattern in patterns:
        matches = [Path(pattern)] if os.path.lexists(pattern) else [Path(p) for p in sorted(glob.glob(pattern))]
        if not matches:
            problems.append(
                f"audio-decode: cannot read '{printable(pattern)}': no such file, directory or matching pattern"
            )
        for match in matches:
            if not match.is_dir():
                found.append(match)
                continue
            media, skipped = _media_files(match)
            found.extend(media)
            if not media:
                problems.append(_no_media_message(match, skipped))
    unique = {path.resolve(): path for path in reversed(found)}  # first spelling of each file wins
    return list(reversed(unique.values())), problems


def _media_files(directory: Path) -> tuple[list[Path], Counter[str]]:
    """The media files under ``directory`` (sorted), and how many others were skipped for each reason."""
    media: list[Path] = []
    skipped: Counter[str] = Counter()
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        reason = _skip_reason(path, directory)
        if reason is None:
            media.append(path)
        else:
            skipped[reason] += 1
    return media, skipped


def _skip_reason(path: Path, directory: Path) -> str | None:
    """Why a file found in a folder is not transcribed, or None to transcribe it.

    Hidden files (and anything in hidden folders: ``.git``, macOS ``._clip.MTS`` resource forks, our own ``.partial``
    temporaries) are skipped; known media extensions are taken; known non-media ones skipped; anything else is probed.
    """
    if any(part.startswith(".") for part in path.relative_to(directory).parts):
        return "hidden"
    suffix = path.suffix.lower()
    if suffix in MEDIA_SUFFIXES:
        return None
    if suffix in NOT_MEDIA_SUFFIXES:
        return f"{suffix} (not media)"
    return _probe_reason(path)


def _probe_reason(path: Path) -> str | None:
    """None when ffprobe finds an audio stream in ``path`` (a file whose extension tells nothing), else why not."""
    from assistant.audio import tool_path  # decoding lives in assistant.audio; if it moves, change this line

    try:
        if path.stat().st_size == 0:
            return "empty"
        ffprobe = tool_path("ffprobe")
    except OSError:
        return "unreadable"
    except AssistantError:
        return "unknown extension, not probed (ffprobe is not installed)"
    command = [ffprobe, "-v", "error", "-show_entries", "stream=codec_type", "-of", "csv=p=0", os.fspath(path)]
    try:
        result = subprocess.run(command, capture_output=True, timeout=PROBE_TIMEOUT_S, check=False)
    except subprocess.TimeoutExpired:
        return f"ffprobe took over {PROBE_TIMEOUT_S} s"
    if result.returncode != 0:
        return "not audio or video (ffprobe)"
    return None if b"audio" in result.stdout.split() else "no audio stream (ffprobe)"


def _no_media_message(directory: Path, skipped: Counter[str]) -> str:
    shown = printable(str(directory))
    if not skipped:
        return f"audio-decode: no files in folder '{shown}'; give a folder holding audio or video files"
    reasons = ", ".join(f"{count} {reason}" for reason, count in skipped.most_common())
    total = sum(skipped.values())
    return (
        f"audio-decode: no audio or video files in folder '{shown}': skipped {total} "
        f"file{'s' if total != 1 else ''}: {reasons}; name a file to try it anyway"
    )


class OutputNamer:
    """Writes each format beside the input (or in output_dir), never overwriting another input's output."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._taken: set[Path] = set()

    def write(self, source: Path, result: FileResult, model: str) -> list[Path]:
        from assistant.asr.cues import CueOptions
        from assistant.asr.writers import WRITERS

        directory = Path(self._config.transcribe.output_dir) if self._config.transcribe.output_dir else source.parent
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(
                f"cannot create output directory '{printable(str(directory))}': {exc.strerror}; choose a writable "
                "--output-dir"
            ) from None
        stem = self._free_stem(directory, source.stem)
        meta = {
            **name_fields(source, "source"),  # "source" as text; "source_bytes" too when the name is not UTF-8
            "model": model,
            "task": self._config.asr.task,
            "audio_track": result.source.track,
            **({"audio_channel": result.source.channel} if result.source.channel is not None else {}),
            "timings": {
                "decode_s": round(result.timings.decode_s, 3),
                "vad_s": round(result.timings.vad_s, 3),
                "asr_s": round(result.timings.asr_s, 3),
                "total_s": round(result.timings.total_s, 3),
            },
        }
        written = []
        for fmt in self._config.transcribe.formats:
            target = directory / f"{stem}.{fmt}"
            text = WRITERS[fmt](result.transcript, meta, CueOptions.from_config(self._config.transcribe))
            atomic_write_text(target, text, what="output", error=OutputError, private=False)  # readable as umask says
            written.append(target)
        return written

    def _free_stem(self, directory: Path, stem: str) -> str:
        candidate, number = stem, 1
        while any((directory / f"{candidate}.{fmt}") in self._taken for fmt in self._config.transcribe.formats):
            number += 1
            candidate = f"{stem}-{number}"
        self._taken.update(directory / f"{candidate}.{fmt}" for fmt in self._config.transcribe.formats)
        return candidate


def _models(args: argparse.Namespace) -> int:
    from assistant.models import OFFLINE_BUNDLES, bundle_status, install_bundle

    for bundle in OFFLINE_BUNDLES.values():
        status = bundle_status(bundle)
        if args.verify and status != "not installed":
            status = f"verified, {install_bundle(bundle)}"
        print(f"{bundle.name:16} {bundle.format:5} {status:40} {bundle.description}")
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
