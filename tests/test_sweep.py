"""`circuit-breakers sweep`: grid parsing and naming, and a toy sweep of two main jobs that share their
data and the base model's evaluation, resume, and record a failing point without stopping."""

import json

import pytest

import circuit_breakers.experiments.sweep as sweep
from circuit_breakers.cli.main import main
from circuit_breakers.config import ConfigError
from circuit_breakers.experiments.main_job import Run
from circuit_breakers.experiments.sweep import data_stage_key, grid_points, parse_grid, run_sweep
from helpers import save_tiny

TOY = [
    "--n_harmful_train",
    "6",
    "--n_harmful_eval",
    "4",
    "--n_benign_train",
    "6",
    "--n_benign_eval",
    "3",
    "--n_borderline_train",
    "2",
    "--n_borderline_eval",
    "3",
    "--completion_tokens",
    "6",
    "--generation_batch_size",
    "4",
    "--eval_max_new_tokens",
    "6",
    "--judge",
    "refusal",
    "--attacks",
    "direct,prefill",
    "--per_device_train_batch_size",
    "2",
    "--target_layers",
    "2",
    "4",
    "--logging_steps",
    "1",
    "--save_steps",
    "1",
    "--max_length",
    "128",
]


def test_parse_grid_reads_values_as_yaml():
    grid = parse_grid(
        [
            "alpha=5|10",
            "target_layers=[10,20]|[10,12,14,16,18,20]",
            "merge=true|false",
            "harmful_prefill=null|Sure, here is",
        ]
    )
    assert grid == {
        "alpha": [5, 10],
        "target_layers": [[10, 20], [10, 12, 14, 16, 18, 20]],
        "merge": [True, False],
        "harmful_prefill": [None, "Sure, here is"],
    }
    assert list(grid) == ["alpha", "target_layers", "merge", "harmful_prefill"]  # the order given


def test_parse_grid_refuses_unknown_keys_like_the_recipe_loader():
    message = r"unknown grid key\(s\): alpah \(did you mean alpha\?\).*Valid keys: .*target_layers"
    with pytest.raises(ConfigError, match=message):
        parse_grid(["alpah=5|10"])


