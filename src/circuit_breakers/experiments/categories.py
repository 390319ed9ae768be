"""Category-specific circuit breakers (issue 9): one named adapter per harm category, loaded side by side
into one model, switched or combined; the category experiment measures each adapter's ASR per category.

Why separate adapters: a deployment may need to break some harm categories and not others (a security
team's model should still write exploit code), and a new category can be added without retraining the
rest. An adapter is made specific by retaining the other categories' completions (`retain_others`): its
rerouting must then leave them where the base model had them, as it must leave benign answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from ..adapters import COMBINED
from ..config import CircuitBreakerConfig, DataConfig, ModelConfig
from ..data.records import Record

logger = logging.getLogger("circuit_breakers")


def by_category(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records grouped by their `category` (None: "uncategorised"), in first-seen order."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(record.category or "uncategorised", []).append(record)
    return groups


def category_sets(
    cb_records: Sequence[Record],
    retain_records: Sequence[Record],
    covered: Sequence[str],
    retain_others: bool = True,
    kept: Sequence[str] = (),
) -> tuple[list[Record], list[Record]]:
    """(rerouted, retained) for an adapter that covers the categories `covered`: their circuit-breaker rows
    are rerouted; with `retain_others`, the other categories' rows join the retain set (as retain rows),
    except those of `kept` (categories an adapter continued from already breaks: neither trained nor undone)."""
    groups = by_category(cb_records)
    missing = [c for c in [*covered, *kept] if c not in groups]
    if missing:
        raise ValueError(
            f"no circuit-breaker rows of categor{'ies' if len(missing) > 1 else 'y'} {missing}; "
            f"the data has {sorted(groups)}"
        )
    rerouted = [r for c in covered for r in groups[c]]
    others = (
        [replace(r, kind="retain") for c, rows in groups.items() if c not in covered and c not in kept for r in rows]
        if retain_others
        else []
    )
    return rerouted, [*retain_records, *others]


def train_category_adapter(
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    cb_records: Sequence[Record],
    retain_records: Sequence[Record],
    covered: Sequence[str],
    out_dir: str | Path,
    retain_others: bool = True,
    init_adapter: str | Path | None = None,
    kept: Sequence[str] = (),
) -> dict[str, Any]:
    """Train one adapter that covers `covered` into `out_dir` (adapter/, merged/, summary.json), or
    return the summary of one already finished there. `init_adapter`: continue from that adapter
    (continual training: a new category on top of an old one, whose categories are `kept`)."""
    from ..training.run import check_output_dir, run_identity, train

    out_dir = Path(out_dir)
    rerouted, retained = category_sets(cb_records, retain_records, covered, retain_others, kept)
    m_cfg = replace(model_cfg, init_adapter=str(init_adapter) if init_adapter else None)
    c_cfg = replace(cb_cfg, output_dir=str(out_dir))
    summary_path = out_dir / "summary.json"
    # a finished adapter is reused only if it was trained with these settings and data (else: one-line error)
    check_output_dir(out_dir, run_identity(m_cfg, data_cfg, c_cfg, rerouted, retained), c_cfg.overwrite_output_dir)
    if summary_path.is_file() and (out_dir / "adapter").is_dir() and not c_cfg.overwrite_output_dir:
        logger.info("adapter for %s: finished in %s, reused", "+".join(covered), out_dir)
        return json.loads(summary_path.read_text(encoding="utf-8"))
    if any(out_dir.glob("checkpoint-*")) and c_cfg.resume_from_checkpoint is None:
        c_cfg = replace(c_cfg, resume_from_checkpoint="last")
    return train(m_cfg, data_cfg, c_cfg, rerouted, retained).summary


def asr_matrix(metrics: Mapping[str, Any], attack: str = "direct") -> dict[str, dict[str, float]]:
    """{model: {category: ASR}} from an evaluation's metrics (`asr_by_category`)."""
    per_model = metrics.get("asr_by_category", {}).get(attack, {})
    return {model: {c: rate["value"] for c, rate in cats.items()} for model, cats in per_model.items()}


