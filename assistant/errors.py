"""Errors users see. Each has a stable ``code`` and a message that names what failed and what to do.

The CLI prints ``f"{code}: {message}"`` and nothing else; servers send the code in their error events.
"""

from __future__ import annotations


class AssistantError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(AssistantError):
    code = "config"


class AudioDecodeError(AssistantError):
    code = "audio-decode"


class ModelNotFoundError(AssistantError):
    code = "model-not-found"


class ChecksumError(AssistantError):
    code = "model-checksum"


class ModelLoadError(AssistantError):
    code = "model-load"


class AsrError(AssistantError):
    code = "asr-failed"


class VadError(AssistantError):
    code = "vad-failed"


class OutputError(AssistantError):
    code = "output"
