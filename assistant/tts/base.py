"""Voice out, the ``tts`` stage: one contract for synthesizers, and ``Speech``, the stage the rest of the program uses.

A ``Synthesizer`` turns text into mono float32 audio at its own rate (Piper for English, espeak-ng for Chinese and
any language espeak-ng speaks). ``Speech`` holds one of each, created through the registry on first use (a server
without Piper still starts; the first English request then says how to install it), and picks one per text from a
voice name: ``auto`` and the OpenAI voice names choose by language. No heavy imports here.
"""

from __future__ import annotations

import re
import threading
from typing import TYPE_CHECKING, Protocol

import numpy as np

from assistant import registry
from assistant.errors import ConfigError
from assistant.messages import Audio

if TYPE_CHECKING:
    from assistant.config import TtsConfig

SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=[.])(?=\s)|\n+")
CJK = re.compile(r"[\u3400-\u9fff]")
ESPEAK_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+\-/]*")  # espeak-ng voice names: cmn, en-us, en-us+f3, roa/it
MIN_SPEED, MAX_SPEED = 0.25, 4.0  # multiples of the voice's natural pace; the range OpenAI's speech API accepts

AUTO = "auto"
PIPER = "piper"
ESPEAK = "espeak-ng"
REMOTE = "openai"  # tts.backend openai: a remote /v1/audio/speech server speaks every text
REMOTE_VOICE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+\-]{0,63}")  # names servers use: alloy, af_bella, en_US-amy
REMOTE_DEFAULT_VOICE = "alloy"  # what "auto" asks a remote server for (OpenAI's first voice)
# OpenAI's voice names: clients send them; they all mean "by language" here
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "fable", "onyx", "nova", "sage", "shimmer", "verse",
                 "marin", "cedar")  # fmt: skip


class Synthesizer(Protocol):
    """One text-to-speech backend speaking with one voice."""

    description: str
    sample_rate: int  # Hz of the audio it returns

    def synthesize(self, text: str, *, speed: float = 1.0) -> Audio:
        """``text`` spoken at ``speed`` times the voice's pace: mono float32 in [-1, 1] at ``sample_rate``,
        ``start_s`` 0."""
        ...


LIST_MARKER = re.compile(r"(?:\d{1,3}|[A-Za-z])\.")  # "1." or "a." opening a list item: not a sentence of its own


def split_sentences(text: str) -> tuple[list[str], str]:
    """Whole sentences in ``text`` and the unfinished rest. A list marker ("1.") stays with the sentence it opens."""
    parts = SENTENCE_END.split(text)
    done: list[str] = []
    carried = ""
    for part in parts[:-1]:
        sentence = f"{carried} {part.strip()}".strip() if carried else (part or "").strip()
        carried = ""
        if LIST_MARKER.fullmatch(sentence):
            carried = sentence
        elif sentence:
            done.append(sentence)
    rest = parts[-1]
    return done, f"{carried} {rest.lstrip()}" if carried else rest


CLAUSE_END = re.compile(r"[,;:](?=\s)|[，；：、]")  # "1,000" is no clause end: a Latin mark needs a space after
MIN_FIRST_CLAUSE = 16  # characters (a Chinese one counts 2): a shorter opening is not worth a voice of its own


def first_clause(text: str) -> tuple[str, str] | None:
    """The opening clause of a reply that has no whole sentence yet, and the rest, when it is long enough to be
    spoken alone (``MIN_FIRST_CLAUSE``): the first audio of a reply whose first sentence is long need not wait for
    its end. None when there is no such clause yet. Later text goes sentence by sentence (better prosody; the first
    clause is playing meanwhile)."""
    for match in CLAUSE_END.finditer(text):
        clause = text[: match.end()].strip()
        if len(clause) + len(CJK.findall(clause)) >= MIN_FIRST_CLAUSE:
            return clause, text[match.end() :]
    return None


def has_cjk(text: str) -> bool:
    return CJK.search(text) is not None


def check_speed(speed: object, where: str = "speed") -> float:
    """``speed`` as a float, or ConfigError naming ``where`` and the valid range."""
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not MIN_SPEED <= speed <= MAX_SPEED:
        raise ConfigError(f"{where}: {speed!r} is not valid; give a number from {MIN_SPEED} to {MAX_SPEED}")
    return float(speed)


def voice_names(english_voice: str) -> tuple[str, ...]:
    """The voice names accepted besides ``espeak-ng:<voice>``."""
    return tuple(dict.fromkeys((AUTO, *OPENAI_VOICES, PIPER, english_voice, ESPEAK)))


def check_voice_name(voice: object, english_voice: str, where: str = "voice") -> str:
    """``voice`` if it names a voice (see ``Speech``), else ConfigError naming ``where`` and the valid choices."""
    if isinstance(voice, str):
        if voice in voice_names(english_voice):
            return voice
        backend, sep, name = voice.partition(":")
        if backend == ESPEAK and sep and ESPEAK_VOICE.fullmatch(name):
            return voice
    raise ConfigError(
        f"{where}: {voice!r} is not a voice; choose one of {', '.join(voice_names(english_voice))}, "
        f"or {ESPEAK}:<voice> for any espeak-ng voice (e.g. {ESPEAK}:en-us; 'espeak-ng --voices' lists them)"
    )


