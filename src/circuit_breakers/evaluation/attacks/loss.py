"""The objective the optimising attacks share: cross-entropy of the target string after the prompt.

Both GCG (discrete suffix tokens) and the embedding attack (a soft prompt) minimise the same loss,
computed over the same token segments: `before` (template + user turn up to the attack slot),
the attack itself, `after` (end of turn + generation prompt) and the `target` ("Sure, here is ...").
`target_loss` recomputes it from messages alone, the way generation will see the prompt, so a test
(or a sceptical reader) can check that what the optimiser reports is what the model gets.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .base import AttackError, Message, encode, split_at_slot, with_suffix


@dataclass
class Segments:
    """Token ids around the attack slot; all 1-D long tensors on the model's device."""

    before: Tensor
    after: Tensor
    target: Tensor
    before_text: str
    after_text: str
    prefix_cache: Any = field(default=None, repr=False)
    """Keys/values of `before`, computed once: every candidate shares that prefix, so the search
    only runs the suffix, the end of the turn and the target through the model."""

    @classmethod
    def build(
        cls,
        model: nn.Module,
        tokenizer: PreTrainedTokenizerBase,
        messages: Sequence[Message],
        target: str,
        prefill: str | None = None,
    ) -> Segments:
        before_text, after_text = split_at_slot(tokenizer, messages, suffix_slot=True, prefill=prefill)
        device = model.get_input_embeddings().weight.device
        target_ids = encode(tokenizer, target)
        if not target_ids:
            raise AttackError("the target string is empty after tokenization")

        def tensor(ids: list[int]) -> Tensor:
            return torch.tensor(ids, dtype=torch.long, device=device)

        return cls(
            tensor(encode(tokenizer, before_text)),
            tensor(encode(tokenizer, after_text)),
            tensor(target_ids),
            before_text,
            after_text,
        )

    @torch.no_grad()
    def cache_prefix(self, model: nn.Module) -> Segments:
        """Compute `prefix_cache` (in place) and return self."""
        self.prefix_cache = model(input_ids=self.before.unsqueeze(0), use_cache=True).past_key_values
        return self

    def prefix_for(self, rows: int) -> Any:
        """A private copy of the prefix cache for a batch of `rows` (the forward pass extends it)."""
        cache = copy.deepcopy(self.prefix_cache)
        if rows > 1:
            cache.batch_repeat_interleave(rows)
        return cache


@contextmanager
def optimising(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and gradients on, whatever the caller had; restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            yield
    finally:
        model.train(was_training)


def _accepts_logits_to_keep(model: nn.Module) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def target_logits(model: nn.Module, n_target: int, past_key_values: Any = None, **inputs: Tensor) -> Tensor:
    """Logits that predict the last `n_target` positions: `[B, n_target, V]`.

    Only those rows go through the LM head when the model supports `logits_to_keep`, which on a
    49k-token vocabulary is most of the forward cost of a candidate batch.
    """
    kwargs: dict[str, Any] = {"logits_to_keep": n_target + 1} if _accepts_logits_to_keep(model) else {}
    if past_key_values is not None:
        kwargs.update(past_key_values=past_key_values, use_cache=True)
    else:
        kwargs["use_cache"] = False
    logits = model(**inputs, **kwargs).logits
    return logits[:, -n_target - 1 : -1, :]


def sequence_loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy per sequence: `[B, n, V]`, `[n]` -> `[B]` (float32 for stable comparisons)."""
    batch, n, vocab = logits.shape
    flat = F.cross_entropy(logits.float().reshape(-1, vocab), target.repeat(batch), reduction="none")
    return flat.view(batch, n).mean(dim=1)


def embeds_loss(model: nn.Module, segments: Segments, middle: Tensor) -> Tensor:
    """Loss with `middle` (`[B, k, H]` embeddings, may need grad) placed in the attack slot: `[B]`."""
    embed = model.get_input_embeddings()
    batch = middle.shape[0]
    cached = segments.prefix_cache is not None
    parts = (segments.after, segments.target) if cached else (segments.before, segments.after, segments.target)
    fixed = [embed(ids).unsqueeze(0).expand(batch, -1, -1) for ids in parts]
    pieces = [middle.to(fixed[0].dtype), *fixed] if cached else [fixed[0], middle.to(fixed[0].dtype), *fixed[1:]]
    past = segments.prefix_for(batch) if cached else None
    logits = target_logits(model, len(segments.target), past, inputs_embeds=torch.cat(pieces, dim=1))
    return sequence_loss(logits, segments.target)


@torch.no_grad()
def ids_loss(model: nn.Module, segments: Segments, middle: Tensor, batch_size: int = 64) -> Tensor:
    """Loss for each row of candidate suffix ids `[N, k]`, evaluated `batch_size` rows at a time: `[N]`."""
    out = []
    for start in range(0, middle.shape[0], batch_size):
        chunk = middle[start : start + batch_size]
        rows = chunk.shape[0]
        tail = [chunk, segments.after.expand(rows, -1), segments.target.expand(rows, -1)]
        n_target = len(segments.target)
        if segments.prefix_cache is not None:
            logits = target_logits(model, n_target, segments.prefix_for(rows), input_ids=torch.cat(tail, 1))
        else:
            ids = torch.cat([segments.before.expand(rows, -1), *tail], 1)
            logits = target_logits(model, n_target, input_ids=ids)
        out.append(sequence_loss(logits, segments.target))
    return torch.cat(out)


@torch.no_grad()
def target_loss(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    target: str,
    suffix_or_embeds: str | Tensor | None = None,
    prefill: str | None = None,
) -> float:
    """Mean cross-entropy of `target` right after the prompt, as generation would present it.

    `suffix_or_embeds`: a string appended verbatim to the last user turn (GCG), or `[k, H]`
    embeddings spliced in at the same place (embedding attack), or None (the plain prompt).
    A string suffix is rendered and tokenized as a whole, as generation does, not as segments.
    """
    if isinstance(suffix_or_embeds, Tensor):
        segments = Segments.build(model, tokenizer, messages, target, prefill)
        return float(embeds_loss(model, segments, suffix_or_embeds.unsqueeze(0))[0])
    chat = with_suffix(messages, suffix_or_embeds) if suffix_or_embeds else list(messages)
    prompt = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) + (prefill or "")
    device = model.get_input_embeddings().weight.device
    target_ids = torch.tensor(encode(tokenizer, target), dtype=torch.long, device=device)
    ids = torch.tensor(encode(tokenizer, prompt), dtype=torch.long, device=device)
    full = torch.cat([ids, target_ids]).unsqueeze(0)
    return float(sequence_loss(target_logits(model, len(target_ids), input_ids=full), target_ids)[0])
