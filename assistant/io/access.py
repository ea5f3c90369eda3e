"""Who may talk to the server: one allow-list of Host names and browser Origins, and a byte count of every request
body, applied to every HTTP request and WebSocket handshake in one ASGI middleware.

Local AI servers have been driven by web pages their users visited: DNS rebinding (a page on ``evil.example``
re-resolves its own name to 127.0.0.1, so the browser sends ``Host: evil.example:PORT``; Ollama's CVE-2024-28224)
and cross-site requests (a "simple" ``text/plain`` POST needs no preflight). So on a loopback bind ``Host`` must be a
loopback name at the bound port or a name in ``server.allowed_hosts``, and any ``Origin`` must be one of the allowed
hosts' (loopback ones at the bound port) or in ``server.allowed_origins``. The lists come from the configuration and
the machine, never from the request's own headers. Bodies are counted as they arrive, chunked or not, so a client
cannot make the server buffer more than ``server.max_upload_mb`` by leaving out Content-Length.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from assistant.errors import LimitError

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _wildcard(host: str) -> bool:
    return host in ("0.0.0.0", "::", "")


def _machine_names() -> set[str]:
    """This machine's name and addresses (a server bound to 0.0.0.0 is reached by any of them)."""
    names = {socket.gethostname().lower()}
    try:
        for *_, address in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(address[0]))
    except OSError:
        pass
    return {f"[{n}]" if ":" in n else n for n in names}


@dataclass(frozen=True)
class AccessPolicy:
    """The allowed ``Host`` names and ``Origin`` values of one server."""

    port: int
    host_names: frozenset[str]  # lower-case names (IPv6 in brackets) a Host may carry, at the bound port
    free_names: frozenset[str]  # server.allowed_hosts: at any port (a TLS proxy's name arrives without one)
    enforce_host: bool
    origins: frozenset[str]

    @classmethod
    def for_server(
        cls, host: str, port: int, allowed_hosts: tuple[str, ...], allowed_origins: tuple[str, ...]
    ) -> AccessPolicy:
        names = set(LOOPBACK_NAMES) if is_loopback(host) or _wildcard(host) else set()
        if not is_loopback(host):
            names |= _machine_names() if _wildcard(host) else {f"[{host}]" if ":" in host else host.lower()}
        free = {name.lower().rsplit(":", 1)[0] if name.count(":") == 1 else name.lower() for name in allowed_hosts}
        origins = {f"{scheme}://{name}:{port}" for name in names for scheme in ("http", "https")}
        origins |= {f"{scheme}://{name}" for name in free for scheme in ("http", "https")}
        origins |= {f"{scheme}://{name}:{port}" for name in free for scheme in ("http", "https")}
        if port == 80:
            origins |= {f"http://{name}" for name in names}
        enforce = is_loopback(host) or bool(allowed_hosts)
        configured = {origin.lower().rstrip("/") for origin in allowed_origins}
        return cls(port, frozenset(names), frozenset(free), enforce, frozenset(origins | configured))

    def refusal(self, host: str | None, origin: str | None) -> str | None:
        """Why a request with these headers is refused, naming the setting to change; None when it is allowed."""
        if self.enforce_host and not host:
            return "the request has no Host header; send HTTP/1.1 with the server's address as Host"
        if self.enforce_host and not self._host_allowed(host):
            return (f"Host {host!r} is not this server's address; if you reach it by that name, add it to "
                    "server.allowed_hosts")  # fmt: skip
        if origin is not None and origin.lower().rstrip("/") not in self.origins:
            return (f"browser Origin {origin!r} may not use this server; to allow a page from there, add it to "
                    "server.allowed_origins")  # fmt: skip
        return None

    def _host_allowed(self, host: str | None) -> bool:
        if not host:
            return False
        host = host.lower()
        if host.endswith("]") or ":" not in host:  # no port: the scheme's default
            name, port = host, "80"
        else:
            name, _, port = host.rpartition(":")
        if name in self.free_names:
            return True
        return name in self.host_names and port == str(self.port)


class AccessGuard:
    """ASGI middleware: the AccessPolicy for every request and handshake (403 / refused handshake), and every
    request body counted against ``limit_bytes`` as it arrives (413 once passed)."""

    def __init__(self, app: App, policy: AccessPolicy, limit_bytes: int, on_refused: Callable[[str], None],
                 stopping: Callable[[], str | None]) -> None:  # fmt: skip
        self._app = app
        self._policy = policy
        self._limit = limit_bytes
        self._on_refused = on_refused
        self._stopping = stopping  # the stop's message while the server stops, else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self._app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        problem = self._policy.refusal(headers.get("host"), headers.get("origin"))
        if problem is not None:
            self._on_refused("forbidden")
            if scope["type"] == "websocket":
                if "websocket.http.response" in scope.get("extensions", {}):  # a 403 that says why
                    await _refuse(send, 403, "forbidden", problem, prefix="websocket.")
                else:  # closing before accepting refuses the handshake with a bare 403
                    await send({"type": "websocket.close", "code": 1008, "reason": "forbidden"})
                return
            await _refuse(send, 403, "forbidden", problem)
            return
        if scope["type"] == "websocket":
            await self._app(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self._limit:  # declared too big: refused before a byte is read
            self._on_refused("limit")
            await _refuse(send, 413, "limit", self._over_limit())
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self._app(scope, self._counted(receive), tracked)
        except asyncio.CancelledError:
            message = self._stopping()
            if message is None:
                raise
            # uvicorn cancels what outlived the graceful stop: answer it as stopped, not with a bare 500
            if not started:
                await _refuse(send, 503, "shutting-down", message)
            else:
                await send({"type": "http.response.body", "body": b"", "more_body": False})

    def _counted(self, receive: Receive) -> Receive:
        received = 0
        limit = self._limit

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise LimitError(self._over_limit())
            return message

        return counted

    def _over_limit(self) -> str:
        return f"the request body is over server.max_upload_mb ({self._limit / 1048576:g} MB)"


def openai_type(status: int) -> str:
    """OpenAI's error ``type`` for a status: its request-rate 429s say ``requests``, server faults
    ``server_error``, every other refusal ``invalid_request_error``."""
    if status == 429:
        return "requests"
    return "server_error" if status >= 500 else "invalid_request_error"


async def _refuse(send: Send, status: int, code: str, message: str, *, prefix: str = "") -> None:
    """An HTTP answer in OpenAI's error shape (``prefix`` "websocket.": ASGI's denial response to a handshake)."""
    error = {"message": message, "type": openai_type(status), "param": None, "code": code}
    body = json.dumps({"error": error}).encode()
    await send({"type": prefix + "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})  # fmt: skip
    await send({"type": prefix + "http.response.body", "body": body})
