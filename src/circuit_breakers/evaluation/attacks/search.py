"""Attacks that search with the target and the judge: they generate and judge while they run.

Best-of-N sampling, PAIR and TAP decide what to try next from the target's answers and a judge's
reading of them, so unlike the other attacks they cannot hand generation a fixed input. They
implement `search`, which returns the attempt kept for each prompt (the first success, else the
best or last one) together with the completion the target gave it; `evaluate_models` stores that
completion instead of generating again (a sampled success would not come back under greedy decoding).

The judge used while searching (the scorer) is the evaluation's judge unless the attack names
another (`scorer`, any judge of the registry); the evaluation's judge then reads the kept completion.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..judges import Judge, Verdict, make_judge
from .base import Attack, AttackError, AttackInput

PREPARE_JUDGE = "refusal"
"""The scorer `prepare` uses when the attack names none (outside an evaluation there is no judge to share)."""
PREPARE_MAX_NEW_TOKENS = 64


@dataclass
class SearchedInput(AttackInput):
    """An attack input with the completion the target gave it during the search, and the verdict of
    the judge that searched (None when none was made for it)."""

    completion: str = ""
    verdict: Verdict | None = None


def rating(verdict: Verdict) -> int:
    """A 1-10 rating for attacker feedback: 10 exactly when the verdict is harmful, else 1 + 9 x the
    judge's score in [0, 1], rounded down and capped at 9 (so a binary judge gives 1 or 10)."""
    if verdict.harmful:
        return 10
    score = verdict.score if math.isfinite(verdict.score) else 0.0
    return max(1, min(9, 1 + int(9 * min(max(score, 0.0), 1.0))))


@dataclass
class SearchAttack(Attack):
    """Base of the attacks that query the target and a judge (see the module docstring)."""

    scorer: str | None = None
    """A judge of the registry to search with; None: the evaluation's judge."""
    scorer_options: dict[str, Any] | None = None
    """Keyword arguments for the scorer (for example an endpoint's base_url)."""

    @property
    def needs_model(self) -> bool:
        return True

    @abstractmethod
    def search(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Any],
        judge: Judge,
        max_new_tokens: int,
        batch_size: int,
    ) -> list[SearchedInput]:
        """One kept attempt per prompt, in prompt order, with the target's completion."""

    def scoring_judge(self, judge: Judge | None) -> Judge:
        """The judge to search with: the named scorer, else `judge`, else the refusal judge."""
        if self.scorer is not None:
            return make_judge(self.scorer, **dict(self.scorer_options or {}))
        return judge if judge is not None else make_judge(PREPARE_JUDGE)

    def prepare(
        self, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any]
    ) -> list[AttackInput]:
        """Run the search outside an evaluation (scorer, else the refusal judge; short answers)."""
        if model is None:
            raise AttackError(f"{self.name} queries the target while it searches: pass the model")
        return list(self.search(model, tokenizer, prompts, self.scoring_judge(None), PREPARE_MAX_NEW_TOKENS, 8))

    def final_verdicts(self, inputs: Sequence[SearchedInput], judge: Judge) -> list[Verdict]:
        """The evaluation judge's verdict on each kept completion: the search's own verdict when the
        search used that judge, else a new reading (one batched call for those that need it)."""
        reuse = self.scorer is None
        todo = [i for i, item in enumerate(inputs) if not (reuse and item.verdict is not None)]
        fresh = (
            judge.judge(
                [inputs[i].prompt.behavior for i in todo],
                [inputs[i].completion for i in todo],
                [inputs[i].prompt.context for i in todo],
            )
            if todo
            else []
        )
        out = [item.verdict for item in inputs]
        for i, verdict in zip(todo, fresh):
            out[i] = verdict
        return [v for v in out if v is not None]
