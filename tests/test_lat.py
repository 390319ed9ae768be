"""RR + LAT (issue 9): a latent adversary perturbs hidden states of circuit-breaker rows during training."""

import pytest
import torch

from circuit_breakers.config import CircuitBreakerConfig, ConfigError
from circuit_breakers.representations import hidden_states, perturbed, stacked
from helpers import make_model
from test_chunked_step import batch, trainer_for


def rerouted(model):
    """Scale lora_B up: an adapter that has moved the representations, so the adversary has something to undo
    (on a fresh adapter adapted == frozen already and no shift is the adversary's best)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(100)
    return model


@pytest.mark.parametrize("layer", [0, 2])
def test_perturbed_shifts_exactly_one_hidden_state(layer):
    model = make_model("llama", layers=4, seed=1).eval()
    ids = torch.randint(3, 300, (2, 7))
    attn = torch.ones_like(ids)
    clean = hidden_states(model, ids, attn, [0, 1, 2, 3])
    delta = torch.randn(2, 7, clean[0].shape[-1])
    with torch.no_grad(), perturbed(model, layer, delta):
        shifted = hidden_states(model, ids, attn, [0, 1, 2, 3])
    torch.testing.assert_close(shifted[layer], clean[layer] + delta)
    for i in range(layer):
        torch.testing.assert_close(shifted[i], clean[i])
    assert not torch.allclose(shifted[3], clean[3], atol=1e-3)  # the shift travels up the stack
    if layer == 0:  # the same as feeding shifted input embeddings
        embeds = model.get_input_embeddings()(ids) + delta
        with torch.no_grad():
            want = model(inputs_embeds=embeds, attention_mask=attn, output_hidden_states=True).hidden_states[3]
        torch.testing.assert_close(shifted[3], want, rtol=1e-4, atol=1e-5)
    after = hidden_states(model, ids, attn, [3])  # the hook is gone
    torch.testing.assert_close(after[3], clean[3])


def test_adversary_stays_in_its_ball_on_circuit_breaker_rows_and_raises_the_cosine(tmp_path):
    trainer, model = trainer_for(tmp_path, 0, lat_epsilon=0.5, lat_steps=3, lat_layer=1, lat_step_size=0.25)
    rerouted(model)
    inputs = batch()
    ids, attn, m_cb = inputs["input_ids"], inputs["attention_mask"], inputs["cb_mask"] * inputs["attention_mask"]
    frozen = trainer.frozen_states(model, ids, attn)
    delta = trainer.adversary.shift(model, ids, attn, m_cb, frozen, None)
    assert all(p.grad is None for p in model.parameters())  # the adversary trains nothing
    norms, clean_norms = delta.norm(dim=-1), frozen[1].norm(dim=-1)
    assert (norms <= 0.5 * clean_norms + 1e-4).all()
    assert norms[3:].abs().max() == 0  # retain rows untouched
    assert (norms[:3] * (1 - attn[:3])).abs().max() == 0  # padding untouched
    ratio = norms[:3][attn[:3] > 0] / clean_norms[:3][attn[:3] > 0]
    assert ratio.median() > 0.3  # it moved far into its ball

    def cosine(d):
        with torch.no_grad(), perturbed(model, 1, d):
            adapted = stacked(hidden_states(model, ids, attn, [2, 4]), [2, 4])
        f = stacked(frozen, [2, 4])
        cos = torch.nn.functional.cosine_similarity(adapted, f, dim=-1)
        return float((cos * m_cb).sum() / (m_cb.sum() * 2))

    assert cosine(delta) > cosine(None) + 1e-3


def test_adversary_takes_signed_steps_of_the_given_size(tmp_path):
    """One step moves every coordinate of a movable token by lat_step_size x its norm / sqrt(H), the
    embedding attack's signed rule (an L2 size of lat_step_size x the norm)."""
    trainer, model = trainer_for(tmp_path, 0, lat_epsilon=5.0, lat_steps=2, lat_layer=1, lat_step_size=0.1)
    rerouted(model)
    inputs = batch()
    ids, attn, m_cb = inputs["input_ids"], inputs["attention_mask"], inputs["cb_mask"] * inputs["attention_mask"]
    frozen = trainer.frozen_states(model, ids, attn)
    delta = trainer.adversary.shift(model, ids, attn, m_cb, frozen, None)[:3]  # candidates: no shift, one step
    real = attn[:3] > 0
    want = 0.1 * frozen[1][:3].norm(dim=-1, keepdim=True) / frozen[1].shape[-1] ** 0.5
    moved = delta.abs().sum(dim=(1, 2)) > 0
    assert moved.all()  # against a rerouted adapter one step beats none on every row
    torch.testing.assert_close(delta.abs()[real], want.expand_as(delta)[real], rtol=1e-4, atol=1e-6)
    assert delta[~real].abs().max() == 0


