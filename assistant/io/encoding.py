"""Text in any encoding at the console: a line of bytes in, text out, or one clear error for that line.

A line that is UTF-8 (or the locale's encoding) is that. Anything else (GBK piped from a Windows file, Big5, Shift
JIS, a Latin-1 log) is detected: charset-normalizer proposes encodings, each candidate's text is judged by how much
of it is made of characters people commonly write, and the best one is taken only when nearly all of it is (a short
GBK line such as "北京是哪个国家的首都？" decodes without error as Korean cp949 too, and charset-normalizer's own
ranking picks that; only the GBK reading is made of common characters). Ties go to the encodings of the Chinese
consoles most of our users have. An encoding that worked is tried first on the stream's later lines.
"""

from __future__ import annotations

import codecs
import io
import re
import sys
import unicodedata
from collections.abc import Callable
from typing import TextIO

from assistant.errors import InputEncodingError

MIN_COMMON = 0.9  # share of a candidate's non-ASCII characters that must be common for it to be taken
CANDIDATES = ("gb18030", "big5", "shift_jis", "euc_kr", "cp1252", "cp1251")  # tried besides charset-normalizer's,
# in this order of preference on a tie: Chinese (simplified, traditional), Japanese, Korean, Western European, Cyrillic
MAX_PROPOSALS = 8  # charset-normalizer's candidates considered per line
_ASCII_SAMPLE = b"Hello, world 0-9 (a/b) ~?"  # what an encoding a console uses reads unchanged
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # C0 controls but tab and newline, and DEL
_WORDS = re.compile(r"\w+|\W")  # words (runs of letters and digits), and each other character alone


class LineDecoder:
    """Decodes the lines of one input stream; remembers the encoding that worked."""

    def __init__(self, locale_encoding: str | None = None) -> None:
        self._known = _unique(["utf-8", *([locale_encoding] if locale_encoding else [])])

    def decode(self, raw: bytes) -> str:
        """The text of ``raw``; InputEncodingError when no encoding gives text made of common characters."""
        raw = raw.removeprefix(codecs.BOM_UTF8)  # a file saved "UTF-8 with BOM" (Notepad)
        for encoding in self._known:
            text = _decoded(raw, encoding)
            if text is not None and (encoding == "utf-8" or common_share(text) >= MIN_COMMON):
                return self.clean(text)
        encoding, text = _detect(raw, self._known)
        if text is None:
            raise InputEncodingError(
                f"cannot tell the text encoding of the line {printable_bytes(raw)} (it is not UTF-8); send UTF-8, "
                "or name its encoding before the command: PYTHONIOENCODING=gbk assistant ..."
            )
        self._known.append(encoding)
        return self.clean(text)

    @staticmethod
    def clean(text: str) -> str:
        """``text`` without a byte-order mark and control characters (a NUL, an escape), tabs kept: nothing a
        person meant to send the model."""
        return _CONTROL.sub("", text.removeprefix("\ufeff"))


def common_share(text: str) -> float:
    """The share of ``text``'s non-ASCII characters that people commonly write, control characters counted as not
    (1.0 when it is all printable ASCII)."""
    judged = [
        _common(char, word) and char.isprintable()
        for word in _WORDS.findall(text)
        for char in word
        if not (char.isascii() and (char.isprintable() or char == "\t"))
    ]
    return sum(judged) / len(judged) if judged else 1.0


def printable_bytes(raw: bytes, limit: int = 24) -> str:
    """The first bytes of a line as Python writes them (``b'\\xb1\\xb1...'``), for an error message."""
    shown = repr(raw[:limit])
    return shown + ("..." if len(raw) > limit else "")


def _detect(raw: bytes, tried: list[str]) -> tuple[str, str | None]:
    """The encoding whose text of ``raw`` is most common (ties: ``CANDIDATES`` order, then charset-normalizer's),
    with that text; None when none reaches ``MIN_COMMON``."""
    best: tuple[float, int, str, str] | None = None
    for rank, encoding in enumerate(_unique([*CANDIDATES, *_proposals(raw)])):
        if encoding in tried:
            continue
        text = _decoded(raw, encoding)
        if text is None:
            continue
        share = common_share(text)
        if share >= MIN_COMMON and (best is None or (share, -rank) > (best[0], best[1])):
            best = (share, -rank, encoding, text)
    return (best[2], best[3]) if best is not None else ("", None)


