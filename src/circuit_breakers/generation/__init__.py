"""Batched chat generation, the same code for base, peft-adapter and merged models, for evaluation and data.

Prompts are rendered with the tokenizer's own chat template (`add_generation_prompt=True`), an
optional assistant prefill is appended after the generation prompt (the prefilling attack, or a
"Sure, here is" start for harmful data), and the batch is left-padded so every row's continuation
starts at the same column. Greedy by default, so a base model and its circuit-broken version are
compared on identical, reproducible outputs. Generation stops at every end-of-turn id
(`stop_token_ids`), because many tokenizers' `eos_token` is the end-of-text token, not the
end-of-turn token.

Greedy batches run through `model.generate` with a decoding loop of our own (`greedy_decode`, passed as
`custom_generate`, so generate still prepares the inputs, merges the model's generation defaults and
builds the logits processors and stopping criteria) that does less work for the same tokens: the
leading tokens every row shares (the chat template's system turn) are prefilled once, rows that have
finished leave the running batch and its KV cache, and the cache writes into room reserved for the new
tokens instead of concatenating every step. bf16 autocast for float32 models on CPUs with
native bf16 dot products is a setting (`bf16` argument or the CIRCUIT_BREAKERS_BF16 environment
variable), off by default because it changes some greedy outputs.

A `vllm.LLM` passed in place of a model runs on the optional vLLM backend (`generation.vllm`: the same
rendered prompts as token ids, the same stop ids and lengths). What both backends generated is counted per
process (`generation.count`, re-exported here as `generation_count`).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import DynamicCache, GenerationConfig, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from .count import GenerationCount as GenerationCount
from .count import count_generated, generated_length, stop_set
from .count import generation_count as generation_count
from .vllm import is_vllm_model, vllm_batches

Conversation = Sequence[dict[str, Any]]

# End-of-turn tokens of common chat templates. Generation stops at any of them that the vocabulary
# has, because many tokenizers' `eos_token` is the end-of-text token, not the end-of-turn token.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "</s>",
)
_PROBE_ANSWER = "Hello"


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation | str],
    prefill: Sequence[str | None] | None = None,
) -> list[str]:
    """Chat-template text of each conversation up to the assistant turn, plus its prefill.

    A plain string is taken as a single user message, so benchmark prompts can be passed directly.
    """
    if prefill is not None and len(prefill) != len(conversations):
        raise ValueError(f"{len(prefill)} prefills for {len(conversations)} conversations")
    texts = []
    for i, conversation in enumerate(conversations):
        messages = [{"role": "user", "content": conversation}] if isinstance(conversation, str) else list(conversation)
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        texts.append(text + ((prefill[i] or "") if prefill is not None else ""))
    return texts


def _template_end_of_turn(tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The special token the chat template writes right after an assistant message (found by
    rendering one), or None when the template cannot render a probe or writes no special token."""
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _PROBE_ANSWER}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - no template, or one that rejects the probe: EOS still stops
        return None
    end = text.rfind(_PROBE_ANSWER) if isinstance(text, str) else -1
    if end < 0:
        return None
    special = set(tokenizer.all_special_ids) | {
        i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False)
    }
    tail = tokenizer(text[end + len(_PROBE_ANSWER) :], add_special_tokens=False)["input_ids"]
    return next((int(i) for i in tail if i in special), None)


def stop_token_ids(model: Any | None, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a turn, sorted: the tokenizer's EOS, the model's configured EOS, the special
    token the chat template closes an assistant message with, and the known end-of-turn tokens present
    in the vocabulary. `model` may be None (then its configured EOS is not known)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
    closing = _template_end_of_turn(tokenizer)
    if closing is not None:
        ids.add(closing)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return sorted(ids)


def _device(model: Any) -> torch.device:
    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    return next(model.parameters()).device


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="prompt", leave=False)


