"""The red-team suite: the attacks that broke circuit breakers, against every model, on identical prompts.

    suite = resolve_suite("cpu")                      # or resolve_suite("cpu", ["direct", "finetune"])
    result = run_redteam({"base": "embedded", "cb": "runs/x/train/merged"}, prompts, suite, "redteam/",
                         judge="offline", finetune_records=harmful_training_records)

Two kinds of attack share one grid of cells. Text attacks (names in `evaluation.attacks.ATTACKS`) are cells of
`evaluate_models`. Tamper attacks (`TAMPER_ATTACKS`) edit the weights and then put the suite's `tamper_attack`
(the plain request) to the edited model: each edited model is a derived model named `MODEL@POINT` (`cb@orth`,
`cb@interp0.5`, `cb@top4`, `cb@ft25`) with its own cell in the same `CellStore`. Cells of in-memory models are
keyed by name only, so `redteam.json` records what each derived model was made from (source identities,
settings, prompts, judge): a changed input recomputes it, an unchanged one is reused without loading anything.
Probe obfuscation needs the guard's probes (a layer above this one); `cli/redteam.py` runs it.
"""

from __future__ import annotations

import gc
import json
import logging
import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..data.prompts import Prompt
from ..data.records import Record
from ..evaluation.attacks import ATTACKS, BUDGETS, Attack, make_attack
from ..evaluation.compare import evaluate_models, model_identity
from ..evaluation.judges import Judge, make_judge
from ..evaluation.redteam_report import RedteamRows, redteam_rows
from ..evaluation.results import EvalResult
from ..evaluation.store import META_FILE, SCHEMA, CellStore, result_from_store
from ..evaluation.tamper.finetune import DEFAULT_STEPS, FinetuneSettings, check_no_overlap, finetune_checkpoints
from ..evaluation.tamper.weights import (
    DEFAULT_FRACTIONS,
    DEFAULT_RANKS,
    interpolation_points,
    refusal_orthogonalize,
    topk_points,
)
from ..fileio import digest, json_safe, write_text_atomic

log = logging.getLogger(__name__)

__all__ = [
    "STATE_FILE",
    "SUITES",
    "TAMPER_ATTACKS",
    "Derived",
    "RedteamError",
    "RedteamResult",
    "RedteamSuite",
    "check_model_source",
    "derived_models",
    "resolve_suite",
    "run_redteam",
]

TAMPER_ATTACKS: tuple[str, ...] = ("orthogonalize", "interpolation", "top_k", "finetune")
"""Attacks on the weights: refusal-direction orthogonalisation, interpolation back to the base, top-k truncation
of the delta to the base, LoRA fine-tuning on harmful completions (`evaluation/tamper`)."""

STATE_FILE = "redteam.json"
"""What each derived model was made from, and its tamper readings (losses, energy kept), beside cells.json."""


class RedteamError(ValueError):
    """A suite, attack, model or data set the red-team run cannot use; the message says how to fix it."""


@dataclass(frozen=True)
class RedteamSuite:
    """One suite: which attacks, at which budget, on how many prompts, and the tamper attacks' points."""

    budget: str
    """The text attacks' budget preset (`evaluation.attacks.BUDGETS`)."""
    attacks: tuple[str, ...]
    """Text attacks and tamper attacks, in report order."""
    n_prompts: int | None
    """Held-out prompts (a seeded subset; None: all)."""
    max_new_tokens: int
    interpolation: tuple[float, ...] = (1.0, 0.5, 0.0)
    """Fractions of the defended-minus-base delta kept (1: the defended model, 0: the base)."""
    top_k: tuple[int, ...] = (1, 4, 16)
    """Ranks each layer's delta is cut to."""
    finetune_steps: tuple[int, ...] = (0, 25)
    """Fine-tuning steps at which the attacked model is evaluated (0: before any step)."""
    finetune_records: int = 16
    """K: harmful training completions the fine-tuning attack uses (a seeded subset of those given)."""
    orthogonalize_instructions: int = 16
    """Harmful and harmless instructions the orthogonalised direction is measured on."""
    tamper_attack: str = "direct"
    """What is put to each tamper-attacked model."""
    obfuscation_prompts: int | None = 10
    """Prompts the probe-obfuscation attack runs on (with `--probe`; None: all)."""

    def to_dict(self) -> dict[str, Any]:
        return json_safe(asdict(self))


_TEXT_DEFAULT = ("direct", "prefill", "template", "multiturn", "best_of_n", "pair", "tap", "gcg", "embedding")

