"""Attacks for the evaluation: each turns evaluation prompts into what generation is fed.

    attack = make_attack("gcg", budget="cpu", steps=5)
    inputs = attack.prepare(model, tokenizer, prompts)      # list[AttackInput]
    results["attack"] = attack.settings()

See docs/attacks.md for what each attack does, its budgets, and how generation applies prefills,
soft prompts and interventions.
"""

from __future__ import annotations

from typing import Any

from .base import (
    DEFAULT_TARGET,
    Attack,
    AttackError,
    AttackInput,
    AttackPrompt,
    Intervention,
    coerce_prompt,
    coerce_prompts,
    option_names,
    shared_context,
    with_suffix,
)
from .conversation import BENIGN_HISTORY, DirectAttack, MultiTurnAttack, PrefillAttack
from .embedding import EmbeddingAttack, EmbeddingResult, embedding_optimize
from .gcg import GCGAttack, GCGResult, gcg_optimize, nanogcg_available
from .loss import target_loss
from .refusal_direction import DirectionIntervention, RefusalDirectionAttack, refusal_direction
from .templates import PLACEHOLDER, TemplateAttack, fill_template, load_templates

ATTACKS: dict[str, type[Attack]] = {
    cls.name: cls
    for cls in (
        DirectAttack,
        PrefillAttack,
        TemplateAttack,
        GCGAttack,
        EmbeddingAttack,
        RefusalDirectionAttack,
        MultiTurnAttack,
    )
}
"""Attack classes by name, in the order reports list them."""

BUDGETS: tuple[str, ...] = ("cpu", "default", "paper")


def make_attack(name: str, budget: str = "default", **options: Any) -> Attack:
    """Build an attack from its name, a budget preset and explicit options (which win over the preset).

    Attacks without a `paper` preset use `default` for it.
    """
    if name not in ATTACKS:
        raise AttackError(f"unknown attack {name!r}; choose one of {sorted(ATTACKS)}")
    if budget not in BUDGETS:
        raise AttackError(f"unknown budget {budget!r}; choose one of {BUDGETS}")
    cls = ATTACKS[name]
    unknown = set(options) - set(option_names(cls))
    if unknown:
        raise AttackError(f"attack {name!r} has no option(s) {sorted(unknown)}; it takes {option_names(cls)}")
    preset = cls.presets.get(budget, cls.presets.get("default", {}))
    return cls(**{**preset, **options})


__all__ = [
    "ATTACKS",
    "BENIGN_HISTORY",
    "BUDGETS",
    "DEFAULT_TARGET",
    "PLACEHOLDER",
    "Attack",
    "AttackError",
    "AttackInput",
    "AttackPrompt",
    "DirectAttack",
    "DirectionIntervention",
    "EmbeddingAttack",
    "EmbeddingResult",
    "GCGAttack",
    "GCGResult",
    "Intervention",
    "MultiTurnAttack",
    "PrefillAttack",
    "RefusalDirectionAttack",
    "TemplateAttack",
    "coerce_prompt",
    "coerce_prompts",
    "embedding_optimize",
    "fill_template",
    "gcg_optimize",
    "load_templates",
    "make_attack",
    "nanogcg_available",
    "option_names",
    "refusal_direction",
    "shared_context",
    "target_loss",
    "with_suffix",
]
