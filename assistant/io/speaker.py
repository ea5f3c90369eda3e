"""The ``speaker`` sink: plays the reply's speech as the voice session makes it, sentence by sentence.

The session synthesizes each sentence as soon as its end streams in (``assistant.tts``) and hands the audio here; a
playing thread plays the sentences in order, so speech starts after the first sentence instead of after the whole
reply. Barge-in stops it at once. ``output.speaker.save_dir`` writes each sentence as a wav file instead of playing
it. Without headphones the microphone hears the speaker: turn ``input.barge_in`` off, or the assistant may interrupt
itself.
"""

from __future__ import annotations

import queue
import sys
import threading
from pathlib import Path

from assistant.config import OutputConfig
from assistant.errors import OutputError
from assistant.messages import Audio, TurnMetrics

PLAY_POLL_S = 0.02  # how often playback checks for a barge-in


class SpeakerSink:
    def __init__(self, output: OutputConfig, *, verbose: bool = False) -> None:
        self._config = output.speaker
        self._sentences: queue.Queue[Audio] = queue.Queue()
        self._hush = threading.Event()
        self._saved = 0
        self.errors: list[str] = []
        if self._config.save_dir:
            try:
                Path(self._config.save_dir).mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise OutputError(f"cannot write spoken replies to '{self._config.save_dir}': {exc.strerror}; "
                                  "set output.speaker.save_dir to a writable folder") from None  # fmt: skip
        threading.Thread(target=self._play_queued, name="speaker", daemon=True).start()

    # --- sink --------------------------------------------------------------------------------------------------------

    def partial(self, text: str) -> None:
        pass

    def transcript(self, text: str) -> None:
        pass

    def delta(self, text: str) -> None:
        pass

    def audio(self, audio: Audio) -> None:
        self._sentences.put(audio)

    def interrupted(self) -> None:
        self.stop()

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None:
        pass

    def error(self, message: str) -> None:
        pass

    def notice(self, message: str) -> None:
        pass

    def stop(self) -> None:
        """Drop queued sentences and cut the one being played."""
        while True:
            try:
                self._sentences.get_nowait()
            except queue.Empty:
                break
            self._sentences.task_done()
        self._hush.set()

    def wait(self) -> None:
        """Block until everything queued has been played."""
        self._sentences.join()

    # --- playing thread ----------------------------------------------------------------------------------------------

    def _play_queued(self) -> None:
        while True:
            audio = self._sentences.get()
            self._hush.clear()
            try:
                self._output(audio)
            except Exception as exc:  # speech is a convenience: a failure is reported, the chat goes on
                message = f"speaker: cannot play the reply: {type(exc).__name__}: {exc}"
                self.errors.append(message)
                print(message, file=sys.stderr, flush=True)
            finally:
                self._sentences.task_done()

    def _output(self, audio: Audio) -> None:
        if self._config.save_dir:
            import soundfile

            self._saved += 1
            path = Path(self._config.save_dir) / f"sentence-{self._saved:04d}.wav"
            soundfile.write(str(path), audio.samples, audio.sample_rate)
            return
        import sounddevice

        sounddevice.play(audio.samples, audio.sample_rate, device=self._config.device)
        while sounddevice.get_stream().active:
            if self._hush.wait(PLAY_POLL_S):
                sounddevice.stop()
                return