def specificity(matrix: Mapping[str, Mapping[str, float]], base: str, categories: Sequence[str]) -> dict[str, Any]:
    """For each category's adapter: the ASR drop (base - adapter, points) on its own category and on each
    other; `specific` when its own drop is larger than every other category's."""
    out: dict[str, Any] = {}
    for category in categories:
        if category not in matrix:
            continue
        drops = {c: round(100 * (matrix[base][c] - matrix[category][c]), 1) for c in categories}
        own = drops[category]
        out[category] = {"drops": drops, "specific": all(own > d for c, d in drops.items() if c != category)}
    return out


def table_markdown(matrix: Mapping[str, Mapping[str, float]], categories: Sequence[str]) -> str:
    """A markdown table: one row per model, one column per category, ASR in percent."""
    lines = ["| model | " + " | ".join(categories) + " |", "|---|" + "---|" * len(categories)]
    for model, row in matrix.items():
        lines.append(f"| {model} | " + " | ".join(f"{100 * row.get(c, float('nan')):.0f}%" for c in categories) + " |")
    return "\n".join(lines) + "\n"


def write_table(path: str | Path, matrix: Mapping[str, Mapping[str, float]], categories: Sequence[str]) -> Path:
    """`table_markdown` in a file (categories-<attack>.md)."""
    path = Path(path)
    path.write_text(table_markdown(matrix, categories), encoding="utf-8")
    return path


def settings_dict(*configs: Any) -> dict[str, Any]:
    """The configs as plain data (for the experiment's record)."""
    out: dict[str, Any] = {}
    for cfg in configs:
        out.update(cfg.to_dict() if hasattr(cfg, "to_dict") else asdict(cfg))
    return out


