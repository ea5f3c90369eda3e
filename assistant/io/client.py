"""``assistant client``: a WebSocket client of ``assistant serve`` that prints transcripts and streamed replies.

``--text`` sends each stdin line as a typed turn; ``--audio FILE...`` streams files as PCM16 16 kHz (the server's
VAD cuts the turns); ``--mic`` streams the microphone. Uses the event protocol of docs/protocol.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from assistant.audio import tool_path
from assistant.errors import AssistantError, AudioDecodeError, AudioSourceError

CHUNK_BYTES = 3200  # 100 ms of PCM16 at 16 kHz
IDLE_S = 3.0  # after the input ends: leave once every turn is answered and the server has been quiet this long


# a client that prints text and sends 16 kHz audio (the Realtime API's defaults are speech and 24 kHz)
TEXT_SESSION_16K = {
    "type": "session.update",
    "session": {"output_modalities": ["text"], "audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}},
}


class RealtimeClient:
    def __init__(self, ws: Any) -> None:
        self._ws = ws
        self.pending = 0  # turns committed or typed whose reply has not finished
        self.committed = 0  # spoken turns the server has cut
        self.last_event = 0.0  # loop time of the last event received
        self.errors = 0
        self.closed = False  # the server closed the connection

    async def receive(self) -> None:
        """Print server events until the connection closes."""
        from websockets.exceptions import ConnectionClosed

        with contextlib.suppress(ConnectionClosed):
            await self._print_events()
        self.closed = True  # not when cancelled: then we are the side that leaves

    async def _print_events(self) -> None:
        async for raw in self._ws:
            event = json.loads(raw)
            kind = event.get("type")
            self.last_event = asyncio.get_running_loop().time()
            if kind == "input_audio_buffer.committed":
                self.pending += 1  # to be transcribed, then answered
                self.committed += 1
            elif kind == "conversation.item.input_audio_transcription.completed":
                if event["transcript"]:
                    print(f"you: {event['transcript']}", flush=True)
                else:  # noise: no turn, no reply
                    self.pending = max(0, self.pending - 1)
            elif kind == "conversation.item.input_audio_transcription.failed":
                self.pending = max(0, self.pending - 1)
            elif kind == "response.created":
                sys.stdout.write("assistant: ")
            elif kind == "response.output_text.delta":
                sys.stdout.write(event["delta"])
                sys.stdout.flush()
            elif kind == "response.done":
                self.pending = max(0, self.pending - 1)
                status = event["response"]["status"]
                print(" [cut]" if status == "cancelled" else "", flush=True)
            elif kind == "error":
                self.errors += 1
                print(f"{event['error']['code']}: {event['error']['message']}", file=sys.stderr, flush=True)

    async def text_turns(self) -> None:
        """Each stdin line a turn, in any encoding (``assistant.io.encoding``); a line that is no text fails alone."""
        from assistant.io.encoding import LineDecoder, piped_reader

        loop = asyncio.get_running_loop()
        read = piped_reader(LineDecoder(sys.stdin.encoding))
        while True:
            try:
                line = await loop.run_in_executor(None, read, "")
            except AssistantError as exc:
                self.errors += 1
                print(exc, file=sys.stderr, flush=True)
                continue
            if line is None:
                break
            if not line.strip():
                continue
            self.pending += 1
            await self._ws.send(
                json.dumps(
                    {
                        "type": "conversation.item.create",
                        "item": {"type": "message", "role": "user", "content": line.strip()},
                    }
                )
            )
            await self._ws.send(json.dumps({"type": "response.create"}))
            while self.pending and not self.closed:
                await asyncio.sleep(0.05)

    async def audio_files(self, paths: Sequence[str]) -> None:
        for path in paths:
            command = [tool_path("ffmpeg"), "-nostdin", "-loglevel", "error", "-i", path, "-af", "apad=pad_dur=1",
                       "-ac", "1", "-ar", "16000", "-f", "s16le", "-"]  # fmt: skip
            result = subprocess.run(command, capture_output=True)
            if result.returncode != 0:
                raise AudioDecodeError(f"cannot read '{path}': {result.stderr.decode(errors='replace').strip()}")
            before = self.committed
            for start in range(0, len(result.stdout), CHUNK_BYTES):
                await self._ws.send(result.stdout[start : start + CHUNK_BYTES])
            await self._ws.send(json.dumps({"type": "input_audio_buffer.commit"}))
            await self._turns_answered(since=before)  # each file is its own turn(s): no barge-in by the next one

    async def _turns_answered(self, *, since: int) -> None:
        """Wait until the server has answered what it transcribed, and stayed quiet for IDLE_S (noise: no turn)."""
        loop = asyncio.get_running_loop()
        self.last_event = loop.time()
        while not self.closed and (
            self.pending or loop.time() - self.last_event < (0.5 if self.committed > since else IDLE_S)
        ):
            await asyncio.sleep(0.05)

    async def microphone(self, device: str | None) -> None:
        from assistant.config import InputConfig
        from assistant.io.microphone import MicrophoneSource

        source = MicrophoneSource(InputConfig(device=device))
        print(f"listening on {source.name}; Ctrl-C to stop", file=sys.stderr)
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def capture() -> None:
            for piece in source.chunks():
                if isinstance(piece, np.ndarray):
                    pcm = (piece.clip(-1, 1) * 32767).astype("<i2").tobytes()
                    loop.call_soon_threadsafe(queue.put_nowait, pcm)

        capturing = loop.run_in_executor(None, capture)
        try:
            while True:
                await self._ws.send(await queue.get())
        finally:
            source.close()
            await asyncio.gather(capturing, return_exceptions=True)


async def run_client(url: str, *, api_key: str | None, audio: Sequence[str], mic: bool, device: str | None) -> int:
    import websockets

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
    try:
        ws = await websockets.connect(url, additional_headers=headers, max_size=None)
    except websockets.exceptions.InvalidURI:
        print(f"connection: {url!r} is not a WebSocket URL; use ws://HOST:PORT/v1/realtime", file=sys.stderr)
        return 2
    except (OSError, websockets.exceptions.InvalidHandshake) as exc:
        print(f"connection: cannot connect to {url} ({exc}); is 'assistant serve' running?", file=sys.stderr)
        return 2
    async with ws:
        client = RealtimeClient(ws)
        receiving = asyncio.create_task(client.receive())  # first: a refusal arrives as an error event
        try:
            await ws.send(json.dumps(TEXT_SESSION_16K))
            if audio:
                await client.audio_files(audio)
            elif mic:
                await client.microphone(device)
            else:
                await client.text_turns()
        except (AudioDecodeError, AudioSourceError) as exc:
            print(exc, file=sys.stderr)
            return 1
        except websockets.exceptions.ConnectionClosed:
            pass  # reported below
        finally:
            if not client.closed:
                receiving.cancel()
            await asyncio.gather(receiving, return_exceptions=True)  # the server's last events are printed
        if client.closed:
            detail = f"code {ws.close_code}" + (f": {ws.close_reason}" if ws.close_reason else "")
            print(f"connection: the server closed the session ({detail})", file=sys.stderr)
            return 1
        return 1 if client.errors else 0
