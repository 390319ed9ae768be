"""Capability retention: teacher-forced loss on held-out benign completions, and an optional bridge
to lm-evaluation-harness (MMLU, ARC, local task files) that scores an already-loaded model.

The loss is the mean cross-entropy per completion token (prompt tokens excluded, end-of-turn
included) with masks from `data.render`, the same masks training uses, so "the retain set's loss
went up by x" means the same thing in training logs and here. A circuit breaker that keeps benign
behaviour leaves this loss where the base model had it.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.batching import pad_examples
from ..data.records import Record
from ..data.render import render_all


@dataclass
class LossResult:
    """Teacher-forced loss over the completion tokens of some records."""

    mean_loss: float
    perplexity: float
    mean_record_loss: float
    n_tokens: int
    n_records: int
    dropped: dict[str, int] = field(default_factory=dict)
    truncated: int = 0
    record_losses: list[float] = field(default_factory=list)

    def to_dict(self, with_records: bool = False) -> dict[str, Any]:
        out = asdict(self)
        if not with_records:
            out.pop("record_losses")
        return out


@torch.no_grad()
def _example_losses(
    model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int, progress: bool = False
) -> list[tuple[float, int]]:
    """(summed loss, counted tokens) per rendered example, in the order given.

    Batches are formed from length-sorted examples (little padding); results are put back in order.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="capability loss", leave=False):
            index = order[start : start + batch_size]
            batch = [examples[i] for i in index]
            ids, attention, mask = pad_examples(batch, pad)
            width = ids.shape[1]
            ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
            logits = model(input_ids=ids, attention_mask=attention).logits.float()
            # Token t is predicted from position t-1: a mask on the first token has no prediction.
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
            ).view(len(batch), width - 1)
            weights = mask[:, 1:].float()
            for row, i in enumerate(index):
                out[i] = (float((nll[row] * weights[row]).sum()), int(weights[row].sum()))
    finally:
        if was_training:
            model.train()
    return out


def teacher_forced_loss(
    model: Any,
    tokenizer: Any,
    records: Sequence[Record],
    batch_size: int = 8,
    max_length: int = 512,
    progress: bool = False,
) -> LossResult:
    """Mean loss per completion token of `records` (chat records whose completion is the reference
    answer). Rows that cannot be rendered are counted in `dropped`, never silently lost;
    `record_losses` follow the order of the rendered records."""
    rendered = render_all(tokenizer, records, mask_mode="completion", max_length=max_length)
    sums = _example_losses(model, tokenizer, rendered.examples, batch_size, progress)
    total, count = sum(s for s, _ in sums), sum(c for _, c in sums)
    per_record = [s / max(c, 1) for s, c in sums]
    mean = total / count if count else math.nan
    return LossResult(
        mean_loss=mean,
        perplexity=math.exp(mean) if count else math.nan,
        mean_record_loss=sum(per_record) / len(per_record) if per_record else math.nan,
        n_tokens=count,
        n_records=len(rendered.examples),
        dropped=dict(rendered.dropped),
        truncated=rendered.truncated,
        record_losses=per_record,
    )


def record_losses(
    model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8, max_length: int = 512
) -> list[float]:
    """Mean loss per completion token of each record, aligned with `records` (NaN where a record
    cannot be rendered or has no completion token), so two models' losses pair record by record."""
    examples, where = [], []
    for i, record in enumerate(records):
        rendered = render_all(tokenizer, [record], mask_mode="completion", max_length=max_length)
        if rendered.examples:
            examples.append(rendered.examples[0])
            where.append(i)
    out = [math.nan] * len(records)
    for i, (total, count) in zip(where, _example_losses(model, tokenizer, examples, batch_size)):
        out[i] = total / count if count else math.nan
    return out


LM_EVAL_INSTALL = "pip install 'circuit-breakers[capability]'"
"""How to install the optional lm-evaluation-harness bridge (the `capability` extra)."""


def lm_eval_available() -> bool:
    """Whether the optional lm-evaluation-harness bridge can run (the `capability` extra)."""
    return importlib.util.find_spec("lm_eval") is not None


def require_lm_eval() -> None:
    """Refuse (ConfigError: a setting the user mends by installing the extra) when lm-evaluation-harness is
    not installed, before any model is loaded."""
    if not lm_eval_available():
        raise ConfigError(f"lm-eval tasks need lm-evaluation-harness, which is not installed: {LM_EVAL_INSTALL}")


