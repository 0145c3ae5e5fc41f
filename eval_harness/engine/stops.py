"""Stop-string checks for the engine's ``stop(request, tokens)`` hook: whether a sequence's text has reached one of
the caller's stop strings, decoded from a window of its last tokens (decoding a whole answer at every look would
cost time quadratic in its length)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

STOP_EVERY = 8  # new tokens between two looks for a stop string (greedy decoding)

StopCheck = Callable[[int, list[int]], bool]


def windowed_stop(
    tokenizer, stops: Sequence[str], skip_special_tokens: bool, every: int = STOP_EVERY
) -> StopCheck | None:
    """For greedy decoding asked every `every` tokens: a window holding the tokens since the previous look and a
    stop string ending in them (a character takes at most 4 byte-level tokens). It only ends a
    sequence early, to save time: callers cut the full text at its first stop string either way. None without
    stop strings."""
    stops = [s for s in stops if s]
    if not stops:
        return None
    window = every + 4 * max(len(s) for s in stops) + 4

    def reached(_: int, tokens: list[int]) -> bool:
        text = tokenizer.decode(tokens[-window:], skip_special_tokens=skip_special_tokens)
        return any(s in text for s in stops)

    return reached


def lookback_stop(tokenizer, stops: Sequence[str]) -> StopCheck:
    """lm-eval's stop-sequence criterion for one sequence: whether a stop string is in the text of its last
    (tokens of that string + 2) new tokens, special tokens decoded (`lm_eval.models.utils_hf.MultiTokenEOSCriteria`).
    Beam search asks it at every step about each request's best candidate."""
    windows = [(stop, len(tokenizer.encode(stop, add_special_tokens=False)) + 2) for stop in stops]

    def stop(_: int, tokens: list[int]) -> bool:
        return any(text in tokenizer.decode(tokens[-window:]) for text, window in windows)

    return stop