def category_experiment(
    prompts: Sequence[Any],
    retain_records: Sequence[Record],
    out: str | Path,
    model_cfg: ModelConfig,
    data_cfg: DataConfig,
    cb_cfg: CircuitBreakerConfig,
    categories: Sequence[str],
    n_eval: int,
    retain_others: bool = True,
    continual: bool = True,
    replay: bool = False,
    continual_steps: int | None = None,
    attacks: Sequence[str] = ("direct",),
    completion_tokens: int = 48,
    max_new_tokens: int = 40,
    batch_size: int = 16,
    judge: str = "offline",
) -> dict[str, Any]:
    """The whole measurement, resumable: split the categories' prompts (held-out share per category),
    generate the base model's completions of the training prompts, train one adapter per category, then
    (`continual`) the first adapter continued on the second category's data (with `replay`, on both
    categories' data; `continual_steps`: its optimizer steps, default the recipe's); evaluate base, each adapter, their
    combination and the continual one on the held-out prompts; write categories.json / categories.md,
    results.json and report.html (ASR per category for every model) under `out`."""
    from ..adapters import export_merged
    from ..data.generate import generate_completions
    from ..data.prompts import read_prompts, write_prompts
    from ..data.sources import split_prompts
    from ..evaluation.compare import evaluate_models
    from ..evaluation.report import write_results
    from ..models import load_model_and_tokenizer

    out = Path(out)
    data_dir, adapters_dir = out / "data", out / "adapters"
    categories = list(categories)
    if len(categories) < 2:
        raise ValueError("a category experiment needs at least two categories")
    chosen = [p for p in prompts if p.category in categories]
    absent = [c for c in categories if not any(p.category == c for p in chosen)]
    if absent:
        raise ValueError(f"no prompts of categor{'ies' if len(absent) > 1 else 'y'} {absent}")
    train_path, eval_path = data_dir / "prompts_train.jsonl", data_dir / "prompts_eval.jsonl"
    if not eval_path.is_file():
        train_prompts, eval_prompts = split_prompts(chosen, n_eval, cb_cfg.seed)
        write_prompts(train_prompts, train_path)
        write_prompts(eval_prompts, eval_path)
    train_prompts, eval_prompts = read_prompts(train_path), read_prompts(eval_path)

    model, tokenizer = load_model_and_tokenizer(model_cfg.model_name_or_path, model_cfg.dtype, device=model_cfg.device)
    cb_records = generate_completions(
        model,
        tokenizer,
        train_prompts,
        data_dir / "gen_harmful.jsonl",
        max_new_tokens=completion_tokens,
        batch_size=batch_size,
        kind="circuit_breaker",
    )
    del model
    counts = {c: len(rows) for c, rows in by_category(cb_records).items()}
    logger.info("circuit-breaker rows per category: %s", counts)

    summaries: dict[str, Any] = {}
    for category in categories:
        summaries[category] = train_category_adapter(
            model_cfg, data_cfg, cb_cfg, cb_records, retain_records, [category], adapters_dir / category, retain_others
        )
    models: dict[str, str] = {"base": model_cfg.model_name_or_path}
    models.update({c: str(adapters_dir / c / "merged") for c in categories})
    combined = adapters_dir / COMBINED / "merged"
    parts = [adapters_dir / c / "adapter" for c in categories]
    sources = json.dumps([[str(p), (p / "adapter_model.safetensors").stat().st_mtime_ns] for p in parts])
    stamp = adapters_dir / COMBINED / "sources.json"  # rebuilt when an adapter was retrained
    if not combined.is_dir() or not stamp.is_file() or stamp.read_text(encoding="utf-8") != sources:
        export_merged(
            parts, model_cfg.model_name_or_path, combined, model_cfg.dtype, model_cfg.trust_remote_code, overwrite=True
        )
        stamp.write_text(sources, encoding="utf-8")
    models[COMBINED] = str(combined)
    first, second = categories[:2]
    continual_name = f"{first}+{second} (continual{', replay' if replay else ''})"
    if continual:
        folder = adapters_dir / f"continual-{first}+{second}{'-replay' if replay else ''}"
        c_cfg = replace(cb_cfg, max_steps=continual_steps or cb_cfg.max_steps)
        # without replay the old category is kept out of both sets; with it, its rows are rerouted again
        covered, kept = ([first, second], []) if replay else ([second], [first])
        summaries[continual_name] = train_category_adapter(
            model_cfg,
            data_cfg,
            c_cfg,
            cb_records,
            retain_records,
            covered,
            folder,
            retain_others,
            init_adapter=adapters_dir / first / "adapter",
            kept=kept,
        )
        models[continual_name] = str(folder / "merged")

    result = evaluate_models(
        models,
        eval_prompts,
        list(attacks),
        judge=judge,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        out_dir=out / "eval",
        dtype=model_cfg.dtype,
        device=model_cfg.device,
    )
    record = {
        "categories": categories,
        "rows_per_category": counts,
        "held_out_per_category": {c: sum(p.category == c for p in eval_prompts) for c in categories},
        "retain_others": retain_others,
        "training": {
            k: {kk: v.get(kk) for kk in ("cos_rerouting_start", "cos_rerouting_end", "steps")}
            for k, v in summaries.items()
        },
    }
    for attack in result.metrics.get("asr", {}):
        matrix = asr_matrix(result.metrics, attack)
        record.setdefault("asr", {})[attack] = matrix
        record.setdefault("specificity", {})[attack] = specificity(matrix, "base", categories)
        if continual and continual_name in matrix:
            alone, after = matrix[first], matrix[continual_name]
            record.setdefault("continual", {})[attack] = {
                "first_category_change_points": round(100 * (after[first] - alone[first]), 1),
                "second_category_drop_points": round(100 * (matrix["base"][second] - after[second]), 1),
                "kept_within_5_points": abs(after[first] - alone[first]) <= 0.05,
            }
        write_table(out / f"categories-{attack}.md", matrix, categories)
    (out / "categories.json").write_text(json.dumps(record, indent=2), encoding="utf-8")
    write_results(result, out, {"categories": record, "settings": settings_dict(model_cfg, data_cfg, cb_cfg)})
    return record