def parse_capability_spec(value: str) -> list[str]:
    """`lm_eval:TASK,TASK` -> the task list (names lm-eval knows, or paths of local YAML task files)."""
    backend, sep, rest = str(value).partition(":")
    tasks = [t.strip() for t in rest.split(",") if t.strip()]
    if backend.strip() != "lm_eval" or not sep or not tasks:
        raise ConfigError(
            f"capability {value!r}: expected lm_eval:TASK[,TASK...] (lm-eval task names or local task YAML files)"
        )
    return tasks


def _task_manager(tasks: Sequence[str], include_path: str | Sequence[str] | None) -> Any:
    """A TaskManager that knows `tasks`; lm-eval's own task index (thousands of YAML files) is scanned only
    when a task is neither a local YAML file nor found under `include_path`."""
    from lm_eval.tasks import TaskManager

    paths = [include_path] if isinstance(include_path, str) else list(include_path or [])
    for path in paths:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"lm-eval include path {path}: no such folder")
    local = TaskManager(include_path=paths or None, include_defaults=False)
    if all(t in local.all_tasks or Path(t).is_file() for t in tasks):
        return local
    return TaskManager(include_path=paths or None)


def _numeric(value: Any) -> float | None:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(float(value)):
        return float(value)
    return None


def run_lm_eval(
    model: Any,
    tokenizer: Any = None,
    tasks: Sequence[str] = ("mmlu",),
    batch_size: int | str = 8,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    include_path: str | Sequence[str] | None = None,
    dtype: str = "auto",
    device: str | None = None,
) -> dict[str, Any]:
    """Score a model on lm-evaluation-harness tasks: per task (and group) each metric with lm-eval's
    standard error, plus per-document values of leaf tasks so two models pair document by document.

    `model` is an already-loaded HF causal LM (with `tokenizer`) or a saved folder / hub id. Tasks are
    names lm-eval knows or local YAML task files (a task over a local JSON/JSONL file runs offline);
    `include_path` adds folders of such files. `limit` takes the first documents of each task.
    """
    require_lm_eval()
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    tasks = list(tasks)
    if not tasks:
        raise ValueError("no lm-eval tasks given")
    manager = _task_manager(tasks, include_path)
    if isinstance(model, (str, Path)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        lm = HFLM(pretrained=str(model), tokenizer=tokenizer, batch_size=batch_size, dtype=dtype, device=device)
    else:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    was_training = getattr(model, "training", False)
    try:
        output = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            log_samples=True,
        )
    finally:
        if was_training:
            model.train()
    if output is None:  # a non-zero rank under a distributed launch
        return {}
    scores: dict[str, Any] = {}
    for task, row in output.get("results", {}).items():
        metrics: dict[str, dict[str, float | None]] = {}
        for key, value in row.items():
            name, _, filter_ = key.partition(",")
            if not filter_ or name.endswith("_stderr") or _numeric(value) is None:
                continue
            label = name if filter_ == "none" else key
            stderr = _numeric(row.get(f"{name}_stderr,{filter_}"))
            metrics[label] = {"value": float(value), "stderr": stderr}
        per_doc: dict[str, dict[str, float]] = {}
        for sample in output.get("samples", {}).get(task, []):
            filter_ = sample.get("filter", "none")
            for name in sample.get("metrics", []):
                value = _numeric(sample.get(name))
                label = name if filter_ == "none" else f"{name},{filter_}"
                if value is not None and label in metrics:
                    per_doc.setdefault(label, {})[str(sample["doc_id"])] = value
        scores[task] = {
            "metrics": metrics,
            "per_doc": per_doc,
            "n": (output.get("n-samples", {}).get(task) or {}).get("effective"),
            "n_shot": output.get("n-shot", {}).get(task),
            "version": output.get("versions", {}).get(task),
        }
    return {
        "tasks": scores,
        "settings": {
            "tasks": tasks,
            "limit": limit,
            "num_fewshot": num_fewshot,
            "lm_eval_version": lm_eval.__version__,
        },
    }


