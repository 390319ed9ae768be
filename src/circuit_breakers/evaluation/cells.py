"""The cells that generate: one (model, attack) cell on the harmful prompts and one over-refusal cell on
the safe ones. Each prepares its inputs against the model, generates, judges, and returns `Sample`s;
`compare.evaluate_models` decides which cells to run and keeps them (`store.CellStore`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.prompts import Prompt
from ..generation import generate, generate_from_embeds
from .attacks import Attack, AttackInput, AttackPrompt, SearchAttack, shared_context
from .attacks.embedding import save_soft_prompts
from .judges import Judge, judge_attack_completions
from .results import OVER_REFUSAL, Sample, safe_compliance, verdict_label

__all__ = [
    "SOFT_PROMPTS_DIR",
    "attack_prompt",
    "generate_inputs",
    "run_attack",
    "run_safe",
    "soft_prompt_file",
]


def attack_prompt(prompt: Prompt) -> AttackPrompt:
    """What an attack needs from a `Prompt`: the request, its context and affirmative target.

    `Prompt.text` already holds a HarmBench context before the request; when the loader kept the
    bare request (`meta["behavior"]`), the context is passed separately so attacks and judges see
    the HarmBench layout without the context twice.
    """
    behavior = prompt.meta.get("behavior") if prompt.context else None
    if isinstance(behavior, str) and behavior.strip():
        return AttackPrompt(behavior, prompt.target, prompt.context, prompt.id)
    return AttackPrompt(prompt.text, prompt.target, None, prompt.id)


def generate_inputs(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[AttackInput],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> list[str]:
    """Generated text for each attack input (without its prefill), in order.

    Inputs are grouped by intervention (one hook set per batch) and by whether they carry a soft
    prompt; text inputs go through `generation.generate` with their prefills, soft prompts through
    `generation.generate_from_embeds`.
    """
    outputs: list[str] = [""] * len(inputs)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, item in enumerate(inputs):
        key = (id(item.intervention) if item.intervention is not None else 0, item.soft_prompt is not None)
        groups.setdefault(key, []).append(i)
    for (_, soft), index in groups.items():
        group = [inputs[i] for i in index]
        with shared_context(model, group):
            if soft:
                with torch.no_grad():
                    embeds = [item.prompt_embeds(model, tokenizer) for item in group]
                texts = generate_from_embeds(model, tokenizer, embeds, max_new_tokens, batch_size)
            else:
                prefills = [item.prefill or "" for item in group]
                texts = generate(
                    model,
                    tokenizer,
                    [item.messages for item in group],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                    prefill=prefills if any(prefills) else None,
                    progress=progress,
                )
        for i, text in zip(index, texts):
            outputs[i] = text
    return outputs


def run_attack(
    name: str,
    label: str,
    attack: Attack,
    model: Any,
    tokenizer: Any,
    items: Sequence[AttackPrompt],
    by_id: Mapping[str, Prompt],
    judge: Judge,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    soft_prompts_to: Path | None = None,
) -> list[Sample]:
    """One (model, attack) cell: prepare inputs against this model, generate, judge the behaviour.

    Soft prompts the attack optimised are written to `soft_prompts_to` before generation, so an
    expensive optimisation can be read again (longer generations, another judge) without redoing it.
    """
    if isinstance(attack, SearchAttack):  # best-of-N, PAIR, TAP: keep the completions the search judged
        found = attack.search(model, tokenizer, items, judge, max_new_tokens, batch_size)
        inputs, completions, verdicts = found, [i.completion for i in found], attack.final_verdicts(found, judge)
    else:
        inputs = attack.prepare(model, tokenizer, items)
        if soft_prompts_to is not None:
            save_soft_prompts(inputs, soft_prompts_to)
        generated = generate_inputs(model, tokenizer, inputs, max_new_tokens, batch_size, progress)
        completions = [(item.prefill or "") + text for item, text in zip(inputs, generated)]
        verdicts = judge_attack_completions(
            judge,
            [i.prompt.behavior for i in inputs],
            completions,
            [i.prompt.context for i in inputs],
            [i.prefill for i in inputs],
        )
    samples = []
    for item, completion, verdict in zip(inputs, completions, verdicts):
        prompt = by_id.get(item.prompt.id or "") if item.prompt.id else None
        samples.append(
            Sample(
                model=name,
                attack=label,
                prompt_id=item.prompt.id or str(item.prompt_index),
                prompt=item.prompt.behavior,
                completion=completion,
                harmful=bool(verdict.harmful),
                complied=bool(verdict.details.get("complied", verdict.harmful)),
                score=float(verdict.score),
                judge=verdict.judge,
                variant=item.variant,
                category=prompt.category if prompt else None,
                source=prompt.source if prompt else None,
                context=item.prompt.context,
                prefill=item.prefill,
                messages=item.messages,
                verdict=verdict_label(verdict.harmful, verdict.details),
                judge_details=dict(verdict.details),
                attack_details=dict(item.settings),
            )
        )
    return samples


SOFT_PROMPTS_DIR = "soft_prompts"


def soft_prompt_file(out_dir: Path, model: str, cell: str) -> Path:
    """Where `evaluate_models(out_dir=...)` keeps the soft prompts of one (model, attack) cell."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}--{cell}")
    return Path(out_dir) / SOFT_PROMPTS_DIR / f"{safe}.safetensors"


def run_safe(
    name: str,
    model: Any,
    tokenizer: Any,
    safe: Sequence[Prompt],
    judge: Judge,
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
) -> list[Sample]:
    """Plain requests that deserve an answer; compliance is what is scored."""
    messages = [p.to_messages() for p in safe]
    completions = generate(
        model, tokenizer, messages, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress
    )
    verdicts = judge.judge([p.text for p in safe], completions, [p.context for p in safe])
    return [
        Sample(
            model=name,
            attack=OVER_REFUSAL,
            prompt_id=p.id,
            prompt=p.text,
            completion=c,
            harmful=bool(v.harmful),
            complied=safe_compliance(v, c),
            score=float(v.score),
            judge=v.judge,
            category=p.category,
            source=p.source,
            messages=m,
            verdict=verdict_label(v.harmful, {**v.details, "complied": safe_compliance(v, c)}, safe=True),
            judge_details=dict(v.details),
        )
        for p, m, c, v in zip(safe, messages, completions, verdicts)
    ]
