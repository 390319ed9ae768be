"""circuit-breakers: train circuit breakers (representation rerouting) into causal LMs and evaluate them.

The public API is what `__all__` lists. Each name is imported from its module on first use, so
`import circuit_breakers` stays cheap and the command line loads only what a command needs.

    from circuit_breakers import CircuitBreakerConfig, DataConfig, ModelConfig, Record, evaluate_models, train
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module (relative to this package) that defines it
_EXPORTS: dict[str, str] = {
    # configs
    "ModelConfig": "config",
    "DataConfig": "config",
    "CircuitBreakerConfig": "config",
    "RunConfig": "config",
    "ConfigError": "config",
    "parse_config": "recipes",
    "parse_run_config": "recipes",
    # models and adapters
    "load_model_and_tokenizer": "models",
    "load_model": "models",
    "load_tokenizer": "models",
    "export_merged": "adapters",
    "load_adapters": "adapters",
    "combine_adapters": "adapters",
    # data
    "Record": "data.records",
    "read_records": "data.records",
    "write_records": "data.records",
    "Prompt": "data.prompts",
    # training
    "train": "training.run",
    "TrainResult": "training.run",
    # evaluation
    "evaluate_models": "evaluation.compare",
    "EvalResult": "evaluation.results",
    "load_result": "evaluation.store",
    "make_attack": "evaluation.attacks",
    "ATTACKS": "evaluation.attacks",
    "make_judge": "evaluation.judges",
    "JUDGES": "evaluation.judges",
    "load_benchmark": "data.benchmarks",
    "write_results": "evaluation.report",
    "summary_table": "evaluation.tables",
    "rejudge": "evaluation.rejudge",
    # generation
    "generate": "generation",
    # experiments
    "run_pipeline": "experiments.main_job",
    "run_sweep": "experiments.sweep",
    "run_redteam": "experiments.redteam",
    "category_experiment": "experiments.categories",
    "agent_experiment": "experiments.agents",
    "interpolate_within_budget": "experiments.interpolate",
    # guard
    "Probe": "guard.probes",
    "fit_probe": "guard.probes",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # static analysers and IDEs see the real names
    from .adapters import combine_adapters, export_merged, load_adapters
    from .config import CircuitBreakerConfig, ConfigError, DataConfig, ModelConfig, RunConfig
    from .data.benchmarks import load_benchmark
    from .data.prompts import Prompt
    from .data.records import Record, read_records, write_records
    from .evaluation.attacks import ATTACKS, make_attack
    from .evaluation.compare import evaluate_models
    from .evaluation.judges import JUDGES, make_judge
    from .evaluation.rejudge import rejudge
    from .evaluation.report import write_results
    from .evaluation.results import EvalResult
    from .evaluation.store import load_result
    from .evaluation.tables import summary_table
    from .experiments.agents import agent_experiment
    from .experiments.categories import category_experiment
    from .experiments.interpolate import interpolate_within_budget
    from .experiments.main_job import run_pipeline
    from .experiments.redteam import run_redteam
    from .experiments.sweep import run_sweep
    from .generation import generate
    from .guard.probes import Probe, fit_probe
    from .models import load_model, load_model_and_tokenizer, load_tokenizer
    from .recipes import parse_config, parse_run_config
    from .training.run import TrainResult, train
