"""Words from the per-token times and scores of transformers' Whisper ``generate`` (whisper-hf backend).

transformers gives a time per token (cross-attention alignment, ``return_token_timestamps``) but no words: tokens
are grouped into words here the way openai/whisper's ``split_to_word_tokens`` does. First tokens that only together
decode to whole characters are joined; then, in languages written with spaces, a token that starts with a space
starts a word and punctuation joins the word before it; in languages written without spaces (Chinese, Japanese,
Thai, Lao, Burmese, Cantonese) every character is a word.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from typing import Any

from assistant.messages import Word

NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})
PUNCTUATION = set(string.punctuation) | set("。，、！？：；「」『』（）…")


def words_of_segment(tokenizer: Any, segment: dict[str, Any], language: str) -> tuple[Word, ...]:
    """The words of one ``generate(return_segments=True, return_token_timestamps=True, output_scores=True,
    return_dict_in_generate=True)`` segment, with times in seconds from the start of the window."""
    tokens = [int(t) for t in segment["tokens"]]
    times = [float(t) for t in segment["token_timestamps"]]
    probabilities = _token_probabilities(segment, tokens)
    text_end = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    pieces = _characters(tokenizer, [i for i, token in enumerate(tokens) if token < text_end], tokens)
    words = pieces if language in NO_SPACE_LANGUAGES else _join_on_spaces(pieces)
    found = []
    for text, indexes in words:
        if not text.strip():
            continue
        # a token's time is where the alignment moves past it: the end of that token, the start of the next
        first, last = indexes[0], indexes[-1]
        start = times[first - 1] if first > 0 else times[first]
        share = [probabilities[i] for i in indexes]
        found.append(Word(text, start, max(times[last], start), sum(share) / len(share)))
    return tuple(found)


def _characters(tokenizer: Any, indexes: Sequence[int], tokens: Sequence[int]) -> list[tuple[str, list[int]]]:
    """Runs of tokens that decode to whole characters (a Chinese character may span two byte-level tokens)."""
    pieces: list[tuple[str, list[int]]] = []
    current: list[int] = []
    for index in indexes:
        current.append(index)
        text = tokenizer.decode([tokens[i] for i in current])
        if "\ufffd" not in text:
            pieces.append((text, current))
            current = []
    return pieces


def _join_on_spaces(pieces: list[tuple[str, list[int]]]) -> list[tuple[str, list[int]]]:
    words: list[tuple[str, list[int]]] = []
    for text, indexes in pieces:
        starts_word = text.startswith(" ") or not words
        if starts_word and text.strip() not in PUNCTUATION:
            words.append((text, list(indexes)))
        else:
            previous_text, previous_indexes = words[-1] if words else ("", [])
            merged = (previous_text + text, previous_indexes + list(indexes))
            words[-1:] = [merged]
    return words


def _token_probabilities(segment: dict[str, Any], tokens: Sequence[int]) -> list[float]:
    """Each token's probability under the decoder's (processed) scores at the step that chose it; 1.0 where the
    scores are not there."""
    import torch

    result = segment.get("result") or {}
    scores = result.get("scores")
    sequences = result.get("sequences")
    if scores is None or sequences is None:
        return [1.0] * len(tokens)
    offset = len(sequences) - len(scores)  # the decoder's prompt comes before the first scored step
    first = int(segment["idxs"][0]) - offset
    found = []
    for position, token in enumerate(tokens):
        step = first + position
        if not 0 <= step < len(scores):
            found.append(1.0)
            continue
        row = scores[step].reshape(-1).float()
        found.append(float(torch.softmax(row, dim=-1)[token]))
    return found
