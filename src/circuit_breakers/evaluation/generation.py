"""Batched chat generation, the same code for base, peft-adapter and merged models.

Prompts are rendered with the tokenizer's own chat template (`add_generation_prompt=True`), an
optional assistant prefill is appended after the generation prompt (the prefilling attack), and the
batch is left-padded so every row's continuation starts at the same column. Greedy by default, so a
base model and its circuit-broken version are compared on identical, reproducible outputs.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import torch
from transformers import GenerationConfig, PreTrainedTokenizerBase

Conversation = Sequence[dict[str, Any]]

# End-of-turn tokens of common chat templates. Generation stops at any of them that the vocabulary
# has, because many tokenizers' `eos_token` is the end-of-text token, not the end-of-turn token.
END_OF_TURN_TOKENS: tuple[str, ...] = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>", "</s>",
)


def render_prompts(
    tokenizer: PreTrainedTokenizerBase,
    conversations: Sequence[Conversation | str],
    prefill: Sequence[str] | None = None,
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
        texts.append(text + (prefill[i] if prefill is not None else ""))
    return texts


def stop_token_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS, the model's configured EOS and the known
    end-of-turn tokens present in the vocabulary."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(i) for i in configured)
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


def is_vllm_model(model: Any) -> bool:
    """True for a `vllm.LLM` instance (checked without importing vllm when it is absent)."""
    return type(model).__module__.startswith("vllm") and hasattr(model, "generate")


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
) -> list[str]:
    """Completions for `conversations`, in order; the prefill is not part of the returned text.

    Works on any causal LM that has `.generate` (plain, `PeftModel`, merged), or on a `vllm.LLM`
    (then `tokenizer` may be None). Rows are sorted by length inside the call so that batches waste
    little padding; the output order matches the input order.
    """
    if is_vllm_model(model):
        return generate_vllm(model, conversations, max_new_tokens, prefill, do_sample, temperature, top_p, seed)
    if tokenizer is None:
        raise ValueError("a tokenizer is needed for transformers models")
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be positive")
    texts = render_prompts(tokenizer, conversations, prefill)
    if not texts:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad token nor an EOS token to pad with")
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=None,
        pad_token_id=pad_id,
        eos_token_id=stop_token_ids(model, tokenizer),
    )
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: -lengths[i])
    device = _device(model)
    outputs: list[str] = [""] * len(texts)
    if do_sample:
        torch.manual_seed(seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with _progress(len(texts), progress, "generate") as bar, torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = tokenizer(
                    [texts[i] for i in rows], add_special_tokens=False, padding=True, return_tensors="pt"
                ).to(device)
                out = model.generate(
                    input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], generation_config=config
                )
                new = out[:, batch["input_ids"].shape[1] :]
                for row, ids in zip(rows, new):
                    outputs[row] = tokenizer.decode(ids, skip_special_tokens=True)
                bar.update(len(rows))
    finally:
        tokenizer.padding_side = old_side
        if was_training:
            model.train()
    return outputs


@torch.no_grad()
def generate_from_embeds(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    prompt_embeds: Sequence[torch.Tensor],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    do_sample: bool = False,
    progress: bool = True,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Completions for prompts given as input embeddings (`[T, hidden]` each: soft-prompt attacks).

    Rows are left-padded with the pad token's embedding under a zero attention mask, so a prompt's
    result does not depend on its batch neighbours.
    """
    if not prompt_embeds:
        return []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=do_sample,
        temperature=temperature if do_sample else None, top_p=top_p if do_sample else None, top_k=None,
        pad_token_id=pad_id, eos_token_id=stop_token_ids(model, tokenizer),
    )
    embed = model.get_input_embeddings()
    device, dtype = embed.weight.device, embed.weight.dtype
    pad_vector = embed(torch.tensor([pad_id], device=device))[0]
    order = sorted(range(len(prompt_embeds)), key=lambda i: -prompt_embeds[i].shape[0])
    outputs: list[str] = [""] * len(prompt_embeds)
    if do_sample:
        torch.manual_seed(seed)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with _progress(len(order), progress, "generate") as bar:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                width = max(prompt_embeds[i].shape[0] for i in rows)
                batch = pad_vector.expand(len(rows), width, -1).clone().to(dtype)
                attention = torch.zeros(len(rows), width, dtype=torch.long, device=device)
                for r, i in enumerate(rows):
                    n = prompt_embeds[i].shape[0]
                    batch[r, width - n :] = prompt_embeds[i].to(device=device, dtype=dtype)
                    attention[r, width - n :] = 1
                out = model.generate(inputs_embeds=batch, attention_mask=attention, generation_config=config)
                # With embeddings only, generate returns just the new tokens.
                for row, ids in zip(rows, out):
                    outputs[row] = tokenizer.decode(ids, skip_special_tokens=True)
                bar.update(len(rows))
    finally:
        if was_training:
            model.train()
    return outputs


def generate_attack_inputs(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    inputs: Sequence[Any],
    max_new_tokens: int = 256,
    batch_size: int = 8,
    include_prefill: bool = False,
    progress: bool = True,
    **kwargs: Any,
) -> list[str]:
    """Completions for `evaluation.attacks.AttackInput`s, in order.

    Inputs are grouped by intervention (each group generates inside that intervention's context)
    and by kind: text inputs go through `generate` with their prefill, soft-prompt inputs through
    `generate_from_embeds`. With `include_prefill`, the prefill is put back in front of the
    generated text, which is what a judge should read for the prefilling attack.
    """
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, item in enumerate(inputs):
        key = (id(item.intervention) if item.intervention is not None else 0, item.soft_prompt is not None)
        groups.setdefault(key, []).append(i)
    outputs: list[str] = [""] * len(inputs)
    for (_, soft), index in groups.items():
        items = [inputs[i] for i in index]
        with items[0].context(model):
            if soft:
                with torch.no_grad():
                    embeds = [item.prompt_embeds(model, tokenizer) for item in items]
                texts = generate_from_embeds(
                    model, tokenizer, embeds, max_new_tokens, batch_size, progress=progress, **kwargs
                )
            else:
                texts = generate(
                    model, tokenizer, [item.messages for item in items], max_new_tokens, batch_size,
                    prefill=[item.prefill or "" for item in items], progress=progress, **kwargs,
                )
        for i, item, text in zip(index, items, texts):
            outputs[i] = (item.prefill or "") + text if include_prefill else text
    return outputs


def vllm_available() -> bool:
    """Whether the optional vLLM backend can be used."""
    return importlib.util.find_spec("vllm") is not None


def generate_vllm(
    llm: Any,
    conversations: Sequence[Conversation | str],
    max_new_tokens: int = 256,
    prefill: Sequence[str] | None = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """The same contract as `generate`, run by a `vllm.LLM` (GPU users; optional, not a dependency)."""
    if not vllm_available():
        raise ImportError("the vLLM backend needs `pip install vllm`")
    from vllm import SamplingParams

    tokenizer = llm.get_tokenizer()
    texts = render_prompts(tokenizer, conversations, prefill)
    # Token ids, not text: the template already holds the BOS, and vLLM would add a second one.
    prompts = [{"prompt_token_ids": tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=temperature if do_sample else 0.0, top_p=top_p, seed=seed
    )
    results = llm.generate(prompts, params)
    return [result.outputs[0].text for result in results]
