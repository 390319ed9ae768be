"""Which prompts and rows the main job trains and evaluates on, chosen from a `RunConfig`.

The harmful training prompts and their held-out splits per source (with the `leave_out` sources kept for
evaluation only), the XSTest safe prompts split into a retain pool and an over-refusal hold-out, how many
rows each generated retain source gets and the conversation retain sets, and the over-refusal sets the
evaluation adds. Selection only: no model runs here and nothing is written; the main job generates and
records (`experiments.main_job`). A source or set whose data is not on this machine is skipped with a
warning and listed in the account the caller records, so a missing download never fails a run halfway.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import RunConfig
from .benchmarks import BENCHMARKS, is_harmful, load_benchmark, split_spec, subsample
from .loaders import load_xstest_csv
from .prompts import Prompt
from .records import DataError, Record
from .sources import (
    ALIASES,
    GENERATED_RETAIN,
    SourceUnavailable,
    load_retain_conversations,
    load_source,
    parse_source_weights,
    resolve_data_root,
    split_prompts,
    split_sources,
)

logger = logging.getLogger("circuit_breakers")


def source_weights(run_cfg: RunConfig) -> dict[str, float]:
    """The recipe's source weights with the `leave_out` sources set to 0 (evaluation only)."""
    weights = parse_source_weights(run_cfg.harmful_prompts)
    for name in (n.strip() for n in run_cfg.leave_out.split(",") if n.strip()):
        for source in ALIASES.get(name, [name]):
            weights[source] = 0.0
    if not any(weights.values()):
        raise ValueError(f"leave_out {run_cfg.leave_out!r} leaves no source to train on")
    return weights


def harmful_splits(run_cfg: RunConfig, seed: int) -> tuple[list[Prompt], dict[str, list[Prompt]], dict[str, Any]]:
    """(training prompts, {source: held-out prompts}, account): every source that is on this machine,
    split on its own; a source whose data is missing is skipped with a warning and listed."""
    weights = source_weights(run_cfg)
    root = resolve_data_root(run_cfg.data_root)
    pools: dict[str, list[Prompt]] = {}
    skipped: dict[str, str] = {}
    for name in weights:
        try:
            pools[name] = load_source(name, root)
        except SourceUnavailable as err:
            logger.warning("harmful source skipped: %s", err)
            skipped[name] = str(err)
    if not any(weights[n] > 0 for n in pools):
        raise ValueError(f"no harmful source to train on is available: {'; '.join(skipped.values())}")
    train, held = split_sources(pools, weights, run_cfg.n_harmful_train, run_cfg.n_harmful_eval, seed)
    account = {
        "data_root": str(root) if root else None,
        "weights": weights,
        "skipped": skipped,
        "available": {n: len(p) for n, p in pools.items()},
        "train": {n: sum(p.source == n for p in train) for n in pools},
        "held_out": {n: len(p) for n, p in held.items()},
    }
    return train, held, account


def xstest_safe_split(run_cfg: RunConfig, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """XSTest's safe prompts (that only look unsafe) from `xstest_path` or the data folder, split into
    (retain pool, `n_xstest` held out for over-refusal, stratified by type); empty when neither has them."""
    root = resolve_data_root(run_cfg.data_root)
    xstest = run_cfg.xstest_path or (str(root / "xstest" / "xstest_prompts.csv") if root else None)
    if not xstest or not Path(xstest).is_file():
        return [], []
    return split_prompts(load_xstest_csv(xstest, label="safe"), run_cfg.n_xstest, seed)


def retain_rows(spec: dict[str, int | None], name: str, default: int) -> int:
    """Rows of a generated retain source: 0 when `retain_sources` does not name it, else its `=rows` or `default`."""
    if name not in spec:
        return 0
    rows = spec[name]
    return default if rows is None else rows


def retain_conversations(
    spec: dict[str, int | None], run_cfg: RunConfig, seed: int, held_out: Sequence[str]
) -> tuple[list[Record], dict[str, str]]:
    """The conversation retain sources (`retain_sources` entries the model does not answer itself), none holding a
    held-out prompt; a source whose data is not on this machine is skipped with a warning and listed."""
    root = resolve_data_root(run_cfg.data_root)
    rows: list[Record] = []
    skipped: dict[str, str] = {}
    for name, count in spec.items():
        if name in GENERATED_RETAIN:
            continue
        try:
            rows += load_retain_conversations(name, count, root, seed, exclude=held_out)
        except SourceUnavailable as err:
            logger.warning("retain source skipped: %s", err)
            skipped[name] = str(err)
    return rows, skipped


def over_refusal_specs(run_cfg: RunConfig) -> list[tuple[str, str | None]]:
    """(name, path or None) of each `over_refusal_sets` entry: a benign registry set, since a harmful set's
    compliance is an attack success, not over-refusal; anything else is refused in one line."""
    specs = []
    for value in (v.strip() for v in run_cfg.over_refusal_sets.split(",")):
        if not value:
            continue
        name, path = split_spec(value)
        benign = sorted(n for n in BENCHMARKS if not is_harmful(n))
        if name not in BENCHMARKS:
            raise ValueError(f"over_refusal_sets: unknown set {name!r}; choose from {', '.join(benign)}")
        if is_harmful(name):
            raise ValueError(
                f"over_refusal_sets: {name} holds harmful prompts (refusing them is wanted); evaluate it with eval "
                f"--benchmark {name} or list its CSV file in harmful_prompts; over-refusal sets: {', '.join(benign)}"
            )
        specs.append((name, path))
    return specs


def over_refusal_prompts(run_cfg: RunConfig, seed: int) -> tuple[list[Prompt], dict[str, Any]]:
    """(prompts, account) of the `over_refusal_sets`: a seeded `n_over_refusal_eval` of each, its name as the
    prompt source so results report it per set; a set whose data is not on this machine is skipped with a
    warning and listed, as harmful sources are, instead of failing a run after training."""
    root = resolve_data_root(run_cfg.data_root)
    prompts: list[Prompt] = []
    account: dict[str, Any] = {"loaded": {}, "skipped": {}}
    for name, path in over_refusal_specs(run_cfg):
        try:
            found = load_benchmark(name, path, data_dir=root)
        except (DataError, OSError) as err:
            logger.warning("over-refusal set skipped: %s: %s", name, err)
            account["skipped"][name] = str(err)
            continue
        if name == "xstest":  # holds both: only its safe prompts measure over-refusal
            found = [p for p in found if p.meta.get("label") == "safe"]
        chosen = subsample(found, run_cfg.n_over_refusal_eval or None, seed)
        for prompt in chosen:
            prompt.source = name
            prompt.id = prompt.id if prompt.id.startswith(name) else f"{name}-{prompt.id}"
        prompts += chosen
        account["loaded"][name] = len(chosen)
    return prompts, account
