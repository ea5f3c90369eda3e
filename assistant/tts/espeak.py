"""espeak-ng: formant speech in over 100 languages (Mandarin as ``cmn``), run as a program for each text."""

from __future__ import annotations

import io
import shutil
import subprocess

import numpy as np

from assistant.errors import ConfigError, OutputError
from assistant.messages import Audio

WORDS_PER_MINUTE = 175  # espeak-ng's own default pace, speed 1.0
MIN_WORDS_PER_MINUTE, MAX_WORDS_PER_MINUTE = 80, 700  # espeak-ng speaks no slower than 80 (speed 0.46)
SAMPLE_RATE = 22_050  # Hz, what espeak-ng writes
TIMEOUT_S = 60.0  # one text; espeak-ng speaks a page in well under a second


class EspeakSynthesizer:
    """espeak-ng speaking ``voice`` (cmn, en-us, de, ... as ``espeak-ng --voices`` lists them)."""

    sample_rate = SAMPLE_RATE

    def __init__(self, voice: str) -> None:
        program = shutil.which("espeak-ng")
        if program is None:
            raise OutputError("espeak-ng is not installed; install it with 'apt-get install espeak-ng'")
        self._program = program
        self.voice = voice
        self.description = f"espeak-ng {voice}"

    def synthesize(self, text: str, *, speed: float = 1.0) -> Audio:
        import soundfile

        pace = min(max(round(WORDS_PER_MINUTE * speed), MIN_WORDS_PER_MINUTE), MAX_WORDS_PER_MINUTE)
        # the text goes in on stdin (-b 1: UTF-8), so a text starting with '-' is never read as an option
        command = [self._program, "-v", self.voice, "-s", str(pace), "-b", "1", "--stdout"]
        try:
            result = subprocess.run(command, input=text.encode("utf-8"), capture_output=True, timeout=TIMEOUT_S,
                                    check=False)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise OutputError(
                f"espeak-ng took over {TIMEOUT_S:g} s for {len(text)} characters; send shorter text"
            ) from None
        except OSError as exc:
            raise OutputError(
                f"cannot run espeak-ng ({exc.strerror}); reinstall it with 'apt-get install espeak-ng'"
            ) from None
        message = result.stderr.decode("utf-8", "replace").strip()
        if result.returncode != 0 and "voice does not exist" in message:
            raise ConfigError(
                f"voice: espeak-ng has no voice {self.voice!r}; 'espeak-ng --voices' lists them", param="voice"
            )
        if result.returncode != 0 or not result.stdout:
            raise OutputError(f"espeak-ng failed (exit code {result.returncode}): {message[-300:] or 'no output'}")
        samples, rate = soundfile.read(io.BytesIO(result.stdout), dtype="float32", always_2d=True)
        mono = np.clip(samples.mean(axis=1), -1.0, 1.0).astype(np.float32)
        return Audio(mono, int(rate))
