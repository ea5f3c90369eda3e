"""The one way every stage reaches an OpenAI-compatible server (``*.backend: openai``): the official ``openai``
client, pointed at the address the user named (never a cloud service by default). Imported only by those backends."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from assistant.errors import ConfigError, ModelLoadError


@dataclass(frozen=True)
class Remote:
    """A client of one server: the ``openai`` module (for its exception classes), the client, and its address."""

    openai: Any
    client: Any
    base_url: str


def connect(stage: str, base_url: str | None, api_key: str | None, *, timeout_s: float, max_retries: int,
            example: str) -> Remote:  # fmt: skip
    """A client for ``{stage}.base_url`` (else OPENAI_BASE_URL) with ``{stage}.api_key`` (else OPENAI_API_KEY);
    ConfigError naming the setting when no address is given, ModelLoadError when the package is missing."""
    try:
        import openai
    except ImportError:
        raise ModelLoadError(f"{stage}.backend openai needs the openai package: pip install openai") from None
    url = base_url or os.environ.get("OPENAI_BASE_URL")
    if not url:
        raise ConfigError(f"{stage}.base_url: backend openai needs the server's address, e.g. {example} (nothing is "
                          "sent to a cloud service unless you name it)")  # fmt: skip
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"{stage}.base_url: {url!r} is not an http(s) address; write it in full, e.g. {example}")
    key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
    return Remote(openai, openai.OpenAI(base_url=url, api_key=key, timeout=timeout_s, max_retries=max_retries), url)
