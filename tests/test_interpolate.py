"""Capability-bounded interpolation (interpolate.py) on tiny saved models: the weights written are
start + w (end - start); the weight chosen is the largest on the grid whose loss change, computed here
by hand, is within the budget; what cannot be met or matched is refused; the CLI writes a loadable model
with its provenance."""

import json

import pytest
import torch

from circuit_breakers.cli.main import main
from circuit_breakers.data.records import Record, write_records
from circuit_breakers.evaluation.capability import teacher_forced_loss
from circuit_breakers.experiments.interpolate import (
    InterpolationError,
    check_compatible,
    interpolate_within_budget,
    set_interpolated,
)
from circuit_breakers.models import load_model, load_tokenizer
from helpers import make_model, save_tiny

GRID = (1.0, 0.75, 0.5, 0.25, 0.0)


def records() -> list[Record]:
    chats = [
        ("How do I bake bread?", "Mix flour, water and yeast, then bake it."),
        ("Write a poem about the sea.", "The waves roll in, the gulls cry out."),
        ("Explain photosynthesis.", "Plants turn light, water and carbon dioxide into sugar."),
    ]
    return [
        Record([{"role": "user", "content": q}, {"role": "assistant", "content": a}], kind="retain") for q, a in chats
    ]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """base (= start) and an end model with sharper (so worse: the model is untrained) predictions and
    blocks 1-2 pushed away from the start."""
    root = tmp_path_factory.mktemp("interp")
    start = save_tiny(root / "start", layers=4)
    end_model = load_model(str(start))
    torch.manual_seed(1)
    with torch.no_grad():
        for block in end_model.model.layers[1:3]:
            for p in block.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        end_model.model.norm.weight.mul_(6.0)
    end_model.save_pretrained(root / "end")
    load_tokenizer(str(start)).save_pretrained(root / "end")
    return start, root / "end"


def loss_changes_by_hand(start, end) -> dict[float, float]:
    tokenizer = load_tokenizer(str(start))
    a, b = load_model(str(start)), load_model(str(end))
    base_loss = teacher_forced_loss(a, tokenizer, records()).mean_loss
    changes = {}
    for w in GRID:
        model = load_model(str(start))
        with torch.no_grad():
            for (name, p), pa, pb in zip(model.named_parameters(), a.parameters(), b.parameters()):
                p.copy_(pa * (1 - w) + pb * w)
        changes[w] = teacher_forced_loss(model, tokenizer, records()).mean_loss / base_loss - 1
    return changes


def test_set_interpolated_writes_the_line_between_the_models():
    start, end, model = make_model(layers=2, seed=0), make_model(layers=2, seed=1), make_model(layers=2, seed=2)
    a, b = start.state_dict(), end.state_dict()
    set_interpolated(model, a, b, 0.25)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, 0.75 * a[name] + 0.25 * b[name], atol=1e-6), name
    set_interpolated(model, a, b, 1.0)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.allclose(model(ids).logits, end(ids).logits, atol=1e-5)


def test_the_largest_weight_within_the_budget_is_chosen(folders):
    start, end = folders
    changes = loss_changes_by_hand(start, end)
    assert changes[0.0] == pytest.approx(0.0, abs=1e-6) and changes[1.0] > 0.5  # the end costs capability
    budget = (changes[0.25] + changes[0.5]) / 2
    model, result = interpolate_within_budget(start, end, records(), base=str(start), max_loss_change=budget, grid=GRID)
    expected = max(w for w in GRID if changes[w] <= budget)
    assert result.weight == expected and 0.0 < expected < 1.0
    assert [w for w, _ in result.tried] == [w for w in GRID if w >= expected]
    for w, change in result.tried:
        assert change == pytest.approx(changes[w], abs=1e-5)
    a, b = load_model(str(start)).state_dict(), load_model(str(end)).state_dict()
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, a[name] + expected * (b[name] - a[name]), atol=1e-6), name


def test_an_unmet_budget_and_mismatched_models_are_refused(folders, tmp_path):
    start, end = folders
    with pytest.raises(InterpolationError, match="no weight keeps the loss change within"):
        interpolate_within_budget(start, end, records(), base=str(start), max_loss_change=-0.5, grid=(1.0, 0.5))
    with pytest.raises(InterpolationError, match="no validation records"):
        interpolate_within_budget(start, end, [], base=str(start))
    with pytest.raises(InterpolationError, match="shape"):
        check_compatible(make_model(layers=2).state_dict(), make_model(layers=2, vocab_size=301).state_dict())
    with pytest.raises(InterpolationError, match="differ in parameters"):
        check_compatible(make_model(layers=2).state_dict(), make_model(layers=3).state_dict())


def test_cli_writes_the_chosen_model_and_its_provenance(folders, tmp_path, capsys):
    start, end = folders
    data = write_records(records(), tmp_path / "val.jsonl")
    out = tmp_path / "out"
    assert (
        main(
            [
                "interpolate",
                str(start),
                str(end),
                str(out),
                "--data",
                str(data),
                "--base",
                str(start),
                "--max_loss_change",
                "0",
                "--grid",
                "1,0",
            ]
        )
        == 0
    )
    info = json.loads((out / "interpolation.json").read_text())
    assert info["weight"] == 0.0 and [w for w, _ in info["tried"]] == [1.0, 0.0] and info["n_records"] == 3
    assert info["base"] == str(start) and info["end"] == str(end)
    loaded, original = load_model(str(out)), load_model(str(start))
    assert all(torch.equal(p, q) for p, q in zip(loaded.parameters(), original.parameters()))
    assert load_tokenizer(str(out)).get_vocab() == load_tokenizer(str(start)).get_vocab()
    assert (
        main(
            [
                "interpolate",
                str(start),
                str(end),
                str(tmp_path / "none"),
                "--data",
                str(data),
                "--base",
                str(start),
                "--max_loss_change",
                "-1",
            ]
        )
        == 2
    )
    assert "no weight keeps" in capsys.readouterr().err and not (tmp_path / "none").exists()


def test_cli_refuses_an_occupied_output_folder_before_any_work_unless_overwrite(folders, tmp_path, capsys):
    start, end = folders
    data = write_records(records(), tmp_path / "val.jsonl")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    command = ["interpolate", str(start), str(end), str(out), "--data", str(data), "--base", str(start)]
    assert main([*command, "--max_loss_change", "0", "--grid", "1,0"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("error: ") and str(out) in err and "--overwrite" in err and "w 1" not in capsys.readouterr().out
    )
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert main([*command, "--max_loss_change", "0", "--grid", "1,0", "--overwrite"]) == 0
    assert json.loads((out / "interpolation.json").read_text())["weight"] == 0.0
