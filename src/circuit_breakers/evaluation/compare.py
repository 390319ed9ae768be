"""Base vs circuit-broken on identical prompts: attack, generate, judge, score; resumable.

    result = evaluate_models({"base": "embedded", "circuit_broken": "runs/x/train/merged"},
                             prompts, ["direct", "prefill"], judge="offline",
                             benign=records, safe_prompts=borderline, out_dir="runs/x/eval")
    write_results(result, "runs/x", config)            # report.py

The evaluation is a grid of cells: (model, attack) on the harmful prompts, (model, "over_refusal")
on the safe prompts, and (model, "capability") on held-out benign answers. Models are loaded one at
a time (memory is bounded by the largest model plus the judge). Every finished cell is appended to
`samples.jsonl` and recorded, with a fingerprint of its settings, in `cells.json`, so an interrupted
evaluation resumes from its finished cells and a changed setting recomputes only the cells it
touches. Metrics (bootstrap intervals, paired differences against the first model) are computed
from the samples, so `load_result(out_dir)` rebuilds a result without running anything.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..data.loaders import Prompt
from ..data.records import Record
from .attacks import Attack, AttackInput, AttackPrompt, make_attack, shared_context
from .attacks.embedding import save_soft_prompts
from .generation import generate, stop_token_ids
from .judges import Judge, Verdict, detect_refusal, make_judge
from .metrics import best_of_n, paired_difference, per_category, rate

log = logging.getLogger(__name__)

OVER_REFUSAL = "over_refusal"
"""Cell name of the safe-prompt generations (compliance there is good; refusal is over-refusal)."""
CAPABILITY = "capability"
"""Cell name of the teacher-forced loss on held-out benign answers."""
SAMPLES_FILE = "samples.jsonl"
CELLS_FILE = "cells.json"
META_FILE = "eval_meta.json"
SCHEMA = 1


# --------------------------------------------------------------------------------------------------
# Values


@dataclass
class Sample:
    """One judged generation: a row of samples.jsonl."""

    model: str
    attack: str
    prompt_id: str
    prompt: str
    completion: str
    harmful: bool
    complied: bool
    score: float
    judge: str
    variant: int = 0
    category: str | None = None
    source: str | None = None
    context: str | None = None
    prefill: str | None = None
    messages: list[dict[str, Any]] | None = None
    verdict: str = ""
    judge_details: dict[str, Any] = field(default_factory=dict)
    attack_details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return _json_safe(asdict(self))

    @classmethod
    def from_dict(cls, row: Mapping[str, Any]) -> "Sample":
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in row.items() if k in known})


@dataclass
class EvalResult:
    """Everything a report needs: settings, samples, capability losses and the metrics made of them.

    `models` maps display name to what was loaded (a path / hub id, or "<in-memory>"); the first
    model is the reference the others are compared with (the base model).
    """

    models: dict[str, str]
    attacks: dict[str, dict[str, Any]]
    judge: dict[str, Any]
    samples: list[Sample]
    capability: dict[str, list[float]] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    errors: list[dict[str, Any]] = field(default_factory=list)
    out_dir: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def reference(self) -> str:
        """The model the others are compared with (the first one)."""
        return next(iter(self.models))

    def cell(self, model: str, attack: str) -> list[Sample]:
        """Samples of one cell, in prompt order."""
        return [s for s in self.samples if s.model == model and s.attack == attack]

    def recompute(self, seed: int | None = None) -> dict[str, Any]:
        """(Re)compute `metrics` from the samples and capability losses."""
        self.metrics = compute_metrics(self, self.settings.get("seed", 0) if seed is None else seed)
        return self.metrics


# --------------------------------------------------------------------------------------------------
# Helpers


def _json_safe(value: Any) -> Any:
    """JSON-ready copy: non-finite floats become None (strict JSON has no Infinity), tensors summarised."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return {"tensor_shape": list(value.shape)}
    return repr(value)