def test_lat_step_trains_on_the_perturbed_rows_and_keeps_retain_clean(tmp_path):
    inputs = batch()
    plain, model_p = trainer_for(tmp_path / "p", 0)
    plain.training_step(rerouted(model_p), dict(inputs))
    hardened, model_h = trainer_for(tmp_path / "h", 0, lat_epsilon=0.5, lat_steps=2, lat_layer=1, lat_step_size=0.25)
    hardened.training_step(rerouted(model_h), dict(inputs))
    p, h = plain.step_metrics, hardened.step_metrics
    assert h["loss_rerouting"][-1] > p["loss_rerouting"][-1] + 1e-4  # the adversary pulled the cosine back up
    assert h["loss_retain"][-1] == pytest.approx(p["loss_retain"][-1], rel=1e-6)
    assert any(q.grad is not None and q.grad.abs().sum() > 0 for q in model_h.parameters())


def test_lat_settings_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="lat_epsilon"):
        CircuitBreakerConfig(output_dir=str(tmp_path), lat_epsilon=-1, use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="lat_step_size"):
        CircuitBreakerConfig(output_dir=str(tmp_path), lat_epsilon=0.5, lat_step_size=0, use_cpu=True, report_to="none")
    with pytest.raises(ConfigError, match="below the deepest target layer"):
        trainer_for(tmp_path, 0, lat_epsilon=0.5, lat_layer=4)


def test_adversary_rows_are_independent_of_the_batch_they_come_in(tmp_path):
    """Per-coordinate signed steps and a per-row choice: chunks and devices find the same shifts."""
    trainer, model = trainer_for(tmp_path, 0, lat_epsilon=0.5, lat_steps=3, lat_layer=1, lat_step_size=0.25)
    rerouted(model)
    inputs = batch()
    ids, attn, m_cb = inputs["input_ids"], inputs["attention_mask"], inputs["cb_mask"] * inputs["attention_mask"]
    whole = trainer.adversary.shift(model, ids, attn, m_cb, trainer.frozen_states(model, ids, attn), None)
    for row in range(3):
        one = slice(row, row + 1)
        alone = trainer.adversary.shift(
            model, ids[one], attn[one], m_cb[one], trainer.frozen_states(model, ids[one], attn[one]), None
        )
        torch.testing.assert_close(alone[0], whole[row], rtol=1e-3, atol=1e-4)
        assert alone.abs().sum() > 0


def test_prompt_only_adversary_leaves_the_completion_tokens_alone(tmp_path):
    trainer, model = trainer_for(
        tmp_path, 0, lat_epsilon=0.5, lat_steps=3, lat_layer=1, lat_positions="prompt", lat_step_size=0.25
    )
    rerouted(model)
    inputs = batch()
    ids, attn, m_cb = inputs["input_ids"], inputs["attention_mask"], inputs["cb_mask"] * inputs["attention_mask"]
    delta = trainer.adversary.shift(model, ids, attn, m_cb, trainer.frozen_states(model, ids, attn), None)
    norms = delta.norm(dim=-1)
    assert norms[m_cb > 0].abs().max() == 0  # completion tokens untouched
    prompt = (attn[:3] > 0) & (m_cb[:3] == 0)
    assert (norms[:3][prompt] > 0).float().mean() > 0.9  # the prompt tokens moved


