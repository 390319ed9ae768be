"""Evaluation of base vs circuit-broken models: attacks, generation, judges, benchmarks, metrics, report.

    from circuit_breakers.evaluation import evaluate_models, load_benchmark, write_results, summary_table

    prompts = load_benchmark("harmbench", "../shared/data", limit=50)
    result = evaluate_models({"base": "embedded", "circuit_broken": "runs/x/train/merged"}, prompts,
                             ["direct", "prefill", "template"], judge="offline", out_dir="runs/x/eval")
    write_results(result, "runs/x/eval", config={})
    print(summary_table(result))

What this module lists in `__all__` is the public API; the submodules hold the details.
"""

from __future__ import annotations

from ..data.benchmarks import BENCHMARKS, is_harmful, load_benchmark
from ..generation import generate
from .attacks import ATTACKS, Attack, AttackInput, AttackPrompt, make_attack
from .capability import LossResult, run_lm_eval, teacher_forced_loss
from .compare import evaluate_models
from .judges import (
    DEFAULT_JUDGE,
    JUDGES,
    HarmBenchJudge,
    Judge,
    LlamaGuardJudge,
    OfflineJudge,
    OfflineThresholds,
    OpenAIJudge,
    RefusalJudge,
    Verdict,
    calibrate_offline_judge,
    detect_refusal,
    judge_agreement,
    make_judge,
)
from .metrics import PairedDifference, Rate, bootstrap_ci, mcnemar_exact, paired_difference, rate, wilson_interval
from .rejudge import rejudge, rejudge_folder
from .report import build_results, load_training_log, render_html, write_results
from .results import CAPABILITY, OVER_REFUSAL, EvalResult, Sample, compute_metrics
from .store import CellStore, load_result
from .tables import summary_table

__all__ = [
    "ATTACKS",
    "BENCHMARKS",
    "CAPABILITY",
    "DEFAULT_JUDGE",
    "JUDGES",
    "OVER_REFUSAL",
    "Attack",
    "AttackInput",
    "AttackPrompt",
    "CellStore",
    "EvalResult",
    "HarmBenchJudge",
    "Judge",
    "LlamaGuardJudge",
    "LossResult",
    "OfflineJudge",
    "OfflineThresholds",
    "OpenAIJudge",
    "PairedDifference",
    "Rate",
    "RefusalJudge",
    "Sample",
    "Verdict",
    "bootstrap_ci",
    "build_results",
    "calibrate_offline_judge",
    "compute_metrics",
    "detect_refusal",
    "evaluate_models",
    "generate",  # re-exported from circuit_breakers.generation
    "is_harmful",
    "judge_agreement",
    "load_benchmark",
    "load_result",
    "load_training_log",
    "make_attack",
    "make_judge",
    "mcnemar_exact",
    "paired_difference",
    "rate",
    "rejudge",
    "rejudge_folder",
    "render_html",
    "run_lm_eval",
    "summary_table",
    "teacher_forced_loss",
    "wilson_interval",
    "write_results",
]