def lm_eval_key(tasks: Sequence[str], options: Mapping[str, Any] | None) -> list[Any]:
    """What an lm-eval cell depends on: tasks, limit, few-shot, and for local task files their text and the
    names, sizes and times of the files beside them (the data a task YAML reads usually lies there, and a
    changed data file beside an unchanged YAML must not reuse old scores)."""
    options = dict(options or {})
    include = options.get("include_path") or []
    folders = [Path(t).parent for t in tasks if Path(t).is_file()]
    folders += [Path(p) for p in ([include] if isinstance(include, str) else include)]
    listing = [
        [str(f), sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in f.iterdir() if p.is_file())]
        for f in folders
        if f.is_dir()
    ]
    files = [Path(t).read_text(encoding="utf-8") if Path(t).is_file() else None for t in tasks]
    return [list(tasks), files, listing, options]


def lm_eval_cell(
    model: Any, tokenizer: Any, tasks: Sequence[str], options: Mapping[str, Any] | None, batch_size: int
) -> dict[str, Any]:
    """What a (model, "lm_eval") cell records: `run_lm_eval` scores of the model the evaluation already
    loaded (the harness reads it in memory, not from disk again), at the evaluation's batch size unless
    `options` name their own."""
    return {"lm_eval": run_lm_eval(model, tokenizer, list(tasks), **{"batch_size": batch_size, **dict(options or {})})}


def lm_eval_metrics(scores: Mapping[str, Mapping[str, Any]], reference: str, seed: int = 0) -> dict[str, Any]:
    """Per model, task and metric the score with lm-eval's standard error; per other model the difference
    to `reference` (other - reference). On a leaf task the difference is paired over the documents both
    were scored on (standard error of the per-document differences, bootstrap interval); on a group, whose
    documents are not kept, it is the difference of the two scores with their standard errors combined
    as if independent (`paired: false`)."""
    from .metrics import bootstrap_ci

    out: dict[str, Any] = {"scores": {}, "difference": {}}
    for name, result in scores.items():
        for task, row in result.get("tasks", {}).items():
            for metric, value in row.get("metrics", {}).items():
                out["scores"].setdefault(task, {}).setdefault(metric, {})[name] = {**value, "n": row.get("n")}
    base = scores.get(reference, {}).get("tasks", {})
    for name, result in scores.items():
        if name == reference:
            continue
        for task, row in result.get("tasks", {}).items():
            if task not in base:
                continue
            for metric, value in row.get("metrics", {}).items():
                ref = base[task].get("metrics", {}).get(metric)
                if ref is None:
                    continue
                a = base[task].get("per_doc", {}).get(metric, {})
                b = row.get("per_doc", {}).get(metric, {})
                shared = [d for d in a if d in b]
                if shared:
                    diffs = [b[d] - a[d] for d in shared]
                    n = len(diffs)
                    mean = sum(diffs) / n
                    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / (n - 1)) if n > 1 else math.nan
                    low, high = bootstrap_ci(diffs, seed=seed)
                    entry = {
                        "difference": mean,
                        "stderr": sd / math.sqrt(n),
                        "low": low,
                        "high": high,
                        "n": n,
                        "paired": True,
                    }
                else:
                    se = [ref.get("stderr"), value.get("stderr")]
                    entry = {
                        "difference": value["value"] - ref["value"],
                        "stderr": math.sqrt(se[0] ** 2 + se[1] ** 2) if None not in se else None,
                        "n": row.get("n"),
                        "paired": False,
                    }
                out["difference"].setdefault(task, {}).setdefault(metric, {})[name] = entry
    return out


def lm_eval_rows(metrics: Mapping[str, Any], models: Sequence[str]) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the report's lm-eval table: score +- standard error per model, then each other
    model's difference to the first with its standard error and interval."""

    def cell(v: Mapping[str, Any] | None, key: str = "value") -> str:
        if not v or v.get(key) is None:
            return "-"
        se = v.get("stderr")
        return f"{v[key]:.4f}" + (f" ± {se:.4f}" if se is not None and math.isfinite(se) else "")

    header = ["task", "metric", *models, *(f"{m} - {models[0]}" for m in models[1:])]
    rows = []
    for task, per_metric in metrics.get("scores", {}).items():
        for metric, per_model in per_metric.items():
            diffs = metrics.get("difference", {}).get(task, {}).get(metric, {})
            row = [task, metric, *(cell(per_model.get(m)) for m in models)]
            for m in models[1:]:
                d = diffs.get(m)
                text = cell(d, "difference")
                if d and d.get("paired") and d.get("low") is not None:
                    text += f" [{d['low']:.4f}, {d['high']:.4f}] (paired, n={d['n']})"
                row.append(text)
            rows.append(row)
    return header, rows
