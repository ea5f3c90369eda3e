"""The text console chat: streamed replies, slash commands, and a scriptable mode when stdin is not a terminal.

Interactive: a ``>`` prompt, Ctrl-C during a reply cuts it (the partial reply stays in the history, marked cut), Ctrl-C
or Ctrl-D at the prompt ends the session. Piped: every input line is one user turn (commands work too) and each reply
is printed followed by a newline, so ``printf 'hi\\nwhat is 2+2\\n' | assistant chat --text`` is a script.

A message of several lines: pasted at the prompt (bracketed paste: the terminal marks the paste, readline keeps it
as one line with its line breaks), or typed with a backslash at the end of each line but the last (typed or piped).
Input in any encoding: lines are read as bytes and decoded by ``assistant.io.encoding``; a line whose encoding
cannot be told fails its own turn with one line on stderr.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from assistant.chat import ChatSession
from assistant.config import OutputConfig
from assistant.conversation import Conversation
from assistant.errors import AssistantError, CommandError
from assistant.io.encoding import LineDecoder, piped_reader
from assistant.llm.base import Reply
from assistant.messages import Audio, TurnMetrics

HELP = """commands:
  /reset              forget the conversation (the system prompt stays)
  /undo               remove the last exchange
  /regenerate         replace the last reply with a new one
  /continue           extend the last reply where it stopped
  /save [FILE]        save the conversation as JSON (default: the autosave file or conversation.json)
  /load FILE          resume a saved conversation
  /system [TEXT]      show the system prompt, or replace it
  /help               this list
  /quit               leave (Ctrl-D too)
start a message with // to send a line that begins with /"""

DEFAULT_SAVE = "conversation.json"
PROMPT, MORE_PROMPT = "> ", ". "  # the prompt, and the one for the next line of a message continued by a backslash
CONTINUES = "\\"  # a line ending in this continues the message on the next line (the backslash is dropped)


@dataclass(frozen=True)
class ConsoleOptions:
    verbose: bool = False  # time to first token and tokens/s after every reply
    interactive: bool = True  # prompt and notices; False when stdin is piped
    autosave: str | None = None  # saved after every turn


class ConsoleChat:
    def __init__(self, session: ChatSession, options: ConsoleOptions, *, out: TextIO, err: TextIO) -> None:
        self._session = session
        self._options = options
        self._out = out
        self._err = err
        self._commands: dict[str, Callable[[str], Reply | None]] = {
            "/reset": self._reset,
            "/undo": self._undo,
            "/regenerate": lambda _: self._session.regenerate(),
            "/continue": lambda _: self._session.continue_reply(),
            "/save": self._save,
            "/load": self._load,
            "/system": self._system,
            "/help": lambda _: self._notice(HELP),
        }

    def run(self, read_line: Callable[[], str | None]) -> int:
        """Read turns until end of input (None) or /quit; returns the number of turns that failed."""
        persona = self._session.conversation.persona
        if persona and persona.greeting and self._options.interactive:
            self._print(f"{persona.name}: {persona.greeting}\n")
        failures = 0
        while True:
            try:
                line = read_line()
            except AssistantError as exc:  # a line that cannot be read (its encoding): its turn fails, no more
                failures += 1
                print(exc, file=self._err, flush=True)
                continue
            if line is None or line.strip() in ("/quit", "/exit"):
                return failures
            if not line.strip():
                continue
            try:
                reply = self._dispatch(line.strip())
                if reply is not None:
                    self._show(reply)
                    self._autosave()
            except AssistantError as exc:
                failures += 1
                print(exc, file=self._err, flush=True)

    def _dispatch(self, line: str) -> Reply | None:
        if line.startswith("//"):
            return self._session.send(line[1:])
        if line.startswith("/"):
            name, _, argument = line.partition(" ")
            command = self._commands.get(name)
            if command is None:
                raise CommandError(f"unknown command {name}; /help lists the commands")
            return command(argument.strip())
        return self._session.send(line)

    def _show(self, reply: Reply) -> None:
        try:
            for delta in reply:
                self._print(delta)
        except KeyboardInterrupt:
            reply.close()
            self._print(" [cut]")
        self._print("\n")
        if self._options.verbose:
            stats = reply.stats
            print(
                f"[{stats.prompt_tokens} prompt tokens ({stats.cached_tokens} cached), "
                f"first token {stats.first_token_s * 1000:.0f} ms, {stats.completion_tokens} tokens, "
                f"{stats.decode_tokens_per_s:.1f} tok/s, {stats.finish_reason}]",
                file=self._err,
                flush=True,
            )

    def _print(self, text: str) -> None:
        self._out.write(text)
        self._out.flush()

    def _notice(self, text: str) -> None:
        """Command feedback: on the terminal in interactive use, on stderr when scripted (stdout has only replies)."""
        print(text, file=self._out if self._options.interactive else self._err, flush=True)

    def _autosave(self) -> None:
        if self._options.autosave:
            self._session.conversation.save(self._options.autosave)

    # --- commands ------------------------------------------------------------------------------------------------

    def _reset(self, _: str) -> None:
        self._session.conversation.reset()
        self._notice("conversation cleared")

    def _undo(self, _: str) -> None:
        removed = self._session.conversation.undo()
        self._notice(f"removed {len(removed)} message{'s' if len(removed) != 1 else ''}")
        self._autosave()

    def _save(self, argument: str) -> None:
        target = self._session.conversation.save(argument or self._options.autosave or DEFAULT_SAVE)
        self._notice(f"saved to {target}")

    def _load(self, argument: str) -> None:
        if not argument:
            raise CommandError("/load needs a file: /load conversation.json")
        self._session.resume(Conversation.load(Path(argument)))
        self._notice(f"loaded {len(self._session.conversation.turns)} messages from {argument}")

    def _system(self, argument: str) -> None:
        if argument:
            self._session.conversation.system = argument
            self._notice("system prompt replaced")
        else:
            self._notice(self._session.conversation.system or "(no system prompt)")


