"""The contract every registered judge keeps, checked on each one built offline on a CPU: one verdict
per input, in order; a score in [0, 1]; settings that survive a JSON round trip; the judge's name on
every verdict; mismatched inputs rejected. Classifier judges run on a tiny model built here, the HTTP
judge against a local endpoint."""

from __future__ import annotations

import json
import math
import re
import zlib
from collections.abc import Callable, Iterator

import pytest
import torch

from circuit_breakers.evaluation.judges import (
    JUDGES,
    HarmBenchJudge,
    Judge,
    LlamaGuardJudge,
    OfflineJudge,
    OpenAIJudge,
    RefusalJudge,
)
from helpers import chat_completions_stub, make_model, make_tokenizer

torch.set_num_threads(1)

REQUESTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.", "Summarise the text."]
COMPLETIONS = [
    "I'm sorry, but I cannot help with that request.",
    "The waves roll in, the gulls cry out.",
    "bake salt knead then flour yeast, water and Mix bake. salt then",
    "",
]
CONTEXTS = [None, None, None, "A short text about plants and light."]


def bag_of_words(texts):
    """A stand-in sentence embedder: normalised hashed word counts."""
    out = torch.zeros(len(texts), 64)
    for i, text in enumerate(texts):
        for word in re.findall(r"[a-z]+", text.lower()):
            out[i, zlib.crc32(word.encode()) % 64] += 1.0
    return torch.nn.functional.normalize(out + 1e-6, dim=-1)


@pytest.fixture(scope="module")
def tiny():
    tokenizer = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tokenizer), layers=2, seed=0).eval(), tokenizer


@pytest.fixture(scope="module")
def grader_url() -> Iterator[str]:
    """A local OpenAI-compatible endpoint that grades a refusal as refused and anything else as harmful."""

    def grade(content: str) -> str:
        refused = "sorry" in content
        return "#refused 1\n#convincing 1\n#specific 1" if refused else "#refused 0\n#convincing 4\n#specific 3"

    with chat_completions_stub(grade) as url:
        yield url


BUILDERS: dict[str, Callable[..., Judge]] = {
    "refusal": lambda tiny, url: RefusalJudge(),
    "offline": lambda tiny, url: OfflineJudge(reference=tiny, embedder=bag_of_words),
    "harmbench": lambda tiny, url: HarmBenchJudge(*tiny),
    "llamaguard": lambda tiny, url: LlamaGuardJudge(*tiny),
    "openai": lambda tiny, url: OpenAIJudge(model="local", base_url=url, api_key="", max_retries=0),
}


def test_every_registered_judge_has_a_contract_check():
    assert set(BUILDERS) == set(JUDGES)
    for name, build in BUILDERS.items():
        assert JUDGES[name].name == name


@pytest.mark.parametrize("name", sorted(JUDGES))
def test_judge_contract(name, tiny, grader_url):
    judge = BUILDERS[name](tiny, grader_url)
    assert isinstance(judge, JUDGES[name])
    verdicts = judge.judge(REQUESTS, COMPLETIONS, CONTEXTS)
    assert len(verdicts) == len(REQUESTS)
    for verdict in verdicts:
        assert verdict.judge == judge.name == name
        assert isinstance(verdict.harmful, bool)
        assert isinstance(verdict.score, float) and math.isfinite(verdict.score) and 0.0 <= verdict.score <= 1.0
        json.dumps(verdict.to_dict(), allow_nan=True)  # details are plain values (perplexity may be infinite)
    # Order is kept: judging one pair alone gives that pair's verdict.
    (alone,) = judge.judge(REQUESTS[1:2], COMPLETIONS[1:2], CONTEXTS[1:2])
    assert (alone.harmful, alone.score) == pytest.approx((verdicts[1].harmful, verdicts[1].score), abs=1e-5)
    assert judge(REQUESTS[:2], COMPLETIONS[:2]) == judge.judge(REQUESTS[:2], COMPLETIONS[:2])
    settings = judge.settings()
    assert settings["name"] == name
    assert json.loads(json.dumps(settings, allow_nan=False)) == settings
    with pytest.raises(ValueError):
        judge.judge(REQUESTS, COMPLETIONS[:2])
    with pytest.raises(ValueError):
        judge.judge(REQUESTS, COMPLETIONS, CONTEXTS[:1])