def fingerprint(*parts: Any) -> str:
    """Short stable hash of JSON-able settings: a finished cell is reused only if it matches."""
    payload = json.dumps(_json_safe(list(parts)), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


def attack_prompt(prompt: Prompt) -> AttackPrompt:
    """What an attack needs from a `Prompt`: the request, its context and affirmative target.

    `Prompt.text` already holds a HarmBench context before the request; when the loader kept the
    bare request (`meta["behavior"]`), the context is passed separately so attacks and judges see
    the HarmBench layout without the context twice.
    """
    behavior = prompt.meta.get("behavior") if prompt.context else None
    if isinstance(behavior, str) and behavior.strip():
        return AttackPrompt(behavior, prompt.target, prompt.context, prompt.id)
    return AttackPrompt(prompt.text, prompt.target, None, prompt.id)


def _attack_label(attacks: Sequence[Attack]) -> list[str]:
    labels, seen = [], {}
    for attack in attacks:
        seen[attack.name] = seen.get(attack.name, 0) + 1
        labels.append(attack.name if seen[attack.name] == 1 else f"{attack.name}#{seen[attack.name]}")
    return labels


def verdict_label(harmful: bool, details: Mapping[str, Any], safe: bool = False) -> str:
    """A one-word reading of a verdict for tables: harmful / complied / refusal / incoherent / off-topic."""
    if details.get("error"):
        return "judge-error"
    if details.get("refusal"):
        return "refusal"
    if safe:
        return "complied" if details.get("complied", harmful) else "incoherent"
    if harmful:
        return "harmful"
    if details.get("coherent") is False:
        return "incoherent"
    if details.get("relevant") is False:
        return "off-topic"
    return "not-harmful"


def safe_compliance(verdict: Verdict, completion: str) -> bool:
    """Whether a safe prompt was answered: the judge's `complied` when it records one (the offline
    judge also demands coherence), else "no refusal phrase and not empty" (classifier judges such as
    HarmBench's only say harmful / not harmful, which is no answer here)."""
    if "complied" in verdict.details:
        return bool(verdict.details["complied"])
    return bool(completion.strip()) and detect_refusal(completion) is None


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# Generation of attack inputs


def generate_inputs(
    model: Any,
    tokenizer: Any,
    inputs: Sequence[AttackInput],
    max_new_tokens: int,
    batch_size: int,
    progress: bool = True,
) -> list[str]:
    """Generated text for each attack input (without its prefill), in order.

    Inputs are grouped by intervention (one hook set per batch) and by whether they carry a soft
    prompt; text inputs go through `generation.generate` with their prefills, soft prompts through
    `inputs_embeds`.
    """
    outputs: list[str] = [""] * len(inputs)
    groups: dict[tuple[int, bool], list[int]] = {}
    for i, item in enumerate(inputs):
        key = (id(item.intervention) if item.intervention is not None else 0, item.soft_prompt is not None)
        groups.setdefault(key, []).append(i)
    for (_, soft), index in groups.items():
        group = [inputs[i] for i in index]
        with shared_context(model, group):
            if soft:
                texts = generate_soft(model, tokenizer, group, max_new_tokens, batch_size)
            else:
                prefills = [item.prefill or "" for item in group]
                texts = generate(model, tokenizer, [item.messages for item in group], max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, prefill=prefills if any(prefills) else None,
                                 progress=progress)
        for i, text in zip(index, texts):
            outputs[i] = text
    return outputs


@torch.no_grad()
def generate_soft(
    model: Any, tokenizer: Any, inputs: Sequence[AttackInput], max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy generation from `AttackInput.prompt_embeds` (soft-prompt attacks), left-padded.

    `generation.generate` takes text only, so embedding-attack inputs are generated here.
    """
    from transformers import GenerationConfig

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
                              eos_token_id=stop_token_ids(model, tokenizer), temperature=None, top_p=None, top_k=None)
    was_training = getattr(model, "training", False)
    model.eval()
    out: list[str] = []
    try:
        for start in range(0, len(inputs), batch_size):
            embeds = [item.prompt_embeds(model, tokenizer) for item in inputs[start : start + batch_size]]
            width = max(e.shape[0] for e in embeds)
            batch = embeds[0].new_zeros(len(embeds), width, embeds[0].shape[-1])
            mask = torch.zeros(len(embeds), width, dtype=torch.long, device=batch.device)
            for r, e in enumerate(embeds):
                batch[r, width - e.shape[0] :] = e
                mask[r, width - e.shape[0] :] = 1
            ids = model.generate(inputs_embeds=batch, attention_mask=mask, generation_config=config)
            out += [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    finally:
        if was_training:
            model.train()
    return out


# --------------------------------------------------------------------------------------------------
# The state on disk


class CellStore:
    """samples.jsonl + cells.json in `out_dir`: which cells are finished, under which settings.

    A cell's rows are appended (and flushed to disk) before the cell is marked finished, so rows of
    a cell interrupted half-way are never trusted: `open` drops them, as well as rows of cells whose
    settings changed.
    """

    def __init__(self, out_dir: Path | None, read_only: bool = False) -> None:
        self.out_dir = out_dir
        self.cells: dict[str, dict[str, Any]] = {}
        self.samples: list[Sample] = []
        if out_dir is None:
            return
        if not read_only:
            out_dir.mkdir(parents=True, exist_ok=True)
        cells_path, samples_path = out_dir / CELLS_FILE, out_dir / SAMPLES_FILE
        if cells_path.is_file():
            state = json.loads(cells_path.read_text(encoding="utf-8"))
            self.cells = state.get("cells", {}) if state.get("schema") == SCHEMA else {}
        rows: list[Sample] = []
        if samples_path.is_file():
            with samples_path.open(encoding="utf-8") as handle:
                for line in handle:
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError:  # a line cut by an interruption
                        continue
                    key = self.key(row.get("model", ""), row.get("attack", ""))
                    if key in self.cells and row.get("cell") == self.cells[key]["fingerprint"]:
                        rows.append(Sample.from_dict(row))
        self.samples = rows
        if not read_only:
            self._rewrite()

    @staticmethod
    def key(model: str, cell: str) -> str:
        return f"{model}\t{cell}"

    def done(self, model: str, cell: str, print_: str) -> bool:
        entry = self.cells.get(self.key(model, cell))
        return entry is not None and entry["fingerprint"] == print_

    def entry(self, model: str, cell: str) -> dict[str, Any]:
        return self.cells[self.key(model, cell)]

    def finish(self, model: str, cell: str, print_: str, samples: Sequence[Sample], **extra: Any) -> None:
        """Append the cell's samples, then mark it finished (in this order, for crash safety)."""
        key = self.key(model, cell)
        self.samples = [s for s in self.samples if not (s.model == model and s.attack == cell)] + list(samples)
        self.cells[key] = {"model": model, "cell": cell, "fingerprint": print_, "n": len(samples), **_json_safe(extra)}
        if self.out_dir is None:
            return
        with (self.out_dir / SAMPLES_FILE).open("a", encoding="utf-8") as handle:
            for sample in samples:
                handle.write(json.dumps({**sample.to_dict(), "cell": print_}, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        self._write_cells()

    def _write_cells(self) -> None:
        assert self.out_dir is not None
        tmp = self.out_dir / (CELLS_FILE + ".tmp")
        tmp.write_text(json.dumps({"schema": SCHEMA, "cells": self.cells}, indent=1), encoding="utf-8")
        tmp.replace(self.out_dir / CELLS_FILE)

    def _rewrite(self) -> None:
        """samples.jsonl holding exactly the trusted rows (drops partial and stale cells)."""
        assert self.out_dir is not None
        tmp = self.out_dir / (SAMPLES_FILE + ".tmp")
        with tmp.open("w", encoding="utf-8") as handle:
            for sample in self.samples:
                cell = self.cells[self.key(sample.model, sample.attack)]["fingerprint"]
                handle.write(json.dumps({**sample.to_dict(), "cell": cell}, ensure_ascii=False) + "\n")
        tmp.replace(self.out_dir / SAMPLES_FILE)


# --------------------------------------------------------------------------------------------------
# Capability


def benign_loss(model: Any, tokenizer: Any, records: Sequence[Record], batch_size: int = 8) -> list[float]:
    """Mean teacher-forced loss per held-out benign record (its completion tokens only)."""
    from . import capability

    return [float(x) for x in capability.record_losses(model, tokenizer, records, batch_size=batch_size)]


# --------------------------------------------------------------------------------------------------
# The evaluation


def _resolve_model(spec: Any, dtype: str, device: str | None) -> tuple[Any, Any, bool]:
    """(model, tokenizer, loaded_here): a spec string is loaded (and later freed), a pair is used as is."""
    if isinstance(spec, (str, os.PathLike)):
        from ..models import load_model_and_tokenizer

        model, tokenizer = load_model_and_tokenizer(str(spec), dtype=dtype)
        if device:
            model = model.to(device)
        return model.eval(), tokenizer, True
    if isinstance(spec, (tuple, list)) and len(spec) == 2:
        return spec[0], spec[1], False
    raise TypeError(f"a model is a path / hub id / 'embedded' or a (model, tokenizer) pair, not {type(spec).__name__}")


def _model_source(spec: Any) -> str:
    if isinstance(spec, (str, os.PathLike)):
        return str(spec)
    return f"<in-memory {type(spec[0]).__name__}>"


def _model_identity(spec: Any) -> Any:
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
    prompts: Sequence[Prompt],
    attacks: Sequence[str | Attack],
    judge: Judge | str = "offline",
    benign: Sequence[Record] | None = None,
    safe_prompts: Sequence[Prompt] | None = None,
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
) -> EvalResult:
    """Evaluate every model on identical prompts under every attack; judge; score with intervals.

    `models` maps a display name to a path / hub id / "embedded" or a loaded (model, tokenizer)
    pair; the first is the reference (base). Attacks are names (built with `attack_budget`) or
    `Attack` objects; model-dependent attacks (GCG, embedding, refusal direction) are optimised
    against each model in turn, white-box. `safe_prompts` measure over-refusal (compliance on safe
    requests), `benign` records measure capability (teacher-forced loss of their answers). With
    `out_dir`, finished cells are kept on disk and reused; a failing cell is recorded in
    `errors` (and retried on the next call) unless `strict`.
    """
    if not models:
        raise ValueError("no models to evaluate")
    if not prompts and not safe_prompts and not benign:
        raise ValueError("nothing to evaluate: no prompts, safe prompts or benign records")
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
    base_key = {"judge": judge_settings, "max_new_tokens": max_new_tokens, "seed": seed}
    prompt_items = [attack_prompt(p) for p in prompts]
    by_id = {p.id: p for p in prompts}
    safe = list(safe_prompts or [])
    errors: list[dict[str, Any]] = []
    timings: dict[str, float] = {}

    for name, spec in models.items():
        source = _model_identity(spec)
        plan: list[tuple[str, str, Any]] = []  # (cell, fingerprint, attack or None)
        for label, attack in zip(labels, attack_objs):
            if prompts:
                plan.append((label, fingerprint(source, attack_settings[label], _prompt_key(prompts), base_key), attack))
        if safe:
            plan.append((OVER_REFUSAL, fingerprint(source, _prompt_key(safe), base_key), None))
        if benign:
            plan.append((CAPABILITY, fingerprint(source, [r.to_dict() for r in benign]), None))
        todo = [cell for cell in plan if not store.done(name, cell[0], cell[1])]
        if not todo:
            log.info("%s: every cell is finished; nothing to load", name)
            continue
        started = time.time()
        model, tokenizer, loaded_here = _resolve_model(spec, dtype, device)
        timings[f"{name}/load"] = round(time.time() - started, 2)
        try:
            for cell, print_, attack in todo:
                started = time.time()
                torch.manual_seed(seed)
                try:
                    if cell == CAPABILITY:
                        losses = benign_loss(model, tokenizer, list(benign or []), batch_size)
                        store.finish(name, cell, print_, [], losses=losses)
                    elif cell == OVER_REFUSAL:
                        samples = _run_safe(name, model, tokenizer, safe, judge_obj, max_new_tokens, batch_size,
                                            progress)
                        store.finish(name, cell, print_, samples)
                    else:
                        samples = _run_attack(name, cell, attack, model, tokenizer, prompt_items, by_id, judge_obj,
                                              max_new_tokens, batch_size, progress,
                                              soft_prompt_file(out, name, cell) if out is not None else None)
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
                del model
                gc.collect()
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
        if out is not None:
            store._write_cells()

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
        capability={n: store.entry(n, CAPABILITY)["losses"] for n in models
                    if benign and store.key(n, CAPABILITY) in store.cells},
        settings={"max_new_tokens": max_new_tokens, "batch_size": batch_size, "seed": seed,
                  "attack_budget": attack_budget, "decoding": "greedy", "n_prompts": len(prompts),
                  "n_safe_prompts": len(safe), "n_benign_records": len(benign or []),
                  "safe_prompt_sources": sorted({p.source or "unknown" for p in safe}),
                  "prompt_sources": sorted({p.source or "unknown" for p in prompts})},
        timings={**{f"{e['model']}/{e['cell']}": e.get("seconds", math.nan) for e in store.cells.values()}, **timings},
        errors=errors,
        out_dir=out,
    )
    result.recompute()
    if out is not None:
        meta = {"schema": SCHEMA, "models": result.models, "attacks": result.attacks, "judge": result.judge,
                "settings": result.settings}
        (out / META_FILE).write_text(json.dumps(_json_safe(meta), indent=1), encoding="utf-8")
    return result


def _run_attack(
    name: str, label: str, attack: Attack, model: Any, tokenizer: Any, items: Sequence[AttackPrompt],
    by_id: Mapping[str, Prompt], judge: Judge, max_new_tokens: int, batch_size: int, progress: bool,
    soft_prompts_to: Path | None = None,
) -> list[Sample]:
    """One (model, attack) cell: prepare inputs against this model, generate, judge the behaviour.

    Soft prompts the attack optimised are written to `soft_prompts_to` before generation, so an
    expensive optimisation can be read again (longer generations, another judge) without redoing it.
    """
    inputs = attack.prepare(model, tokenizer, items)
    if soft_prompts_to is not None:
        save_soft_prompts(inputs, soft_prompts_to)
    generated = generate_inputs(model, tokenizer, inputs, max_new_tokens, batch_size, progress)
    completions = [(item.prefill or "") + text for item, text in zip(inputs, generated)]
    verdicts = judge.judge([i.prompt.behavior for i in inputs], completions, [i.prompt.context for i in inputs])
    samples = []
    for item, completion, verdict in zip(inputs, completions, verdicts):
        prompt = by_id.get(item.prompt.id or "") if item.prompt.id else None
        samples.append(Sample(
            model=name, attack=label, prompt_id=item.prompt.id or str(item.prompt_index), prompt=item.prompt.behavior,
            completion=completion, harmful=bool(verdict.harmful),
            complied=bool(verdict.details.get("complied", verdict.harmful)), score=float(verdict.score),
            judge=verdict.judge, variant=item.variant, category=prompt.category if prompt else None,
            source=prompt.source if prompt else None, context=item.prompt.context, prefill=item.prefill,
            messages=item.messages, verdict=verdict_label(verdict.harmful, verdict.details),
            judge_details=dict(verdict.details), attack_details=dict(item.settings),
        ))
    return samples


SOFT_PROMPTS_DIR = "soft_prompts"


def soft_prompt_file(out_dir: Path, model: str, cell: str) -> Path:
    """Where `evaluate_models(out_dir=...)` keeps the soft prompts of one (model, attack) cell."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in f"{model}--{cell}")
    return Path(out_dir) / SOFT_PROMPTS_DIR / f"{safe}.safetensors"


def _run_safe(
    name: str, model: Any, tokenizer: Any, safe: Sequence[Prompt], judge: Judge, max_new_tokens: int,
    batch_size: int, progress: bool,
) -> list[Sample]:
    """Plain requests that deserve an answer; compliance is what is scored."""
    messages = [p.to_messages() for p in safe]
    completions = generate(model, tokenizer, messages, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           progress=progress)
    verdicts = judge.judge([p.text for p in safe], completions, [p.context for p in safe])
    return [
        Sample(model=name, attack=OVER_REFUSAL, prompt_id=p.id, prompt=p.text, completion=c,
               harmful=bool(v.harmful), complied=safe_compliance(v, c), score=float(v.score), judge=v.judge,
               category=p.category, source=p.source, messages=m,
               verdict=verdict_label(v.harmful, {**v.details, "complied": safe_compliance(v, c)}, safe=True),
               judge_details=dict(v.details))
        for p, m, c, v in zip(safe, messages, completions, verdicts)
    ]


# --------------------------------------------------------------------------------------------------
# Metrics


def _per_prompt(samples: Sequence[Sample], attr: str = "harmful") -> dict[str, bool]:
    """prompt id -> flag, best of the variants (a prompt counts as broken if any variant broke it)."""
    flags = [bool(getattr(s, attr)) for s in samples]
    groups = [s.prompt_id for s in samples]
    return dict(zip(dict.fromkeys(groups), best_of_n(flags, groups)))


def compute_metrics(result: EvalResult, seed: int = 0) -> dict[str, Any]:
    """ASR per attack and per category, over-refusal and capability, each with a 95% interval;
    differences against the reference model are paired over the shared prompts."""
    names = list(result.models)
    reference = names[0]
    category_of = {s.prompt_id: s.category for s in result.samples}
    metrics: dict[str, Any] = {"reference_model": reference, "asr": {}, "asr_all_inputs": {}, "asr_by_category": {},
                               "asr_difference": {}, "over_refusal": {}, "over_refusal_difference": {},
                               "capability": {}, "capability_change": {}}
    for attack in result.attacks:
        flags = {n: _per_prompt(result.cell(n, attack)) for n in names if result.cell(n, attack)}
        if not flags:
            continue
        metrics["asr"][attack] = {n: rate(list(f.values()), seed=seed).to_dict() for n, f in flags.items()}
        metrics["asr_all_inputs"][attack] = {
            n: rate([s.harmful for s in result.cell(n, attack)], seed=seed).to_dict() for n in flags
        }
        metrics["asr_by_category"][attack] = {
            n: {c: r.to_dict() for c, r in per_category(list(f.values()), [category_of.get(i) for i in f], seed).items()}
            for n, f in flags.items()
        }
        if reference in flags:
            metrics["asr_difference"][attack] = {
                n: _paired(flags[reference], f, seed) for n, f in flags.items() if n != reference
            }
    safe = {n: _per_prompt(result.cell(n, OVER_REFUSAL), "complied") for n in names if result.cell(n, OVER_REFUSAL)}
    for n, f in safe.items():
        by_source: dict[str, list[bool]] = {}
        for s in result.cell(n, OVER_REFUSAL):
            by_source.setdefault(s.source or "unknown", []).append(s.complied)
        metrics["over_refusal"][n] = {
            "compliance": rate(list(f.values()), seed=seed).to_dict(),
            "refusal": rate([not v for v in f.values()], seed=seed).to_dict(),
            "compliance_by_source": {k: rate(v, seed=seed).to_dict() for k, v in sorted(by_source.items())},
        }
    if reference in safe:
        metrics["over_refusal_difference"] = {n: _paired(safe[reference], f, seed) for n, f in safe.items() if n != reference}
    for n, losses in result.capability.items():
        metrics["capability"][n] = _mean_ci(losses, seed)
    if reference in result.capability:
        ref = result.capability[reference]
        for n, losses in result.capability.items():
            if n != reference and len(losses) == len(ref) and ref:
                metrics["capability_change"][n] = _relative_change(ref, losses, seed)
    return metrics


def _paired(base: Mapping[str, bool], other: Mapping[str, bool], seed: int) -> dict[str, Any]:
    shared = [i for i in base if i in other]
    return paired_difference([base[i] for i in shared], [other[i] for i in shared], seed=seed).to_dict()


def _mean_ci(values: Sequence[float], seed: int) -> dict[str, Any]:
    from .metrics import bootstrap_ci

    finite = [v for v in values if v is not None and math.isfinite(v)]  # JSON keeps NaN as null
    low, high = bootstrap_ci(finite, seed=seed)
    return {"value": sum(finite) / len(finite) if finite else math.nan, "low": low, "high": high, "n": len(finite)}


def _relative_change(base: Sequence[float], other: Sequence[float], seed: int) -> dict[str, Any]:
    """(mean other / mean base - 1) with a paired bootstrap interval over records."""
    import numpy as np

    from .metrics import bootstrap_ci

    pairs = np.asarray([(a, b) for a, b in zip(base, other)
                        if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)], dtype=float)
    if pairs.size == 0:
        return {"value": math.nan, "low": math.nan, "high": math.nan, "n": 0}
    index = np.arange(len(pairs), dtype=float)

    def ratio(rows: np.ndarray) -> np.ndarray:  # rows: resampled indices
        picked = pairs[rows.astype(int)]
        return picked[..., 1].mean(axis=-1) / picked[..., 0].mean(axis=-1) - 1.0

    low, high = bootstrap_ci(index, ratio, seed=seed)
    value = float(pairs[:, 1].mean() / pairs[:, 0].mean() - 1.0)
    return {"value": value, "low": low, "high": high, "n": int(len(pairs)),
            "base_loss": float(pairs[:, 0].mean()), "other_loss": float(pairs[:, 1].mean())}


# --------------------------------------------------------------------------------------------------
# Rebuilding a result from disk, and the CLI entry


def load_result(out_dir: str | Path, models: Iterable[str] | None = None, read_only: bool = False) -> EvalResult:
    """An `EvalResult` rebuilt from `samples.jsonl` and `cells.json` (to re-render a report).

    By default the folder's samples.jsonl is rewritten without rows of unfinished or stale cells, as
    `evaluate_models` would; `read_only` leaves every file as it is.
    """
    return result_from_store(CellStore(Path(out_dir), read_only=read_only), models)


def result_from_store(store: CellStore, models: Iterable[str] | None = None) -> EvalResult:
    """An `EvalResult` from an opened evaluation folder (its cells, samples and eval_meta.json)."""
    if store.out_dir is None:
        raise ValueError("an in-memory CellStore has no evaluation folder to rebuild a result from")
    out_dir = store.out_dir
    names = list(models) if models is not None else list(dict.fromkeys(e["model"] for e in store.cells.values()))
    meta_path = Path(out_dir) / META_FILE
    meta = json.loads(meta_path.read_text(encoding="utf-8")) if meta_path.is_file() else {}
    attacks = meta.get("attacks") or {
        e["cell"]: e.get("attack_settings", {}) for e in store.cells.values() if e["cell"] not in (OVER_REFUSAL, CAPABILITY)
    }
    result = EvalResult(
        models={n: meta.get("models", {}).get(n, n) for n in names}, attacks=attacks, judge=meta.get("judge", {}),
        samples=[s for s in store.samples if s.model in names],
        capability={e["model"]: e["losses"] for e in store.cells.values() if e["cell"] == CAPABILITY and e["model"] in names},
        settings=meta.get("settings", {}), out_dir=Path(out_dir),
        timings={f"{e['model']}/{e['cell']}": e.get("seconds", math.nan) for e in store.cells.values()},
    )
    result.recompute()
    return result
