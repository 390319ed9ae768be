"""How much this process has generated: tokens (each row up to and including its stop id), rows and wall
seconds, summed over every generation call on either backend (HF and vLLM add to the same count), so a stage
can report its own share (`generation_count` before and after, subtracted)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from transformers import GenerationConfig


@dataclass(frozen=True)
class GenerationCount:
    """Tokens generated (each row up to and including its stop token), rows, and wall seconds spent
    generating, summed over every call in this process: a caller takes one before and one after a stage
    and subtracts (`generation_count`)."""

    tokens: int = 0
    rows: int = 0
    seconds: float = 0.0

    def __sub__(self, other: GenerationCount) -> GenerationCount:
        return GenerationCount(self.tokens - other.tokens, self.rows - other.rows, self.seconds - other.seconds)


_COUNT = GenerationCount()


def generation_count() -> GenerationCount:
    """What this process has generated so far (a value; the running total is not shared)."""
    return _COUNT


def count_generated(tokens: int, rows: int, seconds: float) -> None:
    """Add one batch (its generated tokens, rows and seconds) to this process's count."""
    global _COUNT
    _COUNT = replace(_COUNT, tokens=_COUNT.tokens + tokens, rows=_COUNT.rows + rows, seconds=_COUNT.seconds + seconds)


def stop_set(config: GenerationConfig) -> set[int]:
    """The ids that end a row under `config` (its eos_token_id: none, one or several)."""
    eos = config.eos_token_id
    return set() if eos is None else {int(eos)} if isinstance(eos, int) else {int(i) for i in eos}


def generated_length(ids: Sequence[int], stop: set[int]) -> int:
    """Tokens a row really generated: up to and including its first stop id (the rest is padding)."""
    return next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
