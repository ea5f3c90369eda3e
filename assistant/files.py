"""Writing files so that a crash or a full disk never leaves a broken one behind, and naming files as text.

File names are bytes to the operating system; Python shows a byte that is not UTF-8 as a lone surrogate
(``os.fsdecode``'s ``surrogateescape``), which no UTF-8 stream or JSON document can hold. ``printable`` and
``name_fields`` turn such names into text without losing a byte.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

from assistant.errors import AssistantError

PUBLIC_MODE = 0o666  # what a plain open() asks for; the kernel applies the umask (0644 under umask 022)
PRIVATE_MODE = 0o600  # only the owner: conversations hold what people said
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
_NAME_ATTEMPTS = 100  # random temporary names tried before giving up (a clash is already ~impossible)


def atomic_write_text(target: Path, text: str, *, what: str, error: type[AssistantError], private: bool) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over the target.

    Readers see the previous file or the new one, never a part of either, and no temporary file outlives the call
    whatever goes wrong (a full disk, text that cannot be encoded, Ctrl+C). ``private`` files are 0600; the others
    get the mode a plain ``open()`` gives under the current umask, so a media server running as another user can read
    subtitles. ``error`` is the stage's own error type; it is raised for OSError and UnicodeError.
    """
    try:
        data = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(
            f"cannot save {what} to '{printable(str(target))}': the text holds {exc.object[exc.start : exc.end]!a}, "
            "which UTF-8 cannot encode; this is a bug, please report it"
        ) from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = _create_temporary(target, PRIVATE_MODE if private else PUBLIC_MODE)
    except OSError as exc:
        raise error(
            f"cannot save {what} to '{printable(str(target))}': {exc.strerror}; choose a writable path"
        ) from None
    renamed = False
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        renamed = True
        _sync_directory(target.parent)
    except OSError as exc:
        raise error(
            f"cannot save {what} to '{printable(str(target))}': {exc.strerror}; the previous file is unchanged; free "
            "some space or choose another path"
        ) from None
    finally:
        if not renamed:
            _remove_quietly(temporary)


def _create_temporary(target: Path, mode: int) -> tuple[int, Path]:
    """Create ``.NAME.RANDOM.partial`` beside ``target`` with O_EXCL; the kernel applies the umask to ``mode``.

    Unlike ``tempfile.mkstemp`` (always 0600) and unlike reading the umask with ``os.umask`` (process-wide, racy with
    other threads), this gives exactly the mode ``open()`` would.
    """
    for _ in range(_NAME_ATTEMPTS):
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
        try:
            return os.open(temporary, _CREATE_FLAGS, mode), temporary
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside '{printable(str(target))}'")


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):  # the original error is the one to report
        path.unlink(missing_ok=True)


def _sync_directory(folder: Path) -> None:
    """Make the rename itself durable (a power cut right after it could otherwise bring the old file back)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems cannot open directories; the rename is still atomic
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def printable(text: str) -> str:
    """``text`` safe for any UTF-8 console or document, on one line: each byte of a file name that is not UTF-8, and
    each control character (a newline in a name), becomes ``\\xNN``.

    ``caf\\udce9.wav`` (the Latin-1 name ``café.wav`` as Python sees it) prints as ``caf\\xe9.wav``; valid names are
    unchanged.
    """
    try:
        shown = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that stands for no byte (not from os.fsdecode)
        shown = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return shown.translate(_CONTROL_ESCAPES)


# control characters (a newline in a file name) would break the one line a message takes: shown as \xNN
_CONTROL_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F]}


def name_fields(path: str | os.PathLike[str], key: str) -> dict[str, Any]:
    """JSON fields naming ``path`` losslessly: ``{key: text}``, plus ``{key}_bytes`` when the name is not UTF-8.

    ``key`` is the name as text (``printable``: undecodable bytes as ``\\xNN``). ``{key}_bytes`` is present only when
    the name holds bytes that are not UTF-8: the exact bytes, percent-encoded (RFC 3986, ``/`` kept), so
    ``urllib.parse.unquote_to_bytes(doc[key + "_bytes"])`` (or ``doc[key].encode()`` when absent) is the name the
    operating system knows.
    """
    raw = os.fsencode(path)
    fields: dict[str, Any] = {key: printable(os.fsdecode(raw))}
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        fields[f"{key}_bytes"] = quote(raw, safe="/")
    return fields


class ExclusiveLock:
    """An OS lock on ``path`` (created empty if missing) held by one process at a time, freed by ``release`` or when
    the process dies. flock on a descriptor opened read-only: unlike filelock's, which opens the file for writing,
    it needs no write permission on the lock file and does not keep the file system from being remounted read-only.
    Where flock does not exist (Windows) it falls back to the filelock package."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self._fallback: Any = None

    def acquire(self) -> bool:
        """Take the lock without waiting: False when another process (or another lock in this one) holds it.
        OSError when the lock file cannot be made (a read-only or full directory)."""
        try:
            import fcntl
        except ImportError:  # Windows
            import filelock

            self._fallback = filelock.FileLock(self._path, mode=PRIVATE_MODE)
            try:
                self._fallback.acquire(timeout=0)
            except filelock.Timeout:
                return False
            return True
        while True:
            fd = os.open(self._path, os.O_RDONLY | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), PRIVATE_MODE)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            except OSError:
                os.close(fd)
                raise
            if self._still_ours(fd):
                self._fd = fd
                return True
            os.close(fd)  # its holder removed that file as we locked it: take the lock on the new one

    def _still_ours(self, fd: int) -> bool:
        """Whether the path still names the file ``fd`` locked (the holder before us may have unlinked it)."""
        try:
            return os.stat(self._path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        """Drop the lock and remove the lock file while still holding it (the classic unlink-on-release protocol:
        a process that locked the old file sees it unlinked and starts again), so lock files never pile up."""
        if self._fd is not None:
            with contextlib.suppress(OSError):  # a read-only directory keeps it: harmless
                os.unlink(self._path)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._fallback is not None:
            self._fallback.release()
            self._fallback = None
