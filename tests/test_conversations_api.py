"""Saved conversations over HTTP (``/v1/conversations``), read with the official openai SDK's own Conversations
client where OpenAI's API has the call (retrieve, update, delete, items) and plain HTTP for this server's additions
(the list, export), against a real server whose conversations come from real Realtime sessions."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import require_offline_models
from tests.test_server import events_until, start_server, ws_url

pytestmark = pytest.mark.real_model
openai = pytest.importorskip("openai")
websockets = pytest.importorskip("websockets")

ALPHA, BETA = "alpha-key-for-conversations", "beta-key-for-conversations"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    require_offline_models("smollm2-135m", "whisper-base")
    folder = tmp_path_factory.mktemp("conversations")
    process, base = start_server("--set", f"server.conversation_dir={folder}",
                                 "--set", f"server.api_keys=[{ALPHA}, {BETA}]")  # fmt: skip
    yield base
    process.terminate()
    process.wait(timeout=30)


async def talk(base: str, key: str, *texts: str, keep_open: Any = None) -> str:
    """A Realtime session that says ``texts`` (each answered) and returns its conversation id; ``keep_open`` is
    awaited while the session is still open."""
    headers = {"Authorization": f"Bearer {key}"}
    async with websockets.connect(ws_url(base), additional_headers=headers) as ws:
        conversation_id = json.loads(await ws.recv())["session"]["conversation_id"]
        for text in texts:
            item = {"role": "user", "content": text}
            await ws.send(json.dumps({"type": "conversation.item.create", "item": item}))
            await ws.send(json.dumps({"type": "response.create"}))
            await events_until(ws, "response.done", timeout=120)
        if keep_open is not None:
            await keep_open(conversation_id)
    return str(conversation_id)


def get(base: str, path: str, key: str) -> tuple[int, bytes, str]:
    request = urllib.request.Request(base + path, headers={"Authorization": f"Bearer {key}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read(), response.headers.get("content-disposition", "")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), ""


def test_list_read_rename_export_and_delete_with_the_openai_sdk(server: str) -> None:
    first = asyncio.run(talk(server, ALPHA, "My name is Ada.", "What is my name?"))
    api = openai.OpenAI(base_url=f"{server}/v1", api_key=ALPHA, max_retries=0, timeout=30)
    status, body, _ = get(server, "/v1/conversations", ALPHA)
    listed = json.loads(body)
    assert status == 200 and listed["object"] == "list" and listed["data"][0]["id"] == first
    assert listed["data"][0]["title"] == "My name is Ada." and listed["data"][0]["message_count"] == 4
    conversation = api.conversations.retrieve(first)  # the SDK's own model of OpenAI's conversation object
    assert conversation.id == first and conversation.object == "conversation" and conversation.created_at > 0
    page = api.conversations.items.list(first, order="asc", limit=2)
    assert [item.role for item in page.data] == ["user", "assistant"] and page.has_more
    assert page.data[0].content[0].text == "My name is Ada."
    newest = api.conversations.items.list(first, limit=1)  # OpenAI's default order: newest first
    assert newest.data[0].role == "assistant"
    renamed = api.conversations.update(first, metadata={"title": "Names"})
    assert renamed.metadata == {"title": "Names"}
    _, body, disposition = get(server, f"/v1/conversations/{first}/export?format=markdown", ALPHA)
    assert body.decode().startswith("# Names") and "**User**\n\nMy name is Ada." in body.decode()
    assert disposition == f'attachment; filename="{first}.md"'
    _, body, _ = get(server, f"/v1/conversations/{first}/export?format=json", ALPHA)
    assert json.loads(body)["title"] == "Names" and len(json.loads(body)["messages"]) == 4
    # another key sees none of it
    assert json.loads(get(server, "/v1/conversations", BETA)[1])["data"] == []
    with pytest.raises(openai.NotFoundError):
        openai.OpenAI(base_url=f"{server}/v1", api_key=BETA, max_retries=0).conversations.retrieve(first)
    deleted = api.conversations.delete(first)
    assert deleted.deleted and deleted.id == first
    with pytest.raises(openai.NotFoundError):
        api.conversations.retrieve(first)


def test_an_open_conversation_cannot_be_renamed_or_deleted_and_bad_requests_say_why(server: str) -> None:
    api = openai.OpenAI(base_url=f"{server}/v1", api_key=ALPHA, max_retries=0, timeout=30)

    async def while_open(conversation_id: str) -> None:
        for attempt in (lambda: api.conversations.update(conversation_id, metadata={"title": "x"}),
                        lambda: api.conversations.delete(conversation_id)):  # fmt: skip
            with pytest.raises(openai.ConflictError) as refused:
                await asyncio.to_thread(attempt)
            assert "open in another session" in refused.value.message

    conversation_id = asyncio.run(talk(server, ALPHA, "Hello.", keep_open=while_open))
    with pytest.raises(openai.BadRequestError, match="no other key is kept"):
        api.conversations.update(conversation_id, metadata={"color": "blue"})
    with pytest.raises(openai.BadRequestError, match="choose asc or desc"):
        api.conversations.items.list(conversation_id, order="sideways")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="conversation id"):
        api.conversations.retrieve("..passwd")  # ids are file names and nothing more
    with pytest.raises(openai.NotFoundError):
        api.conversations.retrieve("../../etc/passwd")
    status, body, _ = get(server, f"/v1/conversations/{conversation_id}/export?format=pdf", ALPHA)
    assert status == 400 and json.loads(body)["error"]["code"] == "config"


def test_personas_in_the_persona_dir_are_listed(tmp_path: Path) -> None:
    import shutil

    folder = tmp_path / "personas"
    shutil.copytree(Path(__file__).parents[1] / "configs" / "personas", folder)
    (folder / "broken.yaml").write_text("name: nobody\n")  # no system prompt
    process, base = start_server("--set", f"server.persona_dir={folder}")
    try:
        status, body, _ = get(base, "/v1/personas", "none")
    finally:
        process.terminate()
        process.wait(timeout=30)
    listed = {item["id"]: item for item in json.loads(body)["data"]}
    assert status == 200 and listed["math-teacher"]["name"] == "王老师"
    assert listed["math-teacher"]["instructions"].startswith("你是一位耐心的中学数学老师")
    assert "needs at least 'system" in listed["broken"]["error"] and str(folder) not in listed["broken"]["error"]
