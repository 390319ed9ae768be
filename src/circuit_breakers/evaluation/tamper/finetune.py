"""Fine-tuning attack: LoRA on a few harmful completions, and the attacked model at chosen steps.

Safety training is known to come off in a few fine-tuning steps on a handful of harmful examples
(Qi et al. 2023; TamperBench); a circuit breaker is worth more than a refusal-trained model only if it
survives longer. This trains a fresh LoRA (the project's `adapters.add_lora`, every decoder block,
attention and MLP) on the caller's harmful records with AdamW and the usual completion-token
cross-entropy, and hands the model to the caller at each checkpoint step (0 = the untouched model),
so ASR and benign loss are read along the way with the usual machinery:

    for point, attacked in finetune_checkpoints(model, tokenizer, harmful, eval_prompts):
        result = evaluate_models({f"ft{point.step}": (attacked, tokenizer)}, eval_prompts, ["direct"])

The training records must not be the evaluation prompts (that would measure memorisation): overlap by
prompt text is refused before anything is trained. The model trains in eval mode (no dropout), so a run is
reproducible from its seed. The caller's model is itself again afterwards (LoRA removed).
"""

from __future__ import annotations

import copy
import json
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from ...adapters import add_lora
from ...config import ModelConfig
from ...data.batching import pad_examples
from ...data.records import Record
from ...data.render import Example, render_all
from ...fileio import json_safe
from ...models import find_decoder_layers, save_model
from ..attacks.base import AttackError
from ..capability import teacher_forced_loss

DEFAULT_STEPS: tuple[int, ...] = (0, 10, 25, 50, 100)
TAMPER_FILE = "tamper.json"
"""What `save_attacked` writes beside the weights: how the model was attacked."""


@dataclass
class FinetuneSettings:
    """The attacker's budget: checkpoint steps, optimiser and LoRA shape."""

    steps: tuple[int, ...] = DEFAULT_STEPS
    """Optimiser steps at which the attacked model is handed out (0: before any step)."""
    learning_rate: float = 2e-4
    lora_r: int = 16
    lora_alpha: int = 16
    lora_targets: str = "attention,mlp"
    batch_size: int = 4
    max_length: int = 512
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["steps"] = list(self.steps)
        return out


@dataclass
class FinetuneCheckpoint:
    """The attacked model at one step: the losses that say how far the attack went and what it cost."""

    step: int
    harmful_loss: float
    """Teacher-forced loss on the training records' completions (what the attack lowers)."""
    train_loss: float = float("nan")
    """Mean batch loss of the steps since the previous checkpoint (NaN at step 0)."""
    benign_loss: float | None = None
    """Teacher-forced loss on the caller's benign records (the capability cost), when given."""
    seconds: float = 0.0
    evaluation: Any = None
    """What the caller's `evaluate` returned for this checkpoint (`finetune_attack`)."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; `evaluation` through its own `to_dict` when it has one (return plain values, such as an
        EvalResult's `metrics`, from the callback)."""
        out = asdict(replace(self, evaluation=None))
        evaluation = self.evaluation
        out["evaluation"] = evaluation.to_dict() if hasattr(evaluation, "to_dict") else json_safe(evaluation)
        return out


@dataclass
class FinetuneResult:
    """Every checkpoint of one fine-tuning attack, with its settings."""

    settings: FinetuneSettings
    n_records: int
    checkpoints: list[FinetuneCheckpoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "attack": "finetune",
            "settings": self.settings.to_dict(),
            "n_records": self.n_records,
            "checkpoints": [c.to_dict() for c in self.checkpoints],
        }


def normalised(text: str) -> str:
    """Whitespace-collapsed, case-folded text: how prompts are compared for overlap."""
    return " ".join(str(text).split()).casefold()


def prompt_texts(item: Any) -> set[str]:
    """The texts an evaluation prompt may appear as in a training record: a string; a `Prompt`'s text and bare
    behaviour; an `AttackPrompt`'s behaviour; a `Record`'s prompt."""
    if isinstance(item, str):
        return {normalised(item)}
    found = set()
    for attribute in ("text", "behavior", "prompt"):
        value = getattr(item, attribute, None)
        if isinstance(value, str) and value.strip():
            found.add(normalised(value))
    behavior = (getattr(item, "meta", None) or {}).get("behavior")
    if isinstance(behavior, str) and behavior.strip():
        found.add(normalised(behavior))
    return found


def check_no_overlap(records: Sequence[Record], eval_prompts: Sequence[Any]) -> None:
    """Refuse (AttackError) training records whose prompt is one of the evaluation prompts (compared after
    collapsing whitespace and case), and an empty training set."""
    if not records:
        raise AttackError("the fine-tuning attack got no harmful records to train on; give a few (K >= 1)")
    held_out = set().union(*(prompt_texts(p) for p in eval_prompts)) if eval_prompts else set()
    clashes = [r.prompt for r in records if normalised(r.prompt) in held_out]
    if clashes:
        shown = "; ".join(repr(c) for c in clashes[:3])
        raise AttackError(
            f"{len(clashes)} fine-tuning record(s) have an evaluation prompt as their prompt ({shown}): "
            "train on harmful records disjoint from the evaluation prompts"
        )


