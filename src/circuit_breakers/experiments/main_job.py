"""The main job: prompts -> the model's own completions -> train -> merge -> evaluate -> report.

Each stage writes its outputs into the run folder and records itself in `stages.json` with a key made
from the settings it depends on; a second `run` with the same recipe skips finished stages, a changed
setting re-runs that stage and the ones after it, and an interrupted stage starts again (training
resumes from its last checkpoint).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from ..config import CircuitBreakerConfig, DataConfig, ModelConfig, RunConfig
from ..data.augment import as_refusal_retain, vary_phrasing
from ..data.generate import generate_completions, target_prefill
from ..data.prompts import Prompt, load_builtin_prompts, read_prompts, write_prompts
from ..data.records import read_records, write_records
from ..data.refusal import looks_like_refusal
from ..data.sources import (
    ALIASES,
    SourceUnavailable,
    load_source,
    parse_source_weights,
    resolve_data_root,
    split_prompts,
    split_sources,
)
from ..fileio import digest as settings_digest
from ..fileio import write_text_atomic
from ..locks import folder_lock

logger = logging.getLogger("circuit_breakers")


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


SOURCES_FILE = "sources.json"
"""The data stage's account of its harmful sources: weights, prompts trained and held out, skipped."""


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


def build_data(run_cfg: RunConfig, model_name: str, data_dir: Path, seed: int) -> None:
    """Prompt splits and the model's own completions: rerouting, retain and held-out sets.

    With `refusal_retain`, a harmful training prompt the model refuses is retained (its refusal kept, as
    the paper retains the model's refusals) instead of rerouted: the breaker must not unlearn refusing.
    """
    from ..models import load_model_and_tokenizer

    data_dir.mkdir(parents=True, exist_ok=True)
    harmful_train, held, account = harmful_splits(run_cfg, seed)
    benign_train, benign_eval = split_prompts(load_builtin_prompts("benign"), run_cfg.n_benign_eval, seed)
    borderline_train, borderline_eval = split_prompts(
        load_builtin_prompts("borderline"), run_cfg.n_borderline_eval, seed
    )
    borderline_train = borderline_train[: run_cfg.n_borderline_train]
    write_prompts([p for prompts in held.values() for p in prompts], data_dir / "harmful_eval.jsonl")
    xstest_pool, xstest_eval = xstest_safe_split(run_cfg, seed)
    write_prompts(borderline_eval + xstest_eval, data_dir / "safe_eval.jsonl")
    model, tokenizer = load_model_and_tokenizer(model_name)
    common = dict(max_new_tokens=run_cfg.completion_tokens, batch_size=run_cfg.generation_batch_size)
    prefill = target_prefill if run_cfg.harmful_prefill == "target" else run_cfg.harmful_prefill
    benign = generate_completions(
        model,
        tokenizer,
        [*benign_train[: run_cfg.n_benign_train], *benign_eval],
        data_dir / "gen_benign.jsonl",
        kind="retain",
        **common,
    )
    eval_ids = {p.id for p in benign_eval}
    if run_cfg.phrasing_variety > 0:
        exchanges = [(r.prompt, r.completion) for r in benign if r.meta.get("prompt_id") not in eval_ids]
        harmful_train = vary_phrasing(harmful_train, run_cfg.phrasing_variety, seed, exchanges)
    harmful = generate_completions(
        model,
        tokenizer,
        harmful_train,
        data_dir / "gen_harmful.jsonl",
        kind="circuit_breaker",
        prefill=prefill,
        **common,
    )
    refused, cb = [], []
    for record in harmful:
        (refused if run_cfg.refusal_retain and looks_like_refusal(record.completion) else cb).append(record)
    borderline = generate_completions(
        model, tokenizer, borderline_train, data_dir / "gen_borderline.jsonl", kind="retain", **common
    )
    if run_cfg.n_xstest_retain > 0:
        pool = xstest_pool[: run_cfg.n_xstest_retain]
        answered = generate_completions(
            model, tokenizer, pool, data_dir / "gen_xstest_safe.jsonl", kind="retain", **common
        )
        borderline += [r for r in answered if not looks_like_refusal(r.completion)]  # a refusal here is over-refusal
    write_records(cb, data_dir / "circuit_breaker.jsonl")
    write_records(
        [r for r in benign if r.meta.get("prompt_id") not in eval_ids] + borderline + as_refusal_retain(refused),
        data_dir / "retain.jsonl",
    )
    write_records([r for r in benign if r.meta.get("prompt_id") in eval_ids], data_dir / "benign_eval.jsonl")
    account["rerouted"] = {n: sum(r.source == n for r in cb) for n in account["train"]}
    account["refusals_retained"] = {n: sum(r.source == n for r in refused) for n in account["train"]}
    write_text_atomic(data_dir / SOURCES_FILE, json.dumps(account, indent=2))


def data_stage_key(model_cfg: ModelConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig) -> dict[str, Any]:
    """What the data stage depends on: two runs with the same key have the same data (the sweep shares it)."""
    prefixes = (
        "n_harmful",
        "n_benign",
        "n_borderline",
        "harmful",
        "completion",
        "leave_out",
        "data_root",
        "refusal",
        "phrasing",
        "xstest",
    )
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
    """The whole job; returns the run folder. One job per run folder at a time: a second one is refused
    (FolderLocked, naming the first) before it runs any stage."""
    check_evaluation_settings(run_cfg)
    with folder_lock(Path(run_cfg.runs_dir) / run_cfg.run_id, "run folder"):
        return run_stages(model_cfg, data_cfg, cb_cfg, run_cfg)


