"""Attacks for the evaluation: each turns evaluation prompts into what generation is fed.

    attack = make_attack("gcg", budget="cpu", steps=5)
    inputs = attack.prepare(model, tokenizer, prompts)      # list[AttackInput]
    results["attack"] = attack.settings()

See docs/attacks.md for what each attack does, its budgets, and how generation applies prefills,
soft prompts and interventions.
"""

from __future__ import annotations

from typing import Any

from .attacker import ATTACKER_SYSTEM_PROMPT, Attacker, EndpointAttacker, ModelAttacker, parse_attacker_reply
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
from .best_of_n import BestOfNAttack, add_noise, augment, flip_case, scramble_words
from .conversation import BENIGN_HISTORY, DirectAttack, MultiTurnAttack, PrefillAttack
from .embedding import EmbeddingAttack, EmbeddingResult, embedding_optimize
from .gcg import GCGAttack, GCGResult, gcg_optimize, nanogcg_available
from .loss import target_loss
from .pair import PairAttack
from .refusal_direction import DirectionIntervention, RefusalDirectionAttack, refusal_direction
from .search import SearchAttack, SearchedInput, rating
from .tap import TapAttack, on_topic
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
        BestOfNAttack,
        PairAttack,
        TapAttack,
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
    "ATTACKER_SYSTEM_PROMPT",
    "ATTACKS",
    "BENIGN_HISTORY",
    "BUDGETS",
    "DEFAULT_TARGET",
    "PLACEHOLDER",
    "Attack",
    "AttackError",
    "AttackInput",
    "AttackPrompt",
    "Attacker",
    "BestOfNAttack",
    "DirectAttack",
    "DirectionIntervention",
    "EmbeddingAttack",
    "EmbeddingResult",
    "EndpointAttacker",
    "GCGAttack",
    "GCGResult",
    "Intervention",
    "ModelAttacker",
    "MultiTurnAttack",
    "PairAttack",
    "PrefillAttack",
    "RefusalDirectionAttack",
    "SearchAttack",
    "SearchedInput",
    "TapAttack",
    "TemplateAttack",
    "add_noise",
    "augment",
    "coerce_prompt",
    "coerce_prompts",
    "embedding_optimize",
    "fill_template",
    "flip_case",
    "gcg_optimize",
    "load_templates",
    "make_attack",
    "nanogcg_available",
    "on_topic",
    "option_names",
    "parse_attacker_reply",
    "rating",
    "refusal_direction",
    "scramble_words",
    "shared_context",
    "target_loss",
    "with_suffix",
]