SUITES: dict[str, RedteamSuite] = {
    # Finishes on a 2-core CPU for 2 models x 40 prompts with the embedded model: short budgets, few points.
    "cpu": RedteamSuite(
        budget="cpu",
        attacks=(
            *("direct", "prefill", "template", "best_of_n", "pair", "embedding"),
            *("orthogonalize", "interpolation", "finetune"),
        ),
        n_prompts=40,
        max_new_tokens=64,
        interpolation=(1.0, 0.5, 0.0),
        finetune_steps=(0, 25),
        finetune_records=16,
        orthogonalize_instructions=16,
    ),
    # Every attack at its default budget; the curves (11 interpolation points, 5 fine-tuning points).
    "default": RedteamSuite(
        budget="default",
        attacks=(*_TEXT_DEFAULT, "refusal_direction", *TAMPER_ATTACKS),
        n_prompts=100,
        max_new_tokens=256,
        interpolation=DEFAULT_FRACTIONS,
        top_k=(1, 4, 16),
        finetune_steps=DEFAULT_STEPS,
        finetune_records=64,
        orthogonalize_instructions=64,
        obfuscation_prompts=40,
    ),
    # As the papers ran them: paper budgets, every prompt, long answers.
    "paper": RedteamSuite(
        budget="paper",
        attacks=(*_TEXT_DEFAULT, "refusal_direction", *TAMPER_ATTACKS),
        n_prompts=None,
        max_new_tokens=512,
        interpolation=DEFAULT_FRACTIONS,
        top_k=DEFAULT_RANKS,
        finetune_steps=DEFAULT_STEPS,
        finetune_records=64,
        orthogonalize_instructions=128,
        obfuscation_prompts=None,
    ),
}
"""The suites by name; `resolve_suite` picks one and applies overrides."""