def test_insert_slots_puts_the_suffix_before_the_end_of_the_user_turn():
    """Circuit-breaker rows get the placeholders right before the last end of a user turn (where the embedding
    attack's soft prompt sits), outside both loss masks; retain rows are only padded."""
    from circuit_breakers.training import insert_slots

    ids = torch.tensor([[5, 7, 8, 6, 7, 8, 30, 31, 0], [5, 40, 7, 8, 41, 42, 0, 0, 0]])
    attn = (ids > 0).long()
    cb = torch.tensor([[0, 0, 0, 0, 0, 0, 1, 1, 0], [0] * 9])
    retain = torch.tensor([[0] * 9, [0, 0, 0, 0, 1, 1, 0, 0, 0]])
    out, slots = insert_slots(
        {"input_ids": ids, "attention_mask": attn, "cb_mask": cb, "retain_mask": retain},
        torch.tensor([90, 91]),
        torch.tensor([7, 8]),
        pad_id=0,
    )
    assert out["input_ids"].tolist() == [[5, 7, 8, 6, 90, 91, 7, 8, 30, 31, 0], [5, 40, 7, 8, 41, 42, 0, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[1] * 10 + [0], [1] * 6 + [0] * 5]
    assert out["cb_mask"].tolist() == [[0] * 8 + [1, 1, 0], [0] * 11]
    assert out["retain_mask"].tolist() == [[0] * 11, [0, 0, 0, 0, 1, 1] + [0] * 5]
    assert slots.nonzero().tolist() == [[0, 4], [0, 5]]
    with pytest.raises(ConfigError, match="no end of a user turn"):
        insert_slots(
            {"input_ids": ids, "attention_mask": attn, "cb_mask": cb, "retain_mask": retain},
            torch.tensor([90]),
            torch.tensor([8, 7]),
            pad_id=0,
        )
    short = {
        "input_ids": torch.tensor([[5]]),
        "attention_mask": torch.tensor([[1]]),
        "cb_mask": torch.tensor([[1]]),
        "retain_mask": torch.tensor([[0]]),
    }
    with pytest.raises(ConfigError, match="no end of a user turn"):  # a row shorter than the template's turn end
        insert_slots(short, torch.tensor([90]), torch.tensor([7, 8]), pad_id=0)


def suffix_batch():
    """`batch()` with an end of user turn (ids 1, 2) planted before each circuit-breaker row's completion."""
    from circuit_breakers.training import insert_slots

    inputs = batch()
    for row in range(3):
        start = int(inputs["cb_mask"][row].nonzero()[0])
        inputs["input_ids"][row, start - 2 : start] = torch.tensor([1, 2])
    return insert_slots(inputs, torch.tensor([50, 51, 52]), torch.tensor([1, 2]), pad_id=0)


def test_suffix_adversary_moves_one_shared_suffix_that_persists_and_raises_the_cosine(tmp_path):
    trainer, model = trainer_for(tmp_path, 0, lat_epsilon=2.0, lat_steps=3, lat_positions="suffix", lat_step_size=0.25)
    trainer.adversary.slot_tokens = (torch.tensor([50, 51, 52]), torch.tensor([1, 2]))
    rerouted(model)
    inputs, slots = suffix_batch()
    ids, attn, m_cb = inputs["input_ids"], inputs["attention_mask"], inputs["cb_mask"] * inputs["attention_mask"]
    frozen = trainer.frozen_states(model, ids, attn)
    delta = trainer.adversary.suffix_shift(model, ids, attn, m_cb, slots, frozen, None)
    assert all(p.grad is None for p in model.parameters())  # the adversary trains nothing
    moved = delta.norm(dim=-1) > 0
    assert (moved <= slots).all() and moved[:3].any() and not moved[3:].any()  # only the slots of cb rows
    embed = model.get_input_embeddings()
    origin = embed(torch.tensor([50, 51, 52])).detach()
    unit = float(embed.weight.pow(2).mean().sqrt()) * origin.shape[-1] ** 0.5
    first = trainer.lat_suffix.clone()
    assert ((first - origin).norm(dim=-1) <= 2.0 * unit + 1e-4).all()
    # 3 signed steps of 0.25 x the embedding rms per coordinate, none clipped at this radius: each coordinate
    # moved by 1 or 3 steps (a sign flip undoes one), and some by 3
    steps = ((first - origin) / (0.25 * unit / origin.shape[-1] ** 0.5)).abs()
    assert torch.allclose(steps, steps.round(), atol=1e-3) and set(steps.round().unique().tolist()) == {1.0, 3.0}
    rows_shift = delta[:3][slots[:3]].view(3, 3, -1)
    assert (
        torch.equal(rows_shift[0], rows_shift[1])
        or torch.equal(rows_shift[0], rows_shift[2])
        or torch.equal(rows_shift[1], rows_shift[2])
    )  # one suffix for all rows (each row keeps its best state)

    def cosine(d):
        with torch.no_grad():
            frozen_cb = stacked(frozen, [2, 4])[:, :3]
            return float(
                trainer.adversary.row_cosines(
                    model, ids[:3], attn[:3], m_cb[:3], frozen_cb, None, None if d is None else d[:3]
                ).mean()
            )

    assert cosine(delta) > cosine(None) + 1e-3
    trainer.adversary.suffix_shift(model, ids, attn, m_cb, slots, frozen, None)
    assert not torch.equal(trainer.lat_suffix, first)  # kept and moved on, not restarted
    assert (trainer.lat_suffix - first).abs().amax() > 0.7 * unit / origin.shape[-1] ** 0.5


def test_suffix_mode_needs_the_input_embeddings(tmp_path):
    with pytest.raises(ConfigError, match="lat_layer 0"):
        CircuitBreakerConfig(
            output_dir=str(tmp_path), lat_epsilon=1, lat_positions="suffix", lat_layer=2, use_cpu=True, report_to="none"
        )
