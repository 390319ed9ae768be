"""Judges: decide whether a completion is harmful compliance with a request, behind one interface.

    judge = make_judge("offline")                       # or refusal / harmbench / llamaguard / openai
    verdicts = judge.judge(requests, completions)       # one Verdict per pair, named after its judge

Every verdict records the judge that produced it, so a reported attack success rate always says
whose opinion it is. Judges, weakest to strongest:

- `refusal`: refusal-phrase matching. A weak baseline: it counts gibberish and off-topic text as
  compliance, which is exactly what a circuit-broken model emits.
- `offline` (default; CPU, nothing from the Hub): not a refusal AND coherent (perplexity under a
  reference LM, no degenerate repetition) AND relevant to the request (sentence-embedding cosine).
  It does not judge whether the content is harmful: it assumes the request is, so it measures
  "answered a harmful request", an upper bound on what a content classifier would call harmful.
- `harmbench`: the HarmBench classifier prompt with any HF classifier (cais/HarmBench-Llama-2-13b-cls,
  cais/HarmBench-Mistral-7b-val-cls), scored from the yes/no next-token probabilities.
- `llamaguard`: a Llama Guard model through its own chat template, scored from "unsafe" vs "safe".
- `openai`: any OpenAI-compatible chat endpoint with a StrongREJECT-style rubric (plain HTTP).

Modules: `base` (interface), `refusal`, `offline` (with its calibration), `degeneracy` (text measures of
loops), `no_answer` (the rule every judge gets on attack completions), `classifiers` (HarmBench, Llama
Guard), `http` (the rubric grader), `agreement` (XSTest human labels).
"""

from __future__ import annotations

from typing import Any

from ...data.refusal import REFUSAL_PATTERNS, detect_refusal
from .agreement import judge_agreement, xstest_split
from .base import Judge, Verdict, check_lengths
from .classifiers import (
    CLASSIFIER_MODELS,
    HarmBenchJudge,
    LlamaGuardJudge,
    classifier_weights_problem,
    harmbench_prompt,
    label_probabilities,
    load_classifier,
)
from .degeneracy import compression_ratio, new_bytes, repetition_ratio
from .http import RUBRIC_PROMPT, OpenAIJudge, parse_rubric, rubric_score
from .no_answer import NO_ANSWER_RULE, judge_attack_completions, no_answer_reason
from .offline import (
    OfflineJudge,
    OfflineThresholds,
    SentenceEmbedder,
    calibrate_offline_judge,
    mean_perplexity,
    minilm_path,
    response_token_nlls,
    synthetic_gibberish,
    window_perplexity,
)
from .refusal import RefusalJudge

JUDGES: dict[str, type[Judge]] = {
    "refusal": RefusalJudge,
    "offline": OfflineJudge,
    "harmbench": HarmBenchJudge,
    "llamaguard": LlamaGuardJudge,
    "openai": OpenAIJudge,
}
"""Judges by name, for `make_judge` and the command line."""
DEFAULT_JUDGE = "offline"


def make_judge(name: str = DEFAULT_JUDGE, **kwargs: Any) -> Judge:
    """Build a judge by name (see JUDGES); keyword arguments go to its constructor."""
    if name not in JUDGES:
        raise ValueError(f"unknown judge {name!r}; choose one of {sorted(JUDGES)}")
    return JUDGES[name](**kwargs)


__all__ = [
    "NO_ANSWER_RULE",
    "CLASSIFIER_MODELS",
    "DEFAULT_JUDGE",
    "JUDGES",
    "REFUSAL_PATTERNS",
    "RUBRIC_PROMPT",
    "HarmBenchJudge",
    "Judge",
    "LlamaGuardJudge",
    "OfflineJudge",
    "OfflineThresholds",
    "OpenAIJudge",
    "RefusalJudge",
    "SentenceEmbedder",
    "Verdict",
    "calibrate_offline_judge",
    "check_lengths",
    "classifier_weights_problem",
    "compression_ratio",
    "detect_refusal",
    "harmbench_prompt",
    "judge_agreement",
    "judge_attack_completions",
    "label_probabilities",
    "load_classifier",
    "make_judge",
    "mean_perplexity",
    "minilm_path",
    "new_bytes",
    "no_answer_reason",
    "parse_rubric",
    "repetition_ratio",
    "response_token_nlls",
    "rubric_score",
    "synthetic_gibberish",
    "window_perplexity",
    "xstest_split",
]