def resolve_suite(name: str, attacks: Sequence[str] | None = None, **overrides: Any) -> RedteamSuite:
    """The suite `name` with `attacks` (text and tamper names) and field `overrides` in place of its own; every
    name is checked here, before anything is loaded."""
    if name not in SUITES:
        raise RedteamError(f"unknown suite {name!r}; choose one of {sorted(SUITES)}")
    suite = SUITES[name]
    if attacks is not None:
        attacks = [a.strip() for a in attacks if a.strip()]
        if not attacks:
            raise RedteamError("--attacks names no attack; give a comma-separated list such as direct,finetune")
        unknown = [a for a in attacks if a not in ATTACKS and a not in TAMPER_ATTACKS]
        if unknown:
            raise RedteamError(
                f"unknown attack {unknown[0]!r}; choose from {sorted(ATTACKS)} (text) "
                f"or {list(TAMPER_ATTACKS)} (tamper)"
            )
        suite = replace(suite, attacks=tuple(dict.fromkeys(attacks)))
    fields = set(RedteamSuite.__dataclass_fields__)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise RedteamError(f"a suite has no setting {unknown[0]!r}; it has {sorted(fields)}")
    suite = replace(suite, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    check_suite(suite)
    return suite


def check_suite(suite: RedteamSuite) -> None:
    """Refuse settings no run can use (RedteamError naming the setting)."""
    if suite.budget not in BUDGETS:
        raise RedteamError(f"unknown budget {suite.budget!r}; choose one of {BUDGETS}")
    if suite.tamper_attack not in ATTACKS:
        raise RedteamError(f"tamper_attack {suite.tamper_attack!r} is not a text attack; choose from {sorted(ATTACKS)}")
    if suite.n_prompts is not None and suite.n_prompts < 1:
        raise RedteamError(f"n_prompts must be at least 1, got {suite.n_prompts}")
    if suite.obfuscation_prompts is not None and suite.obfuscation_prompts < 1:
        raise RedteamError(f"obfuscation_prompts must be at least 1, got {suite.obfuscation_prompts}")
    if suite.max_new_tokens < 1:
        raise RedteamError(f"max_new_tokens must be at least 1, got {suite.max_new_tokens}")
    if "interpolation" in suite.attacks and (
        not suite.interpolation or any(not 0 <= f <= 1 for f in suite.interpolation)
    ):
        raise RedteamError(f"interpolation fractions must lie in [0, 1], got {list(suite.interpolation)}")
    if "top_k" in suite.attacks and (not suite.top_k or min(suite.top_k) < 1):
        raise RedteamError(f"top-k ranks must be at least 1, got {list(suite.top_k)}")
    if "finetune" in suite.attacks:
        if not suite.finetune_steps or min(suite.finetune_steps) < 0:
            raise RedteamError(f"fine-tuning steps must be at least 0, got {list(suite.finetune_steps)}")
        if suite.finetune_records < 1:
            raise RedteamError(f"finetune_records must be at least 1, got {suite.finetune_records}")


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_model_source(name: str, spec: str) -> None:
    """Refuse a model that cannot be there: a path (absolute, relative with ./ or ../, or with more than one
    part) that does not exist, or a file that is not a .gguf. `embedded` and `org/name` hub ids pass."""
    text = str(spec)
    path = Path(text).expanduser()
    if path.exists():
        if path.is_file() and path.suffix != ".gguf":
            raise RedteamError(f"--model {name}={spec}: a file, not a model folder; give the folder with config.json")
        return
    if text == "embedded" or (_HUB_ID.fullmatch(text) and not text.startswith(".")):
        return
    raise RedteamError(f"--model {name}={spec}: no such folder; give a model folder, a hub id or `embedded`")


@dataclass(frozen=True)
class Derived:
    """A tamper-attacked model: `source` (a model of the run) edited by `kind` at `value`."""

    name: str
    source: str
    kind: str
    value: float


def derived_name(source: str, kind: str, value: float) -> str:
    """`cb@orth`, `cb@interp0.5`, `cb@top4`, `cb@ft25`: the derived model's display name and cell key."""
    short = {"orthogonalize": "orth", "interpolation": "interp", "top_k": "top", "finetune": "ft"}[kind]
    return f"{source}@{short}" if kind == "orthogonalize" else f"{source}@{short}{value:g}"


def derived_models(names: Sequence[str], suite: RedteamSuite) -> list[Derived]:
    """Every derived model of the suite, in report order: orthogonalisation and fine-tuning of every model,
    interpolation and top-k of every model but the first (they move a model towards the first, the base)."""
    out: list[Derived] = []
    for kind in suite.attacks:
        if kind not in TAMPER_ATTACKS:
            continue
        for source in names:
            if kind == "orthogonalize":
                values: tuple[float, ...] = (0.0,)
            elif kind == "finetune":
                values = tuple(sorted(set(suite.finetune_steps)))
            elif source == names[0]:
                continue
            else:
                values = suite.interpolation if kind == "interpolation" else suite.top_k
            out += [Derived(derived_name(source, kind, v), source, kind, float(v)) for v in values]
    return out


@dataclass
class RedteamResult:
    """The whole grid (`result`, derived models included) and the red-team view of it (`rows`: table and
    curves)."""

    suite: RedteamSuite
    result: EvalResult
    rows: RedteamRows
    derived: list[Derived] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return json_safe(
            {
                "suite": self.suite.to_dict(),
                "derived": {d.name: asdict(d) for d in self.derived},
                **self.rows.to_dict(),
            }
        )


def _load(spec: str, dtype: str, device: str | None) -> tuple[Any, Any]:
    from .. import models

    model, tokenizer = models.load_model_and_tokenizer(str(spec), dtype=dtype)
    if device:
        model = model.to(device)
    return model.eval(), tokenizer


def _read_state(out: Path) -> dict[str, Any]:
    path = out / STATE_FILE
    state = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    return {"derived": dict(state.get("derived", {})), "points": dict(state.get("points", {}))}


def _write_state(out: Path, state: Mapping[str, Any]) -> None:
    write_text_atomic(out / STATE_FILE, json.dumps(json_safe(dict(state)), indent=1))


def pick_records(records: Sequence[Record], k: int, seed: int) -> list[Record]:
    """K training records: all when there are at most K, else a seeded random subset in their order."""
    if len(records) <= k:
        return list(records)
    keep = sorted(random.Random(seed).sample(range(len(records)), k))
    return [records[i] for i in keep]


def run_redteam(
    models: Mapping[str, str],
    prompts: Sequence[Prompt],
    suite: RedteamSuite,
    out_dir: str | Path,
    judge: Judge | str = "offline",
    judge_options: Mapping[str, Any] | None = None,
    finetune_records: Sequence[Record] | None = None,
    benign: Sequence[Record] | None = None,
    batch_size: int = 8,
    seed: int = 0,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = True,
) -> RedteamResult:
    """Run `suite` against `models` ({display name: path / hub id / "embedded"}; the first is the base) on
    `prompts`, judged by `judge`; cells finished in `out_dir` are reused. `finetune_records` are harmful training
    completions (never the evaluation prompts: refused here) for the fine-tuning attack; `benign` records give its
    capability cost. Every input is checked before a model is loaded."""
    if not models:
        raise RedteamError("give at least one --model (the first is the base)")
    for name, spec in models.items():
        if "@" in name:
            raise RedteamError(f"--model {name}={spec}: '@' is kept for derived models (cb@ft25); rename it")
        check_model_source(name, spec)
    prompts = list(prompts)
    if not prompts:
        raise RedteamError("no evaluation prompts; give --prompts FILE or --benchmark NAME")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise RedteamError("prompt ids must be unique (cells and paired differences are keyed by them)")
    check_suite(suite)
    names = list(models)
    tamper = [a for a in suite.attacks if a in TAMPER_ATTACKS]
    if len(names) < 2 and any(a in ("interpolation", "top_k") for a in tamper):
        raise RedteamError("interpolation and top_k move a defended model towards the base: give two --model")
    records: list[Record] = []
    if "finetune" in tamper:
        if not finetune_records:
            raise RedteamError(
                "the fine-tuning attack needs harmful training completions: give --run RUN_DIR (its "
                "data/circuit_breaker.jsonl) or --finetune_data FILE, or leave finetune out of --attacks"
            )
        records = pick_records(finetune_records, suite.finetune_records, seed)
        check_no_overlap(records, prompts)
    text_names = [a for a in suite.attacks if a in ATTACKS]
    if tamper and suite.tamper_attack not in text_names:  # the untouched models under it: the tamper rows' reference
        text_names.append(suite.tamper_attack)
    text_objs = [make_attack(a, budget=suite.budget) for a in text_names]
    tamper_obj = make_attack(suite.tamper_attack, budget=suite.budget)
    judge_obj = make_judge(judge, **dict(judge_options or {})) if isinstance(judge, str) else judge
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    common: dict[str, Any] = {
        "judge": judge_obj,
        "max_new_tokens": suite.max_new_tokens,
        "batch_size": batch_size,
        "out_dir": out,
        "seed": seed,
        "attack_budget": suite.budget,
        "dtype": dtype,
        "device": device,
        "progress": progress,
    }
    errors: list[dict[str, Any]] = []
    attack_settings: dict[str, Any] = {}
    if text_objs:
        text = evaluate_models(dict(models), prompts, text_objs, **common)
        errors += text.errors
        attack_settings.update(text.attacks)

    derived = derived_models(names, suite)
    if derived:
        errors += _run_derived(models, prompts, suite, derived, tamper_obj, judge_obj, records, benign, common)
    store = CellStore(out)
    if tamper_obj.name not in attack_settings:
        attack_settings[tamper_obj.name] = _cell_settings(store, tamper_obj, names + [d.name for d in derived])
    every = names + [d.name for d in derived]
    result = result_from_store(store, [n for n in every if any(e["model"] == n for e in store.cells.values())])
    result.models = {
        n: str(models[n]) if n in models else f"{next(d for d in derived if d.name == n).source} (tamper-attacked)"
        for n in result.models
    }
    result.attacks = attack_settings
    result.judge = judge_obj.settings()
    result.errors = errors
    result.settings = {
        "max_new_tokens": suite.max_new_tokens,
        "batch_size": batch_size,
        "seed": seed,
        "attack_budget": suite.budget,
        "decoding": "greedy",
        "dtype": dtype,
        "n_prompts": len(prompts),
        "prompt_sources": sorted({p.source or "unknown" for p in prompts}),
        "n_finetune_records": len(records),
    }
    result.recompute()
    meta = {"schema": SCHEMA, "models": result.models, "attacks": result.attacks, "judge": result.judge}
    write_text_atomic(out / META_FILE, json.dumps(json_safe({**meta, "settings": result.settings}), indent=1))
    state = _read_state(out)
    rows = redteam_rows(result, names, suite.attacks, tamper_obj.name, _points(derived, state), seed)
    return RedteamResult(suite, result, rows, derived)


def _cell_settings(store: CellStore, attack: Attack, names: Sequence[str]) -> dict[str, Any]:
    for name in names:
        entry = store.cells.get(store.key(name, attack.name))
        if entry and "attack_settings" in entry:
            return entry["attack_settings"]
    return attack.settings()


def _points(derived: Sequence[Derived], state: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """{derived name: its kind, source, value and the tamper readings recorded for it}."""
    return {d.name: {**asdict(d), **state["points"].get(d.name, {})} for d in derived}


def _origin(
    d: Derived,
    models: Mapping[str, str],
    suite: RedteamSuite,
    records: Sequence[Record],
    prompts: Sequence[Prompt],
    tamper_obj: Attack,
    judge_obj: Judge,
    common: Mapping[str, Any],
) -> str:
    """Everything a derived model's cell depends on: its source (and the base for the delta attacks), how it was
    made, and how it is evaluated."""
    base = next(iter(models))
    made: Any
    if d.kind == "finetune":
        made = [[r.to_dict() for r in records], FinetuneSettings(steps=(int(d.value),), seed=common["seed"]).to_dict()]
    elif d.kind == "orthogonalize":
        made = [suite.orthogonalize_instructions, [p.text for p in prompts]]
    else:
        made = model_identity(models[base])
    evaluated = [
        judge_obj.settings(),
        tamper_obj.settings(),
        [[p.id, p.text, p.context, p.target] for p in prompts],
        common["max_new_tokens"],
        common["seed"],
        common["dtype"],
    ]
    return digest(d.kind, d.value, model_identity(models[d.source]), made, evaluated)


def _run_derived(
    models: Mapping[str, str],
    prompts: Sequence[Prompt],
    suite: RedteamSuite,
    derived: Sequence[Derived],
    tamper_obj: Attack,
    judge_obj: Judge,
    records: Sequence[Record],
    benign: Sequence[Record] | None,
    common: Mapping[str, Any],
) -> list[dict[str, Any]]:
    """Make and evaluate the derived models whose cells are not finished under the same origin; one load of each
    source model serves all of its derived models (and one load of the base, the delta attacks)."""
    out: Path = common["out_dir"]
    state = _read_state(out)
    store = CellStore(out)
    origins = {d.name: _origin(d, models, suite, records, prompts, tamper_obj, judge_obj, common) for d in derived}
    todo = []
    for d in derived:
        if state["derived"].get(d.name) == origins[d.name] and store.key(d.name, tamper_obj.name) in store.cells:
            continue
        for key in [k for k, e in store.cells.items() if e["model"] == d.name]:  # stale: made from other inputs
            del store.cells[key]
        state["derived"].pop(d.name, None)
        todo.append(d)
    if not todo:
        log.info("every tamper-attacked cell is finished; nothing to load")
        return []
    store.write_cells()
    _write_state(out, state)
    errors: list[dict[str, Any]] = []
    base = next(iter(models))

    def evaluate(d: Derived, model: Any, tokenizer: Any, reading: Mapping[str, Any]) -> None:
        state["points"][d.name] = dict(reading)
        result = evaluate_models({d.name: (model, tokenizer)}, prompts, [tamper_obj], **common)
        errors.extend(result.errors)
        if not result.errors:
            state["derived"][d.name] = origins[d.name]
        _write_state(out, state)

    for source in models:
        mine = [d for d in todo if d.source == source]
        if not mine:
            continue
        model, tokenizer = _load(models[source], common["dtype"], common["device"])
        try:
            delta = [d for d in mine if d.kind in ("interpolation", "top_k")]
            if delta:
                base_model, _ = _load(models[base], common["dtype"], common["device"])
                start = {k: v.detach().clone() for k, v in base_model.state_dict().items()}
                del base_model
                end = {k: v.detach().clone() for k, v in model.state_dict().items()}
                fractions = [d.value for d in delta if d.kind == "interpolation"]
                by_value = {(d.kind, d.value): d for d in delta}
                if fractions:
                    for point, attacked in interpolation_points(model, start, end, fractions):
                        evaluate(by_value["interpolation", point.value], attacked, tokenizer, point.to_dict())
                ranks = [int(d.value) for d in delta if d.kind == "top_k"]
                if ranks:
                    for point, attacked in topk_points(model, start, end, ranks):
                        evaluate(by_value["top_k", float(point.value)], attacked, tokenizer, point.to_dict())
                del start, end
            tuned = {int(d.value): d for d in mine if d.kind == "finetune"}
            if tuned:
                settings = FinetuneSettings(steps=tuple(sorted(set(suite.finetune_steps))), seed=common["seed"])
                checkpoints = finetune_checkpoints(model, tokenizer, records, prompts, settings, benign)
                try:
                    for point, attacked in checkpoints:
                        if point.step in tuned:
                            evaluate(tuned[point.step], attacked, tokenizer, point.to_dict())
                        if point.step >= max(tuned):
                            break
                finally:
                    checkpoints.close()  # removes the LoRA even after an early stop
            for d in mine:
                if d.kind == "orthogonalize":  # last: edits the loaded model in place
                    harmful = [p.meta.get("behavior") or p.text for p in prompts]
                    info = refusal_orthogonalize(
                        model, tokenizer, harmful, n_instructions=suite.orthogonalize_instructions
                    )
                    evaluate(d, model, tokenizer, info.to_dict())
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - one failing tamper attack must not lose the others
            log.exception("tamper attacks on %s failed", source)
            errors.append({"model": source, "cell": "tamper", "error": f"{type(err).__name__}: {err}"})
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return errors
