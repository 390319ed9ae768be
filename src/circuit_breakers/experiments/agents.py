"""The agent experiment (issue 6): tool-call circuit breakers against prompt injection, base vs circuit-broken.

Split the cases, train on the training split (the injection's call rerouted; the user's next call retained
on clean and injected conversations), then score both models teacher-forced on the held-out splits
(`evaluation.agents`). The result records the recipe's parsed settings, so a later run with another
training recipe can reuse the base model's scores when its splits and base model are the same.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import CircuitBreakerConfig, DataConfig, ModelConfig
from ..data.agents import ToolCase
from ..evaluation.agents import evaluate_splits
from ..fileio import write_text_atomic
from .main_job import recipe_settings

__all__ = ["agent_experiment", "base_scores_apply", "read_agent_result", "save_agent_result"]


def _cap(cases: Sequence[ToolCase], n: int | None, seed: int = 0) -> list[ToolCase]:
    """At most `n` cases, spread evenly over the (deterministically shuffled) list."""
    cases = list(cases)
    random.Random(seed).shuffle(cases)
    return cases if n is None or len(cases) <= n else cases[:n]


def base_scores_apply(
    base_result: Mapping[str, Any],
    eval_counts: Mapping[str, int],
    heldout_attacks: Sequence[str],
    seed: int,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
) -> bool:
    """Whether an earlier result scored the same base model on the same splits: same evaluation counts,
    held-out attacks and seed, and the same model, dtype and max_length in its recorded settings."""
    settings = base_result.get("settings") or {}
    model, data = settings.get("model") or {}, settings.get("data") or {}
    return (
        base_result.get("counts", {}).get("eval") == dict(eval_counts)
        and base_result.get("heldout_attacks") == list(heldout_attacks)
        and base_result.get("seed", seed) == seed
        and (model.get("model_name_or_path"), model.get("dtype"), data.get("max_length"))
        == (model_cfg.model_name_or_path, model_cfg.dtype, data_cfg.max_length)
    )


def agent_experiment(
    cases: Sequence[ToolCase],
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    n_train_cb: int | None = 240,
    n_eval: int | None = 120,
    heldout_attacks: Sequence[str] = ("tool_knowledge",),
    seed: int = 0,
    eval_batch_size: int = 8,
    base_result: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Split `cases`, train circuit breakers on the training split (injected call rerouted; the
    user's next call retained on clean and injected conversations), then score base and
    circuit-broken models on the held-out splits. Returns settings, counts and both models' metrics.
    `base_result`: an earlier result whose base scores are reused (checked by `base_scores_apply`)."""
    from ..data.agents import case_counts, favourite_counts, records_from_cases, split_cases
    from ..models import load_model, load_model_and_tokenizer
    from ..training.run import train

    splits = split_cases(cases, heldout_attacks=heldout_attacks, seed=seed)
    train_cases = splits.pop("train")
    injected = _cap([c for c in train_cases if c.injected and c.correct_call], n_train_cb, seed)
    keys = {(c.suite, c.user_task, c.injection_task) for c in injected}
    clean = [
        c for c in train_cases if not c.injected and c.correct_call and (c.suite, c.user_task, c.injection_task) in keys
    ]
    cb_records, _ = records_from_cases(injected)
    _, retain_records = records_from_cases([*injected, *clean])
    favourites = [name for name, _ in favourite_counts(cases).most_common(3)]
    evals = {name: _cap(split, n_eval, seed) for name, split in splits.items()}
    # "too broad": the benign split's cases whose correct call uses an injection's favourite tool
    evals["too_broad"] = [c for c in splits["benign"] if c.correct_call and c.correct_call["name"] in favourites]
    eval_counts = {k: len(v) for k, v in evals.items()}
    base, tokenizer = load_model_and_tokenizer(model_cfg.model_name_or_path, model_cfg.dtype, device=model_cfg.device)
    if base_result is not None:  # scores of the same base model on the same splits: reuse them
        if not base_scores_apply(base_result, eval_counts, heldout_attacks, seed, model_cfg, data_cfg):
            raise ValueError("--base_from was made with other splits or another recipe; its base scores do not apply")
        before = base_result["base"]
    else:
        before = evaluate_splits(base, tokenizer, evals, data_cfg.max_length, eval_batch_size, favourites)
    del base
    result = train(model_cfg, data_cfg, cb_cfg, cb_records, retain_records)
    broken = load_model(str(result.merged_dir), model_cfg.dtype, device=model_cfg.device)
    after = evaluate_splits(broken, tokenizer, evals, data_cfg.max_length, eval_batch_size, favourites)
    return {
        "settings": recipe_settings(model_cfg, data_cfg, cb_cfg),
        "seed": seed,
        "counts": {
            "all": case_counts(cases),
            "train_cb": len(cb_records),
            "train_retain": len(retain_records),
            "eval": eval_counts,
        },
        "favourite_tools": favourites,
        "heldout_injection_tasks": sorted({f"{c.suite}/{c.injection_task}" for c in splits["heldout_injection"]}),
        "heldout_attacks": list(heldout_attacks),
        "base": before,
        "circuit_broken": after,
        "train_summary": {k: v for k, v in result.summary.items() if k != "masks"},
        "output_dir": str(result.output_dir),
    }


def save_agent_result(result: Mapping[str, Any], path: str | Path) -> Path:
    """The experiment's result as indented JSON (a later run's `base_result`), written atomically."""
    return write_text_atomic(path, json.dumps(result, indent=2, default=str) + "\n")


def read_agent_result(path: str | Path) -> dict[str, Any]:
    """A result `save_agent_result` wrote."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
