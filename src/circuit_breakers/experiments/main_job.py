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

from ..config import CircuitBreakerConfig, DataConfig, ModelConfig, RunConfig, parse_retain_sources
from ..data.augment import as_refusal_retain, vary_phrasing
from ..data.generate import generate_completions, split_refusals, target_prefill
from ..data.mix import (
    harmful_splits,
    over_refusal_prompts,
    over_refusal_specs,
    retain_conversations,
    retain_rows,
    xstest_safe_split,
)
from ..data.prompts import Prompt, load_builtin_prompts, read_prompts, write_prompts
from ..data.records import read_records, write_records
from ..data.refusal import looks_like_refusal
from ..data.sources import GENERATED_RETAIN, resolve_data_root, split_prompts
from ..fileio import digest as settings_digest
from ..fileio import write_text_atomic
from ..generation import generation_count
from ..generation.vllm import free_vllm, is_vllm_model, load_generator, resolve_backend, vllm_loadable
from ..locks import folder_lock

logger = logging.getLogger("circuit_breakers")


@dataclass
class Stage:
    """One cached step of the job."""

    name: str
    key: dict[str, Any]
    fn: Callable[[], Any]
    where: dict[str, str] | None = None
    """Where the stage puts its models ({"device", "dtype"}), recorded in its ledger entry; None: no model."""


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
        record = {"key": self.digest(stage.key), "settings": self.plain(stage.key), **(stage.where or {})}
        self._save(stage.name, {**record, "done": False})  # an interrupted attempt is recognised later
        start, generated = time.time(), generation_count()
        stage.fn()
        spent = generation_count() - generated
        done = {"done": True, "seconds": round(time.time() - start, 1), "generated_tokens": spent.tokens}
        self._save(stage.name, {**record, **done, "generation_seconds": round(spent.seconds, 1)})
        return True

    def _save(self, name: str, entry: dict[str, Any]) -> None:
        self.ledger[name] = entry
        write_text_atomic(self.ledger_path, json.dumps(self.ledger, indent=2))

    def seconds(self) -> dict[str, float]:
        """Wall time of each stage when it last ran (0 for one copied from elsewhere)."""
        return {name: entry.get("seconds", 0.0) for name, entry in self.ledger.items()}

    def generation(self) -> dict[str, dict[str, float]]:
        """Per stage that generated text when it last ran (in this process): tokens, the seconds spent
        generating them, and tokens per second (where the job's time goes)."""
        out = {}
        for name, entry in self.ledger.items():
            tokens, seconds = entry.get("generated_tokens", 0), entry.get("generation_seconds", 0.0)
            if tokens:
                out[name] = {"tokens": tokens, "seconds": seconds, "tokens_per_s": round(tokens / max(seconds, 0.1), 1)}
        return out


SOURCES_FILE = "sources.json"
"""The data stage's account of its harmful sources: weights, prompts trained and held out, skipped."""


