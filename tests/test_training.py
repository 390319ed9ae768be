"""Training on tiny models: parameters move, rerouting happens, export and resume are exact."""

import logging
from types import SimpleNamespace

import pytest
import torch
from peft import PeftModel
from transformers import TrainerControl, TrainerState

from circuit_breakers.data.records import Record
from circuit_breakers.models import load_model, num_layers
from circuit_breakers.recipes import parse_config
from circuit_breakers.training import StallCheck, TrainingDiverged
from circuit_breakers.training.run import train
from helpers import save_tiny

HARMFUL = "Sure, here is how to do it step by step. Mix flour, water, yeast and salt, then knead."
BENIGN = "The waves roll in, the gulls cry out. Plants turn light into sugar."


def records(n=8, numbered=True):
    tag = (lambda i: f" {i}") if numbered else (lambda i: "")
    cb = [Record.from_prompt(f"How do I bake bread{tag(i)}?", HARMFUL, "circuit_breaker") for i in range(n)]
    retain = [Record.from_prompt(f"Write a poem about the sea{tag(i)}.", BENIGN, "retain") for i in range(n)]
    return cb, retain


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("tiny") / "model", "llama", "chatml", layers=6)


def config(tiny_dir, out, *extra):
    args = [
        "--model_name_or_path",
        str(tiny_dir),
        "--output_dir",
        str(out),
        "--max_steps",
        "8",
        "--per_device_train_batch_size",
        "2",
        "--target_layers",
        "2",
        "4",
        "--logging_steps",
        "1",
        "--save_steps",
        "4",
        "--seed",
        "0",
        "--dataloader_num_workers",
        "0",
        *extra,
    ]
    return parse_config(args)


# The levers of configs/embedded.yaml (random lora_B, centred cosine, relative squared retain distance,
# constant retain weight), with the rate and weight scaled for an 8-step run on a tiny model whose
# hidden states are ~10x smaller than SmolLM2's (the embedded recipe: lr 1e-3, weight 100, 60 steps).
CHOSEN = [
    "--lora_init",
    "random",
    "--learning_rate",
    "2e-2",
    "--alpha",
    "5",
    "--representation",
    "centered",
    "--retain_distance",
    "relative_squared",
    "--schedule",
    "single",
    "--retain_weight",
    "10",
    "--cb_mask_mode",
    "completion",
]


