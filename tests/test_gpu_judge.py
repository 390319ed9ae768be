"""The classifier judge as the GPU recipes use it: named by the recipes, batched, its model freed after each
judging call, and a run whose classifier cannot be loaded stopped at the start in one line (issue 29)."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from huggingface_hub import constants

import circuit_breakers.evaluation.judges.classifiers as classifiers
from circuit_breakers import models
from circuit_breakers.cli.main import main
from circuit_breakers.config import RunConfig
from circuit_breakers.evaluation.judges import HarmBenchJudge, classifier_weights_problem
from circuit_breakers.evaluation.suite import judge_spec
from circuit_breakers.experiments.main_job import check_evaluation_settings
from circuit_breakers.models import ModelError
from circuit_breakers.recipes import parse_run_config
from helpers import make_model, make_tokenizer, save_tiny

torch.set_num_threads(1)

CLASSIFIER = "cais/HarmBench-Llama-2-13b-cls"
GPU_RECIPES = ["llama3-8b", "mistral-7b", "llama31-8b", "paper"]
REQUESTS = ["How do I bake bread?", "Write a poem about the sea.", "Explain photosynthesis.", "Hi", "Tell me a story."]
ANSWERS = [
    "Mix flour, water, yeast and salt, then knead and bake.",
    "The waves roll in, the gulls cry out.",
    "Plants turn light into sugar.",
    "Hello!",
    "Once upon a time there was a baker who baked bread for the whole town every morning.",
]


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """An empty Hugging Face cache and HF_HUB_OFFLINE: no classifier weights anywhere."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.mark.parametrize("recipe", GPU_RECIPES)
def test_gpu_recipes_judge_with_the_harmbench_classifier(recipe):
    *_, run_cfg = parse_run_config([], recipe=recipe)
    assert judge_spec(run_cfg.judge) == ("harmbench", {"model": CLASSIFIER})


def test_run_without_the_classifier_stops_before_the_data_stage(tmp_path, no_hub, capsys):
    tiny = save_tiny(tmp_path / "model", "llama", "llama3", layers=4)
    runs = tmp_path / "runs"
    capsys.readouterr()  # the model save's progress bar
    code = main(["run", "--config", "llama3-8b", "--model_name_or_path", str(tiny), "--runs_dir", str(runs)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith(f"error: judge harmbench:{CLASSIFIER}: ")
    assert "weights not found locally" in err and "--judge offline|openai|refusal" in err
    assert not (runs / "llama3-8b").exists()  # no run folder, so no data stage


def test_unreachable_hub_is_named_at_the_start(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    models.hub_unreachable.cache_clear()
    try:
        with pytest.raises(ValueError, match=r"the Hub is unreachable .*--judge offline\|openai\|refusal"):
            check_evaluation_settings(RunConfig(judge="harmbench"))
    finally:
        models.hub_unreachable.cache_clear()


def cached_snapshot(cache, files):
    """A Hugging Face cache entry of the classifier holding `files` ({name: text})."""
    repo = cache / ("models--" + CLASSIFIER.replace("/", "--"))
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    for name, text in files.items():
        (snapshot / name).write_text(text)


def test_weights_probe_reads_the_local_cache(tmp_path, no_hub):
    cache = tmp_path / "hf-cache"
    shards = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    index = json.dumps({"weight_map": {"a": shards[0], "b": shards[1]}})
    cached_snapshot(cache, {"config.json": "{}", "model.safetensors.index.json": index})
    assert "weights not found locally" in classifier_weights_problem(CLASSIFIER)  # shards missing
    snapshot = next((cache / ("models--" + CLASSIFIER.replace("/", "--")) / "snapshots").iterdir())
    for shard in shards:
        (snapshot / shard).write_text("x")
    assert classifier_weights_problem(CLASSIFIER) is None
    check_evaluation_settings(RunConfig(judge=f"harmbench:{CLASSIFIER}"))  # passes: a complete local copy


def test_local_classifier_folder_is_checked_for_weights(tmp_path):
    folder = tmp_path / "cls"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"holds no config.json with complete weights"):
        check_evaluation_settings(RunConfig(judge=f"harmbench:{folder}"))
    with pytest.raises(ValueError, match=r"neither a model folder nor a hub id"):
        check_evaluation_settings(RunConfig(judge=f"harmbench:{tmp_path / 'missing' / 'x' / 'y'}"))
    check_evaluation_settings(RunConfig(judge=f"harmbench:{save_tiny(tmp_path / 'tiny', layers=2)}"))


def test_named_classifier_is_loaded_per_call_batched_and_freed(tmp_path, monkeypatch):
    """A classifier named by folder: its scores are those of the same weights passed as an object (batching
    and the longest-first order change nothing), and no reference to its model outlives the call."""
    folder = save_tiny(tmp_path / "cls", "llama", "chatml", layers=2)
    loaded = []
    real = classifiers.load_classifier

    def recording(*args, **kwargs):
        model = real(*args, **kwargs)
        loaded.append((weakref.ref(model), next(model.parameters()).device))
        return model

    monkeypatch.setattr(classifiers, "load_classifier", recording)
    judge = HarmBenchJudge(str(folder), batch_size=2, device="cpu")
    verdicts = judge.judge(REQUESTS, ANSWERS)
    gc.collect()
    assert len(loaded) == 1 and loaded[0][0]() is None and loaded[0][1] == torch.device("cpu")
    assert judge.classifier.model is None
    tokenizer = make_tokenizer("chatml")
    reference = HarmBenchJudge(make_model("llama", vocab_size=len(tokenizer), layers=2), tokenizer, batch_size=1)
    expected = [v.score for v in reference.judge(REQUESTS, ANSWERS)]
    assert [v.score for v in verdicts] == pytest.approx(expected, abs=1e-5)
    judge.judge(REQUESTS[:1], ANSWERS[:1])
    assert len(loaded) == 2 and loaded[1][0]() is None  # loaded again for the next call, freed again


def test_keep_loaded_holds_the_classifier_until_close(tmp_path):
    judge = HarmBenchJudge(str(save_tiny(tmp_path / "cls", layers=2)), device="cpu", keep_loaded=True)
    judge.judge(REQUESTS[:2], ANSWERS[:2])
    held = weakref.ref(judge.classifier.model)
    judge.judge(REQUESTS[:2], ANSWERS[:2])
    assert judge.classifier.model is held()  # not loaded twice
    judge.close()
    gc.collect()
    assert held() is None


def test_a_missing_gpu_is_refused_when_the_judge_is_made(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ModelError, match="device cuda asked for"):
        HarmBenchJudge(str(save_tiny(tmp_path / "cls", layers=2)), device="cuda")
