"""Distribution shift on benign text, judge-free: how far the defended model's next-token distributions
and greedy answers move from the base model's where nothing harmful is asked.

The base model answers each benign prompt greedily (its first N tokens, as token ids); that answer is
then read, teacher-forced, by both models in one forward each, and two readings come from that pass:

- KL(base || defended) per answer token, with a bootstrap interval over prompts. The answer is the base
  model's benign behaviour, so a defended model that keeps it has KL near 0 there.
- Greedy agreement: the share of prompts on which the defended model's greedy answer is the base
  model's, token for token, with a Wilson interval. Greedy decoding is decided one token at a time, so
  the defended model generates the base answer if and only if its argmax at every answer position is
  the base model's token: the defended model never has to generate. The first position where it
  departs gives the agreed prefix length.

Only the answer positions go through the vocabulary projection (`logits_to_keep`), not the prompt's,
and the leading tokens every prompt shares (the chat template's system turn) are read once per model.

    answer_ids = greedy_answer_ids(base, tokenizer, prompts, n_tokens=16)
    rows = answer_drift(base, defended, tokenizer, prompts, answer_ids)
    kl, agreement = kl_summary(rows), prefix_agreement(rows)
"""

from __future__ import annotations

import copy
import inspect
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from ..data.prompts import Prompt
from ..generation import generate_batches, generation_config, render_prompts
from .metrics import DEFAULT_CONFIDENCE, bootstrap_ci, wilson_interval

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_DRIFT_TOKENS",
    "Agreement",
    "KLSummary",
    "answer_drift",
    "drift_greedy_cell",
    "drift_kl_cell",
    "drift_summary",
    "greedy_answer_ids",
    "kl_summary",
    "prefix_agreement",
    "prompt_ids",
]

DEFAULT_DRIFT_TOKENS = 16
"""Greedy tokens of the base model's answer that KL and agreement are read over."""
MIN_SHARED_PREFIX = 8
"""Fewest leading tokens common to every prompt worth reading once and sharing through a KV cache."""


@dataclass(frozen=True)
class KLSummary:
    """Mean KL(base || defended) per answer token (nats), with a bootstrap interval over prompts.

    `value` weighs every token alike (total KL / total tokens); `mean_record` averages the prompts'
    own per-token means (every prompt alike)."""

    value: float
    low: float
    high: float
    n_tokens: int
    n_records: int
    mean_record: float
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Agreement:
    """k of n prompts whose greedy answers were identical token for token, with a Wilson interval, and
    the mean number of leading answer tokens the two models agreed on (`mean_prefix`)."""

    value: float
    low: float
    high: float
    k: int
    n: int
    mean_prefix: float = math.nan
    confidence: float = DEFAULT_CONFIDENCE

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _conversation(prompt: Prompt | str) -> Any:
    return prompt.to_messages() if isinstance(prompt, Prompt) else prompt


def prompt_ids(tokenizer: Any, prompts: Sequence[Prompt | str]) -> list[list[int]]:
    """Token ids of each prompt up to the assistant turn, exactly as `generation` feeds them to the model."""
    texts = render_prompts(tokenizer, [_conversation(p) for p in prompts])
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]] if texts else []


