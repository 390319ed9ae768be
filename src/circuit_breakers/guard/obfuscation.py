"""Probe obfuscation: the embedding attack with a term that lowers the guard probe's score.

A harmfulness probe guards a model only if an attacker who optimises the input cannot also make the harmful
answer look benign to it. Bailey et al. (arXiv 2412.09565) drove probes' recall from near 100% to near 0%
with exactly this: the usual soft-prompt objective (make the model say the target) plus
`weight * mean softplus(probe logit)` over the states the probe reads (its loss for calling them benign).
By default those are the target completion's tokens at the probe's layer, teacher-forced after the attacked
prompt: the completion tokens the probe was trained on and the monitor scores (`positions` also offers the
prompt's tokens, or both).

`obfuscation_attack` runs the plain attack and the obfuscated one with the same seed and steps on each prompt
and reports, for both, the target loss (does the attack still work?) and the probe's window score on the
target (and, with `max_new_tokens`, on the model's own greedy answer), with the recall at the probe's
calibrated threshold: how many attacked prompts the monitor would still halt.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ..evaluation.attacks.base import Message, coerce_prompts
from ..evaluation.attacks.embedding import DEFAULT_INIT, EmbeddingResult, embedding_optimize
from ..evaluation.attacks.loss import Segments, target_loss
from ..generation import generate_from_embeds
from ..models import find_decoder_layers
from .probes import Probe, probe_device, window_score

Positions = Literal["target", "prompt", "all"]


@dataclass
class ObfuscationSettings:
    """The embedding attack's budget plus the obfuscation term's weight and where it reads the probe."""

    weight: float = 1.0
    """Weight of the probe term against the target loss (0: the plain embedding attack)."""
    positions: Positions = "target"
    steps: int = 100
    step_size: float = 0.05
    restarts: int = 1
    restart_noise: float = 0.5
    seed: int = 0
    init: str = DEFAULT_INIT
    max_new_tokens: int = 0
    """Also generate this many tokens from each soft prompt and score the model's own answer (0: target only)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ObfuscationReading:
    """One prompt under the plain and the obfuscated attack (same seed and steps)."""

    prompt_index: int
    prompt_id: str | None
    plain_target_loss: float
    obfuscated_target_loss: float
    plain_probe_score: float
    """The probe's window score on the target tokens after the plain attack's soft prompt."""
    obfuscated_probe_score: float
    plain_generation_score: float | None = None
    obfuscated_generation_score: float | None = None
    plain_embeds: Tensor | None = field(default=None, repr=False)
    obfuscated_embeds: Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.endswith("_embeds")}


@dataclass
class ObfuscationResult:
    """Every prompt's reading and the probe's recall at its threshold, with and without the term."""

    settings: ObfuscationSettings
    layer: int
    threshold: float
    readings: list[ObfuscationReading] = field(default_factory=list)

    def recall(self, which: str) -> float | None:
        """Share of prompts whose `which` score (plain_probe_score, ...) is above the threshold (the monitor fires)."""
        scores = [getattr(r, which) for r in self.readings]
        if not scores or any(s is None for s in scores):
            return None
        return sum(s > self.threshold for s in scores) / len(scores)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": "probe_obfuscation",
            "settings": self.settings.to_dict(),
            "layer": self.layer,
            "threshold": self.threshold,
            "recall_plain": self.recall("plain_probe_score"),
            "recall_obfuscated": self.recall("obfuscated_probe_score"),
            "recall_plain_generation": self.recall("plain_generation_score"),
            "recall_obfuscated_generation": self.recall("obfuscated_generation_score"),
            "readings": [r.to_dict() for r in self.readings],
        }


@contextmanager
def layer_states(model: nn.Module, layer: int) -> Iterator[list[Tensor]]:
    """While open, the list holds the states at hidden_states index `layer` of each forward (with gradient)."""
    kept: list[Tensor] = []
    blocks = find_decoder_layers(model)
    if not 0 <= layer <= len(blocks):
        raise ValueError(f"probe layer {layer} is out of range: the model has {len(blocks)} blocks (0..{len(blocks)})")

    def keep(states: Any) -> None:
        kept[:] = [states[0] if isinstance(states, tuple) else states]

    if layer == 0:
        handle = blocks[0].register_forward_pre_hook(
            lambda _m, args, kwargs: keep(args[0] if args else kwargs["hidden_states"]), with_kwargs=True
        )
    else:
        handle = blocks[layer - 1].register_forward_hook(lambda _m, _a, output: keep(output))
    try:
        yield kept
    finally:
        handle.remove()


def probe_term(probe: Probe, states: Tensor) -> Tensor:
    """Mean softplus(logit) over states `[..., H]`: the probe's cross-entropy for calling them benign."""
    return nn.functional.softplus(probe(states)).mean()