def run_console(session: ChatSession, options: ConsoleOptions) -> int:
    decoder = LineDecoder(sys.stdin.encoding)
    read_line = _terminal_reader(decoder) if options.interactive else piped_reader(decoder)
    return ConsoleChat(session, options, out=sys.stdout, err=sys.stderr).run(continued(read_line))


def continued(read_line: Callable[[str], str | None]) -> Callable[[], str | None]:
    """Messages from lines (``read_line(prompt)``): a line ending in a backslash goes on with the next one, so a
    message of several lines can be typed where a terminal has no bracketed paste (or piped). The end of input
    inside such a message sends what was read."""

    def read_message() -> str | None:
        lines: list[str] = []
        while True:
            line = read_line(MORE_PROMPT if lines else PROMPT)
            if line is None:
                return "\n".join(lines) if lines else None
            if not line.endswith(CONTINUES):
                return "\n".join([*lines, line])
            lines.append(line[: -len(CONTINUES)])

    return read_message


def _terminal_reader(decoder: LineDecoder) -> Callable[[str], str | None]:
    """Lines typed at the prompt, with line editing and history (readline); None on Ctrl-D or Ctrl-C.

    CPython turns readline's bracketed paste off (for its own REPL); it is turned back on, so a pasted paragraph
    is one line with its line breaks. readline sets the terminal's paste mode only while it reads a line, and only
    when stdin and stdout are a terminal (else ``input()`` does not use readline), and clears it after each line,
    on Ctrl-C and at the end. libedit (some macOS builds) has no such mode, and Windows has no readline (its console
    keeps a paste's lines apart too): there the backslash serves."""
    try:
        import readline
    except ImportError:  # Windows: input() edits lines itself
        readline = None
    if readline is not None and "libedit" not in (readline.__doc__ or ""):
        readline.parse_and_bind("set enable-bracketed-paste on")

    def read(prompt: str) -> str | None:
        try:
            line = input(prompt)
        except UnicodeDecodeError as exc:  # a strict locale codec: the bytes typed are in the error
            return decoder.decode(bytes(exc.object).rstrip(b"\r\n"))
        except (EOFError, KeyboardInterrupt):
            print()
            return None
        return _readable(line, decoder)

    return read


def _readable(line: str, decoder: LineDecoder) -> str:
    """``line`` as read by ``input()``; under a UTF-8 C locale bytes that were not UTF-8 came in as lone surrogates
    (Python's ``surrogateescape``): those bytes are decoded again."""
    try:
        line.encode("utf-8")
    except UnicodeEncodeError:
        return decoder.decode(line.encode(sys.stdin.encoding or "utf-8", "surrogateescape"))
    return line


class ConsoleSink:
    """Voice turns on the terminal: the transcript, then the reply as it streams; metrics with --verbose."""

    def __init__(self, output: OutputConfig, *, verbose: bool = False) -> None:
        self._verbose = verbose
        self._live_line = sys.stdout.isatty()  # partial transcripts update one line in place on a terminal
        self._partial_shown = False

    def partial(self, text: str) -> None:
        if self._live_line:
            sys.stdout.write(f"\r\x1b[Kyou: {text} …")
            sys.stdout.flush()
            self._partial_shown = True

    def transcript(self, text: str) -> None:
        if self._partial_shown:
            sys.stdout.write("\r\x1b[K")
            self._partial_shown = False
        print(f"you: {text}", flush=True)
        sys.stdout.write("assistant: ")
        sys.stdout.flush()

    def delta(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    def audio(self, audio: Audio) -> None:
        pass

    def interrupted(self) -> None:
        pass

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None:
        print(" [cut]" if metrics.cut else "", flush=True)
        if self._verbose:
            print(_latency_line(metrics), file=sys.stderr, flush=True)

    def error(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def notice(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def _latency_line(metrics: TurnMetrics) -> str:
    """``--verbose``: a turn's latency and where it went, in ms from the end of speech."""
    audio = metrics.speech_end_to_first_audio_ms
    parts = [f"{metrics.audio_s:.1f} s of speech; end of speech -> transcript "
             f"{metrics.speech_end_to_transcript_ms:.0f} ms -> first reply character "
             f"{metrics.transcript_to_first_char_ms:.0f} ms (total {metrics.speech_end_to_first_char_ms:.0f} ms"
             + (f", first audio {audio:.0f} ms" if audio is not None else "") + ")"]  # fmt: skip
    breakdown = [(name, value) for name, value in (("turn ended", metrics.endpoint_ms),
                 ("recognition started", metrics.asr_start_ms), ("recognition ran", metrics.asr_ms),
                 ("first token", metrics.first_token_ms)) if value is not None]  # fmt: skip
    if breakdown:
        parts.append(", ".join(f"{name} {value:.0f}" for name, value in breakdown)
                     + (", preemptive" if metrics.preemptive else ""))  # fmt: skip
    parts.append(f"{metrics.tokens_per_s:.1f} tok/s")
    return "[" + "; ".join(parts) + "]"