def greedy_answer_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    n_tokens: int = DEFAULT_DRIFT_TOKENS,
    batch_size: int = 8,
    progress: bool = False,
) -> list[list[int]]:
    """Token ids of the model's greedy answer to each prompt, in order: the first `n_tokens`, or fewer
    ending with the end-of-turn id that stopped it (`generation.generate_batches`, the generator
    everything else uses)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be at least 1, got {n_tokens}")
    texts = render_prompts(tokenizer, [_conversation(p) for p in prompts])
    config = generation_config(model, tokenizer, n_tokens)
    eos = config.eos_token_id
    stop = {int(eos)} if isinstance(eos, int) else {int(i) for i in eos or []}
    out: list[list[int]] = [[] for _ in texts]
    from tqdm.auto import tqdm

    with tqdm(total=len(texts), disable=not progress, desc="greedy answers", unit="prompt", leave=False) as bar:
        for batch in generate_batches(model, tokenizer, texts, config, batch_size):
            for row, ids in batch:
                end = next((i + 1 for i, t in enumerate(ids) if t in stop), len(ids))
                out[row] = [int(t) for t in ids[:end]]
            bar.update(len(batch))
    return out


def answer_drift(
    base: Any,
    other: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    answer_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
    share_prefix: bool = True,
) -> list[tuple[float, int, int]]:
    """Per prompt: (KL(base || other) summed over the answer's tokens, answer tokens, agreed prefix).

    Each prompt plus `base`'s answer ids is read teacher-forced by both models (one forward each, right
    padded, logits only where an answer token is predicted, float32). The agreed prefix counts the
    leading answer positions where `other`'s argmax is the answer token: it equals the answer's length
    exactly when `other`'s greedy answer is the same ids. Aligned with `prompts`; (nan, 0, 0) for an
    empty answer. With `share_prefix`, the tokens all prompts start with are read once per model and
    their KV cache copied to every batch (models whose forward takes a cache and position ids).
    """
    import torch

    if len(prompts) != len(answer_ids):
        raise ValueError(f"{len(answer_ids)} answers for {len(prompts)} drift prompts")
    heads = prompt_ids(tokenizer, prompts)
    out: list[tuple[float, int, int]] = [(math.nan, 0, 0)] * len(prompts)
    todo = [i for i in range(len(prompts)) if answer_ids[i]]
    if any(not heads[i] for i in todo):
        raise ValueError("a drift prompt rendered to no tokens: check the tokenizer's chat template")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    todo.sort(key=lambda i: len(heads[i]) + len(answer_ids[i]))
    states = [(m, getattr(m, "training", False)) for m in (base, other)]
    for model, _ in states:
        model.eval()
    mismatched = 0
    try:
        with torch.no_grad():
            shared = _shared_length([heads[i] for i in todo]) if share_prefix and _takes_cache(base, other) else 0
            prefixes = [_prefix_cache(model, heads[todo[0]][:shared]) if shared else None for model in (base, other)]
            if None in prefixes:
                shared, prefixes = 0, [None, None]
            for start in range(0, len(todo), batch_size):
                index = todo[start : start + batch_size]
                # The last answer token is never an input: nothing after it is predicted.
                rows = [heads[i][shared:] + list(answer_ids[i][:-1]) for i in index]
                ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
                attention, keep = torch.zeros_like(ids), torch.zeros_like(ids, dtype=torch.bool)
                for r, (i, row) in enumerate(zip(index, rows)):
                    ids[r, : len(row)] = torch.tensor(row)
                    attention[r, : len(row)] = 1
                    keep[r, len(heads[i]) - shared - 1 : len(row)] = True
                target = torch.tensor([t for i in index for t in answer_ids[i]])
                log_p, log_q = (
                    _answer_log_probs(model, ids, attention, keep, prefix)
                    for model, prefix in zip((base, other), prefixes)
                )
                if log_p.shape[-1] != log_q.shape[-1]:
                    raise ValueError(
                        f"the two models' vocabularies differ ({log_p.shape[-1]} vs {log_q.shape[-1]}): "
                        "KL and agreement need the same tokenizer"
                    )
                per_token = (log_p.exp() * (log_p - log_q)).sum(-1).double()
                matches = log_q.argmax(-1) == target
                mismatched += int((log_p.argmax(-1) != target).sum())
                offset = 0
                for i in index:
                    n = len(answer_ids[i])
                    agreed = int(matches[offset : offset + n].long().cumprod(0).sum())
                    out[i] = (float(per_token[offset : offset + n].sum()), n, agreed)
                    offset += n
    finally:
        for model, training in states:
            if training:
                model.train()
    if mismatched:
        log.warning(
            "%d answer tokens are not the base model's own argmax when read back: its generation settings "
            "(a repetition penalty, bf16) or near-ties changed them; agreement there is argmax agreement",
            mismatched,
        )
    return out


def drift_greedy_cell(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    n_tokens: int = DEFAULT_DRIFT_TOKENS,
    batch_size: int = 8,
    progress: bool = False,
) -> dict[str, Any]:
    """What the reference's "drift_greedy" cell records: its greedy answers as token ids (`answer_ids`, what
    every other model's KL and agreement are read over: decoded text would not tokenize back to them) and
    as text (`answers`, for reading)."""
    ids = greedy_answer_ids(model, tokenizer, prompts, n_tokens, batch_size, progress)
    return {"answers": [tokenizer.decode(a, skip_special_tokens=True) for a in ids], "answer_ids": ids}


def drift_kl_cell(
    reference: Any,
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    answer_ids: Sequence[Sequence[int]],
    batch_size: int = 8,
) -> dict[str, Any]:
    """What a model's "drift_kl" cell records: per prompt [KL(reference || model) summed over the answer,
    answer tokens, agreed prefix] over the reference's answer ids (`answer_drift`); `kl_summary` and
    `prefix_agreement` read the rows back, so both readings come from this one pass."""
    rows = answer_drift(reference, model, tokenizer, prompts, answer_ids, batch_size=batch_size)
    return {"kl": [list(row) for row in rows]}


def _forward_parameters(model: Any) -> set[str]:
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(inspect.signature(inner.forward).parameters)


def _takes_cache(*models: Any) -> bool:
    """Whether every model's forward continues from a KV cache at given positions (the decoder-only
    models of transformers 5; those with the older `cache_position` argument are read whole)."""
    for model in models:
        params = _forward_parameters(model)
        if not {"past_key_values", "position_ids"} <= params or "cache_position" in params:
            return False
    return True


def _shared_length(heads: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each its last token (it predicts the
    answer's first); 0 when fewer than `MIN_SHARED_PREFIX` or fewer than two prompts."""
    if len(heads) < 2:
        return 0
    first, limit = heads[0], min(len(h) for h in heads) - 1
    n = 0
    while n < limit and all(h[n] == first[n] for h in heads):
        n += 1
    return n if n >= MIN_SHARED_PREFIX else 0