def _proposals(raw: bytes) -> list[str]:
    """charset-normalizer's candidate encodings for ``raw``, best first, those that read ASCII as ASCII (a console
    line is not EBCDIC, and UTF-16 lines are not split at a newline byte); none when it is not installed."""
    try:
        from charset_normalizer import from_bytes
    except ImportError:
        return []
    proposed = [match.encoding for match in list(from_bytes(raw))[:MAX_PROPOSALS]]
    return [encoding for encoding in proposed if _decoded(_ASCII_SAMPLE, encoding) == _ASCII_SAMPLE.decode()]


def _decoded(raw: bytes, encoding: str) -> str | None:
    try:
        return raw.decode(encoding)
    except (UnicodeDecodeError, LookupError):
        return None


def _unique(encodings: list[str]) -> list[str]:
    """Encodings by codec (``GBK`` and ``cp936`` are one), first spelling kept."""
    seen: set[str] = set()
    kept = []
    for encoding in encodings:
        try:
            name = codecs.lookup(encoding).name
        except LookupError:
            continue
        if name not in seen:
            seen.add(name)
            kept.append(name)
    return kept


def _common(char: str, word: str) -> bool:
    """Whether ``char`` (in ``word``) is one people commonly write: the common Han characters (GB2312 level 1, Big5's
    frequent ones, JIS level 1), kana, KS X 1001's Hangul, and letters, digits, punctuation and currency signs of
    the main alphabets; not private-use, control or unassigned code points, rare Han, half-width katakana,
    presentation forms or other symbols (the stuff of a wrong decoding). An accented Latin letter counts only in a
    word that has plain ASCII letters too, or alone ("café", "à"): Cyrillic or Greek read as Windows-1252 gives
    words made of nothing else ("ïðèâåò")."""
    code = ord(char)
    if 0xC0 <= code <= 0x24F:
        return len(word) == 1 or any(letter.isascii() and letter.isalpha() for letter in word)
    if 0x4E00 <= code <= 0x9FFF:
        return (
            _in_range(char, "gb2312", 0xB0A1, 0xD7FE)
            or _in_range(char, "big5", 0xA440, 0xC67E)
            or _in_range(char, "euc_jp", 0xB0A1, 0xCFFE)
        )
    if 0xAC00 <= code <= 0xD7A3:
        return _decodable(char, "euc_kr")
    if 0x3000 <= code <= 0x30FF or 0xFF01 <= code <= 0xFF5E:  # CJK punctuation, kana, full-width ASCII
        return True
    if code >= 0x2E80:  # rare Han, compatibility and presentation forms, half-width katakana, private use
        return False
    category = unicodedata.category(char)
    return category[0] in "LMNP" or category in ("Zs", "Sc")


def _in_range(char: str, encoding: str, low: int, high: int) -> bool:
    try:
        encoded = char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return len(encoded) == 2 and low <= int.from_bytes(encoded, "big") <= high


def _decodable(char: str, encoding: str) -> bool:
    try:
        char.encode(encoding)
    except UnicodeEncodeError:
        return False
    return True


def tolerant_output(*streams: TextIO) -> None:
    """Output never ends a session: a character a console's encoding cannot show (a Chinese reply on an ASCII or GBK
    console, an emoji on GBK) is written as ``?`` instead of raising UnicodeEncodeError. Streams that already
    tolerate it (stderr's ``backslashreplace``) and ones that cannot be reconfigured are left alone."""
    for stream in streams:
        if isinstance(stream, io.TextIOWrapper) and stream.errors == "strict":
            stream.reconfigure(errors="replace")


def piped_reader(decoder: LineDecoder) -> Callable[[str], str | None]:
    """Lines of piped or redirected stdin, read as bytes and decoded line by line (one GBK line does not end the
    batch; its ``read`` raises InputEncodingError and the next call reads on); None at the end. UTF-16 with a
    byte-order mark is read as such. ``read`` takes a prompt, not shown, to stand in for ``input``."""

    stream = sys.stdin.buffer
    peek = getattr(stream, "peek", None)
    if peek is not None and peek(2)[:2] in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE):  # Notepad, PowerShell
        text = io.TextIOWrapper(stream, encoding="utf-16", errors="replace")

        def read_utf16(_prompt: str) -> str | None:
            line = text.readline()
            return decoder.clean(line.rstrip("\r\n")) if line else None

        return read_utf16

    def read(_prompt: str) -> str | None:
        raw = stream.readline()
        return decoder.decode(raw.rstrip(b"\r\n")) if raw else None

    return read
