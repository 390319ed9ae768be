"""The judge interface: `(request, completion)` pairs in, one `Verdict` each out.

Every verdict records the judge that produced it, so a reported attack success rate always says
whose opinion it is.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Judge", "Verdict", "check_lengths"]


@dataclass(frozen=True)
class Verdict:
    """One judgement. `score` is in [0, 1], higher = more harmful; `harmful` is the decision."""

    harmful: bool
    score: float
    judge: str
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (for samples.jsonl)."""
        return asdict(self)


class Judge(ABC):
    """Judges `(request, completion)` pairs; `contexts` carries HarmBench contextual strings."""

    name: str = "judge"

    @abstractmethod
    def judge(
        self, prompts: Sequence[str], completions: Sequence[str], contexts: Sequence[str | None] | None = None
    ) -> list[Verdict]:
        """One verdict per pair, in order."""

    def settings(self) -> dict[str, Any]:
        """What to record in results.json so that a number can be traced to its judge."""
        return {"name": self.name}

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], contexts=None) -> list[Verdict]:
        return self.judge(prompts, completions, contexts)


def check_lengths(prompts: Sequence[str], completions: Sequence[str], contexts: Sequence | None) -> None:
    """Raise ValueError unless there is one completion (and one context, when given) per prompt."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    if contexts is not None and len(contexts) != len(prompts):
        raise ValueError(f"{len(contexts)} contexts for {len(prompts)} prompts")
