"""Errors users see. Each has a stable ``code`` and a message that names what failed and what to do.

The CLI prints ``f"{code}: {message}"`` and nothing else; servers send the code in their error events.
"""

from __future__ import annotations

import re

# an absolute file path in a message (not a URL's path, not an API route): only its last part is shown to clients
_ABSOLUTE_PATH = re.compile(r"""(?<![\w/.:])/(?!v1/)(?:[^\s'"/]+/)+([^\s'"/]*)""")


class AssistantError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param  # the request field at fault (OpenAI's error ``param``), when one is

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ConfigError(AssistantError):
    code = "config"


class InvalidRequestError(ConfigError):
    """An API request field refused, with OpenAI's code for why: ``unknown_parameter`` (not in OpenAI's reference),
    ``unsupported_parameter`` / ``unsupported_value`` (OpenAI's, not done here), ``invalid_value`` /
    ``invalid_type`` (malformed), ``model_not_found``. ``param`` names the field (``messages[2].content[0]``)."""

    def __init__(self, message: str, *, param: str, code: str = "invalid_value") -> None:
        super().__init__(message, param=param)
        self.code = code


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


class LlmError(AssistantError):
    """Generation failed (the backend raised, the server answered an error)."""

    code = "llm-failed"


class PromptTooLongError(AssistantError):
    """The prompt does not fit the model's context window; the sizes, when known, say by how much."""

    code = "prompt-too-long"

    def __init__(self, message: str, *, prompt_tokens: int | None = None, context_tokens: int | None = None) -> None:
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context_tokens = context_tokens


class TemplateError(AssistantError):
    code = "template"


class ConversationError(AssistantError):
    """A conversation file could not be read or written, or a command does not apply to the history now."""

    code = "conversation"


class CommandError(AssistantError):
    """A console command that does not exist or is missing its argument."""

    code = "command"


class InputEncodingError(AssistantError):
    """A line of console input whose text encoding cannot be told (it is not UTF-8 nor any encoding detected)."""

    code = "input-encoding"


class AudioSourceError(AssistantError):
    """No microphone, or the capture device failed or vanished."""

    code = "audio-source"


class BusyError(AssistantError):
    """The model worker's queue is full: try again shortly."""

    code = "busy"


class AuthError(AssistantError):
    code = "unauthorized"


class LimitError(AssistantError):
    """A request over one of the server's limits (size, audio seconds, sessions)."""

    code = "limit"


class RateLimitError(AssistantError):
    """A client over its ``server.rate_limit_*`` allowance; ``retry_after_s`` says when enough will have freed up.
    The code is OpenAI's own, which clients (the openai SDK) retry after ``Retry-After``."""

    code = "rate_limit_exceeded"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class ShutdownError(AssistantError):
    """The server is stopping (SIGTERM / SIGINT): work in flight is cancelled and new work refused."""

    code = "shutting-down"


def public_message(exc: BaseException) -> str:
    """What a client (a remote user) may read of an error: the message with absolute paths on the server reduced to
    their last part (a conversation's file name, never the directory it lives in)."""
    message = exc.message if isinstance(exc, AssistantError) else str(exc)
    return _ABSOLUTE_PATH.sub(r"\1", message)


class UnsupportedMediaTypeError(AssistantError):
    """A body of the wrong content type (a JSON route sent ``text/plain``, an upload that is not multipart)."""

    code = "unsupported-media-type"


class NotFoundError(AssistantError):
    """What a request names does not exist (a conversation id)."""

    code = "not-found"


class ConflictError(AssistantError):
    """The request would clash with work in progress (a conversation open in a session)."""

    code = "conflict"
