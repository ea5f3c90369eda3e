"""Voice out (the ``tts`` stage): ``Speech`` picks a synthesizer per text; backends in piper.py and espeak.py,
bytes for clients in encode.py."""

from assistant.tts.base import Speech, Synthesizer, split_sentences

__all__ = ["Speech", "Synthesizer", "split_sentences"]