def check_remote_voice(voice: object, where: str = "voice") -> str:
    """``voice`` if it can be a remote server's voice name (the server decides whether it has it)."""
    if isinstance(voice, str) and REMOTE_VOICE.fullmatch(voice):
        return voice
    raise ConfigError(f"{where}: {voice!r} is not a voice name; give one the speech server has (e.g. alloy), or auto")


class Speech:
    """The ``tts`` stage: text in, audio out, with the synthesizer chosen per text from a voice name.

    - ``auto`` or an OpenAI voice name (alloy, echo, ...): by language. Text containing Chinese characters goes to
      espeak-ng with ``chinese_voice``, anything else to Piper with ``english_voice``.
    - ``piper`` or the ``english_voice`` name itself: Piper, whatever the text.
    - ``espeak-ng``: espeak-ng with ``chinese_voice``; ``espeak-ng:<voice>``: espeak-ng with that voice.

    With ``remote`` (``tts.backend: openai``) a remote server speaks every text and any voice name goes to it as it
    is (``auto``: alloy).
    """

    def __init__(
        self,
        *,
        english_voice: str = "joe-us-piper",
        chinese_voice: str = "cmn-latn-pinyin",
        voice: str = AUTO,
        speed: float = 1.0,
        remote: TtsConfig | None = None,
    ) -> None:
        if not ESPEAK_VOICE.fullmatch(chinese_voice):
            raise ConfigError(f"tts.chinese_voice: {chinese_voice!r} is not an espeak-ng voice name (e.g. cmn)")
        self.english_voice = english_voice
        self.chinese_voice = chinese_voice
        self._remote = remote
        self.voice = self.check_voice(voice, "tts.voice")
        self.speed = check_speed(speed, "tts.speed")
        self._synthesizers: dict[tuple[str, str], Synthesizer] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_config(cls, config: TtsConfig) -> Speech:
        return cls(english_voice=config.english_voice, chinese_voice=config.chinese_voice, voice=config.voice,
                   speed=config.speed, remote=config if config.backend == REMOTE else None)  # fmt: skip

    @property
    def description(self) -> str:
        if self._remote is not None:
            return f"openai {self._remote.model} at {self._remote.base_url}"
        return f"piper {self.english_voice} / espeak-ng {self.chinese_voice}"

    @property
    def voices(self) -> tuple[str, ...]:
        """The voice names accepted; besides these, ``espeak-ng:<voice>`` picks any espeak-ng voice (any name a
        remote server has, with a remote backend)."""
        return (AUTO, *OPENAI_VOICES) if self._remote is not None else voice_names(self.english_voice)

    def check_voice(self, voice: object, where: str = "voice") -> str:
        """``voice`` if it is one this stage speaks with, else ConfigError naming the valid choices."""
        if self._remote is not None:
            return check_remote_voice(voice, where)
        return check_voice_name(voice, self.english_voice, where)

    def choose(self, text: str, voice: str | None = None) -> tuple[str, str]:
        """The backend (a name in registry.TTS_BACKENDS) and its voice that would speak ``text`` with ``voice``."""
        voice = self.check_voice(self.voice if voice is None else voice)
        if self._remote is not None:
            return REMOTE, REMOTE_DEFAULT_VOICE if voice == AUTO else voice
        if voice == AUTO or voice in OPENAI_VOICES:
            return (ESPEAK, self.chinese_voice) if has_cjk(text) else (PIPER, self.english_voice)
        if voice in (PIPER, self.english_voice):
            return PIPER, self.english_voice
        if voice == ESPEAK:
            return ESPEAK, self.chinese_voice
        return ESPEAK, voice.partition(":")[2]

    def synthesize(self, text: str, *, voice: str | None = None, speed: float | None = None) -> Audio:
        """``text`` spoken with ``voice`` (default ``tts.voice``) at ``speed`` (default ``tts.speed``)."""
        pace = self.speed if speed is None else check_speed(speed)
        if not text.strip():
            return Audio(np.zeros(0, dtype=np.float32), self.synthesizer(*self.choose(text, voice)).sample_rate)
        return self.synthesizer(*self.choose(text, voice)).synthesize(text, speed=pace)

    def synthesizer(self, backend: str, voice: str) -> Synthesizer:
        """The synthesizer for ``backend`` speaking ``voice``, created on first use and kept."""
        with self._lock:
            found = self._synthesizers.get((backend, voice))
            if found is None:
                extra = (self._remote,) if backend == REMOTE else ()
                found = registry.create("tts", backend, voice, *extra)
                self._synthesizers[(backend, voice)] = found
            return found