def obfuscated_optimize(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probe: Probe,
    messages: Sequence[Message],
    target: str,
    settings: ObfuscationSettings,
    seed: int | None = None,
) -> list[EmbeddingResult]:
    """`embedding_optimize` with `settings.weight * probe_term` on the probe's layer added to its loss. The term
    reads the states of the forward the target loss just ran (a hook on the probe's layer), so it costs no
    second pass; with the prefix cache that forward covers the soft prompt, the end of the turn and the target."""
    probe = probe_device(probe, model)
    n_target = len(Segments.build(model, tokenizer, messages, target).target)

    with layer_states(model, probe.settings.layer) as kept:

        def extra(_soft: Tensor) -> Tensor:
            states = kept[-1][0]
            if settings.positions == "target":
                states = states[-n_target:]
            elif settings.positions == "prompt":
                states = states[:-n_target]
            return settings.weight * probe_term(probe, states)

        return embedding_optimize(
            model,
            tokenizer,
            messages,
            target,
            settings.init,
            settings.steps,
            settings.step_size,
            settings.restarts,
            settings.restart_noise,
            settings.seed if seed is None else seed,
            extra_loss=extra if settings.weight else None,
        )


@torch.no_grad()
def target_probe_score(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probe: Probe,
    messages: Sequence[Message],
    completion: str,
    soft_prompt: Tensor | None = None,
) -> float:
    """The probe's window score (what the monitor compares with its threshold) on `completion`'s tokens,
    teacher-forced after the prompt with `soft_prompt` (`[k, H]`) at the end of the user turn."""
    probe = probe_device(probe, model)
    segments = Segments.build(model, tokenizer, messages, completion)
    embed = model.get_input_embeddings()
    parts = [embed(segments.before)]
    if soft_prompt is not None:
        parts.append(soft_prompt.to(embed.weight.device, embed.weight.dtype))
    parts += [embed(segments.after), embed(segments.target)]
    was_training = model.training
    model.eval()
    try:
        with layer_states(model, probe.settings.layer) as kept:
            model(inputs_embeds=torch.cat(parts).unsqueeze(0), use_cache=False)
    finally:
        model.train(was_training)
    probs = probe.probability(kept[-1][0, -len(segments.target) :]).tolist()
    return window_score(probs, probe.settings.window)


def best(results: Sequence[EmbeddingResult]) -> EmbeddingResult:
    """The restart with the lowest objective."""
    return min(results, key=lambda r: r.best_loss)


def obfuscation_attack(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    probe: Probe,
    prompts: Sequence[Any],
    settings: ObfuscationSettings | None = None,
    target: str | None = None,
    progress: Callable[[int, ObfuscationReading], None] | None = None,
) -> ObfuscationResult:
    """The plain and the obfuscated embedding attack on each prompt (same seed, `settings.seed + i`, and
    steps), read by the probe; `target` replaces every prompt's own target. The threshold is the probe's
    calibrated one (`probes.calibrate`); `progress(i, reading)` is called after each prompt."""
    settings = settings or ObfuscationSettings()
    if settings.weight < 0:
        raise ValueError(f"the obfuscation weight must be >= 0, not {settings.weight}")
    if settings.positions not in ("target", "prompt", "all"):
        raise ValueError(f"positions must be target, prompt or all, not {settings.positions!r}")
    result = ObfuscationResult(settings, probe.settings.layer, float(probe.settings.threshold))
    plain_settings = ObfuscationSettings(**{**asdict(settings), "weight": 0.0})
    for i, item in enumerate(coerce_prompts(prompts)):
        messages = item.chat()
        goal = target if target is not None else item.target_or_default()
        plain = best(obfuscated_optimize(model, tokenizer, probe, messages, goal, plain_settings, settings.seed + i))
        hidden = best(obfuscated_optimize(model, tokenizer, probe, messages, goal, settings, settings.seed + i))
        reading = ObfuscationReading(
            prompt_index=i,
            prompt_id=item.id,
            plain_target_loss=target_loss(model, tokenizer, messages, goal, plain.embeds),
            obfuscated_target_loss=target_loss(model, tokenizer, messages, goal, hidden.embeds),
            plain_probe_score=target_probe_score(model, tokenizer, probe, messages, goal, plain.embeds),
            obfuscated_probe_score=target_probe_score(model, tokenizer, probe, messages, goal, hidden.embeds),
            plain_embeds=plain.embeds,
            obfuscated_embeds=hidden.embeds,
        )
        if settings.max_new_tokens > 0:
            for which, soft in (("plain", plain.embeds), ("obfuscated", hidden.embeds)):
                answer = answer_from(model, tokenizer, messages, soft, settings.max_new_tokens)
                score = target_probe_score(model, tokenizer, probe, messages, answer, soft) if answer.strip() else 0.0
                setattr(reading, f"{which}_generation_score", score)
        result.readings.append(reading)
        if progress is not None:
            progress(i, reading)
    return result


@torch.no_grad()
def answer_from(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], soft: Tensor, max_new_tokens: int
) -> str:
    """The model's greedy answer to the prompt with `soft` spliced in (as the evaluation generates it)."""
    segments = Segments.build(model, tokenizer, messages, " ")
    embed = model.get_input_embeddings()
    prompt = torch.cat(
        [embed(segments.before), soft.to(embed.weight.device, embed.weight.dtype), embed(segments.after)]
    )
    return generate_from_embeds(model, tokenizer, [prompt], max_new_tokens, batch_size=1)[0]