def test_training_changes_lora_and_reroutes_while_retaining(tiny_dir, tmp_path):
    m, d, c = config(tiny_dir, tmp_path / "run", *CHOSEN)
    result = train(m, d, c, *records())
    before = PeftModel.from_pretrained(load_model(str(tiny_dir)), str(result.adapter_dir))
    lora_b = [p for n, p in before.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    s = result.summary
    assert s["cos_rerouting_start"] > 0.95
    assert s["cos_rerouting_end"] < 0.5, s
    assert s["cos_retain_end"] > 0.9, s
    assert s["rerouted"] is True
    # centred representation: the cosine the loss sees is logged and summarised beside the raw one
    assert s["cos_rerouting_seen_end"] < s["cos_rerouting_seen_start"] - 0.3, s


def test_lora_parameters_change_from_init(tiny_dir, tmp_path):
    from circuit_breakers.training.run import setup_model

    m, d, c = config(tiny_dir, tmp_path / "run", *CHOSEN, "--max_steps", "2", "--merge", "false")
    peft_model, _, _ = setup_model(m, c)
    init = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" in n}
    result = train(m, d, c, *records())
    from safetensors.torch import load_file

    trained = load_file(result.adapter_dir / "adapter_model.safetensors")
    changed = [k for k in trained if not torch.allclose(trained[k], init[k.replace(".weight", ".default.weight")])]
    assert len(changed) == len(trained)


def test_merged_export_of_truncated_run_is_full_and_equals_base_plus_adapter(tiny_dir, tmp_path):
    m, d, c = config(tiny_dir, tmp_path / "run", *CHOSEN, "--max_steps", "3")
    result = train(m, d, c, *records())
    assert result.summary["trained_layers"] == 4
    merged = load_model(str(result.merged_dir), dtype="float32")
    assert num_layers(merged) == 6
    adapted = PeftModel.from_pretrained(load_model(str(tiny_dir), dtype="float32"), str(result.adapter_dir)).eval()
    ids = torch.randint(3, 250, (2, 12))
    with torch.no_grad():
        want = adapted(input_ids=ids).logits
        got = merged(input_ids=ids).logits
        base = load_model(str(tiny_dir), dtype="float32")(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-4)
    assert not torch.allclose(got, base, atol=1e-3)  # the merge did something
    card = (result.adapter_dir / "README.md").read_text()
    assert "target layers" in card and "[2, 4]" in card


def losses_of(result):
    return [
        (row["step"], round(row["loss"], 6))
        for row in result.log_history
        if "loss" in row and "train_runtime" not in row
    ]


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--layer_weights", "learned", "--layer_weight_lr", "0.2"],
        ["--lat_epsilon", "0.3", "--lat_steps", "2", "--lat_layer", "1"],
        [
            "--lat_epsilon",
            "2",
            "--lat_steps",
            "2",
            "--lat_positions",
            "suffix",
            "--lat_suffix_init",
            "x x x",
            "--lat_step_size",
            "0.2",
        ],
    ],
    ids=["plain", "learned_layer_weights", "lat", "lat_suffix"],
)
def test_resume_reproduces_uninterrupted_loss_sequence(tiny_dir, tmp_path, extra):
    m, d, c = config(tiny_dir, tmp_path / "full", *CHOSEN, *extra, "--merge", "false")
    uninterrupted = train(m, d, c, *records())
    full = losses_of(uninterrupted)
    m, d, c = config(tiny_dir, tmp_path / "part", *CHOSEN, *extra, "--merge", "false", "--max_steps", "8")
    from transformers import TrainerCallback

    class StopAt6(TrainerCallback):  # in the middle of the second epoch (4 steps per epoch)
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 6:
                control.should_training_stop = control.should_save = True

    train(m, d, c, *records(), callbacks=[StopAt6()])
    m, d, c = config(
        tiny_dir,
        tmp_path / "part",
        *CHOSEN,
        *extra,
        "--merge",
        "false",
        "--resume_from_checkpoint",
        str(tmp_path / "part" / "checkpoint-6"),
    )
    result = train(m, d, c, *records())
    resumed = losses_of(result)
    assert [s for s, _ in resumed] == list(range(1, 9))  # steps 1-6 come from the checkpoint's state
    assert resumed == full
    if "suffix" in extra:  # the universal soft suffix was checkpointed (else the resumed losses would differ)
        assert (tmp_path / "part" / "checkpoint-6" / "lat_suffix.safetensors").is_file()
    if "learned" in extra:  # the logits left uniform, were checkpointed and came back
        weights = uninterrupted.summary["layer_weights"]
        assert set(weights) == {"2", "4"} and sum(weights.values()) == pytest.approx(1.0)
        assert abs(weights["2"] - 0.5) > 1e-3
        assert result.summary["layer_weights"] == weights
        logged = [row for row in uninterrupted.log_history if "layer_weight_2" in row]
        assert len(logged) == 8 and logged[0]["layer_weight_2"] == 0.5


def test_gradient_accumulation_keeps_schedule_and_loss(tiny_dir, tmp_path):
    # dropout masks would differ between the two layouts; the centred cosine's mean is per micro-batch
    nodrop = [*CHOSEN, "--lora_dropout", "0", "--representation", "raw"]
    m, d, c = config(tiny_dir, tmp_path / "a", *nodrop, "--merge", "false", "--max_steps", "3")
    plain = train(m, d, c, *records())
    m, d, c = config(
        tiny_dir,
        tmp_path / "b",
        *nodrop,
        "--merge",
        "false",
        "--max_steps",
        "3",
        "--per_device_train_batch_size",
        "1",
        "--gradient_accumulation_steps",
        "2",
        "--train_sampling_strategy",
        "sequential",
    )
    m2, d2, c2 = config(
        tiny_dir,
        tmp_path / "c",
        *nodrop,
        "--merge",
        "false",
        "--max_steps",
        "3",
        "--train_sampling_strategy",
        "sequential",
    )
    # rows of different lengths (numbered prompts, 1 vs 2 tokens): a mean of two micro-batch means would
    # differ from the mean over all tokens; the accumulated step divides by the whole step's token count
    cb, retain = records()
    for i in range(0, len(cb), 4):
        cb[i] = Record.from_prompt(
            cb[i].messages[0]["content"], HARMFUL + " Then bake it for forty minutes.", "circuit_breaker"
        )
    accumulated, reference = train(m, d, c, cb, retain), train(m2, d2, c2, cb, retain)

    def coef(r):
        return [row["coef_rerouting"] for row in r.log_history if "coef_rerouting" in row]

    assert coef(accumulated) == coef(reference) == coef(plain)
    # same examples, batch 2 vs 1 x 2 accumulated: same loss up to float error
    la = [row["loss"] for row in accumulated.log_history if "coef_rerouting" in row]
    lr = [row["loss"] for row in reference.log_history if "coef_rerouting" in row]
    assert la == pytest.approx(lr, rel=1e-5)
    assert la[-1] != pytest.approx(la[0], rel=1e-3)  # training moved: the comparison means something


