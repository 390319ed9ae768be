"""The common shape of every attack: evaluation prompts in, `AttackInput`s (what generation is fed) out.

An attack never generates. It rewrites the conversation (`messages`), may put words in the
assistant's mouth (`prefill`), may replace part of the prompt with optimised embeddings
(`soft_prompt`), or may change the model's activations while it generates (`intervention`).
Generation applies these, the judge sees the original behaviour, and `settings` travel into the
results so that every number says which attack, with which budget, produced it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Protocol

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from ...data.slots import Message, encode, split_at_slot, with_suffix  # noqa: F401 (with_suffix: re-exported for the attacks)
from ...fileio import json_safe

DEFAULT_TARGET = "Sure, here is"
"""Affirmative target used when a benchmark gives none (AdvBench and HarmBench give their own)."""


class AttackError(ValueError):
    """An attack that cannot run with the given prompts, options or model."""


CONTEXT_SEPARATOR = "\n\n---\n\n"
"""Between a HarmBench context string and the request, as HarmBench (and `data.loaders`) lay it out."""


@dataclass
class AttackPrompt:
    """One evaluation item: the behaviour to elicit, its affirmative target and optional context.

    `history` holds the turns before the request when the benchmark item is itself a conversation;
    `source` keeps the item it was built from (for example a `data.prompts.Prompt`).
    """

    behavior: str
    target: str | None = None
    context: str | None = None
    id: str | None = None
    history: list[Message] | None = None
    source: Any = field(default=None, repr=False, compare=False)

    def user_content(self) -> str:
        """The user turn as HarmBench renders contextual behaviours: context, a rule, then the request."""
        if self.context:
            return f"{self.context}{CONTEXT_SEPARATOR}{self.behavior}"
        return self.behavior

    def chat(self, user_text: str | None = None, before: Sequence[Message] = ()) -> list[Message]:
        """The conversation an attack sends: system turns of `history`, then `before` (an attack's
        own turns), the rest of `history`, and the user turn (`user_text`, default `user_content()`)."""
        history = [dict(m) for m in self.history or []]
        system = [m for m in history if m.get("role") == "system"]
        rest = [m for m in history if m.get("role") != "system"]
        text = self.user_content() if user_text is None else user_text
        return [*system, *[dict(m) for m in before], *rest, {"role": "user", "content": text}]

    def target_or_default(self) -> str:
        return self.target or DEFAULT_TARGET


_BEHAVIOR_KEYS = ("behavior", "Behavior", "prompt", "goal", "instruction", "request", "question")
_TARGET_KEYS = ("target", "default_target", "Target")
_CONTEXT_KEYS = ("context", "ContextString", "context_string")
_ID_KEYS = ("id", "BehaviorID", "behavior_id")


def _pick(row: Mapping[str, Any] | object, keys: Sequence[str]) -> Any:
    for key in keys:
        value = row.get(key) if isinstance(row, Mapping) else getattr(row, key, None)
        if value not in (None, ""):
            return value
    return None


def coerce_prompt(item: AttackPrompt | str | Mapping[str, Any] | object) -> AttackPrompt:
    """Accept what benchmark loaders produce: a string, a dict (HarmBench, AdvBench, CB-format keys)
    or any object with `behavior`/`prompt`, `target` and `context` attributes."""
    if isinstance(item, AttackPrompt):
        return item
    if isinstance(item, str):
        return AttackPrompt(item)
    behavior = _pick(item, _BEHAVIOR_KEYS)
    context = _pick(item, _CONTEXT_KEYS)
    text = _pick(item, ("text",))
    if behavior is None and isinstance(text, str):
        # `text` is the whole user turn (data.prompts.Prompt): recover the request behind the context.
        head = f"{context}{CONTEXT_SEPARATOR}" if context else None
        behavior, context = (text[len(head) :], context) if head and text.startswith(head) else (text, None)
    if not isinstance(behavior, str) or not behavior:
        raise AttackError(f"cannot find the behaviour text in {item!r}; expected one of {_BEHAVIOR_KEYS} or text")
    messages = _pick(item, ("messages",))
    history = None
    if isinstance(messages, list) and messages:
        if messages[-1].get("role") != "user":
            raise AttackError("a conversation prompt must end with the user turn")
        history = [dict(m) for m in messages[:-1]] or None
    ident = _pick(item, _ID_KEYS)
    return AttackPrompt(
        behavior, _pick(item, _TARGET_KEYS), context, None if ident is None else str(ident), history, item
    )


def coerce_prompts(items: Iterable[AttackPrompt | str | Mapping[str, Any] | object]) -> list[AttackPrompt]:
    return [coerce_prompt(item) for item in items]


class Intervention(Protocol):
    """Something that changes the model's activations for as long as its context is open."""

    def apply(self, model: nn.Module) -> AbstractContextManager[Any]: ...

    def describe(self) -> dict[str, Any]: ...