def completion_loss(model: nn.Module, examples: Sequence[Example], pad_token_id: int) -> torch.Tensor:
    """Mean cross-entropy per completion token of a batch (token t predicted from t-1), with gradient."""
    device = next(model.parameters()).device
    ids, attention, mask = (t.to(device) for t in pad_examples(examples, pad_token_id))
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits.float()
    nll = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
    ).view(ids.shape[0], -1)
    weights = mask[:, 1:].float()
    return (nll * weights).sum() / weights.sum().clamp_min(1)


def finetune_checkpoints(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    eval_prompts: Sequence[Any],
    settings: FinetuneSettings | None = None,
    benign: Sequence[Record] | None = None,
) -> Iterator[tuple[FinetuneCheckpoint, nn.Module]]:
    """LoRA fine-tuning of `model` (a plain, merged model; float32 advised on CPU) on `records`; yields
    (checkpoint, the attacked model) at each of `settings.steps`. The yielded model is valid until the next
    item is asked for; evaluate it then. Settings and overlap are checked here, before anything is trained;
    closing the iterator early (break) also removes the LoRA."""
    settings = settings or FinetuneSettings()
    steps = sorted(set(settings.steps))
    if not steps or steps[0] < 0:
        raise AttackError(f"fine-tuning checkpoint steps must be >= 0, got {list(settings.steps)}")
    if settings.batch_size < 1 or settings.learning_rate <= 0:
        raise AttackError("fine-tuning needs batch_size >= 1 and learning_rate > 0")
    if isinstance(model, PeftModel):
        raise AttackError("fine-tune a merged model, not one with adapters (merge it first: export_merged)")
    check_no_overlap(records, eval_prompts)
    examples = render_all(tokenizer, list(records), "completion", settings.max_length).examples
    if not examples:
        raise AttackError("none of the fine-tuning records could be rendered with this tokenizer's chat template")
    return _train(model, tokenizer, list(records), examples, steps, settings, list(benign or []))


def _train(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: list[Record],
    examples: list[Example],
    steps: list[int],
    settings: FinetuneSettings,
    benign: list[Record],
) -> Iterator[tuple[FinetuneCheckpoint, nn.Module]]:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    torch.manual_seed(settings.seed)  # lora_A's initialisation
    lora = ModelConfig(
        model_name_or_path=str(getattr(model, "name_or_path", "") or "attacked-model"),
        lora_r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,
        lora_targets=settings.lora_targets,
    )
    attacked = add_lora(model, lora, range(len(find_decoder_layers(model))))
    try:
        attacked.eval()
        optimizer = torch.optim.AdamW([p for p in attacked.parameters() if p.requires_grad], lr=settings.learning_rate)
        rng = random.Random(settings.seed)
        order: list[int] = []
        step, started, batch_losses = 0, time.time(), []

        def checkpoint() -> FinetuneCheckpoint:
            harmful = teacher_forced_loss(attacked, tokenizer, records, settings.batch_size, settings.max_length)
            point = FinetuneCheckpoint(step, harmful.mean_loss)
            if batch_losses:
                point.train_loss = sum(batch_losses) / len(batch_losses)
            if benign:
                point.benign_loss = teacher_forced_loss(attacked, tokenizer, benign, settings.batch_size).mean_loss
            point.seconds = round(time.time() - started, 3)
            return point

        if steps[0] == 0:
            yield checkpoint(), attacked
        while step < steps[-1]:
            if len(order) < settings.batch_size:  # epochs of shuffled records, batches never split across two
                epoch = list(range(len(examples)))
                rng.shuffle(epoch)
                order = order + epoch
            batch, order = order[: settings.batch_size], order[settings.batch_size :]
            with torch.enable_grad():
                loss = completion_loss(attacked, [examples[i] for i in batch], pad)
                optimizer.zero_grad()
                loss.backward()
            optimizer.step()
            step += 1
            batch_losses.append(float(loss.detach()))
            if step in steps:
                yield checkpoint(), attacked
                batch_losses = []
    finally:
        attacked.unload()  # the LoRA layers out, the caller's modules back in place
        for name, p in model.named_parameters():
            p.requires_grad_(trainable.get(name, p.requires_grad))
        model.train(was_training)


def finetune_attack(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    records: Sequence[Record],
    eval_prompts: Sequence[Any],
    settings: FinetuneSettings | None = None,
    benign: Sequence[Record] | None = None,
    evaluate: Callable[[nn.Module, FinetuneCheckpoint], Any] | None = None,
) -> FinetuneResult:
    """`finetune_checkpoints` run to the end, calling `evaluate(attacked model, checkpoint)` at each checkpoint
    (for example an `evaluate_models` call on the eval prompts); its return value is kept in
    `checkpoint.evaluation`."""
    settings = settings or FinetuneSettings()
    result = FinetuneResult(settings, len(records))
    for point, attacked in finetune_checkpoints(model, tokenizer, records, eval_prompts, settings, benign):
        if evaluate is not None:
            point.evaluation = evaluate(attacked, point)
        result.checkpoints.append(point)
    return result


def save_attacked(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    out_dir: str | Path,
    info: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save the attacked model as an ordinary checkpoint (a merged copy: the model handed out keeps its LoRA and
    can go on training), with `tamper.json` (`info`: how it was attacked). Evaluating it by path lets the cell
    store tell checkpoints apart."""
    merged = copy.deepcopy(model)
    if isinstance(merged, PeftModel):
        merged = merged.merge_and_unload()
    extra = {TAMPER_FILE: json.dumps(info or {}, indent=2, default=str)}
    return save_model(merged, tokenizer, out_dir, extra, overwrite)
