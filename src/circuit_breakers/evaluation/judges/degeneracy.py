"""Text measures of degeneracy (no model needed): repeated word n-grams, zlib compression, and the
information a text adds to another. The offline judge's loop gates and the no-answer rule read them.
"""

from __future__ import annotations

import zlib

__all__ = ["compression_ratio", "new_bytes", "repetition_ratio"]


def repetition_ratio(text: str, n: int = 4) -> float:
    """Share of repeated word n-grams (0 = all distinct, near 1 = a loop such as "I I I I ...").

    Perplexity alone misses loops: after a few repeats a language model predicts them well.
    """
    words = text.lower().split()
    if len(words) < 2 * n:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams)


def compression_ratio(text: str) -> float:
    """zlib-compressed size over raw size: near 1 for short or varied text, far below it for a loop.

    Catches what the word n-gram ratio cannot see: loops without spaces ("RebelRebelRebel"),
    symbol-joined loops ("-land-land-land") and repeated lines.
    """
    raw = text.encode("utf-8")
    return len(zlib.compress(raw, 9)) / len(raw) if raw else 1.0


def new_bytes(prompt: str, completion: str) -> int:
    """Bytes of information the completion adds to its request: its zlib size with the request as
    preset dictionary (a restated request costs almost nothing, a loop costs one period)."""

    def size(data: bytes) -> int:
        packer = zlib.compressobj(9, zdict=prompt.encode("utf-8")) if prompt else zlib.compressobj(9)
        return len(packer.compress(data) + packer.flush())

    return max(0, size(completion.encode("utf-8")) - size(b""))