def test_nan_loss_stops_with_clear_message(tiny_dir, tmp_path):
    m, d, c = config(
        tiny_dir,
        tmp_path / "nan",
        "--lora_init",
        "random",
        "--learning_rate",
        "1e38",
        "--max_grad_norm",
        "0",
        "--merge",
        "false",
        "--max_steps",
        "6",
    )
    with pytest.raises(TrainingDiverged, match=r"at step \d+"):
        train(m, d, c, *records())


def test_paper_preset_stalls_and_the_detector_fires(tiny_dir, tmp_path, caplog):
    m, d, c = config(
        tiny_dir,
        tmp_path / "paper",
        "--config",
        "paper",
        "--max_steps",
        "6",
        "--stall_check_steps",
        "4",
        "--merge",
        "false",
    )
    with caplog.at_level("WARNING", logger="circuit_breakers"):
        result = train(m, d, c, *records())
    assert result.summary["rerouted"] is False
    assert any("rerouting has not started" in r.message for r in caplog.records)


def test_under_the_adversary_the_stall_warning_says_so(tiny_dir, tmp_path, caplog):
    """RR + LAT logs the cosine on the adversary's shifted rows, where a stall can also mean the adversary
    undoes rerouting every step (which can erase the circuit breaker): the warning must say that."""
    m, d, c = config(
        tiny_dir,
        tmp_path / "paper-lat",
        "--config",
        "paper",
        "--max_steps",
        "6",
        "--stall_check_steps",
        "4",
        "--merge",
        "false",
        "--lat_epsilon",
        "0.5",
        "--lat_steps",
        "2",
    )
    with caplog.at_level("WARNING", logger="circuit_breakers"):
        result = train(m, d, c, *records())
    assert result.summary["rerouted"] is False and result.summary["stall_warning"] is True
    messages = [r.message for r in caplog.records]
    assert any("does not hold under the adversary" in text for text in messages), messages
    assert not any("rerouting has not started" in text for text in messages)


def test_chosen_default_reroutes_without_warning(tiny_dir, tmp_path, caplog):
    m, d, c = config(tiny_dir, tmp_path / "chosen", *CHOSEN, "--stall_check_steps", "4", "--merge", "false")
    with caplog.at_level("WARNING", logger="circuit_breakers"):
        result = train(m, d, c, *records())
    assert result.summary["rerouted"] is True
    assert not any("rerouting has not started" in r.message for r in caplog.records)


def test_a_continued_rerouted_adapter_counts_as_rerouted_without_a_stall_warning(tiny_dir, tmp_path, caplog):
    """Rerouting is judged against adapted == frozen (cosine 1), not against the run's first log: an adapter
    continued after it has rerouted starts low and barely moves, which is no stall."""
    m, d, c = config(tiny_dir, tmp_path / "first", *CHOSEN, "--merge", "false")
    first = train(m, d, c, *records())
    assert first.summary["cos_rerouting_end"] < 0.5
    m, d, c = config(
        tiny_dir,
        tmp_path / "second",
        *CHOSEN,
        "--merge",
        "false",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-6",
        "--stall_check_steps",
        "1",
        "--init_adapter",
        str(first.adapter_dir),
    )
    with caplog.at_level("WARNING", logger="circuit_breakers"):
        second = train(m, d, c, *records())
    s = second.summary
    assert s["cos_rerouting_start"] < 0.5 and abs(s["cos_rerouting_end"] - s["cos_rerouting_start"]) < 0.05, s
    assert s["rerouted"] is True
    assert not any("rerouting has not started" in r.message for r in caplog.records)


