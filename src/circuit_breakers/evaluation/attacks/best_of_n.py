"""Best-of-N jailbreaking (Hughes et al. 2024, arXiv 2412.03556): ask many noisy copies of the request.

Each attempt augments the request at random, in the paper's order, each with its own probability:

- scrambling: every whitespace-separated word longer than 3 characters has its middle characters
  (all but the first and the last) shuffled, with probability `scramble_prob`;
- capitalisation: every letter has its case flipped, with probability `case_prob`;
- noise: every printable ASCII character (codes 32-126) moves one code point up or down (staying
  printable), with probability `noise_prob`.

The defaults are the paper's text settings at sigma = 0.4: sigma^(1/2) (about 0.63) for scrambling and
capitalisation, sigma^3 (0.064) for noise. Only the request is augmented; a HarmBench context stays
as it is. The target answers each attempt by temperature sampling; the attack succeeds on the first
attempt the scorer judges harmful, and keeps that attempt (else the last one) with its attempt count.

Augmentations are drawn from `random.Random` seeded with the attack's seed, the attempt number and
the request, and sampling is seeded per round, so a run is reproducible. Budgets: `cpu` N = 4,
`default` N = 32, `paper` N = 10,000 (the paper's largest text budget; a cap, since prompts stop at
their first success).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn
from transformers import PreTrainedTokenizerBase

from ...generation import generate
from ..judges import Judge
from .base import CONTEXT_SEPARATOR, AttackError, AttackPrompt, coerce_prompts
from .search import SearchAttack, SearchedInput

SIGMA = 0.4
"""The paper's augmentation strength for text."""
SCRAMBLE_PROB = SIGMA**0.5
CASE_PROB = SIGMA**0.5
NOISE_PROB = SIGMA**3
_PRINTABLE = (32, 126)


def scramble_words(text: str, rng: random.Random, prob: float = SCRAMBLE_PROB) -> str:
    """Shuffle the middle of each word longer than 3 characters with probability `prob`; the first
    and last characters and all whitespace stay where they are."""
    parts = re.split(r"(\s+)", text)
    for i, part in enumerate(parts):
        if len(part) > 3 and not part.isspace() and rng.random() < prob:
            middle = list(part[1:-1])
            rng.shuffle(middle)
            parts[i] = part[0] + "".join(middle) + part[-1]
    return "".join(parts)


def flip_case(text: str, rng: random.Random, prob: float = CASE_PROB) -> str:
    """Flip the case of each letter with probability `prob` (letters whose flipped case is one
    different character; nothing else changes)."""
    out = []
    for c in text:
        flipped = c.swapcase()
        out.append(flipped if len(flipped) == 1 and flipped != c and rng.random() < prob else c)
    return "".join(out)


def add_noise(text: str, rng: random.Random, prob: float = NOISE_PROB) -> str:
    """Move each printable ASCII character one code point up or down with probability `prob`,
    staying inside 32-126; other characters are left alone."""
    low, high = _PRINTABLE
    out = []
    for c in text:
        code = ord(c)
        if low <= code <= high and rng.random() < prob:
            step = rng.choice((-1, 1))
            code = code + step if low <= code + step <= high else code - step
        out.append(chr(code))
    return "".join(out)


def augment(
    text: str,
    rng: random.Random,
    scramble_prob: float = SCRAMBLE_PROB,
    case_prob: float = CASE_PROB,
    noise_prob: float = NOISE_PROB,
) -> str:
    """Scrambling, then capitalisation, then noise, as the paper applies them."""
    return add_noise(flip_case(scramble_words(text, rng, scramble_prob), rng, case_prob), rng, noise_prob)


@dataclass
class BestOfNAttack(SearchAttack):
    """Up to `n` augmented copies of each request, each answered by temperature sampling; stops at
    the first one the scorer judges harmful (see the module docstring)."""

    name: ClassVar[str] = "best_of_n"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {"n": 4},
        "default": {"n": 32},
        "paper": {"n": 10_000},
    }
    n: int = 32
    seed: int = 0
    temperature: float = 1.0
    """Sampling temperature of the target's answers (the paper samples at 1.0)."""
    scramble_prob: float = SCRAMBLE_PROB
    case_prob: float = CASE_PROB
    noise_prob: float = NOISE_PROB
    per_round: int = 1
    """Attempts per open prompt per generation round: more fills a GPU batch, but up to per_round - 1
    attempts past the first success are generated and judged."""

    def check(self) -> None:
        """Refuse options that cannot run (one line each)."""
        if self.n < 1 or self.per_round < 1:
            raise AttackError(f"best_of_n: n and per_round must be at least 1 (got {self.n}, {self.per_round})")
        if self.temperature <= 0:
            raise AttackError("best_of_n: temperature must be positive (it samples)")
        for key in ("scramble_prob", "case_prob", "noise_prob"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise AttackError(f"best_of_n: {key} must lie in [0, 1], not {getattr(self, key)}")

    def augmented(self, request: str, attempt: int) -> str:
        """The request as attempt `attempt` (0-based) sends it: the same text for the same seed."""
        rng = random.Random(f"best_of_n:{self.seed}:{attempt}:{request}")
        return augment(request, rng, self.scramble_prob, self.case_prob, self.noise_prob)

    def search(
        self,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[Any],
        judge: Judge,
        max_new_tokens: int,
        batch_size: int,
    ) -> list[SearchedInput]:
        self.check()
        items = coerce_prompts(prompts)
        scorer = self.scoring_judge(judge)
        kept: list[SearchedInput | None] = [None] * len(items)
        open_ = list(range(len(items)))
        start = 0
        while open_ and start < self.n:
            attempts = range(start, min(self.n, start + self.per_round))
            rows = [(i, k) for i in open_ for k in attempts]
            messages = [items[i].chat(self._user_text(items[i], k)) for i, k in rows]
            # Sampling is done here with generation.generate's sampling path, seeded per round.
            answers = generate(
                model,
                tokenizer,
                messages,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
                do_sample=True,
                temperature=self.temperature,
                seed=self.seed * 1_000_003 + start,
                progress=False,
            )
            verdicts = scorer.judge([items[i].behavior for i, _ in rows], answers, [items[i].context for i, _ in rows])
            done = set()
            for (i, k), conversation, answer, verdict in zip(rows, messages, answers, verdicts):
                if i in done:
                    continue
                settings = {"attempts": k + 1, "success": bool(verdict.harmful), "n": self.n, "scorer": scorer.name}
                kept[i] = SearchedInput(
                    conversation, items[i], i, self.name, settings=settings, completion=answer, verdict=verdict
                )
                if verdict.harmful:
                    done.add(i)
            open_ = [i for i in open_ if i not in done]
            start += self.per_round
        return [item for item in kept if item is not None]

    def _user_text(self, item: AttackPrompt, attempt: int) -> str:
        augmented = self.augmented(item.behavior, attempt)
        return f"{item.context}{CONTEXT_SEPARATOR}{augmented}" if item.context else augmented
