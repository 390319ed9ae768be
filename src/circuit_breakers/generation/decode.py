"""Our greedy decoding loop, run as `model.generate(custom_generate=greedy_decode)`: generate still prepares the
inputs, merges the model's generation defaults and builds the logits processors and stopping criteria, and
this loop does less work for the same tokens. The leading tokens every row shares (the chat template's system
turn) are prefilled once, rows that have finished leave the running batch and its KV cache, and the cache
writes into room reserved for the new tokens instead of concatenating every step."""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

__all__ = ["MIN_SHARED_PREFIX", "greedy_decode", "own_loop_fits"]


class _ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values live in a buffer of `capacity` tokens reserved up front: each
    step writes its token in place instead of concatenating (copying) the whole cache, and finished rows
    are dropped with one index per layer. The values, and so the attention, are those of DynamicLayer."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buffer: torch.Tensor | None = None
        self.value_buffer: torch.Tensor | None = None

    def _view(self) -> None:
        self.keys = self.key_buffer[..., : self.length, :]
        self.values = self.value_buffer[..., : self.length, :]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        if self.key_buffer is None or self.length + new > self.key_buffer.shape[-2]:
            size = max(self.capacity, 2 * (self.length + new))
            keys = key_states.new_empty((*key_states.shape[:-2], size, key_states.shape[-1]))
            values = value_states.new_empty((*value_states.shape[:-2], size, value_states.shape[-1]))
            if self.key_buffer is not None:
                keys[..., : self.length, :] = self.key_buffer[..., : self.length, :]
                values[..., : self.length, :] = self.value_buffer[..., : self.length, :]
            self.key_buffer, self.value_buffer = keys, values
        self.key_buffer[..., self.length : self.length + new, :] = key_states
        self.value_buffer[..., self.length : self.length + new, :] = value_states
        self.length += new
        self._view()
        return self.keys, self.values

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.key_buffer is not None:
            self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
            self._view()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.key_buffer is not None:
            self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
            self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
            self._view()

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        if self.is_initialized and self.keys is not None:
            self.length = self.keys.shape[-2]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.batch_select_indices(beam_idx)


MIN_SHARED_PREFIX = 4
"""Fewest common leading tokens (a chat template's system turn, say) worth one prefill shared by all rows."""


def _shared_prefix(input_ids: torch.Tensor, mask: torch.Tensor | None) -> int:
    """How many leading tokens (after each row's left padding) every row of the batch shares, leaving each
    row at least one token of its own; 0 where rows are not left-padded or share too little."""
    if input_ids.shape[0] < 2:
        return 0
    if mask is None:
        starts = [0] * input_ids.shape[0]
    else:
        if bool((mask[:, 1:] < mask[:, :-1]).any()):  # a hole or right padding: not left-padded
            return 0
        starts = (mask == 0).sum(dim=1).tolist()
    width = input_ids.shape[1]
    longest = min(width - start for start in starts) - 1
    first = input_ids[0, starts[0] : starts[0] + longest]
    same = torch.ones(longest, dtype=torch.bool, device=input_ids.device)
    for row, start in enumerate(starts[1:], 1):
        same &= input_ids[row, start : start + longest] == first
    shared = int(same.long().cumprod(0).sum()) if longest > 0 else 0
    return shared if shared >= MIN_SHARED_PREFIX else 0


