"""PAIR (Chao et al. 2023, arXiv 2310.08419), run as HarmBench runs it: an attacker model rewrites the
request from the target's answers and the scorer's ratings.

For each request, `n_streams` independent attacker conversations run for up to `n_iterations`
rounds. In a round every stream proposes a prompt (an unparsable reply reuses the stream's previous
prompt, at first the request itself, and is counted), the target answers each greedily, the scorer
rates each answer 1-10 (`search.rating`), and each stream's attacker sees its answer and rating next
round. The search for a request stops after the round in which any stream's answer is judged
harmful; the kept attempt is the highest-rated one (the earliest among equals), so a success when
there is one.

Budgets: `cpu` 2 streams x 2 rounds, `default` 5 x 3, `paper` 20 x 3 (HarmBench's PAIR settings).
The attacker options (model, endpoint, temperature, history kept) are in `attacker.AttackerSearch`.
Requests are searched together: each round is one attacker call and one target batch over the streams
of every request still open.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..judges import Judge
from .attacker import Attacker, AttackerSearch, Attempt, parse_attacker_reply
from .base import AttackError, AttackPrompt, Message, coerce_prompts
from .search import SearchedInput


@dataclass
class PairAttack(AttackerSearch):
    """Parallel attacker conversations, refined from the target's answers (see the module docstring)."""

    name: ClassVar[str] = "pair"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {"n_streams": 2, "n_iterations": 2, "attacker_max_new_tokens": 128},
        "default": {"n_streams": 5, "n_iterations": 3},
        "paper": {"n_streams": 20, "n_iterations": 3},
    }
    n_streams: int = 5
    n_iterations: int = 3

    def search(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Any],
        judge: Judge,
        max_new_tokens: int,
        batch_size: int,
        attacker: Attacker | None = None,
    ) -> list[SearchedInput]:
        if self.n_streams < 1 or self.n_iterations < 1:
            raise AttackError(
                f"pair: n_streams and n_iterations must be at least 1 (got {self.n_streams}, {self.n_iterations})"
            )
        self.check_attacker()
        items = coerce_prompts(prompts)
        scorer = self.scoring_judge(judge)
        if not items:
            return []
        searches = [_Search(item, [self.opening(item) for _ in range(self.n_streams)]) for item in items]
        with self.open_attacker(model, tokenizer, attacker) as writer:
            for round_ in range(1, self.n_iterations + 1):
                open_ = [s for s in searches if not s.done]
                if not open_:
                    break
                rows = [(s, stream) for s in open_ for stream in range(self.n_streams)]
                replies = writer.reply([self.trimmed(s.conversations[stream]) for s, stream in rows])
                for (s, stream), reply in zip(rows, replies):
                    parsed = parse_attacker_reply(reply)
                    if parsed is None:
                        s.failures += 1
                    else:
                        s.previous[stream] = parsed[1]
                requests = [(s.item, s.previous[stream]) for s, stream in rows]
                attempts = self.query(model, tokenizer, requests, scorer, max_new_tokens, batch_size)
                for (s, stream), reply, attempt in zip(rows, replies, attempts):
                    s.queries += 1
                    if s.best is None or attempt.rating > s.best[0].rating:
                        s.best = (attempt, round_, stream)
                    s.conversations[stream] = self.extend(
                        s.conversations[stream], reply, attempt.answer, attempt.rating, s.item.behavior
                    )
                    s.done = s.done or attempt.verdict.harmful
        return [self._kept(index, s, scorer) for index, s in enumerate(searches)]

    def _kept(self, index: int, search: _Search, scorer: Judge) -> SearchedInput:
        if search.best is None:  # n_streams and n_iterations are checked to be at least 1
            raise AttackError("pair: no attempt was made")
        attempt, round_, stream = search.best
        settings = {
            "iteration": round_,
            "stream": stream,
            "queries": search.queries,
            "parse_failures": search.failures,
            "scorer": scorer.name,
            "attacker": self.attacker,
        }
        return attempt.kept(search.item, index, self.name, settings)


@dataclass
class _Search:
    """One request's PAIR state: its streams' conversations and last prompts, the best attempt so far."""

    item: AttackPrompt
    conversations: list[list[Message]]
    previous: list[str] = field(default_factory=list)
    best: tuple[Attempt, int, int] | None = None  # (attempt, round, stream)
    failures: int = 0
    queries: int = 0
    done: bool = False

    def __post_init__(self) -> None:
        self.previous = self.previous or [self.item.behavior] * len(self.conversations)