@pytest.mark.parametrize(
    "bad, message",
    [
        ("alpha", "expected KEY=V1"),
        ("alpha=5|", "empty value"),
        ("alpha=5|5", "repeated"),
        ("run_id=a|b", "the sweep sets"),
        ("target_layers=[1,2|[3]", "not valid YAML"),
    ],
)
def test_parse_grid_refuses_malformed_items(bad, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid([bad])


def test_parse_grid_refuses_a_key_given_twice():
    with pytest.raises(ConfigError, match="given twice"):
        parse_grid(["alpha=5", "alpha=10"])


def test_grid_points_are_the_product_in_a_stable_order_with_readable_names():
    points = grid_points({"alpha": [5, 10.5], "target_layers": [[10, 20], [2, 4, 6]]})
    assert [p["name"] for p in points] == [
        "alpha=5,target_layers=10-20",
        "alpha=5,target_layers=2-4-6",
        "alpha=10.5,target_layers=10-20",
        "alpha=10.5,target_layers=2-4-6",
    ]
    assert points[1]["overrides"] == {"alpha": 5, "target_layers": [2, 4, 6]}
    assert grid_points({"alpha": [5, 10.5], "target_layers": [[10, 20], [2, 4, 6]]}) == points


def test_grid_point_names_are_safe_folder_names_and_unique():
    points = grid_points({"harmful_prefill": ["Sure, here/is", "Sure, here is", None], "merge": [True]})
    names = [p["name"] for p in points]
    assert names[2] == "harmful_prefill=null,merge=true"
    assert len(set(names)) == 3  # the first two differ only in unsafe characters: told apart by a hash
    for name in names[:2]:
        assert name.startswith("harmful_prefill=Sure__here_is") and "/" not in name and " " not in name
    long = grid_points({"harmful_prefill": ["x" * 300]})[0]["name"]
    assert len(long) < 130


def test_cli_explains_the_grid_and_refuses_unknown_keys_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--help"])
    assert exit_.value.code == 0
    help_text = capsys.readouterr().out
    assert "--grid KEY=V1|V2|..." in help_text and "'target_layers=[10,20]|[10,12,14,16,18,20]'" in help_text
    assert main(["sweep", "--grid", "alpah=1|2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "alpah (did you mean alpha?)" in err


def test_a_bad_value_fails_before_any_point_runs(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(sweep, "run_pipeline", lambda *a: calls.append(a))
    with pytest.raises(ConfigError, match=r"grid point alpha=x: .*alpha must be a number"):
        run_sweep({"alpha": [5, "x"]}, overrides={"runs_dir": str(tmp_path)}, sweep_id="s")
    with pytest.raises(ConfigError, match="alpha: set both by the grid and as an override"):
        run_sweep({"alpha": [5, 6]}, overrides={"runs_dir": str(tmp_path), "alpha": 3}, sweep_id="s")
    assert calls == []


def test_a_failing_point_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    seen = []

    def fake_pipeline(model_cfg, data_cfg, cb_cfg, run_cfg):
        seen.append((run_cfg.run_id, cb_cfg.alpha, cb_cfg.max_steps))
        if cb_cfg.alpha == 1:
            raise RuntimeError("boom\non two lines")

    monkeypatch.setattr(sweep, "run_pipeline", fake_pipeline)
    code = main(["sweep", "--grid", "alpha=1|2", "--sweep_id", "s", "--runs_dir", str(tmp_path), "--max_steps", "7"])
    assert code == 1  # a failed point makes the command fail, after every point ran
    assert seen == [("alpha=1", 1.0, 7), ("alpha=2", 2.0, 7)]
    doc = json.loads((tmp_path / "s" / "sweep.json").read_text())
    first, second = doc["points"]
    assert (first["status"], first["error"]) == ("failed", "RuntimeError: boom on two lines")
    assert second["status"] == "done" and second["error"] is None
    table = (tmp_path / "s" / "sweep.md").read_text()
    assert "failed: RuntimeError: boom on two lines" in table
    # each point has the recipe it ran with, so it can be re-run on its own
    assert "alpha: 2" in (tmp_path / "s" / "alpha=2" / "recipe.yaml").read_text()

    seen.clear()
    with pytest.raises(RuntimeError, match="boom"):
        run_sweep({"alpha": [1, 2]}, overrides={"runs_dir": str(tmp_path)}, sweep_id="strict", strict=True)
    assert [s[0] for s in seen] == ["alpha=1"]
    statuses = [p["status"] for p in json.loads((tmp_path / "strict" / "sweep.json").read_text())["points"]]
    assert statuses == ["failed", "pending"]


@pytest.fixture(scope="module")
def toy_sweep(tmp_path_factory):
    """Two points (max_steps 1 and 2) with the same data settings; calls counted by kind and model."""
    import circuit_breakers.evaluation.compare as compare
    import circuit_breakers.experiments.main_job as pipeline

    tmp = tmp_path_factory.mktemp("sweep")
    tiny = save_tiny(tmp / "model", "llama", "chatml", layers=6)
    args = [
        "sweep",
        "--grid",
        "max_steps=1|2",
        "--sweep_id",
        "toy",
        "--model_name_or_path",
        str(tiny),
        "--runs_dir",
        str(tmp / "runs"),
        *TOY,
    ]
    calls: dict[str, int] = {}

    def counted(name, fn, by_model=False):
        def wrapper(*a, **k):
            key = f"{name}/{a[0]}" if by_model else name
            calls[key] = calls.get(key, 0) + 1
            return fn(*a, **k)

        return wrapper

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pipeline, "build_data", counted("build_data", pipeline.build_data))
        mp.setattr(compare, "run_attack", counted("attack", compare.run_attack, by_model=True))
        mp.setattr(compare, "run_safe", counted("safe", compare.run_safe, by_model=True))
        mp.setattr(compare, "benign_loss", counted("benign_loss", compare.benign_loss))
        assert main(args) == 0
    return tmp / "runs" / "toy", args, calls


def test_each_point_trains_with_its_own_settings(toy_sweep):
    root, _, _ = toy_sweep
    for name, steps in [("max_steps=1", 1), ("max_steps=2", 2)]:
        assert json.loads((root / name / "train" / "summary.json").read_text())["steps"] == steps
        assert (root / name / "results.json").is_file()


def test_points_with_the_same_data_share_data_and_base_cells(toy_sweep):
    root, _, calls = toy_sweep
    assert calls["build_data"] == 1
    assert calls["attack/base"] == 2 and calls["safe/base"] == 1  # direct + prefill, over-refusal: once
    assert calls["attack/circuit_broken"] == 4 and calls["safe/circuit_broken"] == 2  # per point
    assert calls["benign_loss"] == 3  # base once, each circuit-broken model once
    ledger = json.loads((root / "max_steps=2" / "stages.json").read_text())
    assert ledger["data"]["copied_from"] == "max_steps=1" and ledger["train"]["done"]
    first = json.loads((root / "max_steps=1" / "stages.json").read_text())
    assert ledger["data"]["key"] == first["data"]["key"]
    # the base model's numbers of the second point are the reused cells: identical to the first's
    results = [json.loads((root / n / "results.json").read_text())["metrics"] for n in ("max_steps=1", "max_steps=2")]
    assert results[0]["asr"]["direct"]["base"] == results[1]["asr"]["direct"]["base"]


def test_sweep_json_and_table_have_one_row_per_point(toy_sweep):
    root, _, _ = toy_sweep
    doc = json.loads((root / "sweep.json").read_text())
    assert doc["grid"] == {"max_steps": [1, 2]}
    assert [p["name"] for p in doc["points"]] == ["max_steps=1", "max_steps=2"]
    assert [p["status"] for p in doc["points"]] == ["done", "done"]
    assert [p["data_from"] for p in doc["points"]] == [None, "max_steps=1"]
    assert doc["points"][0]["ran"] == ["model", "data", "train", "evaluate"]
    assert doc["points"][1]["ran"] == ["train", "evaluate"]
    for point in doc["points"]:
        m = point["metrics"]
        assert set(m["asr"]) == {"direct", "prefill"}
        assert 0 <= m["asr"]["direct"]["circuit_broken"] <= 1 and 0 <= m["over_refusal"]["circuit_broken"] <= 1
        assert isinstance(m["capability_change"], float) and isinstance(m["cos_rerouting_end"], float)
        assert m["steps"] == point["overrides"]["max_steps"] and m["train_seconds"] > 0
    lines = (root / "sweep.md").read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ")]
    assert rows[0].startswith("| max_steps | ASR direct | ASR prefill |")
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| 1", "| 2"]
    assert any(line.startswith("base model (every point): ASR direct") for line in lines)


def test_rerunning_the_sweep_resumes_without_recomputing_or_clobbering(toy_sweep, monkeypatch):
    root, args, _ = toy_sweep
    import circuit_breakers.experiments.main_job as pipeline
    import circuit_breakers.training.run as train_module

    def fail(*_a, **_k):
        raise AssertionError("finished work ran again")

    before = {n: (root / n / "train" / "summary.json").read_text() for n in ("max_steps=1", "max_steps=2")}
    monkeypatch.setattr(train_module, "train", fail)
    monkeypatch.setattr(pipeline, "build_data", fail)
    monkeypatch.setattr(pipeline, "evaluate_stage", fail)
    monkeypatch.setattr(sweep, "share_data", fail)  # a finished point keeps its own folders
    assert main(args) == 0
    doc = json.loads((root / "sweep.json").read_text())
    assert [p["ran"] for p in doc["points"]] == [[], []]
    assert [p["status"] for p in doc["points"]] == ["done", "done"]
    assert {n: (root / n / "train" / "summary.json").read_text() for n in before} == before


def test_a_ledger_keyed_by_an_older_digest_keeps_its_points_own_work(toy_sweep, monkeypatch):
    """Stages recorded under another digest of the same settings (an older hash) count as finished: the
    re-run sweep neither recomputes nor copies anything, and the ledgers get the current keys back."""
    root, args, _ = toy_sweep
    import circuit_breakers.experiments.main_job as pipeline
    import circuit_breakers.training.run as train_module

    def fail(*_a, **_k):
        raise AssertionError("finished work ran again")

    names = ("max_steps=1", "max_steps=2")
    current = {n: json.loads((root / n / "stages.json").read_text()) for n in names}
    for n in names:
        old = {stage: {**entry, "key": "0123456789abcdef"} for stage, entry in current[n].items()}
        (root / n / "stages.json").write_text(json.dumps(old, indent=2))
    monkeypatch.setattr(train_module, "train", fail)
    monkeypatch.setattr(pipeline, "build_data", fail)
    monkeypatch.setattr(pipeline, "evaluate_stage", fail)
    monkeypatch.setattr(sweep, "share_data", fail)
    assert main(args) == 0
    doc = json.loads((root / "sweep.json").read_text())
    assert [p["status"] for p in doc["points"]] == ["done", "done"]
    for n in names:
        keys = {stage: e["key"] for stage, e in json.loads((root / n / "stages.json").read_text()).items()}
        assert keys == {stage: e["key"] for stage, e in current[n].items()}


def test_data_stage_key_is_the_one_the_pipeline_records(toy_sweep):
    """sweep.data_stage_key mirrors run_pipeline's data key: if they drift apart, this says so."""
    root, args, _ = toy_sweep
    from circuit_breakers.recipes import parse_run_config

    overrides = args[args.index("--model_name_or_path") :]  # what the sweep put on top of each point's recipe
    configs = parse_run_config(overrides, recipe=root / "max_steps=1" / "recipe.yaml")
    recorded = json.loads((root / "max_steps=1" / "stages.json").read_text())["data"]["key"]
    assert Run.digest(data_stage_key(configs)) == recorded


def test_data_from_takes_an_existing_runs_data_when_its_settings_match(toy_sweep, monkeypatch):
    root, args, _ = toy_sweep
    import circuit_breakers.experiments.main_job as pipeline

    def fail(*_a, **_k):
        raise AssertionError("the data was built again")

    monkeypatch.setattr(pipeline, "build_data", fail)
    new = [a if a != "toy" else "toy-from" for a in args]
    new[new.index("max_steps=1|2")] = "max_steps=3"
    assert main([*new, "--data_from", str(root / "max_steps=1")]) == 0
    point = root.parent / "toy-from" / "max_steps=3"
    ledger = json.loads((point / "stages.json").read_text())
    assert ledger["data"]["copied_from"] == "max_steps=1" and ledger["train"]["done"]
    assert json.loads((point / "train" / "summary.json").read_text())["steps"] == 3
    # other data settings: the folder is not used (the recorded key differs), the data is built
    monkeypatch.undo()
    other = [*new, "--data_from", str(root / "max_steps=1"), "--completion_tokens", "5"]
    other[other.index("toy-from")] = "toy-other"
    assert main(other) == 0
    assert (
        "copied_from" not in json.loads((root.parent / "toy-other" / "max_steps=3" / "stages.json").read_text())["data"]
    )


def test_command_line_settings_are_read_as_recipe_values():
    """`--key value` arguments become recipe settings typed as a recipe's values, so library code never sees argv."""
    from circuit_breakers.recipes import parse_settings, settings_from_args

    settings = settings_from_args(
        [
            "--alpha",
            "5",
            "--target_layers",
            "10",
            "--run_id",
            "123",
            "--merge",
            "--retain_layers=10,20",
            "--learning_rate",
            "1e-3",
            "--dtype",
            "float32",
        ]
    )
    assert settings == {
        "alpha": 5,
        "target_layers": [10],
        "run_id": "123",
        "merge": True,
        "retain_layers": "10,20",
        "learning_rate": "1e-3",
        "dtype": "float32",
    }
    assert settings_from_args(["--target_layers", "10", "20"]) == {"target_layers": [10, 20]}
    with pytest.raises(ConfigError, match="alpah"):
        settings_from_args(["--alpah", "5"])
    assert settings_from_args(["--alpha", "5", "--alpha", "6"]) == {"alpha": 6}
    model_cfg, data_cfg, cb_cfg, run_cfg = parse_settings(settings, recipe="embedded")
    assert (cb_cfg.alpha, cb_cfg.target_layers, cb_cfg.learning_rate) == (5.0, [10], 1e-3)
    assert (run_cfg.run_id, model_cfg.dtype, cb_cfg.retain_layers) == ("123", "float32", "10,20")
    assert data_cfg.max_length == 256  # the recipe's value where no setting overrides it
    with pytest.raises(ConfigError, match="alpha must be a number"):
        parse_settings({"alpha": "x"}, recipe="embedded")


def test_the_table_shows_each_points_worst_held_out_source():
    def point(name, per_source):
        asr = {"direct": {"base": 0.9, "circuit_broken": 0.1}}
        return {
            "name": name,
            "status": "done",
            "overrides": {"alpha": name},
            "metrics": {"asr": asr, "asr_by_source": {"direct": per_source}},
        }

    doc = {"grid": {"alpha": [1, 2]}, "points": [point(1, {"a": 0.0, "b": 0.4}), point(2, {"a": 0.2, "b": 0.1})]}
    header, rows, _ = sweep.sweep_rows(doc)
    column = header.index("worst source direct")
    assert [row[column] for row in rows] == ["40% b", "20% a"]
    one_source = {"grid": doc["grid"], "points": [point(1, {"a": 0.0})]}
    assert "worst source direct" not in sweep.sweep_rows(one_source)[0]  # nothing to compare with one source