def run_stages(model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig) -> Path:
    """The job's stages, each skipped when its cached result is current (the caller holds the folder's lock)."""
    from ..models import resolve_model_path
    from ..training.run import train

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
    eval_keys = (
        "attacks",
        "attack_budget",
        "judge",
        "eval_max_new_tokens",
        "trigger_threshold",
    )
    eval_key = {**train_key, **{k: v for k, v in asdict(run_cfg).items() if k in eval_keys}}

    # A train folder left by a run with other settings is replaced; one left by an interrupted attempt
    # with these settings (recorded as not done) is resumed from its last checkpoint.
    stale_train = "train" in run.ledger and not run.same("train", train_key)
    stages = [
        Stage("model", model_key, lambda: resolve_model_path(model_cfg.model_name_or_path)),
        Stage("data", data_key, lambda: build_data(run_cfg, model_cfg.model_name_or_path, data_dir, cb_cfg.seed)),
        Stage("train", train_key, lambda: _train_stage(model_cfg, data_cfg, cb_cfg, train, fresh=stale_train)),
        Stage(
            "evaluate",
            eval_key,
            lambda: evaluate_stage(run_cfg, model_cfg.model_name_or_path, root, cb_cfg.target_layers),
        ),
    ]
    for stage in stages:
        run.stage(stage)
    write_text_atomic(root / "stage_seconds.json", json.dumps(run.seconds(), indent=2))
    print_summary(root, run.seconds())
    return root


def print_summary(root: Path, seconds: dict[str, float]) -> None:
    """The closing table: ASR base vs circuit-broken per attack, over-refusal, capability, stage times."""
    from rich.console import Console

    from ..evaluation.report import RESULTS_FILE
    from ..evaluation.tables import summary_table

    console = Console(stderr=True)
    results = root / RESULTS_FILE
    if results.is_file():
        table = summary_table(json.loads(results.read_text(encoding="utf-8")))
        console.print(table, highlight=False, markup=False, soft_wrap=True)  # a log keeps its rows whole
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


def xstest_safe_split(run_cfg: RunConfig, seed: int) -> tuple[list[Prompt], list[Prompt]]:
    """XSTest's safe prompts (that only look unsafe) from `xstest_path` or the data folder, split into
    (retain pool, `n_xstest` held out for over-refusal, stratified by type); empty when neither has them."""
    from ..data.loaders import load_xstest_csv

    root = resolve_data_root(run_cfg.data_root)
    xstest = run_cfg.xstest_path or (str(root / "xstest" / "xstest_prompts.csv") if root else None)
    if not xstest or not Path(xstest).is_file():
        return [], []
    return split_prompts(load_xstest_csv(xstest, label="safe"), run_cfg.n_xstest, seed)


def trigger_stage(
    result: Any, base_model: str, defended: str, benign: Sequence[Any], layers: Sequence[int] | None, threshold: float
) -> dict[str, Any]:
    """The judge-free trigger rate per held-out source (and on benign answers): `evaluation.trigger` on the
    base model's own direct answers."""
    from ..data.records import Record
    from ..evaluation.trigger import prompt_cosines, trigger_rates
    from ..models import default_target_layers, load_model, load_tokenizer, num_layers

    answers = [
        Record.from_prompt(s.prompt, s.completion, "circuit_breaker", source=s.source)
        for s in result.cell(result.reference, "direct")
        if s.completion.strip()
    ]
    records = [*answers, *benign]
    groups = [r.source or "unknown" for r in answers] + ["benign (held-out)"] * len(benign)
    tokenizer = load_tokenizer(base_model)
    base, other = load_model(base_model, dtype="float32"), load_model(defended, dtype="float32")
    layers = list(layers) if layers else default_target_layers(num_layers(base))
    cosines = prompt_cosines(base, other, tokenizer, records, layers)
    return {name: rate.to_dict() for name, rate in trigger_rates(cosines, groups, threshold).items()}


def evaluate_stage(run_cfg: RunConfig, base_model: str, root: Path, target_layers: Sequence[int] | None = None) -> None:
    """Base vs circuit-broken on the held-out prompts; writes results.json, samples.jsonl, report.html
    with held-out ASR per source and the trigger rate."""
    from ..evaluation.compare import evaluate_models
    from ..evaluation.report import write_results

    data_dir = root / "data"
    defended = str(root / "train" / "merged")
    benign = read_records(data_dir / "benign_eval.jsonl")
    result = evaluate_models(
        {"base": base_model, "circuit_broken": defended},
        read_prompts(data_dir / "harmful_eval.jsonl"),
        [a.strip() for a in run_cfg.attacks.split(",") if a.strip()],
        judge=run_cfg.judge,
        benign=benign,
        safe_prompts=read_prompts(data_dir / "safe_eval.jsonl"),
        max_new_tokens=run_cfg.eval_max_new_tokens,
        attack_budget=run_cfg.attack_budget,
        batch_size=run_cfg.generation_batch_size,
        out_dir=root / "eval",
    )
    extra: dict[str, Any] = {}
    sources_file = data_dir / SOURCES_FILE
    if sources_file.is_file():
        extra["sources"] = json.loads(sources_file.read_text(encoding="utf-8"))
    if result.cell(result.reference, "direct"):
        rates = trigger_stage(result, base_model, defended, benign, target_layers, run_cfg.trigger_threshold)
        extra["trigger_rate"] = {"circuit_broken": rates}
    write_results(result, root, {"run": asdict(run_cfg)}, run_dir=root / "train", extra=extra)
