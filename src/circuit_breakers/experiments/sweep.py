"""Ablations as one command: the main job over a grid of recipe settings, then one table.

    grid = parse_grid(["alpha=5|10", "target_layers=[10,20]|[10,12,14,16,18,20]"])
    doc = run_sweep(grid, recipe="embedded", sweep_id="layers")   # runs/layers/<point>/ each a full run
    print(sweep_markdown(doc))

Each grid point is a full main job (`main_job.run_pipeline`) in `runs/<sweep_id>/<point>/`, with its own
`recipe.yaml` (the recipe plus the point's settings). Points that share the data settings share the
work that depends only on them: the data stage and the base model's evaluation cells are copied from an
earlier point instead of being computed again. Re-running the same sweep reuses finished stages (the
main job's ledger), so an interrupted sweep is resumed by running it again.
"""

from __future__ import annotations

import datetime as _dt
import itertools
import json
import logging
import re
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from ..config import ConfigError
from ..fileio import digest as settings_digest
from ..fileio import write_text_atomic
from ..locks import folder_lock
from ..recipes import check_settings, load_recipe, parse_run_config, parse_settings, unknown_key_error, valid_keys
from .main_job import Run, check_evaluation_settings, run_pipeline
from .main_job import data_stage_key as pipeline_data_key

logger = logging.getLogger("circuit_breakers")

SWEEP_FILE = "sweep.json"
TABLE_FILE = "sweep.md"
POINT_RECIPE = "recipe.yaml"
SWEEP_OWNED = ("run_id", "runs_dir")
"""Keys the sweep sets for every point (its folder), so a grid may not vary them."""
SHARED_STAGES = ("model", "data")
"""Ledger stages a point takes over from an earlier point with the same data settings."""
GRID_HELP = """\
A grid is one or more --grid KEY=V1|V2|... options; KEY is any recipe key, each value is read as
YAML (so numbers, true/false, null and lists work). Every combination is one main job, in
runs/<sweep_id>/<KEY=V,...>/. Example, the paper's target-layer ablation at two loss scales:

  circuit-breakers sweep --grid 'target_layers=[10,20]|[10,12,14,16,18,20]' --grid 'alpha=5|10' --max_steps 30

Points with the same data settings generate the data and evaluate the base model once. Running the
same command again resumes: finished stages are reused. Results: runs/<sweep_id>/sweep.json and sweep.md.
"""


# --------------------------------------------------------------------------------------------------
# The grid


def parse_grid(values: Sequence[str]) -> dict[str, list[Any]]:
    """`KEY=V1|V2|...` strings as {key: [values]}, values read as YAML like a recipe's.

    Unknown keys are refused with the recipe loader's own "did you mean" message, before anything runs.
    """
    grid: dict[str, list[Any]] = {}
    for item in values:
        key, eq, rest = item.partition("=")
        key = key.strip()
        if not eq or not key or not rest.strip():
            raise ConfigError(f"grid {item!r}: expected KEY=V1|V2|..., e.g. alpha=5|10")
        if key in grid:
            raise ConfigError(f"grid key {key} is given twice; put all its values in one --grid {key}=V1|V2")
        if any(not v.strip() for v in rest.split("|")):
            raise ConfigError(f"grid {item!r}: empty value (write null for none)")
        try:
            parsed = [yaml.safe_load(v) for v in rest.split("|")]
        except yaml.YAMLError as err:
            raise ConfigError(f"grid {item!r}: a value is not valid YAML: {' '.join(str(err).split())}") from err
        if len({json.dumps(v, sort_keys=True, default=str) for v in parsed}) != len(parsed):
            raise ConfigError(f"grid {item!r}: a value is repeated")
        grid[key] = parsed
    unknown = [k for k in grid if k not in valid_keys()]
    if unknown:
        raise unknown_key_error(unknown, "grid")
    owned = [k for k in grid if k in SWEEP_OWNED]
    if owned:
        raise ConfigError(f"grid key(s) {', '.join(owned)}: the sweep sets these itself (one folder per point)")
    return grid