@contextmanager
def left_padding(tokenizer: PreTrainedTokenizerBase) -> Iterator[None]:
    """Pad on the left (and with EOS when the tokenizer has no pad token) inside the block, so every
    row of a batch continues from the same column."""
    side, pad = tokenizer.padding_side, tokenizer.pad_token
    tokenizer.padding_side = "left"
    if pad is None:
        tokenizer.pad_token = tokenizer.eos_token
    try:
        yield
    finally:
        tokenizer.padding_side = side
        if pad is None:
            tokenizer.pad_token = pad


def generation_config(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
) -> GenerationConfig:
    """Greedy (or sampling) settings that stop at every end-of-turn id and pad with the pad token
    (else EOS)."""
    stop = stop_token_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        if not stop:
            raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
        pad_id = stop[0]
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=stop,
    )


BF16_ENV = "CIRCUIT_BREAKERS_BF16"
"""Environment variable that turns bf16 autocast on (`1`) for generation on CPUs that support it."""
PLAIN_ENV = "CIRCUIT_BREAKERS_PLAIN_GENERATE"
"""Environment variable that (`1`) sends greedy batches through `model.generate`'s own loop in the caller's
order, as the code did before `greedy_decode`: the baseline for timing, or a check when our loop is in doubt."""
_ON, _OFF = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}
logger = logging.getLogger("circuit_breakers")


def cpu_bf16_supported(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX-BF16), where bf16 autocast is faster
    than float32; without it bf16 is emulated and slower."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _switch(name: str, meaning: str) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value not in _ON | _OFF:
        raise ValueError(f"{name}={value!r} is not a switch: set it to 1 ({meaning}) or 0 (off)")
    return value in _ON


def plain_generation_wanted() -> bool:
    """Whether CIRCUIT_BREAKERS_PLAIN_GENERATE=1 asks for plain `model.generate` in the caller's order."""
    return _switch(PLAIN_ENV, "plain model.generate")


def bf16_autocast_wanted(model: Any, bf16: bool | None = None) -> bool:
    """Whether generation runs under bf16 autocast: asked for (`bf16`, else CIRCUIT_BREAKERS_BF16=1), the
    model float32 on a CPU, and the CPU multiplies bf16 natively. Off by default: greedy outputs change."""
    if bf16 is None:
        bf16 = _switch(BF16_ENV, "bf16 autocast on")
    if not bf16 or _device(model).type != "cpu":
        return False
    dtype = getattr(model, "dtype", None) or next(model.parameters()).dtype
    if dtype != torch.float32:
        return False
    if not cpu_bf16_supported():
        logger.warning(
            "bf16 autocast asked for, but this CPU has no native bf16 (AVX512-BF16 or AMX): generating in float32"
        )
        return False
    return True


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


def _own_loop_fits(model: Any, config: GenerationConfig) -> bool:
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


