"""Builds the voice chat from the configuration and runs it (the ``assistant chat`` voice modes)."""

from __future__ import annotations

import sys
import threading
from collections.abc import Sequence

from assistant import registry
from assistant.chat import ChatSession
from assistant.config import Config
from assistant.messages import AudioSource, ReplySink
from assistant.tts.base import Speech
from assistant.voice import PushToTalk, VoiceChat


def run_voice(config: Config, session: ChatSession, audio: Sequence[str], *, verbose: bool) -> tuple[int, bool]:
    """Voice turns until the source ends. Returns (failed turns, whether to fall back to typing)."""
    sinks = [registry.create("sink", name, config.output, verbose=verbose) for name in config.output.sinks]
    if audio:
        source = registry.create("source", "file", config.input, audio)
    else:
        source = registry.create("source", "microphone", config.input)
    try:
        return _take_turns(config, session, source, sinks, live=not audio)
    finally:  # every way out (Ctrl-C while a model loads too) frees the source's native resources
        source.close()


def _take_turns(config: Config, session: ChatSession, source: AudioSource, sinks: list[ReplySink], *,
                live: bool) -> tuple[int, bool]:  # fmt: skip
    transcriber = registry.create("asr", config.asr.backend, config.asr)
    speech = Speech.from_config(config.tts) if "speaker" in config.output.sinks else None  # the reply is spoken
    voice = VoiceChat(source, VoiceChat.build_segmenter(config), transcriber, session, sinks, config=config,
                      speech=speech)  # fmt: skip
    if isinstance(voice.segmenter, PushToTalk):
        _keyboard_toggles(voice.segmenter)
    if live:
        mode = "press Enter to talk, Enter again to send" if config.input.mode == "push-to-talk" else "speak"
        print(f"listening on {getattr(source, 'name', 'the microphone')}: {mode}; Ctrl-C to stop", file=sys.stderr)
    try:
        failures = voice.run()
        for sink in sinks:
            getattr(sink, "wait", lambda: None)()  # let the speaker finish the last reply
    except KeyboardInterrupt:  # leaving is not an error: nothing more is printed
        if sys.stderr.isatty():
            print("", file=sys.stderr)  # ends the line the terminal echoed ^C on
        return 0, False
    if voice.source_error is not None and live and sys.stdin.isatty():
        print("the microphone is gone; typing instead", file=sys.stderr)
        return failures, True
    return failures + (voice.source_error is not None), False


def _keyboard_toggles(push_to_talk: PushToTalk) -> None:
    def read_keys() -> None:
        for _ in sys.stdin:
            push_to_talk.toggle()
            state = "recording... Enter to send" if push_to_talk.recording.is_set() else "sent"
            print(state, file=sys.stderr, flush=True)

    threading.Thread(target=read_keys, name="push-to-talk keys", daemon=True).start()