def _name_part(value: Any) -> str:
    """A value as it reads in a folder name: lists joined by '-', anything unsafe in a path as '_'."""
    if isinstance(value, (list, tuple)):
        text = "-".join(_name_part(v) for v in value)
    elif isinstance(value, bool) or value is None:
        text = json.dumps(value)
    elif isinstance(value, Mapping):
        text = json.dumps(value, sort_keys=True, default=str)
    else:
        text = str(value)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _short_hash(overrides: Mapping[str, Any]) -> str:
    """Eight hex digits that tell apart points whose readable names are cut or collide."""
    return settings_digest(overrides, length=8)


def grid_points(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination, in the grid's key order with the last key varying fastest, each as
    {"name": "alpha=5,max_steps=30", "overrides": {...}}: a stable order and readable, safe folder names."""
    keys = list(grid)
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        overrides = dict(zip(keys, combo))
        name = ",".join(f"{k}={_name_part(v)}" for k, v in overrides.items())
        if len(name) > 120:  # keep far below the 255-byte limit of a path component
            name = f"{name[:100]}-{_short_hash(overrides)}"
        points.append({"name": name, "overrides": overrides})
    names = [p["name"] for p in points]
    for point in points:  # values that differ only in unsafe characters would share a folder
        if names.count(point["name"]) > 1:
            point["name"] = f"{point['name']}-{_short_hash(point['overrides'])}"
    return points


# --------------------------------------------------------------------------------------------------
# Running


def point_configs(
    recipe: str | Path, overrides: Mapping[str, Any], shared: Mapping[str, Any], recipe_file: Path
) -> tuple:
    """The main job's configs for one point: `recipe` plus the point's `overrides` and the settings
    `shared` by every point, written to `recipe_file` (so `run --config <point>/recipe.yaml` re-runs the
    point on its own). The recipe loader checks every value, as it checks a hand-written recipe."""
    settings = {**load_recipe(recipe), **shared, **overrides}
    header = (
        f"# sweep point: recipe {recipe} with {json.dumps(overrides, default=str)}\n"
        f"# settings shared by every point: {json.dumps(dict(shared), default=str) if shared else 'none'}\n"
    )
    write_text_atomic(recipe_file, header + yaml.safe_dump(settings, sort_keys=False))
    return parse_run_config([], recipe=recipe_file)


def data_stage_key(configs: Sequence[Any]) -> dict[str, Any]:
    """The key the main job records for its `data` stage, from a point's (model, data, train, run) configs."""
    model_cfg, _, cb_cfg, run_cfg = configs
    return pipeline_data_key(model_cfg, cb_cfg, run_cfg)


def _ledger(root: Path) -> dict[str, Any]:
    path = root / "stages.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _data_done(ledger: Mapping[str, Any], digest: str) -> bool:
    entry = ledger.get("data") or {}
    return bool(entry.get("done")) and entry.get("key") == digest and bool((ledger.get("model") or {}).get("done"))


def share_data(source: Path, target: Path) -> None:
    """Give `target` the data stage of `source` (same data key): its `data/` folder and ledger entries,
    and its `eval/` cells, so the base model's cells are reused (the circuit-broken model's are keyed
    by its own merged folder and are computed again). Later stages recorded in `target` are marked
    unfinished: they were made from other data."""
    for folder in ("data", "eval"):
        if (target / folder).exists():
            shutil.rmtree(target / folder)
        if (source / folder).is_dir():
            shutil.copytree(source / folder, target / folder)
    theirs, ours = _ledger(source), _ledger(target)
    ledger = {name: {**theirs[name], "seconds": 0.0, "copied_from": source.name} for name in SHARED_STAGES}
    ledger.update({name: {**entry, "done": False} for name, entry in ours.items() if name not in SHARED_STAGES})
    write_text_atomic(target / "stages.json", json.dumps(ledger, indent=2))


def _data_source(points: Sequence[Mapping[str, Any]], digest: str) -> Path | None:
    """The latest earlier point whose finished data stage has this key, preferring one with
    evaluation cells (it holds the most base-model cells). Its ledger must record the key this module
    computes for it: the guard against `data_stage_key` drifting from the pipeline's."""
    matching = [
        Path(p["run_dir"])
        for p in points
        if p["data_digest"] == digest and _data_done(_ledger(Path(p["run_dir"])), digest)
    ]
    with_cells = [root for root in matching if (root / "eval").is_dir()]
    return (with_cells or matching or [None])[-1]


def run_sweep(
    grid: Mapping[str, Sequence[Any]],
    recipe: str | Path = "embedded",
    overrides: Mapping[str, Any] | None = None,
    sweep_id: str | None = None,
    strict: bool = False,
    data_from: str | Path | None = None,
) -> dict[str, Any]:
    """Run the main job at every grid point; write sweep.json and sweep.md and print the table.

    `overrides` are recipe settings (key -> value, checked as a recipe's) applied to every point (the
    CLI reads them from `--key value` arguments). A failing point is recorded with its error and the
    sweep goes on, unless `strict`. Every point is checked before the first one runs, so a bad value
    fails at once. Returns sweep.json's document. `data_from`: a finished main-job folder whose data
    stage (and base-model cells) a point takes when its data settings match (the recorded key is
    compared), as it would from an earlier point.
    """
    overrides = check_settings(overrides or {}, "overrides")
    both = [k for k in grid if k in overrides]
    if both:
        raise ConfigError(f"{', '.join(both)}: set both by the grid and as an override; keep one")
    base = parse_settings(overrides, recipe=recipe)
    if sweep_id is None:
        sweep_id = _name_part(f"{base[3].run_id}-sweep-{'-'.join(grid)}")
    if not sweep_id or Path(sweep_id).name != sweep_id or sweep_id in (".", ".."):
        raise ConfigError(f"sweep id {sweep_id!r} must be a plain folder name")
    root = Path(base[3].runs_dir) / sweep_id
    with folder_lock(root, "sweep folder"):  # one sweep per folder at a time; each point locks its own
        return _run_points(grid, recipe, overrides, sweep_id, root, strict, data_from)


def _run_points(
    grid: Mapping[str, Sequence[Any]],
    recipe: str | Path,
    overrides: dict[str, Any],
    sweep_id: str,
    root: Path,
    strict: bool,
    data_from: str | Path | None,
) -> dict[str, Any]:
    points = grid_points(grid)
    configs = []
    for point in points:  # all checked (and their recipes written) before anything runs
        point["run_dir"] = str(root / point["name"])
        try:
            # with its own folder in its recipe, `run --config <point>/recipe.yaml` resumes the point
            own = {**point["overrides"], "run_id": point["name"], "runs_dir": str(root)}
            configs.append(point_configs(recipe, own, overrides, root / point["name"] / POINT_RECIPE))
            check_evaluation_settings(configs[-1][3])  # attacks, budget, judge: a typo fails before point 1
        except ValueError as err:  # ConfigError included
            raise ConfigError(f"grid point {point['name']}: {err}") from err
        point["data_digest"] = Run.digest(data_stage_key(configs[-1]))
        point.update(status="pending", error=None, data_from=None, ran=[], seconds=None, metrics=None)

    doc = {
        "sweep_id": sweep_id,
        "folder": str(root),
        "recipe": str(recipe),
        "overrides": overrides,
        "grid": {k: list(v) for k, v in grid.items()},
        "points": points,
    }
    for i, (point, (model_cfg, data_cfg, cb_cfg, run_cfg)) in enumerate(zip(points, configs)):
        point_root = Path(point["run_dir"])
        # a data stage recorded under an older digest of the same settings is brought up to date, so the
        # point keeps its own data instead of taking an earlier point's
        Run(point_root).same("data", data_stage_key(configs[i]))
        before = _ledger(point_root)
        if not _data_done(before, point["data_digest"]):  # a finished point keeps its own data
            outside = [{"run_dir": str(data_from), "data_digest": point["data_digest"]}] if data_from else []
            source = _data_source([*outside, *points[:i]], point["data_digest"])
            if source is not None:
                logger.info("sweep point %s: data and base-model cells from %s", point["name"], source.name)
                share_data(source, point_root)
                before = _ledger(point_root)
        run_cfg = replace(run_cfg, runs_dir=str(root), run_id=point["name"])
        logger.info("sweep point %d/%d: %s", i + 1, len(points), point["name"])
        started = time.time()
        try:
            run_pipeline(model_cfg, data_cfg, cb_cfg, run_cfg)
        except Exception as err:  # noqa: BLE001 - one failing point must not lose the others
            logger.exception("sweep point %s failed", point["name"])
            message = " ".join(str(err).split())  # one line, for the table and for grep
            point.update(status="failed", error=f"{type(err).__name__}: {message}" if message else type(err).__name__)
            if strict:
                _finish_point(doc, point, before, started)
                raise
        else:
            point.update(status="done", metrics=point_metrics(point_root))
        _finish_point(doc, point, before, started)
    print_sweep(doc)
    return doc


def _finish_point(doc: dict[str, Any], point: dict[str, Any], before: Mapping[str, Any], started: float) -> None:
    """Record which stages ran and how long the point took, and rewrite sweep.json and sweep.md."""
    after = _ledger(Path(point["run_dir"]))
    point["ran"] = [name for name, entry in after.items() if entry != before.get(name)]
    point["data_from"] = (after.get("data") or {}).get("copied_from")  # also when copied by an earlier sweep
    point["seconds"] = round(time.time() - started, 1)
    write_sweep(doc, doc["folder"])


# --------------------------------------------------------------------------------------------------
# Metrics and the table


def _value(entry: Any) -> float | None:
    return entry.get("value") if isinstance(entry, Mapping) else None


def point_metrics(run_dir: str | Path) -> dict[str, Any]:
    """The numbers an ablation compares, from a finished run folder: per attack the ASR of the base and
    circuit-broken models, over-refusal, benign loss change, the final rerouting cosine, train seconds."""
    from ..evaluation.report import RESULTS_FILE, training_summary

    run_dir = Path(run_dir)
    out: dict[str, Any] = {}
    results_path = run_dir / RESULTS_FILE
    if results_path.is_file():
        doc = json.loads(results_path.read_text(encoding="utf-8"))
        metrics, models = doc.get("metrics", {}), list(doc.get("models", {}))
        reference = metrics.get("reference_model", models[0] if models else "")
        other = next((m for m in models if m != reference), reference)
        out["models"] = {"base": reference, "circuit_broken": other}
        out["asr"] = {
            attack: {"base": _value(per.get(reference)), "circuit_broken": _value(per.get(other))}
            for attack, per in metrics.get("asr", {}).items()
        }
        refusal = metrics.get("over_refusal", {})
        if refusal:
            out["over_refusal"] = {
                "base": _value(refusal.get(reference, {}).get("refusal")),
                "circuit_broken": _value(refusal.get(other, {}).get("refusal")),
            }
        out["asr_by_source"] = {
            attack: {source: _value(entry) for source, entry in (per.get(other) or {}).items()}
            for attack, per in metrics.get("asr_by_source", {}).items()
        }
        out["capability_change"] = _value(metrics.get("capability_change", {}).get(other))
        out["eval_errors"] = [f"{e.get('model')} / {e.get('cell')}: {e.get('error')}" for e in doc.get("errors") or []]
    summary = training_summary(run_dir) or {}
    out["cos_rerouting_end"] = summary.get("cos_rerouting_end")
    out["cos_retain_end"] = summary.get("cos_retain_end")
    out["steps"] = summary.get("steps")
    out["train_seconds"] = (_ledger(run_dir).get("train") or {}).get("seconds")
    return out


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


def _uniform(points: Sequence[Mapping[str, Any]], pick: Any) -> tuple[bool, Any]:
    """(all finished points agree, the value): the base model's numbers are shown once when they agree."""
    values = [pick(p["metrics"]) for p in points if p.get("metrics")]
    return (bool(values) and all(v == values[0] for v in values)), (values[0] if values else None)


def _several_sources(points: Sequence[Mapping[str, Any]], attack: str) -> bool:
    """Whether some point measured `attack` on more than one harmful source (then the worst one is shown)."""
    return any(len(((p.get("metrics") or {}).get("asr_by_source") or {}).get(attack) or {}) > 1 for p in points)


def _worst(metrics: Mapping[str, Any], attack: str) -> str:
    """The circuit-broken model's highest held-out ASR over sources under `attack`, and that source."""
    per_source = {k: v for k, v in ((metrics.get("asr_by_source") or {}).get(attack) or {}).items() if v is not None}
    if not per_source:
        return "-"
    source = max(per_source, key=lambda k: (per_source[k], k))
    return f"{_pct(per_source[source])} {source}"


def sweep_rows(doc: Mapping[str, Any]) -> tuple[list[str], list[list[str]], list[str]]:
    """(header, one row per point, notes) of the sweep table: the grid keys, then the circuit-broken
    model's ASR per attack, over-refusal, benign loss change, final rerouting cosine, train seconds and
    status. The base model's numbers go in a note when every point agrees on them, else in columns."""
    from ..evaluation.tables import signed

    points, keys = doc["points"], list(doc["grid"])
    attacks = list(dict.fromkeys(a for p in points for a in ((p.get("metrics") or {}).get("asr") or {})))
    base_cols: list[tuple[str, Any]] = []
    notes = []
    picks = [
        *((f"ASR {a}", lambda m, a=a: ((m.get("asr") or {}).get(a) or {}).get("base")) for a in attacks),
        ("over-refusal", lambda m: (m.get("over_refusal") or {}).get("base")),
    ]
    for label, pick in picks:
        same, value = _uniform(points, pick)
        if same:
            notes.append(f"{label} {_pct(value)}")
        else:
            base_cols.append((f"base {label}", pick))
    notes = [f"base model (every point): {', '.join(notes)}"] if notes else []
    header = [
        *keys,
        *(f"ASR {a}" for a in attacks),
        *(c for c, _ in base_cols),
        *(f"worst source {a}" for a in attacks if _several_sources(points, a)),
        "over-refusal",
        "benign loss Δ",
        "cos reroute end",
        "train s",
        "status",
    ]
    rows = []
    for point in points:
        m = point.get("metrics") or {}
        asr = m.get("asr") or {}
        change, cos, seconds = m.get("capability_change"), m.get("cos_rerouting_end"), m.get("train_seconds")
        status = point["status"] if not point.get("error") else f"failed: {point['error']}"
        if m.get("eval_errors"):
            status = f"{status} ({len(m['eval_errors'])} eval cells failed)"
        rows.append(
            [
                *(
                    json.dumps(point["overrides"][k], default=str)
                    if not isinstance(point["overrides"][k], str)
                    else point["overrides"][k]
                    for k in keys
                ),
                *(_pct((asr.get(a) or {}).get("circuit_broken")) for a in attacks),
                *(_pct(pick(m)) if m else "-" for _, pick in base_cols),
                *(_worst(m, a) for a in attacks if _several_sources(points, a)),
                _pct((m.get("over_refusal") or {}).get("circuit_broken")),
                "-" if change is None else f"{signed(100 * change, 1)}%",
                "-" if cos is None else f"{cos:.3f}",
                "-" if seconds is None else f"{seconds:.0f}",
                status,
            ]
        )
    return header, rows, notes


def sweep_table(doc: Mapping[str, Any]) -> Any:
    """The sweep as a rich Table (ASR and over-refusal are the circuit-broken model's)."""
    from rich.table import Table

    header, rows, notes = sweep_rows(doc)
    table = Table(
        title=f"sweep {doc['sweep_id']} (ASR, over-refusal: circuit-broken model)", caption="\n".join(notes) or None
    )
    for column in header:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def sweep_markdown(doc: Mapping[str, Any]) -> str:
    """The sweep as a markdown table (sweep.md), with the base model's numbers in a line above it."""
    header, rows, notes = sweep_rows(doc)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    out = [
        f"# sweep {doc['sweep_id']}",
        "",
        f"recipe `{doc['recipe']}`"
        + (f", overrides `{json.dumps(doc['overrides'], default=str)}`" if doc["overrides"] else "")
        + "; ASR and over-refusal of the circuit-broken model.",
        "",
    ]
    out += [*notes, ""] if notes else []
    out += [line(header), line(["---"] * len(header)), *(line(r) for r in rows)]
    return "\n".join(out) + "\n"


def write_sweep(doc: Mapping[str, Any], root: str | Path) -> None:
    """sweep.json and sweep.md in `root`; written after every point, so an interrupted sweep shows
    what it finished."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    stamped = {**doc, "updated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    write_text_atomic(root / SWEEP_FILE, json.dumps(stamped, indent=1, default=str))
    write_text_atomic(root / TABLE_FILE, sweep_markdown(doc))


def print_sweep(doc: Mapping[str, Any]) -> None:
    """The closing table, on stderr as the main job prints its own."""
    from rich.console import Console

    console = Console(stderr=True)
    console.print(sweep_table(doc))
    console.print(f"sweep: {Path(doc['folder']) / TABLE_FILE}", highlight=False)
