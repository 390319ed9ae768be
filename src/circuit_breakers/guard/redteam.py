"""Probe obfuscation in the red-team run: for each guarded model, the probe's recall with and without the
obfuscation term (`guard/obfuscation.py`), kept in the run's folder and reused while nothing it depends on changed.

It lives here, not in `experiments/redteam.py`, because the probes are the guard's (a layer above the experiments).
The attack's budget follows the embedding attack's preset of the suite's budget; the monitor's halt rate on the
attacked prompts is the recall on the model's own greedy answer (`recall_*_generation`).
"""

from __future__ import annotations

import gc
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..data.prompts import Prompt
from ..evaluation.attacks import EmbeddingAttack
from ..evaluation.cells import attack_prompt
from ..evaluation.compare import model_identity
from ..experiments.redteam import RedteamError, RedteamSuite
from ..fileio import digest, json_safe, write_text_atomic
from .obfuscation import ObfuscationSettings, obfuscation_attack
from .probes import PROBE_CONFIG, PROBE_WEIGHTS, Probe, find_probe

log = logging.getLogger(__name__)

__all__ = ["OBFUSCATION_FILE", "obfuscation_settings", "probe_folders", "run_probe_obfuscation"]

OBFUSCATION_FILE = "probe_obfuscation.json"
"""The readings of each guarded model in the red-team folder, with the key they were made under."""


def probe_folders(values: Sequence[str], models: Mapping[str, str]) -> dict[str, str]:
    """`--probe NAME=DIR` (repeatable) or `--probe auto` (each model's MODEL_DIR/probe, where there is one) ->
    {model name: probe folder}; every folder is checked to hold a probe before anything is loaded."""
    found: dict[str, str] = {}
    for value in values:
        if value == "auto":
            for name, spec in models.items():
                folder = find_probe(spec, "auto")
                if folder is not None:
                    found.setdefault(name, folder)
            continue
        name, sep, folder = value.partition("=")
        if not sep or not name.strip() or not folder.strip():
            raise RedteamError(f"--probe {value!r}: expected NAME=PROBE_DIR (a model's name) or auto")
        if name.strip() not in models:
            raise RedteamError(f"--probe {value!r}: no --model named {name.strip()!r}; models: {sorted(models)}")
        found[name.strip()] = folder.strip()
    for name, folder in found.items():
        if not (Path(folder) / PROBE_CONFIG).is_file() or not (Path(folder) / PROBE_WEIGHTS).is_file():
            raise RedteamError(
                f"--probe {name}={folder}: no {PROBE_CONFIG} and {PROBE_WEIGHTS} there; train one with `probe train`"
            )
    if values and not found:
        raise RedteamError("--probe auto: no model has a probe beside it (MODEL_DIR/probe); give --probe NAME=DIR")
    return found


def obfuscation_settings(suite: RedteamSuite, seed: int = 0) -> ObfuscationSettings:
    """The embedding attack's steps and restarts at the suite's budget, answers as long as the suite's."""
    preset = EmbeddingAttack.presets.get(suite.budget, EmbeddingAttack.presets["default"])
    return ObfuscationSettings(
        steps=int(preset.get("steps", 100)),
        restarts=int(preset.get("restarts", 1)),
        seed=seed,
        max_new_tokens=suite.max_new_tokens,
    )


def _folder_key(folder: str) -> list[Any]:
    path = Path(folder)
    return sorted([p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in path.iterdir() if p.is_file())


def run_probe_obfuscation(
    models: Mapping[str, str],
    probes: Mapping[str, str],
    prompts: Sequence[Prompt],
    suite: RedteamSuite,
    out_dir: str | Path,
    dtype: str = "float32",
    device: str | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """{model name: `ObfuscationResult.to_dict()` plus `n_prompts`} for each model with a probe, on the first
    `suite.obfuscation_prompts` prompts; readings made under the same model, probe files, prompts and settings are
    read back from `out_dir/probe_obfuscation.json` instead of being made again."""
    from .. import models as model_loading

    out = Path(out_dir)
    path = out / OBFUSCATION_FILE
    kept = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    chosen = list(prompts)[: suite.obfuscation_prompts] if suite.obfuscation_prompts else list(prompts)
    settings = obfuscation_settings(suite, seed)
    items = [attack_prompt(p) for p in chosen]
    results: dict[str, dict[str, Any]] = {}
    for name, folder in probes.items():
        key = digest(
            model_identity(models[name]),
            _folder_key(folder),
            [[p.id, p.text, p.context, p.target] for p in chosen],
            settings.to_dict(),
            dtype,
        )
        if kept.get(name, {}).get("key") == key:
            results[name] = kept[name]
            continue
        model, tokenizer = model_loading.load_model_and_tokenizer(str(models[name]), dtype=dtype)
        if device:
            model = model.to(device)
        try:
            result = obfuscation_attack(model.eval(), tokenizer, Probe.load(folder), items, settings)
        finally:
            del model
            gc.collect()
        results[name] = json_safe({**result.to_dict(), "probe": folder, "n_prompts": len(chosen), "key": key})
        kept[name] = results[name]
        write_text_atomic(path, json.dumps(kept, indent=1))
        log.info("%s: probe recall %s plain, %s obfuscated", name, result.recall("plain_probe_score"),
                 result.recall("obfuscated_probe_score"))  # fmt: skip
    return results