def generate_batches(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    texts: Sequence[str],
    config: GenerationConfig,
    batch_size: int = 8,
    bf16: bool | None = None,
) -> Iterator[list[tuple[int, list[int]]]]:
    """New token ids for rendered `texts`, one batch at a time: `[(index in texts, ids), ...]`.

    Longest texts go first (batches waste little padding, and an out-of-memory error shows at once);
    a caller that writes each batch before asking for the next one can resume after an interruption.
    Rows that stop early are filled with the pad id after their stop token, as `model.generate` does.
    Greedy batches decode with `greedy_decode` (finished rows leave the batch); `bf16`: see
    `bf16_autocast_wanted`. A `vllm.LLM` runs the texts through `vllm_batches` (its own batching).
    CIRCUIT_BREAKERS_PLAIN_GENERATE=1 keeps the caller's order and generate's own loop (`PLAIN_ENV`).
    """
    if batch_size < 1 or not config.max_new_tokens or config.max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    if is_vllm_model(model):
        yield from vllm_batches(model, tokenizer, texts, config)
        return
    lengths = [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]] if texts else []
    plain = plain_generation_wanted()
    order = list(range(len(texts))) if plain else sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = _device(model)
    own_loop = {"custom_generate": greedy_decode} if _own_loop_fits(model, config) and not plain else {}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16_autocast_wanted(model, bf16) else nullcontext()
    stop = stop_set(config)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            with left_padding(tokenizer):
                batch = tokenizer(
                    [texts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt"
                ).to(device)
            began = time.perf_counter()
            with torch.no_grad(), autocast:
                out = model.generate(
                    input_ids=batch["input_ids"],
                    attention_mask=batch["attention_mask"],
                    generation_config=config,
                    **own_loop,
                )
            new = out[:, batch["input_ids"].shape[1] :].tolist()
            count_generated(sum(generated_length(ids, stop) for ids in new), len(new), time.perf_counter() - began)
            yield list(zip(rows, new))
    finally:
        if was_training:
            model.train()


def generate(
    model: Any,
    tokenizer: PreTrainedTokenizerBase | None,
    conversations: Sequence[Conversation | str],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    prefill: Sequence[str] | None = None,
    do_sample: bool = False,
    progress: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    bf16: bool | None = None,
) -> list[str]:
    """Completions for `conversations`, in order; the prefill is not part of the returned text.

    Works on any causal LM that has `.generate` (plain, `PeftModel`, merged), or on a `vllm.LLM` (then
    `tokenizer` may be None: the engine's own renders, and vLLM batches by itself). Rows are sorted by length
    inside the call so that batches waste little padding; the output order matches the input order. `bf16`:
    see `bf16_autocast_wanted`.
    """
    on_vllm = is_vllm_model(model)
    if on_vllm and tokenizer is None:
        tokenizer = model.get_tokenizer()
    if tokenizer is None:
        raise ValueError("a tokenizer is needed for transformers models")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    texts = render_prompts(tokenizer, conversations, prefill)
    if not texts:
        return []
    config = generation_config(model, tokenizer, max_new_tokens, do_sample, temperature, top_p)
    outputs: list[str] = [""] * len(texts)
    if on_vllm:
        batches = vllm_batches(model, tokenizer, texts, config, seed if do_sample else None)
    else:
        if do_sample:
            torch.manual_seed(seed)
        batches = generate_batches(model, tokenizer, texts, config, batch_size, bf16)
    with _progress(len(texts), progress, "generate") as bar:
        for batch in batches:
            for row, ids in batch:
                outputs[row] = tokenizer.decode(ids, skip_special_tokens=True)
            bar.update(len(batch))
    return outputs


@torch.no_grad()
def generate_from_embeds(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_embeds: Sequence[torch.Tensor],
    max_new_tokens: int = 256,
    batch_size: int = 8,
) -> list[str]:
    """Greedy completions for prompts given as input embeddings (`[T, hidden]` each: soft-prompt
    attacks), in order. Rows are left-padded with zeros under a zero attention mask."""
    if not prompt_embeds:
        return []
    config = generation_config(model, tokenizer, max_new_tokens)
    was_training = getattr(model, "training", False)
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(prompt_embeds), batch_size):
            embeds = list(prompt_embeds[start : start + batch_size])
            width = max(e.shape[0] for e in embeds)
            batch = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[-1])
            mask = torch.zeros(len(embeds), width, dtype=torch.long, device=batch.device)
            for r, e in enumerate(embeds):
                batch[r, width - e.shape[0] :] = e
                mask[r, width - e.shape[0] :] = 1
            # With embeddings only, generate returns just the new tokens.
            began = time.perf_counter()
            ids = model.generate(inputs_embeds=batch, attention_mask=mask, generation_config=config).tolist()
            stop = stop_set(config)
            count_generated(sum(generated_length(row, stop) for row in ids), len(ids), time.perf_counter() - began)
            out += [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    finally:
        if was_training:
            model.train()
    return out


def generate_vllm(
    llm: Any,
    conversations: Sequence[Conversation | str],
    max_new_tokens: int = 256,
    prefill: Sequence[str] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> list[str]:
    """`generate` run by a `vllm.LLM` (GPU users; optional, not a dependency); `tokenizer` defaults to the
    engine's own."""
    return generate(
        llm,
        tokenizer,
        conversations,
        max_new_tokens,
        prefill=prefill,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=False,
    )