def _prefix_cache(model: Any, prefix: Sequence[int]) -> tuple[Any, int] | None:
    """(KV cache of `prefix` read by `model`, one row; its length), or None where the cache is not plain
    or sliding-window attention (a state-space layer cannot be copied to rows this way)."""
    import torch
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    one = {"logits_to_keep": 1} if "logits_to_keep" in _forward_parameters(model) else {}
    model(input_ids=torch.tensor([list(prefix)], device=device), past_key_values=cache, use_cache=True, **one)
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
        return None
    return cache, len(prefix)


def _answer_log_probs(model: Any, ids: Any, attention: Any, keep: Any, prefix: tuple[Any, int] | None) -> Any:
    """log_softmax (float32, on the CPU) of the logits at the `keep` positions, `[n_kept, vocab]` in row
    order; only those hidden states are projected when the model's forward takes `logits_to_keep`.
    With `prefix` (a one-row cache and its length), `ids` continue it: the cache is copied to every row."""
    import torch

    device = next(model.parameters()).device

    def inputs() -> dict[str, Any]:  # a fresh copy of the prefix cache for every forward
        out = {"input_ids": ids.to(device), "attention_mask": attention.to(device)}
        if prefix is not None:
            cache, length = copy.deepcopy(prefix[0]), prefix[1]
            cache.batch_repeat_interleave(ids.shape[0])
            rows, width = ids.shape
            out["attention_mask"] = torch.cat([attention.new_ones(rows, length), attention], dim=1).to(device)
            out["position_ids"] = (length + torch.arange(width)).expand(rows, width).to(device)
            out.update(past_key_values=cache, use_cache=True)
        return out

    n_kept = int(keep.sum())
    logits = None
    if "logits_to_keep" in _forward_parameters(model):
        logits = model(**inputs(), logits_to_keep=keep.to(device)).logits
        if logits.dim() != 2 or logits.shape[0] != n_kept:  # a forward that slices the old way
            logits = None
    if logits is None:
        logits = model(**inputs()).logits[keep.to(device)]
    return logits.float().log_softmax(-1).cpu()


def kl_summary(rows: Sequence[Sequence[float]], seed: int = 0) -> KLSummary:
    """KL per token from per-prompt (summed KL, tokens, ...) rows, with a percentile bootstrap over
    prompts of the token-weighted mean (rows with no token or a missing value are left out)."""
    import numpy as np

    kept = [(float(r[0]), int(r[1])) for r in rows if r[0] is not None and r[1] and math.isfinite(float(r[0]))]
    kept = [(s, n) for s, n in kept if n > 0]
    if not kept:
        return KLSummary(math.nan, math.nan, math.nan, 0, 0, math.nan)
    data = np.asarray(kept, dtype=float)

    def ratio(picks: np.ndarray) -> np.ndarray:  # picks: resampled row indices
        picked = data[picks.astype(int)]
        return picked[..., 0].sum(axis=-1) / picked[..., 1].sum(axis=-1)

    low, high = bootstrap_ci(np.arange(len(data), dtype=float), ratio, seed=seed)
    return KLSummary(
        value=float(data[:, 0].sum() / data[:, 1].sum()),
        low=low,
        high=high,
        n_tokens=int(data[:, 1].sum()),
        n_records=len(kept),
        mean_record=float((data[:, 0] / data[:, 1]).mean()),
    )


def prefix_agreement(rows: Sequence[Sequence[float]], confidence: float = DEFAULT_CONFIDENCE) -> Agreement:
    """The share of prompts whose agreed prefix is the whole answer, from `answer_drift`'s
    (KL, tokens, agreed prefix) rows (rows without tokens are left out)."""
    kept = [(int(r[1]), int(r[2])) for r in rows if len(r) >= 3 and r[1] and int(r[1]) > 0]
    n = len(kept)
    k = sum(agreed == tokens for tokens, agreed in kept)
    low, high = wilson_interval(k, n, confidence)
    mean_prefix = sum(agreed for _, agreed in kept) / n if n else math.nan
    return Agreement(k / n if n else math.nan, low, high, k, n, mean_prefix, confidence)


def drift_summary(
    base: Any,
    other: Any,
    tokenizer: Any,
    prompts: Sequence[Prompt | str],
    n_tokens: int = DEFAULT_DRIFT_TOKENS,
    batch_size: int = 8,
    seed: int = 0,
) -> tuple[KLSummary, Agreement]:
    """KL(base || other) per token over `base`'s greedy answers to `prompts`, and the greedy agreement."""
    rows = answer_drift(
        base, other, tokenizer, prompts, greedy_answer_ids(base, tokenizer, prompts, n_tokens, batch_size), batch_size
    )
    return kl_summary(rows, seed), prefix_agreement(rows)
