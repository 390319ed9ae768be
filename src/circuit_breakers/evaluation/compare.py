"""Base vs circuit-broken on identical prompts: attack, generate, judge, score; resumable.

    result = evaluate_models({"base": "embedded", "circuit_broken": "runs/x/train/merged"},
                             prompts, ["direct", "prefill"], judge="offline",
                             benign=records, safe_prompts=borderline, out_dir="runs/x/eval")
    write_results(result, "runs/x", config)            # report.py

The evaluation is a grid of cells: (model, attack) on the harmful prompts, (model, "over_refusal")
on the safe prompts, (model, "capability") on held-out benign answers, and on benign drift prompts
(reference, "drift_greedy": its first greedy tokens) and (model, "drift_kl": KL from the reference and
greedy agreement, both read in one teacher-forced pass over the reference's answers). Models are loaded
one at a time (memory is bounded by the largest model plus the judge), except for a drift_kl cell,
which holds the reference model beside the other. This module is the loop; the attack and over-refusal
cells are in `cells`, what the optional cells compute and record in their own modules (`drift`,
`capability` for lm-eval, `quality`).
Finished cells are kept on disk by `store.CellStore`, so an interrupted evaluation resumes and a
changed setting recomputes only the cells it touches; the samples and metrics are `results.EvalResult`.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..data.prompts import Prompt
from ..data.records import Record
from ..fileio import digest, json_safe, write_text_atomic
from ..generation.vllm import (
    free_accelerator_memory,
    free_vllm,
    is_vllm_model,
    load_generator,
    resolve_backend,
    vllm_loadable,
)
from ..models import placement
from .attacks import Attack, SearchAttack, make_attack
from .capability import lm_eval_cell, lm_eval_key
from .cells import attack_prompt, run_attack, run_safe, soft_prompt_file
from .drift import DEFAULT_DRIFT_TOKENS, drift_greedy_cell, drift_kl_cell
from .judges import NO_ANSWER_RULE, Judge, make_judge
from .quality import PairwiseJudge, make_quality_judge, quality_answers, quality_prompts, quality_verdicts
from .results import (
    CAPABILITY,
    DRIFT_GREEDY,
    DRIFT_KL,
    LM_EVAL,
    OVER_REFUSAL,
    QUALITY,
    QUALITY_ANSWERS,
    EvalResult,
)
from .store import META_FILE, SCHEMA, CellStore

log = logging.getLogger(__name__)

__all__ = ["benign_loss", "evaluate_models", "model_identity"]


def _attack_label(attacks: Sequence[Attack]) -> list[str]:
    labels, seen = [], {}
    for attack in attacks:
        seen[attack.name] = seen.get(attack.name, 0) + 1
        labels.append(attack.name if seen[attack.name] == 1 else f"{attack.name}#{seen[attack.name]}")
    return labels


def as_prompt(item: Prompt | str) -> Prompt:
    """A `Prompt` as is; a plain string as a single-turn prompt whose id is derived from its text."""
    return item if isinstance(item, Prompt) else Prompt.from_dict({"text": item})


# --------------------------------------------------------------------------------------------------
# Capability


LOSS_BATCH = 8
"""Most rows of one teacher-forced loss pass (`benign_loss`)."""


def benign_loss(model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8) -> list[float]:
    """Mean teacher-forced loss per held-out benign record (its completion tokens only). At most
    `LOSS_BATCH` rows a pass: each row holds full-vocabulary logits at every position, so the generation
    batch size would be too large here."""
    from . import capability

    size = min(batch_size, LOSS_BATCH)
    return [float(x) for x in capability.record_losses(model, tokenizer, records, batch_size=size)]


def _drift_kl(
    reference: Any,
    model: Any,
    prompts: Sequence[Prompt],
    answer_ids: Sequence[Sequence[int]],
    dtype: str,
    device: str | None,
    batch_size: int,
) -> dict[str, Any]:
    """The drift_kl cell (`drift.drift_kl_cell`) with the reference loaded beside `model` for this cell only
    and freed after it (the loop owns loading: every other cell holds one model)."""
    ref_model, ref_tokenizer, loaded_here = _resolve_model(reference, dtype, device)
    try:
        return drift_kl_cell(ref_model, model, ref_tokenizer, prompts, answer_ids, batch_size)
    finally:
        if loaded_here:
            del ref_model
            gc.collect()


# --------------------------------------------------------------------------------------------------
# The evaluation


def _resolve_model(spec: Any, dtype: str, device: str | None) -> tuple[Any, Any, bool]:
    """(model, tokenizer, loaded_here): a spec string is loaded onto `device` (None: auto) and later freed,
    a pair is used as is."""
    if isinstance(spec, (str, os.PathLike)):
        from ..models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(str(spec), dtype=dtype, device=device or "auto")
        return model.eval(), tokenizer, True
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return spec[0], spec[1], False
    raise TypeError(f"a model is a path / hub id / 'embedded' or a (model, tokenizer) pair, not {type(spec).__name__}")


VLLM_MEMORY_SHARE = 0.5
"""Share of the GPU's memory a vLLM engine takes during evaluation (vLLM's own default is 0.9): the judge, a
classifier loaded onto the same GPU for each judging call, needs the rest."""


def vllm_cell(cell: str, attack: Attack | None) -> bool:
    """Whether a cell only generates text from prompts (a text attack, the safe prompts, the quality answers), so
    a vLLM engine can answer it; white-box, soft-prompt and search attacks and the other cells need the HF model."""
    if attack is not None:
        return not attack.needs_model and not isinstance(attack, SearchAttack)
    return cell in (OVER_REFUSAL, QUALITY_ANSWERS)


def _load_generator(spec: Any, on_vllm: bool, dtype: str, device: str | None, seed: int) -> tuple[Any, Any, bool]:
    """(model, tokenizer, loaded_here) as `_resolve_model` gives them, or a vLLM engine over the same folder with
    the tokenizer HF generation renders with (the engine is fed its token ids)."""
    if not on_vllm:
        return _resolve_model(spec, dtype, device)
    share = {"gpu_memory_utilization": VLLM_MEMORY_SHARE}
    model, tokenizer = load_generator(str(spec), "vllm", dtype, device or "auto", seed, **share)
    return model, tokenizer, True


def _model_source(spec: Any) -> str:
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return f"<in-memory {type(spec[0]).__name__}>"


def model_identity(spec: Any) -> Any:
    """The source plus, for a local folder, its weight files' names, sizes and modification times:
    a model retrained into the same folder (the main job's `train/merged`) must not reuse old cells."""
    source = _model_source(spec)
    path = Path(source)
    if not isinstance(spec, (str, os.PathLike)) or not path.is_dir():
        return source
    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf"))
    return [source, [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]]


def _prompt_key(prompts: Sequence[Prompt]) -> list[Any]:
    return [[p.id, p.text, p.context, p.target] for p in prompts]


def evaluate_models(
    models: Mapping[str, Any],
    prompts: Sequence[Prompt | str],
    attacks: Sequence[str | Attack],
    judge: Judge | str = "offline",
    benign: Sequence[Record] | None = None,
    safe_prompts: Sequence[Prompt | str] | None = None,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    out_dir: str | Path | None = None,
    seed: int = 0,
    attack_budget: str = "default",
    judge_options: Mapping[str, Any] | None = None,
    dtype: str = "auto",
    device: str | None = None,
    progress: bool = True,
    strict: bool = False,
    drift_prompts: Sequence[Prompt | str] | None = None,
    drift_tokens: int = DEFAULT_DRIFT_TOKENS,
    capability_tasks: Sequence[str] = (),
    capability_options: Mapping[str, Any] | None = None,
    quality_judge: str | PairwiseJudge | None = None,
    generation_backend: str = "auto",
) -> EvalResult:
    """Evaluate every model on identical prompts under every attack; judge; score with intervals.

    `models` maps a display name to a path / hub id / "embedded" or a loaded (model, tokenizer)
    pair; the first is the reference (base). Prompts are `Prompt`s or plain strings (single-turn
    requests whose ids come from their text). Attacks are names (built with `attack_budget`) or
    `Attack` objects; model-dependent attacks (GCG, embedding, refusal direction) are optimised
    against each model in turn, white-box. `safe_prompts` measure over-refusal (compliance on safe
    requests), `benign` records measure capability (teacher-forced loss of their answers),
    `drift_prompts` (benign, never trained on) measure distribution shift: the reference's first
    `drift_tokens` greedy tokens, read by each other model for KL(reference || model) per token and
    greedy agreement (`evaluation.drift`). `capability_tasks` are lm-evaluation-harness
    tasks every model is scored on (`capability.run_lm_eval`, with `capability_options`: limit,
    num_fewshot, include_path, batch_size); `quality_judge` (a spec such as `openai:MODEL@URL` or a
    `quality.PairwiseJudge`) compares each model's answers to the `benign` prompts with the reference's
    (`evaluation.quality`). With
    `out_dir`, finished cells are kept on disk and reused; a failing cell is recorded in
    `errors` (and retried on the next call) unless `strict`. `generation_backend` (`generation.vllm.resolve_backend`):
    with vllm, a model given by folder or hub id answers the text attacks, safe and quality prompts on a vLLM
    engine first, which is freed before the HF model loads for the other cells (one model in memory at a time).
    """
    if not models:
        raise ValueError("no models to evaluate")
    where = placement(device or "auto", dtype)  # a device that is not there is refused before anything loads
    backend = resolve_backend(generation_backend, where["device"])  # vllm asked for and missing: refused here
    backends: dict[str, str] = {}
    prompts = [as_prompt(p) for p in prompts]
    safe_prompts = [as_prompt(p) for p in safe_prompts or []]
    drift = [as_prompt(p) for p in drift_prompts or []]
    if not prompts and not safe_prompts and not benign and not drift and not capability_tasks:
        raise ValueError("nothing to evaluate: no prompts, safe prompts, benign records or drift prompts")
    if drift_tokens < 1:
        raise ValueError(f"drift_tokens must be at least 1, got {drift_tokens}")
    ids = [p.id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError("prompt ids must be unique (samples and resumption are keyed by them)")
    judge_obj = make_judge(judge, **dict(judge_options or {})) if isinstance(judge, str) else judge
    attack_objs = [make_attack(a, budget=attack_budget) if isinstance(a, str) else a for a in attacks]
    labels = _attack_label(attack_objs)
    attack_settings = {label: a.settings() for label, a in zip(labels, attack_objs)}
    judge_settings = judge_obj.settings()
    out = Path(out_dir) if out_dir is not None else None
    store = CellStore(out)
    base_key = {"judge": judge_settings, "max_new_tokens": max_new_tokens, "seed": seed, "rule": NO_ANSWER_RULE}
    prompt_items = [attack_prompt(p) for p in prompts]
    by_id = {p.id: p for p in prompts}
    safe = list(safe_prompts or [])
    errors: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    reference = next(iter(models))
    drift_key = [_prompt_key(drift), drift_tokens, "answer ids"]
    lm_eval_deps = lm_eval_key(capability_tasks, capability_options)
    pairs = quality_prompts(benign or []) if quality_judge is not None else []
    if quality_judge is not None and not pairs:
        raise ValueError("the quality judge compares answers to the benign prompts: give benign records")
    quality_obj = make_quality_judge(quality_judge) if isinstance(quality_judge, str) else quality_judge

    for name, spec in models.items():
        source = model_identity(spec)
        plan: list[tuple[str, str, Any]] = []  # (cell, fingerprint, attack or None)
        for label, attack in zip(labels, attack_objs):
            if prompts:
                plan.append((label, digest(source, attack_settings[label], _prompt_key(prompts), base_key), attack))
        if safe:
            plan.append((OVER_REFUSAL, digest(source, _prompt_key(safe), base_key), None))
        if benign:
            plan.append((CAPABILITY, digest(source, [r.to_dict() for r in benign]), None))
        if capability_tasks:
            plan.append((LM_EVAL, digest(source, lm_eval_deps), None))
        if pairs:
            plan.append((QUALITY_ANSWERS, digest(source, pairs, max_new_tokens), None))
        if drift:
            if name == reference:  # the others' agreement and KL are read from their drift_kl pass
                plan.append((DRIFT_GREEDY, digest(source, drift_key), None))
            else:  # over the reference's answers: its greedy cell is part of the key
                ref_cell = store.cells.get(store.key(reference, DRIFT_GREEDY), {})
                ref_print = [model_identity(models[reference]), ref_cell.get("fingerprint")]
                plan.append((DRIFT_KL, digest(source, ref_print, drift_key), None))
        on_vllm = backend == "vllm" and vllm_loadable(spec)
        backends[name] = "vllm" if on_vllm else "hf"
        if on_vllm:  # vLLM's text is its own result (no HF cell reused); its cells first, then HF loads once
            plan = [(c, digest(p, "vllm") if vllm_cell(c, a) else p, a) for c, p, a in plan]
            plan.sort(key=lambda c: not vllm_cell(c[0], c[2]))
        todo = [cell for cell in plan if not store.done(name, cell[0], cell[1])]
        if not todo:
            log.info("%s: every cell is finished; nothing to load", name)
            continue
        model, tokenizer, loaded_here = None, None, False
        try:
            for cell, print_, attack in todo:
                wanted = on_vllm and vllm_cell(cell, attack)
                if model is None or is_vllm_model(model) != wanted:
                    if loaded_here:  # one model in memory at a time
                        if is_vllm_model(model):
                            free_vllm(model)
                        model, tokenizer, loaded_here = None, None, False
                        free_accelerator_memory()
                    started = time.time()
                    model, tokenizer, loaded_here = _load_generator(spec, wanted, dtype, device, seed)
                    timings[f"{name}/load" + ("_vllm" if wanted else "")] = round(time.time() - started, 2)
                    log.info("%s: generation backend %s", name, "vllm" if wanted else "hf")
                started = time.time()
                torch.manual_seed(seed)
                try:
                    if cell == CAPABILITY:
                        losses = benign_loss(model, tokenizer, list(benign or []), batch_size)
                        store.finish(name, cell, print_, [], losses=losses)
                    elif cell == LM_EVAL:
                        record = lm_eval_cell(model, tokenizer, capability_tasks, capability_options, batch_size)
                        store.finish(name, cell, print_, [], **record)
                    elif cell == QUALITY_ANSWERS:
                        record = quality_answers(model, tokenizer, pairs, max_new_tokens, batch_size, progress)
                        store.finish(name, cell, print_, [], **record)
                    elif cell == DRIFT_GREEDY:
                        record = drift_greedy_cell(model, tokenizer, drift, drift_tokens, batch_size, progress)
                        store.finish(name, cell, print_, [], **record)
                    elif cell == DRIFT_KL:
                        ref_key = store.key(reference, DRIFT_GREEDY)
                        if ref_key not in store.cells:
                            raise RuntimeError(f"no greedy answers of {reference} to read KL over (its cell failed)")
                        ids = store.cells[ref_key]["answer_ids"]
                        record = _drift_kl(models[reference], model, drift, ids, dtype, device, batch_size)
                        store.finish(name, cell, print_, [], **record)
                    elif cell == OVER_REFUSAL:
                        samples = run_safe(
                            name, model, tokenizer, safe, judge_obj, max_new_tokens, batch_size, progress
                        )
                        store.finish(name, cell, print_, samples)
                    else:
                        samples = run_attack(
                            name,
                            cell,
                            attack,
                            model,
                            tokenizer,
                            prompt_items,
                            by_id,
                            judge_obj,
                            max_new_tokens,
                            batch_size,
                            progress,
                            soft_prompt_file(out, name, cell) if out is not None else None,
                        )
                        settings = attack.settings()  # after prepare: fitted directions, chosen templates
                        store.finish(name, cell, print_, samples, attack_settings=settings)
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Exception as err:  # noqa: BLE001 - one failing attack must not lose the others
                    if strict:
                        raise
                    log.exception("%s / %s failed", name, cell)
                    errors.append({"model": name, "cell": cell, "error": f"{type(err).__name__}: {err}"})
                seconds = round(time.time() - started, 2)
                timings[f"{name}/{cell}"] = seconds
                if store.done(name, cell, print_):
                    store.entry(name, cell)["seconds"] = seconds
                log.info("%s / %s: %.1f s", name, cell, seconds)
        finally:
            if loaded_here:
                if is_vllm_model(model):
                    free_vllm(model)
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if out is not None:
            store.write_cells()

    if pairs:
        _quality_cells(store, list(models), pairs, quality_obj, seed, errors, strict)
    for label, attack in zip(labels, attack_objs):  # fitted settings of the reference model's cell
        for name in models:
            key = store.key(name, label)
            if key in store.cells and "attack_settings" in store.cells[key]:
                attack_settings[label] = store.cells[key]["attack_settings"]
                break
    result = EvalResult(
        models={name: _model_source(spec) for name, spec in models.items()},
        attacks=attack_settings,
        judge=judge_settings,
        samples=[s for s in store.samples if s.model in models],
        capability={
            n: store.entry(n, CAPABILITY)["losses"]
            for n in models
            if benign and store.key(n, CAPABILITY) in store.cells
        },
        greedy={
            n: store.entry(n, DRIFT_GREEDY)["answers"]
            for n in models
            if drift and store.key(n, DRIFT_GREEDY) in store.cells
        },
        drift_kl={n: store.entry(n, DRIFT_KL)["kl"] for n in models if drift and store.key(n, DRIFT_KL) in store.cells},
        lm_eval={
            n: store.entry(n, LM_EVAL)["lm_eval"]
            for n in models
            if capability_tasks and store.key(n, LM_EVAL) in store.cells
        },
        quality={
            n: store.entry(n, QUALITY)["verdicts"] for n in models if pairs and store.key(n, QUALITY) in store.cells
        },
        settings={
            "max_new_tokens": max_new_tokens,
            "batch_size": batch_size,
            "seed": seed,
            "attack_budget": attack_budget,
            "decoding": "greedy",
            **where,  # where the models given by name ran
            "generation_backend": backends,
            "n_prompts": len(prompts),
            "n_safe_prompts": len(safe),
            "n_benign_records": len(benign or []),
            "safe_prompt_sources": sorted({p.source or "unknown" for p in safe}),
            "prompt_sources": sorted({p.source or "unknown" for p in prompts}),
            **(
                {"capability_tasks": list(capability_tasks), "capability_options": dict(capability_options or {})}
                if capability_tasks
                else {}
            ),
            **({"n_quality_prompts": len(pairs)} if pairs else {}),
            **(
                {
                    "n_drift_prompts": len(drift),
                    "drift_tokens": drift_tokens,
                    "drift_prompt_sources": sorted({p.source or "unknown" for p in drift}),
                }
                if drift
                else {}
            ),
        },
        timings={**{f"{e['model']}/{e['cell']}": e.get("seconds", math.nan) for e in store.cells.values()}, **timings},
        errors=errors,
        out_dir=out,
    )
    result.recompute()
    if out is not None:
        meta = {
            "schema": SCHEMA,
            "models": result.models,
            "attacks": result.attacks,
            "judge": result.judge,
            "settings": result.settings,
        }
        write_text_atomic(out / META_FILE, json.dumps(json_safe(meta), indent=1))
    return result


def _quality_cells(
    store: CellStore,
    names: Sequence[str],
    pairs: Sequence[tuple[str, list[dict[str, Any]]]],
    judge: PairwiseJudge,
    seed: int,
    errors: list[dict[str, Any]],
    strict: bool,
) -> None:
    """The loop over the (model, "quality") cells, every model but the reference, after the models' own loop
    (the judge needs every model's answers, not a model in memory); what a cell computes and records is
    `quality.quality_verdicts`. The judge is loaded only when a cell is to be done."""
    reference = names[0]
    ref_key = store.key(reference, QUALITY_ANSWERS)
    if ref_key not in store.cells:
        return  # the reference's answers failed: recorded in errors already
    ref_answers = store.cells[ref_key]["answers"]
    used = False
    for name in names[1:]:
        key = store.key(name, QUALITY_ANSWERS)
        if key not in store.cells:
            continue
        answers = store.cells[key]["answers"]
        print_ = digest(judge.settings(), pairs, ref_answers, answers, seed)
        if store.done(name, QUALITY, print_):
            continue
        started = time.time()
        try:
            used = True
            store.finish(name, QUALITY, print_, [], **quality_verdicts(judge, pairs, ref_answers, answers, seed))
            store.entry(name, QUALITY)["seconds"] = round(time.time() - started, 2)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - a failing judge must not lose the other cells
            if strict:
                raise
            log.exception("%s / %s failed", name, QUALITY)
            errors.append({"model": name, "cell": QUALITY, "error": f"{type(err).__name__}: {err}"})
    if used and hasattr(judge, "close"):
        judge.close()
    if store.out_dir is not None:
        store.write_cells()
