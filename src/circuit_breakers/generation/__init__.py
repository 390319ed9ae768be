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

import logging
import os
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

from .count import GenerationCount as GenerationCount
from .count import count_generated, generated_length, stop_set
from .count import generation_count as generation_count
from .decode import greedy_decode as greedy_decode
from .decode import own_loop_fits
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
    own_loop = {"custom_generate": greedy_decode} if own_loop_fits(model, config) and not plain else {}
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