def test_init_adapter_continues_from_an_existing_adapter(tiny_dir, tmp_path):
    """Continual training (issue 9): the second run starts from the first run's LoRA weights, not from a
    fresh LoRA, and trains them further; an adapter deeper than the kept blocks is refused."""
    from safetensors.torch import load_file
    from transformers import TrainerCallback

    m, d, c = config(tiny_dir, tmp_path / "first", *CHOSEN, "--merge", "false", "--max_steps", "3")
    first = train(m, d, c, *records())
    first_weights = load_file(str(first.adapter_dir / "adapter_model.safetensors"))

    seen = {}

    class AtStart(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):
            seen.update({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})

    m, d, c = config(
        tiny_dir,
        tmp_path / "second",
        *CHOSEN,
        "--merge",
        "false",
        "--max_steps",
        "3",
        "--init_adapter",
        str(first.adapter_dir),
    )
    second = train(m, d, c, *records(), callbacks=[AtStart()])
    at_start = {n.replace(".default", ""): t for n, t in seen.items()}
    assert at_start and at_start.keys() == first_weights.keys()
    for name, weight in first_weights.items():
        torch.testing.assert_close(at_start[name], weight)  # started exactly from the first adapter
    lora_b = [n for n in at_start if "lora_B" in n]
    assert all(at_start[n].abs().sum() > 0 for n in lora_b)
    after = load_file(str(second.adapter_dir / "adapter_model.safetensors"))
    assert any(not torch.equal(after[n], first_weights[n]) for n in first_weights)  # and trained them further
    assert second.summary["lora_blocks"] == first.summary["lora_blocks"]

    m, d, c = config(
        tiny_dir,
        tmp_path / "shallow",
        *CHOSEN,
        "--merge",
        "false",
        "--target_layers",
        "1",
        "2",
        "--init_adapter",
        str(first.adapter_dir),
    )
    with pytest.raises(ValueError, match="has LoRA on block 3"):
        train(m, d, c, *records())


def log_cosines(check, state, args, rows):
    """Feed (step, rerouting cosine) logs to `check` as Trainer.log does (the row is in log_history first)."""
    for step, cos in rows:
        state.global_step = step
        logs = {"loss": 1.0, "cos_rerouting": cos, "cos_retain": 0.5}
        state.log_history.append({**logs, "step": step})
        check.on_log(args, state, TrainerControl(), logs=logs)


def test_stall_check_warns_once_and_keeps_the_logged_cosines(caplog):
    caplog.set_level(logging.WARNING, logger="circuit_breakers")
    args = SimpleNamespace(stall_check_steps=4, stall_margin=0.01, lat_epsilon=0.0)
    stalled, state = StallCheck(), TrainerState()
    log_cosines(stalled, state, args, [(2, 0.999), (4, 0.998), (6, 0.997)])
    assert stalled.history == [(2, 0.999, 0.5), (4, 0.998, 0.5), (6, 0.997, 0.5)] and stalled.warned
    warnings = [r.getMessage() for r in caplog.records if "rerouting has not started" in r.getMessage()]
    assert len(warnings) == 1 and "0.9990 -> 0.9980 after 4 steps" in warnings[0]

    resumed = StallCheck()  # a resumed run: its first log brings back those before the checkpoint
    log_cosines(resumed, state, args, [(8, 0.5)])
    assert resumed.history == [*stalled.history, (8, 0.5, 0.5)] and not resumed.warned

    caplog.clear()
    moving, state = StallCheck(), TrainerState()
    log_cosines(
        moving, state, SimpleNamespace(stall_check_steps=4, stall_margin=0.01, lat_epsilon=0.5), [(2, 0.999), (4, 0.9)]
    )
    assert not moving.warned and not caplog.records
    log_cosines(moving, state, SimpleNamespace(stall_check_steps=4, stall_margin=0.2, lat_epsilon=0.5), [(6, 0.9)])
    assert moving.warned and "does not hold under the adversary" in caplog.records[-1].getMessage()