def _prefill_shared(
    model: Any, input_ids: torch.Tensor, mask: torch.Tensor | None, shared: int, cache: Any, model_kwargs: dict
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill a left-padded batch whose rows start with the same `shared` tokens: those once, for one row,
    copied to every row; then each row's own tokens. The cache then holds [shared | padding | own tokens]
    per row (the keys of real tokens in their order, padding masked), so attention is unchanged.
    Returns (last-position logits, the attention mask of that layout)."""
    rows, width = input_ids.shape
    starts = (mask == 0).sum(dim=1) if mask is not None else input_ids.new_zeros(rows)
    begin = int(starts[0])
    positions = torch.arange(shared, device=input_ids.device)[None]
    model(
        input_ids=input_ids[:1, begin : begin + shared],
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    cache.batch_repeat_interleave(rows)
    column = torch.arange(width, device=input_ids.device)[None]
    # row r: [pad x a_r | shared | own] -> own tokens shifted left by `shared`, the pads before them
    source = torch.where(column < starts[:, None], column, column + shared).clamp(max=width - 1)
    own = torch.gather(input_ids, 1, source)[:, : width - shared]
    own_mask = (column[:, : width - shared] >= starts[:, None]).long()
    layout = torch.cat([own_mask.new_ones(rows, shared), own_mask], dim=1)
    own_positions = (layout.cumsum(-1) - 1).masked_fill(layout == 0, 0)[:, shared:]
    out = model(
        input_ids=own,
        attention_mask=layout,
        position_ids=own_positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    return out.logits[:, -1], layout


def _droppable(cache: Any) -> bool:
    """Whether rows can leave `cache`: a DynamicCache of plain or sliding-window attention layers."""
    layers = getattr(cache, "layers", None)
    return (
        isinstance(cache, DynamicCache)
        and bool(layers)
        and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer, _ReservedLayer) for layer in layers)
    )


def greedy_decode(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    **model_kwargs: Any,
) -> torch.LongTensor:
    """Greedy decoding for `model.generate(..., custom_generate=greedy_decode)`: the tokens of generate's
    own loop (same inputs, processors, stopping criteria, padding of finished rows), with less work: the
    leading tokens all rows share (the chat template's system turn) are prefilled once, a row that has
    finished leaves the batch and the KV cache, and the cache writes new tokens into reserved room.
    Returns prompt + new ids, `[batch, width]`, as generate does."""
    if synced_gpus or streamer is not None or generation_config.do_sample:
        raise ValueError("greedy_decode runs greedy search on one process without a streamer")
    pad = generation_config.pad_token_id
    pad = int(pad[0] if isinstance(pad, list | tuple) else pad) if pad is not None else 0
    cache = model_kwargs.pop("past_key_values", None)
    if cache is None:
        cache = DynamicCache(config=model.config)
    capacity = max(int(generation_config.max_length or 0), input_ids.shape[1] + 1)
    reserved = type(cache) is DynamicCache and bool(cache.layers)
    reserved = reserved and all(type(layer) is DynamicLayer for layer in cache.layers) and cache.get_seq_length() == 0
    if reserved:
        cache.layers = [_ReservedLayer(capacity) for _ in cache.layers]
    droppable = _droppable(cache)
    mask = model_kwargs.pop("attention_mask", None)
    positions = model_kwargs.pop("position_ids", None)
    model_kwargs.pop("use_cache", None)
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)
    new: list[list[int]] = [[] for _ in range(input_ids.shape[0])]
    sequences = input_ids
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    shared = _shared_prefix(input_ids, mask) if reserved and positions is not None else 0
    if shared:
        step_kwargs = {k: v for k, v in model_kwargs.items() if k != "logits_to_keep"}
        logits, mask = _prefill_shared(model, input_ids, mask, shared, cache, step_kwargs)
    else:
        inputs = {"input_ids": input_ids, "past_key_values": cache, "use_cache": True, **model_kwargs}
        if mask is not None:
            inputs["attention_mask"] = mask
        if positions is not None:
            inputs["position_ids"] = positions
        logits = model(**inputs, return_dict=True).logits[:, -1]
    while True:
        scores = logits_processor(sequences, logits.to(copy=True, dtype=torch.float32, device=input_ids.device))
        tokens = torch.where(unfinished, scores.argmax(dim=-1), pad)
        sequences = torch.cat([sequences, tokens[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(sequences, scores)
        for row, token in zip(rows.tolist(), tokens.tolist()):
            new[row].append(token)
        if not bool(unfinished.any()):
            break
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        if positions is not None:
            positions = positions[..., -1:] + 1
        if droppable and not bool(unfinished.all()):
            keep = unfinished.nonzero().squeeze(1)
            cache.batch_select_indices(keep)
            rows, sequences, tokens, unfinished = rows[keep], sequences[keep], tokens[keep], unfinished[keep]
            mask = mask[keep] if mask is not None else None
            positions = positions[keep] if positions is not None else None
        inputs = {"input_ids": tokens[:, None], "past_key_values": cache, "use_cache": True, **model_kwargs}
        if mask is not None:
            inputs["attention_mask"] = mask
        if positions is not None:
            inputs["position_ids"] = positions
        logits = model(**inputs, return_dict=True).logits[:, -1]
    width = max(len(ids) for ids in new)
    padded = [ids + [pad] * (width - len(ids)) for ids in new]
    return torch.cat([input_ids, torch.tensor(padded, dtype=input_ids.dtype, device=input_ids.device)], dim=-1)


def own_loop_fits(model: Any, config: GenerationConfig) -> bool:
    """Whether `greedy_decode` can stand in for generate's loop: greedy, one beam, a decoder-only model
    whose forward takes position ids and a cache, one process."""
    if config.do_sample or (config.num_beams or 1) > 1 or (config.num_return_sequences or 1) > 1:
        return False
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(base.config, "is_encoder_decoder", False) or not hasattr(base, "generate"):
        return False
    params = inspect.signature(base.forward).parameters
    if not {"position_ids", "past_key_values"} <= set(params) or "cache_position" in params:
        return False
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return not (distributed and torch.distributed.get_world_size() > 1)
