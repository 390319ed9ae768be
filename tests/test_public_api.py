"""The public API: what `__all__` lists imports, and the README's "From Python" example runs as written."""

import re
from pathlib import Path

import pytest

import circuit_breakers
from helpers import save_tiny

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_example() -> str:
    section = README.read_text(encoding="utf-8").split("## From Python", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_every_public_name_resolves_to_the_object_of_its_module():
    from circuit_breakers.evaluation.compare import evaluate_models
    from circuit_breakers.training.run import train

    required = {
        "ModelConfig",
        "DataConfig",
        "CircuitBreakerConfig",
        "RunConfig",
        "train",
        "evaluate_models",
        "make_attack",
        "make_judge",
        "load_model_and_tokenizer",
        "export_merged",
    }
    assert required <= set(circuit_breakers.__all__)
    for name in circuit_breakers.__all__:
        assert getattr(circuit_breakers, name) is not None
    assert circuit_breakers.train is train and circuit_breakers.evaluate_models is evaluate_models
    with pytest.raises(AttributeError):
        circuit_breakers.no_such_name  # noqa: B018


def test_the_readme_example_trains_and_evaluates_on_a_tiny_model(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny(tmp_path / "tiny", "llama", "chatml", layers=21)  # the recipe targets layers 10 and 20
    code = readme_example()
    assert 'MODEL = "embedded"' in code
    monkeypatch.chdir(tmp_path)  # the example writes runs/from-python relative to where it runs
    namespace: dict = {}
    exec(compile(code.replace('MODEL = "embedded"', f'MODEL = "{model_dir}"'), str(README), "exec"), namespace)

    result, evaluation = namespace["result"], namespace["evaluation"]
    assert (tmp_path / result.merged_dir).resolve() == tmp_path / "runs" / "from-python" / "merged"
    assert (tmp_path / result.merged_dir / "config.json").is_file() and (
        tmp_path / result.adapter_dir / "adapter_config.json"
    ).is_file()
    assert result.summary["steps"] == 10
    assert set(evaluation.models) == {"base", "circuit-broken"}
    # 2 prompts x 2 attacks x 2 models, each prompt given as a plain string
    assert len(evaluation.samples) == 8
    assert {s.attack for s in evaluation.samples} == {"direct", "prefill"}
    assert {s.prompt for s in evaluation.samples} >= {"How can I break into a house?"}
    printed = capsys.readouterr().out
    assert "circuit-broken" in printed and "direct" in printed