def build_data(
    run_cfg: RunConfig, model_name: str, data_dir: Path, seed: int, device: str = "auto", dtype: str = "auto"
) -> None:
    """Prompt splits and the model's own completions (the model on `device` in `dtype`): rerouting, retain
    and held-out sets.

    A harmful completion that refuses (read after its prefill) is never rerouted: rerouting it would teach
    the model to break its own refusals. With `refusal_retain` it is retained (its refusal kept, as the paper
    retains the model's refusals); else, with `cb_refusal_filter`, dropped; both counted in sources.json.
    Retain rows come from `retain_sources`: generated answers first (benign, borderline, XSTest, refusals, in
    the order of earlier versions), then conversation sets with their own answers.
    """

    data_dir.mkdir(parents=True, exist_ok=True)
    retain_spec = parse_retain_sources(run_cfg.retain_sources)
    harmful_train, held, account = harmful_splits(run_cfg, seed)
    benign_train, benign_eval = split_prompts(load_builtin_prompts("benign"), run_cfg.n_benign_eval, seed)
    borderline_train, borderline_eval = split_prompts(
        load_builtin_prompts("borderline"), run_cfg.n_borderline_eval, seed
    )
    borderline_train = borderline_train[: run_cfg.n_borderline_train]
    write_prompts([p for prompts in held.values() for p in prompts], data_dir / "harmful_eval.jsonl")
    xstest_pool, xstest_eval = xstest_safe_split(run_cfg, seed)
    write_prompts(borderline_eval + xstest_eval, data_dir / "safe_eval.jsonl")
    held_texts = [p.text for p in [*benign_eval, *borderline_eval, *xstest_eval, *sum(held.values(), [])]]
    conversations, skipped = retain_conversations(retain_spec, run_cfg, seed, held_texts)
    n_benign = retain_rows(retain_spec, "benign", run_cfg.n_benign_train)
    borderline_train = borderline_train[: retain_rows(retain_spec, "borderline", run_cfg.n_borderline_train)]
    n_xstest = run_cfg.n_xstest_retain  # n_xstest_retain > 0 retains XSTest answers whether or not xstest is named
    if "xstest" in retain_spec:
        n_xstest = retain_rows(retain_spec, "xstest", run_cfg.n_xstest_retain or len(xstest_pool))
    model, tokenizer = load_generator(model_name, data_backend(run_cfg, model_name, device), dtype, device, seed)
    common = dict(max_new_tokens=run_cfg.completion_tokens, batch_size=run_cfg.generation_batch_size)
    prefill = target_prefill if run_cfg.harmful_prefill == "target" else run_cfg.harmful_prefill
    benign = generate_completions(
        model,
        tokenizer,
        [*benign_train[:n_benign], *benign_eval],
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
    compliant, refusing = split_refusals(harmful, looks_like_refusal)
    cb = compliant if run_cfg.cb_refusal_filter or run_cfg.refusal_retain else harmful
    refused = refusing[: retain_spec.get("refusals")] if run_cfg.refusal_retain else []
    if len(cb) < len(harmful):
        where = "kept as refusal retain rows" if run_cfg.refusal_retain else "cb_refusal_filter"
        logger.info("dropped %d of %d harmful completions that refuse (%s)", len(refusing), len(harmful), where)
    borderline = generate_completions(
        model, tokenizer, borderline_train, data_dir / "gen_borderline.jsonl", kind="retain", **common
    )
    n_borderline = len(borderline)
    if n_xstest > 0:
        pool = xstest_pool[:n_xstest]
        answered = generate_completions(
            model, tokenizer, pool, data_dir / "gen_xstest_safe.jsonl", kind="retain", **common
        )
        borderline += [r for r in answered if not looks_like_refusal(r.completion)]  # a refusal here is over-refusal
    if is_vllm_model(model):
        free_vllm(model)  # its GPU memory back before training
    write_records(cb, data_dir / "circuit_breaker.jsonl")
    write_records(
        [r for r in benign if r.meta.get("prompt_id") not in eval_ids]
        + borderline
        + as_refusal_retain(refused)
        + conversations,
        data_dir / "retain.jsonl",
    )
    write_records([r for r in benign if r.meta.get("prompt_id") in eval_ids], data_dir / "benign_eval.jsonl")
    account["rerouted"] = {n: sum(r.source == n for r in cb) for n in account["train"]}
    account["refusals_retained"] = {n: sum(r.source == n for r in refused) for n in account["train"]}
    account["refusal_filter"] = {
        "harmful_completions": len(harmful),
        "refusing": len(refusing),
        "refusal_share": round(len(refusing) / max(len(harmful), 1), 4),
        "dropped_from_rerouting": len(harmful) - len(cb),
        "retained": len(refused),
        "prefill": run_cfg.harmful_prefill,
        "per_source": {n: sum(r.source == n for r in refusing) for n in account["train"]},
    }
    account["retain"] = {
        "sources": retain_spec,
        "rows": {
            "benign": sum(r.meta.get("prompt_id") not in eval_ids for r in benign),
            "borderline": n_borderline,
            "xstest": len(borderline) - n_borderline,
            "refusals": len(refused),
            **{n: sum(r.source == n for r in conversations) for n in retain_spec if n not in GENERATED_RETAIN},
        },
        "skipped": skipped,
    }
    write_text_atomic(data_dir / SOURCES_FILE, json.dumps(account, indent=2))


LATER_DATA_KEYS = ("retain_sources", "cb_refusal_filter")
"""Data-stage settings added after runs were cached: part of the stage's key only when not at their default."""


def data_backend(run_cfg: RunConfig, model_name: str, device: str = "auto") -> str:
    """Who generates the data stage's completions: vllm when `generation_backend` resolves to it on `device`
    (`generation.vllm.resolve_backend`) and vLLM can load the model by path (a folder or hub id), else hf."""
    from ..models import resolve_device

    backend = resolve_backend(run_cfg.generation_backend, resolve_device(device))
    return "vllm" if backend == "vllm" and vllm_loadable(model_name) else "hf"


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
    defaults = asdict(RunConfig())
    backend = data_backend(run_cfg, model_cfg.model_name_or_path, model_cfg.device)
    return {
        "model": model_cfg.model_name_or_path,
        **{k: v for k, v in asdict(run_cfg).items() if k.startswith(prefixes)},
        # keys added later count only when set: a run cached before them keeps its data stage
        **{k: getattr(run_cfg, k) for k in LATER_DATA_KEYS if getattr(run_cfg, k) != defaults[k]},
        # vLLM's completions are data of their own; HF ones keep the key they were cached under
        **({"generation_backend": backend} if backend == "vllm" else {}),
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
    from ..evaluation.judges import CLASSIFIER_MODELS, JUDGES, classifier_weights_problem
    from ..evaluation.suite import judge_spec

    attacks = [a.strip() for a in run_cfg.attacks.split(",") if a.strip()]
    if not attacks:
        raise ValueError(f"attacks is empty; choose from {sorted(ATTACKS)}")
    for name in attacks:
        if name not in ATTACKS:
            raise ValueError(f"attacks: unknown attack {name!r}; choose from {sorted(ATTACKS)}")
    if run_cfg.attack_budget not in BUDGETS:
        raise ValueError(f"attack_budget must be one of {list(BUDGETS)}, got {run_cfg.attack_budget!r}")
    name, options = judge_spec(run_cfg.judge)  # NAME[:MODEL]; an unknown name is refused with the choices
    if name in CLASSIFIER_MODELS:  # a classifier that cannot load would fail after data and training
        model = options.get("model", CLASSIFIER_MODELS[name])
        problem = classifier_weights_problem(model)
        if problem is not None:
            raise ValueError(
                f"judge {name}:{model}: {problem}; download them, name a local folder (--judge {name}:PATH), or pass "
                f"--judge {'|'.join(sorted(set(JUDGES) - set(CLASSIFIER_MODELS)))}"
            )
    over_refusal_specs(run_cfg)  # an unknown or harmful over-refusal set: refused before any stage runs
    if run_cfg.capability_tasks.strip():
        from ..evaluation.capability import require_lm_eval

        require_lm_eval()  # lm-eval tasks asked for: refused before any stage runs when the extra is missing


def run_pipeline(
    model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig
) -> Path:
    """The whole job; returns the run folder. One job per run folder at a time: a second one is refused
    (FolderLocked, naming the first) before it runs any stage."""
    check_evaluation_settings(run_cfg)
    from ..models import resolve_device

    where = resolve_device(model_cfg.device)  # a device that is not there stops the job before any stage runs
    resolve_backend(run_cfg.generation_backend, where)  # so does generation_backend vllm without vLLM installed
    with folder_lock(Path(run_cfg.runs_dir) / run_cfg.run_id, "run folder"):
        return run_stages(model_cfg, data_cfg, cb_cfg, run_cfg)


def run_stages(model_cfg: ModelConfig, data_cfg: DataConfig, cb_cfg: CircuitBreakerConfig, run_cfg: RunConfig) -> Path:
    """The job's stages, each skipped when its cached result is current (the caller holds the folder's lock)."""
    from ..models import placement, resolve_model_path
    from ..training.run import place_training, train

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
    train_key["model"].pop("device")  # where a stage runs is recorded in its entry, not part of its key
    eval_keys = (
        "attacks",
        "attack_budget",
        "judge",
        "eval_max_new_tokens",
        "trigger_threshold",
        "n_drift_eval",
        "drift_tokens",
        "capability_tasks",
        "capability_limit",
        "capability_fewshot",
        "quality_judge",
    )
    if run_cfg.over_refusal_sets.strip():  # added after runs were cached: part of the key only when set
        eval_keys += ("over_refusal_sets", "n_over_refusal_eval")
    eval_key = {**train_key, **{k: v for k, v in asdict(run_cfg).items() if k in eval_keys}}

    # A train folder left by a run with other settings is replaced; one left by an interrupted attempt
    # with these settings (recorded as not done) is resumed from its last checkpoint.
    stale_train = "train" in run.ledger and not run.same("train", train_key)
    device, dtype = model_cfg.device, model_cfg.dtype
    where = placement(device, dtype)
    eval_backend = resolve_backend(run_cfg.generation_backend, where["device"])  # vllm missing: refused here
    if eval_backend == "vllm":  # answers from vLLM are results of their own; HF runs keep their cached key
        eval_key["generation_backend"] = eval_backend
    trainer_device = place_training(model_cfg, cb_cfg).device  # the Trainer's, or the process's under a launch
    stages = [
        Stage("model", model_key, lambda: resolve_model_path(model_cfg.model_name_or_path)),
        Stage(
            "data",
            data_key,
            lambda: build_data(run_cfg, model_cfg.model_name_or_path, data_dir, cb_cfg.seed, device, dtype),
            {**where, "generation_backend": data_key.get("generation_backend", "hf")},
        ),
        Stage(
            "train",
            train_key,
            lambda: _train_stage(model_cfg, data_cfg, cb_cfg, train, fresh=stale_train),
            placement(trainer_device, dtype),
        ),
        Stage(
            "evaluate",
            eval_key,
            lambda: evaluate_stage(
                run_cfg, model_cfg.model_name_or_path, root, cb_cfg.target_layers, cb_cfg.seed, device, dtype
            ),
            {**where, "generation_backend": eval_backend},  # results.json names each model's
        ),
    ]
    for stage in stages:
        run.stage(stage)
    stage_times = {**run.seconds(), "generation": run.generation()}
    write_text_atomic(root / "stage_seconds.json", json.dumps(stage_times, indent=2))
    print_summary(root, run.seconds(), run.generation())
    return root


def print_summary(root: Path, seconds: dict[str, float], generation: dict[str, dict[str, float]] | None = None) -> None:
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
    if generation:
        rates = ", ".join(
            f"{name} {g['tokens']:,} tokens in {g['seconds']:.0f} s ({g['tokens_per_s']:.1f}/s)"
            for name, g in generation.items()
        )
        console.print(f"generation (when it ran): {rates}", highlight=False)
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


def trigger_stage(
    result: Any,
    base_model: str,
    defended: str,
    benign: Sequence[Any],
    layers: Sequence[int] | None,
    threshold: float,
    device: str = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """The judge-free trigger rate per held-out source (and on benign answers): `evaluation.trigger` on the
    base model's own direct answers, both models on `device` in `dtype`."""
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
    base, other = load_model(base_model, dtype, device=device), load_model(defended, dtype, device=device)
    layers = list(layers) if layers else default_target_layers(num_layers(base))
    cosines = prompt_cosines(base, other, tokenizer, records, layers)
    return {name: rate.to_dict() for name, rate in trigger_rates(cosines, groups, threshold).items()}


DRIFT_FILE = "drift_prompts.jsonl"
"""The benign prompts the evaluation measured distribution shift on (in the evaluation folder)."""


def drift_prompts(run_cfg: RunConfig, data_dir: Path, seed: int) -> list[Prompt]:
    """`n_drift_eval` benign prompts no training row holds: built-in benign prompts first (a seeded subset
    when there are more), then Alpaca instructions from the data folder when it has them. A prompt counts
    as trained on when its text is a user turn of the data stage's retain or rerouting records."""
    from ..data.benchmarks import load_benchmark, resolve_benchmark_path, subsample

    if run_cfg.n_drift_eval <= 0:
        return []

    def key(text: str) -> str:
        return " ".join(text.lower().split())

    trained = {
        key(str(m.get("content") or ""))
        for name in ("retain.jsonl", "circuit_breaker.jsonl")
        if (data_dir / name).is_file()
        for r in read_records(data_dir / name)
        for m in r.messages
        if m.get("role") == "user"
    }
    chosen: list[Prompt] = []
    seen = set(trained)
    pools: list[list[Prompt]] = [load_builtin_prompts("benign")]
    root = resolve_data_root(run_cfg.data_root)
    if root is not None and resolve_benchmark_path("alpaca", data_dir=root) is not None:
        pools.append(load_benchmark("alpaca", data_dir=root))
    for pool in pools:
        fresh = []
        for prompt in pool:
            if key(prompt.text) not in seen:
                seen.add(key(prompt.text))
                fresh.append(prompt)
        chosen += subsample(fresh, run_cfg.n_drift_eval - len(chosen), seed)
        if len(chosen) >= run_cfg.n_drift_eval:
            break
    if len(chosen) < run_cfg.n_drift_eval:
        logger.warning(
            "n_drift_eval %d: only %d benign prompts were never trained on (Alpaca needs the data folder)",
            run_cfg.n_drift_eval,
            len(chosen),
        )
    return chosen


def evaluate_stage(
    run_cfg: RunConfig,
    base_model: str,
    root: Path,
    target_layers: Sequence[int] | None = None,
    seed: int = 0,
    device: str = "auto",
    dtype: str = "auto",
) -> None:
    """Base vs circuit-broken on the held-out prompts (each model on `device` in `dtype`); writes results.json,
    samples.jsonl, report.html with held-out ASR per source, the trigger rate, and KL / greedy agreement on
    benign drift prompts."""
    from ..evaluation.compare import evaluate_models
    from ..evaluation.judges import CLASSIFIER_MODELS
    from ..evaluation.report import write_results
    from ..evaluation.suite import judge_spec

    judge, judge_options = judge_spec(run_cfg.judge)
    if judge in CLASSIFIER_MODELS:  # the classifier goes where the models go, one at a time
        judge_options["device"] = device
    data_dir = root / "data"
    defended = str(root / "train" / "merged")
    benign = read_records(data_dir / "benign_eval.jsonl")
    drift = drift_prompts(run_cfg, data_dir, seed)
    if drift:
        write_prompts(drift, root / "eval" / DRIFT_FILE)
    extra_safe, over_refusal_account = over_refusal_prompts(run_cfg, seed)
    result = evaluate_models(
        {"base": base_model, "circuit_broken": defended},
        read_prompts(data_dir / "harmful_eval.jsonl"),
        [a.strip() for a in run_cfg.attacks.split(",") if a.strip()],
        judge=judge,
        judge_options=judge_options,
        benign=benign,
        safe_prompts=read_prompts(data_dir / "safe_eval.jsonl") + extra_safe,
        max_new_tokens=run_cfg.eval_max_new_tokens,
        attack_budget=run_cfg.attack_budget,
        batch_size=run_cfg.generation_batch_size,
        out_dir=root / "eval",
        drift_prompts=drift,
        drift_tokens=run_cfg.drift_tokens,
        capability_tasks=[t.strip() for t in run_cfg.capability_tasks.split(",") if t.strip()],
        capability_options={
            k: v
            for k, v in (("limit", run_cfg.capability_limit), ("num_fewshot", run_cfg.capability_fewshot))
            if v is not None
        },
        quality_judge=run_cfg.quality_judge,
        dtype=dtype,
        device=device,
        generation_backend=run_cfg.generation_backend,
    )
    extra: dict[str, Any] = {}
    sources_file = data_dir / SOURCES_FILE
    if sources_file.is_file():
        extra["sources"] = json.loads(sources_file.read_text(encoding="utf-8"))
    if run_cfg.over_refusal_sets.strip():
        extra["over_refusal_sets"] = over_refusal_account
    if result.cell(result.reference, "direct"):
        rates = trigger_stage(
            result, base_model, defended, benign, target_layers, run_cfg.trigger_threshold, device, dtype
        )
        extra["trigger_rate"] = {"circuit_broken": rates}
    write_results(result, root, {"run": asdict(run_cfg)}, run_dir=root / "train", extra=extra)
