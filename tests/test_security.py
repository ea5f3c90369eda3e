"""Who gets in: requests exactly as a browser on a foreign page, or a hostile client, would send them to a real
`assistant serve` on 127.0.0.1 (DNS rebinding's foreign Host, a foreign Origin, a `text/plain` simple POST, a chunked
body past the limit with the server's memory measured) and what an anonymous caller can learn."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from assistant.config import load_config
from assistant.errors import ConfigError
from assistant.io.access import AccessPolicy
from assistant.io.server import check_exposure
from tests.conftest import require_offline_models
from tests.test_load import rss_mb
from tests.test_server import start_server, ws_url

pytestmark = [pytest.mark.real_model, pytest.mark.reliability]
websockets = pytest.importorskip("websockets")
InvalidStatus = pytest.importorskip("websockets.exceptions").InvalidStatus
openai = pytest.importorskip("openai")

UPLOAD_MB = 5


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, str, Path]]:
    require_offline_models("smollm2-135m", "whisper-base")
    conversations = tmp_path_factory.mktemp("conversations")
    process, base = start_server("--set", f"server.max_upload_mb={UPLOAD_MB}",
                                 "--set", f"server.conversation_dir={conversations}")  # fmt: skip
    yield process, base, conversations
    process.terminate()
    process.wait(timeout=30)


def raw(base: str, request: bytes, *, timeout: float = 30) -> tuple[int, bytes]:
    """Send bytes as they are (browsers and attackers set headers urllib would not; each request here says
    ``Connection: close``) and read the whole answer: its status and body."""
    port = int(base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as connection:
        connection.sendall(request)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    return int(answer.split(b" ", 2)[1]), answer.partition(b"\r\n\r\n")[2]


def chat_request(host: str, *, origin: str | None = None, content_type: str = "application/json") -> bytes:
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}).encode()
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: {content_type}\r\n"
    head += f"Origin: {origin}\r\n" if origin else ""
    return head.encode() + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body


def test_dns_rebinding_a_foreign_host_is_refused_everywhere(server: tuple[Any, str, Path]) -> None:
    _, base, _ = server
    port = base.rsplit(":", 1)[1]
    for path in ("/v1/models", "/health", "/"):
        request = f"GET {path} HTTP/1.1\r\nHost: evil.example:{port}\r\nConnection: close\r\n\r\n"
        status, body = raw(base, request.encode())
        assert status == 403 and b"server.allowed_hosts" in body, (path, status, body)
    status, body = raw(base, chat_request(f"evil.example:{port}"))
    assert status == 403 and json.loads(body)["error"]["code"] == "forbidden"
    for host in (f"127.0.0.1:{port}", f"localhost:{port}"):  # however the user typed the address
        assert raw(base, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())[0] == 200
    assert raw(base, b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1:1\r\nConnection: close\r\n\r\n")[0] == 403

    # the WebSocket handshake, as a browser on the rebound page sends it
    handshake = (f"GET /v1/realtime HTTP/1.1\r\nHost: evil.example:{port}\r\nUpgrade: websocket\r\n"
                 "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                 "Sec-WebSocket-Version: 13\r\n\r\n")  # fmt: skip
    assert raw(base, handshake.encode(), timeout=10)[0] == 403


def test_a_foreign_origin_and_a_simple_text_plain_post_are_refused(server: tuple[Any, str, Path]) -> None:
    _, base, _ = server
    host = base.removeprefix("http://")
    for origin in ("http://evil.example", "null", f"http://evil.example:{host.rsplit(':', 1)[1]}"):
        status, body = raw(base, chat_request(host, origin=origin))
        assert status == 403 and b"server.allowed_origins" in body, (origin, body)
    # the page we serve, whichever loopback name the user typed
    assert raw(base, chat_request(host, origin=f"http://localhost:{host.rsplit(':', 1)[1]}"))[0] == 200
    # a "simple" cross-site request (no preflight) is text/plain: JSON routes take JSON only
    status, body = raw(base, chat_request(host, content_type="text/plain"))
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported-media-type"

    async def handshake() -> None:
        with pytest.raises(InvalidStatus):
            async with websockets.connect(ws_url(base), origin="http://evil.example"):
                pass
        async with websockets.connect(ws_url(base), origin=f"http://localhost:{host.rsplit(':', 1)[1]}") as ws:
            assert json.loads(await ws.recv())["type"] == "session.created"

    asyncio.run(handshake())


def test_a_chunked_body_past_the_limit_is_cut_off_and_memory_stays_flat(server: tuple[Any, str, Path]) -> None:
    process, base, _ = server
    port = int(base.rsplit(":", 1)[1])
    before = rss_mb(process.pid)
    chunk = b"a" * (1 << 20)
    sent = 0
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as connection:
        connection.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                           "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n".encode())  # fmt: skip
        try:
            for _ in range(300):  # 300 MiB offered, no Content-Length
                connection.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except OSError:  # the server answered and closed: the rest is refused
            pass
        connection.settimeout(10)
        try:
            while part := connection.recv(65536):
                answer += part
        except OSError:
            pass
    grown = rss_mb(process.pid) - before
    assert answer.startswith(b"HTTP/1.1 413") and b"server.max_upload_mb" in answer, answer[:300]
    assert sent < 100 * (1 << 20), f"the server read on to {sent >> 20} MiB"
    assert grown < 40, f"server memory grew {grown:.0f} MB"
    print(f"\nchunked 300 MiB offered: refused after {sent >> 20} MiB sent, server RSS {grown:+.0f} MB")


def test_an_anonymous_caller_learns_nothing_it_needs_no_key_for(server: tuple[Any, str, Path]) -> None:
    _, base, conversations = server
    for path in ("/openapi.json", "/docs"):
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(base + path, timeout=10)
        assert missing.value.code == 404 and json.loads(missing.value.read())["error"]["code"] == "not-found"
    with urllib.request.urlopen(base + "/health", timeout=10) as response:
        assert json.loads(response.read()) == {"status": "ok"}
    (conversations / "broken.json").write_text("{not json")

    async def corrupt() -> str:
        async with websockets.connect(f"{ws_url(base)}?conversation=broken") as ws:
            return str(json.loads(await ws.recv())["error"]["message"])

    message = asyncio.run(corrupt())
    assert "broken.json" in message and str(conversations) not in message, message
    # malformed bodies of other shapes: 400 in our shape, never a 500
    host = base.removeprefix("http://")
    deep = b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    lone_surrogate = b'{"messages": [{"role": "user", "content": "\\ud800"}]}'
    for body in (
        b'{"messages": "hi"}',
        b'{"messages": [], "stream": "yes"}',
        b"[1, 2]",
        b'{"stream_options": 5}',
        deep,
        lone_surrogate,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
    ):
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body  # fmt: skip
        status, answer = raw(base, request)
        assert status == 400 and set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}, answer


def test_exposed_binds_need_long_keys_and_get_a_tls_warning() -> None:
    with pytest.raises(ConfigError, match="shorter than 16 characters"):
        check_exposure(load_config(None, ["server.host=0.0.0.0", "server.api_key=x"]))
    check_exposure(load_config(None, ["server.host=0.0.0.0", "server.api_key=0123456789abcdef"]))


def test_the_allow_list_is_built_from_the_configuration_never_from_the_request() -> None:
    loopback = AccessPolicy.for_server("127.0.0.1", 8765, (), ())
    assert loopback.refusal("127.0.0.1:8765", "http://localhost:8765") is None
    assert loopback.refusal("[::1]:8765", None) is None
    assert loopback.refusal("evil.example:8765", "http://evil.example:8765") is not None  # rebinding: both foreign
    assert loopback.refusal(None, None) is not None
    proxied = AccessPolicy.for_server("127.0.0.1", 8765, ("chat.example.org",), ())
    assert proxied.refusal("chat.example.org", "https://chat.example.org") is None  # a TLS proxy in front
    exposed = AccessPolicy.for_server("0.0.0.0", 8765, (), ())
    assert exposed.refusal("192.0.2.10:8765", None) is None  # Host not enforced without allowed_hosts: the key is
    assert exposed.refusal("192.0.2.10:8765", "http://evil.example") is not None


def test_bodies_of_any_shape_get_a_4xx_in_openais_shape_never_a_500(server: tuple[Any, str, Path]) -> None:
    """Generated JSON bodies (hypothesis) sent to every JSON route of the running server."""
    import os

    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    _, base, _ = server
    host = base.removeprefix("http://")
    values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12),
        lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=10), children, max_size=3),
        max_leaves=8,
    )
    fields = st.sampled_from(["messages", "stream", "stream_options", "max_tokens", "temperature", "stop", "seed",
                              "input", "voice", "speed", "response_format", "metadata", "model", "tools"])  # fmt: skip
    bodies = st.dictionaries(fields, values, max_size=4) | values
    routes = st.sampled_from(["/v1/chat/completions", "/v1/audio/speech", "/v1/conversations/abc"])

    @hypothesis.settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "150")) // 3, deadline=None)
    @hypothesis.given(routes, bodies)
    def post(route: str, body: Any) -> None:
        data = json.dumps(body).encode()
        request = (f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode() + data  # fmt: skip
        status, answer = raw(base, request, timeout=120)
        assert status < 500, (route, body, answer[:300])
        if status >= 400:
            assert set(json.loads(answer)["error"]) == {"message", "type", "param", "code"}, answer

    post()


def test_configured_origins_match_however_they_were_written() -> None:
    policy = AccessPolicy.for_server("127.0.0.1", 8765, (), ("https://App.Example.org/",))
    assert policy.refusal("127.0.0.1:8765", "https://app.example.org") is None


def test_locks_free_their_file_and_a_missing_persona_folder_is_refused_at_start(tmp_path: Path) -> None:
    from assistant.files import ExclusiveLock
    from assistant.io.server import Services

    path = tmp_path / "c.json.lock"
    first, second = ExclusiveLock(path), ExclusiveLock(path)
    assert first.acquire() and not second.acquire()
    first.release()
    assert not path.exists() and second.acquire()  # released: the file is gone, and the lock free
    second.release()
    with pytest.raises(ConfigError, match="server.persona_dir: 'no-such-folder' is not a directory"):
        Services.load(load_config(None, ["server.persona_dir=no-such-folder"]))


def test_a_ray_cluster_nobody_answers_is_one_line_not_a_long_wait() -> None:
    from assistant.ray_batch import _check_reachable

    with pytest.raises(ConfigError, match="nothing answers there"):
        _check_reachable("127.0.0.1:1")
    with pytest.raises(ConfigError, match="give 'local'"):
        _check_reachable("nonsense")
