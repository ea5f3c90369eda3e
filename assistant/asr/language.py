"""Which language each speech window is in, for recordings that switch language.

Whisper's language detection looks at one window. It is reliable on a few seconds of clear speech and unreliable on a
short interjection ("OK", "嗯") or a noisy stretch, where a wrong guess makes the decoder *translate* the window into
the guessed language. So each window keeps its own detection only when that detection is sure, and an unsure window
takes the language of the speech around it (the rule below).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

# Whisper's languages, code -> the English name OpenAI's API returns in verbose_json ("english"), in Whisper's order
WHISPER_LANGUAGES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian", "kn": "kannada",
    "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian", "sw": "swahili",
    "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala", "km": "khmer", "sn": "shona",
    "yo": "yoruba", "so": "somali", "af": "afrikaans", "oc": "occitan", "ka": "georgian", "be": "belarusian",
    "tg": "tajik", "sd": "sindhi", "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese",
    "sa": "sanskrit", "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip
_CODES_BY_NAME = {name: code for code, name in WHISPER_LANGUAGES.items()}
SURE_MIN_S = 2.0  # a window shorter than this is unsure whatever its probability
SURE_MIN_PROBABILITY = 0.5  # below this the detection is unsure


@dataclass(frozen=True)
class LanguageGuess:
    """One window's own detection: ``language`` None when the window held no words."""

    language: str | None
    probability: float
    duration_s: float

    @property
    def sure(self) -> bool:
        return self.language is not None and self.duration_s >= SURE_MIN_S and self.probability >= SURE_MIN_PROBABILITY


def settle_languages(guesses: Sequence[LanguageGuess], *, before: str | None = None) -> list[str | None]:
    """The language each window is transcribed in, in order.

    A sure window (at least ``SURE_MIN_S`` seconds and probability at least ``SURE_MIN_PROBABILITY``) keeps its own
    detection. An unsure one takes the language of the nearest sure window before it (``before``: the last language
    heard in the previous block of the same file), else the nearest sure window after it; with no sure window at all
    it keeps its own guess. A window with no words gets None (nothing to redo).
    """
    settled: list[str | None] = []
    previous = before
    for index, guess in enumerate(guesses):
        if guess.language is None:
            settled.append(None)
        elif guess.sure:
            previous = guess.language
            settled.append(guess.language)
        else:
            settled.append(previous or _next_sure(guesses, index) or guess.language)
    return settled


def _next_sure(guesses: Sequence[LanguageGuess], index: int) -> str | None:
    return next((g.language for g in guesses[index + 1 :] if g.sure), None)


def language_code(value: str | None) -> str | None:
    """A language as Whisper's code: ``en`` stays ``en``, OpenAI's ``english`` (any case) becomes ``en``; a value
    that is neither is returned lower-cased (a server's own naming); None stays None."""
    if not value:
        return None
    lowered = value.strip().lower()
    return lowered if lowered in WHISPER_LANGUAGES else _CODES_BY_NAME.get(lowered, lowered)
