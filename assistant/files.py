"""Writing files so that a crash or a full disk never leaves a broken one behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from assistant.errors import AssistantError


def atomic_write_text(target: Path, text: str, *, what: str, error: type[AssistantError]) -> None:
    """Write through a temporary file in the same directory, fsync, then rename over the target.

    Readers see the previous file or the new one, never a part of either; ``error`` is the stage's own error type.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent)
    except OSError as exc:
        raise error(f"cannot save {what} to '{target}': {exc.strerror}; choose a writable path") from None
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, target)
        _sync_directory(target.parent)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        raise error(
            f"cannot save {what} to '{target}': {exc.strerror}; the previous file is unchanged; free some space or "
            "choose another path"
        ) from None


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