@dataclass
class AttackInput:
    """What generation is fed for one (prompt, attack, variant).

    Generation renders `messages` with the chat template and the generation prompt, appends
    `prefill` (the judged completion should be `prefill + generated text`), splices `soft_prompt`
    (`[k, hidden]` embeddings) in at the end of the last user turn via `prompt_embeds`, and runs
    inside `context(model)`, which applies the `intervention` if there is one.
    """

    messages: list[Message]
    prompt: AttackPrompt
    prompt_index: int
    attack: str
    variant: int = 0
    prefill: str | None = None
    soft_prompt: Tensor | None = None
    intervention: Intervention | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def render(self, tokenizer: PreTrainedTokenizerBase) -> str:
        """Prompt text (template + generation prompt + prefill). Not valid when a soft prompt is set."""
        if self.soft_prompt is not None:
            raise AttackError("this input carries a soft prompt: use prompt_embeds(), not render()")
        text = tokenizer.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        return text + (self.prefill or "")

    def render_parts(self, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
        """(text before, text after) the end of the last user turn, where a soft prompt goes."""
        return split_at_slot(tokenizer, self.messages, suffix_slot=True, prefill=self.prefill)

    def prompt_embeds(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Tensor:
        """`[T, hidden]` input embeddings of the whole prompt with the soft prompt spliced in."""
        before, after = self.render_parts(tokenizer)
        embed = model.get_input_embeddings()
        device = embed.weight.device
        parts = [embed(torch.tensor(encode(tokenizer, before), device=device, dtype=torch.long))]
        if self.soft_prompt is not None:
            parts.append(self.soft_prompt.to(device=device, dtype=embed.weight.dtype))
        parts.append(embed(torch.tensor(encode(tokenizer, after), device=device, dtype=torch.long)))
        return torch.cat(parts, dim=0)

    def context(self, model: nn.Module) -> AbstractContextManager[Any]:
        """Open this around generation: applies the intervention, or does nothing."""
        return self.intervention.apply(model) if self.intervention is not None else nullcontext()

    def record(self) -> dict[str, Any]:
        """JSON-ready description for samples.jsonl (tensors summarised, not dumped)."""
        out: dict[str, Any] = {
            "attack": self.attack,
            "variant": self.variant,
            "prompt_index": self.prompt_index,
            "behavior": self.prompt.behavior,
            "messages": self.messages,
            "settings": self.settings,
        }
        if self.prompt.id is not None:
            out["behavior_id"] = self.prompt.id
        if self.prompt.context is not None:
            out["context"] = self.prompt.context
        if self.prefill is not None:
            out["prefill"] = self.prefill
        if self.soft_prompt is not None:
            out["soft_prompt_shape"] = list(self.soft_prompt.shape)
        if self.intervention is not None:
            out["intervention"] = self.intervention.describe()
        return out


def shared_context(model: nn.Module, inputs: Sequence[AttackInput]) -> AbstractContextManager[Any]:
    """One context for a generation batch; refuses a batch whose inputs need different interventions."""
    found = {id(i.intervention): i for i in inputs}
    if len(found) > 1:
        raise AttackError("inputs in one batch carry different interventions; group them by intervention")
    return next(iter(found.values())).context(model) if found else nullcontext()


class Attack(ABC):
    """Turns evaluation prompts into generation inputs; subclasses are dataclasses of their options.

    `presets` name budgets (`cpu` for a short run on a laptop, `default`, and `paper` where the
    literature has settings); `make_attack(name, budget=..., **overrides)` builds one.
    """

    name: ClassVar[str]
    presets: ClassVar[dict[str, dict[str, Any]]] = {"cpu": {}, "default": {}}

    @abstractmethod
    def prepare(
        self, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any]
    ) -> list[AttackInput]:
        """One or more inputs per prompt, in prompt order."""

    @property
    def needs_model(self) -> bool:
        """Whether `prepare` runs the model (optimisation or activation statistics)."""
        return False

    def settings(self) -> dict[str, Any]:
        """Options of this attack for results.json (JSON-ready values only)."""
        options = asdict(self) if hasattr(self, "__dataclass_fields__") else {}
        return {"attack": self.name, **{k: json_safe(v) for k, v in options.items()}}


def option_names(cls: type[Attack]) -> list[str]:
    """Names of the options an attack takes (its dataclass fields)."""
    return [f.name for f in fields(cls) if f.init] if hasattr(cls, "__dataclass_fields__") else []
