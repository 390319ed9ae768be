"""The batched greedy generator (issue 33): our decoding loop gives the token ids of `model.generate`'s
own loop (float32, mixed prompt lengths, left padding, rows that stop early on any end-of-turn id),
drops finished rows from the running batch, returns outputs in the caller's order, counts what it
generated, and keeps bf16 autocast behind a setting."""

from __future__ import annotations

import pytest
import torch

from circuit_breakers.generation import (
    BF16_ENV,
    PLAIN_ENV,
    bf16_autocast_wanted,
    cpu_bf16_supported,
    generate,
    generate_batches,
    generation_config,
    generation_count,
    greedy_decode,
    left_padding,
    render_prompts,
)
from helpers import make_model, make_tokenizer

PROMPTS = [
    "Hi",
    "How do I bake bread? Tell me every step, from the flour to the oven, please.",
    "Write a poem about the sea.",
    "2 + 2?",
    "Explain photosynthesis to a child in very simple words please, with two examples.",
    "The capital of France is?",
]
NEW = 12


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    tokenizer = make_tokenizer("chatml")
    return make_model("llama", vocab_size=len(tokenizer)), tokenizer


def batch_of(tokenizer, texts):
    with left_padding(tokenizer):
        return tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")


def plain(model, batch, config):
    """`model.generate`'s own loop: the reference."""
    with torch.no_grad():
        return model.generate(**batch, generation_config=config)


def ours(model, batch, config):
    with torch.no_grad():
        return model.generate(**batch, generation_config=config, custom_generate=greedy_decode)


def shapes_per_forward(model):
    """(rows, positions) of every forward pass of the decoder (a hook on its first block)."""
    shapes: list[tuple[int, int]] = []
    handle = model.model.layers[0].register_forward_pre_hook(lambda _m, args: shapes.append(tuple(args[0].shape[:2])))
    return shapes, handle


def first_new_token(ids, start):
    """The first token at or after `start` that its row has not produced before (None if there is none)."""
    return next((t for i, t in enumerate(ids) if i >= start and t not in ids[:i]), None)


def early_stop_config(model, tokenizer, batch):
    """A config whose stop ids make two rows end early at two different ids, while another row runs to
    the token limit: ids read from an unstopped reference run at a step where they are new in their row."""
    base = generation_config(model, tokenizer, NEW)
    free = generation_config(model, tokenizer, NEW)
    free.eos_token_id = [tokenizer.vocab_size + 1000]  # no id stops: every row runs NEW tokens
    reference = plain(model, batch, free)[:, batch["input_ids"].shape[1] :].tolist()
    for first in range(len(reference)):
        for second in range(first + 1, len(reference)):
            a, b = first_new_token(reference[first], 2), first_new_token(reference[second], 4)
            if a is not None and b is not None and a != b and any(a not in r and b not in r for r in reference):
                base.eos_token_id = sorted({*base.eos_token_id, a, b})
                return base, [a, b]
    raise AssertionError("the tiny model's outputs hold no ids that stop some rows early and not others")


def test_own_loop_equals_generate_with_mixed_lengths_and_rows_that_stop_early(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer, render_prompts(tokenizer, PROMPTS))
    assert (batch["attention_mask"] == 0).any()  # mixed lengths, left-padded
    assert (batch["attention_mask"][:, -1] == 1).all()
    config, chosen = early_stop_config(model, tokenizer, batch)
    reference = plain(model, batch, config)
    shapes, handle = shapes_per_forward(model)
    try:
        result = ours(model, batch, config)
    finally:
        handle.remove()
    assert torch.equal(result, reference)  # identical token ids, padding after a stop included
    new = result[:, batch["input_ids"].shape[1] :].tolist()
    stopped = [row for row, ids in enumerate(new) if any(t in config.eos_token_id for t in ids)]
    assert 0 < len(stopped) < len(PROMPTS)  # some rows stop early, some run to the limit
    assert all(any(t in ids for ids in new) for t in chosen)  # each chosen id ended a row
    # the template's system turn, which every row starts with, is prefilled once for one row
    system = tokenizer("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")["input_ids"]
    assert shapes[0] == (1, len(system)) and shapes[1][0] == len(PROMPTS)
    # finished rows leave the running batch: fewer rows in later forward passes, only the unfinished at the end
    sizes = [rows for rows, _ in shapes[1:]]
    assert sizes[-1] == len(PROMPTS) - len(stopped) and sizes == sorted(sizes, reverse=True)


def test_rows_without_a_shared_start_are_prefilled_together(tiny):
    model, tokenizer = tiny
    texts = ["Hi there", "Write a poem about the sea.", "2 + 2?"]  # no chat template: nothing shared
    batch = batch_of(tokenizer, texts)
    config = generation_config(model, tokenizer, NEW)
    shapes, handle = shapes_per_forward(model)
    try:
        result = ours(model, batch, config)
    finally:
        handle.remove()
    assert torch.equal(result, plain(model, batch, config))
    assert shapes[0] == tuple(batch["input_ids"].shape)


def test_stops_at_each_end_of_turn_id_on_its_own(tiny):
    model, tokenizer = tiny
    batch = batch_of(tokenizer, render_prompts(tokenizer, PROMPTS))
    config, chosen = early_stop_config(model, tokenizer, batch)
    for stop in chosen:
        one = generation_config(model, tokenizer, NEW)
        one.eos_token_id = [stop]
        result = ours(model, batch, one)
        assert torch.equal(result, plain(model, batch, one))
        new = result[:, batch["input_ids"].shape[1] :].tolist()
        ends = [ids[: ids.index(stop) + 1] for ids in new if stop in ids]
        assert ends and all(len(ids) <= NEW for ids in ends)
        pad = config.pad_token_id
        for ids in new:  # after its stop id a row holds only padding
            if stop in ids:
                assert set(ids[ids.index(stop) + 1 :]) <= {pad}


def test_template_end_of_turn_id_stops_a_row(tiny):
    """The chat template's end-of-turn token (from `stop_token_ids`) ends a row when the model writes it."""
    model, tokenizer = tiny
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    config = generation_config(model, tokenizer, NEW)
    assert end in config.eos_token_id
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: out.index_fill(-1, torch.tensor([end]), 1e4))
    try:
        batch = batch_of(tokenizer, render_prompts(tokenizer, PROMPTS[:3]))
        result = ours(model, batch, config)
    finally:
        handle.remove()
    assert result[:, batch["input_ids"].shape[1] :].tolist() == [[end]] * 3


@pytest.mark.parametrize("arch", ["mistral", "qwen2", "gemma", "gpt_neox", "gpt2"])
def test_own_loop_equals_generate_on_other_architectures(arch):
    tokenizer = make_tokenizer("chatml")
    model = make_model(arch, vocab_size=len(tokenizer))
    batch = batch_of(tokenizer, render_prompts(tokenizer, PROMPTS))
    config, _ = early_stop_config(model, tokenizer, batch)
    assert torch.equal(ours(model, batch, config), plain(model, batch, config))


def test_equal_lengths_and_a_single_row(tiny):
    """No padding at all (generate then drops the mask) and a batch of one give generate's ids too."""
    model, tokenizer = tiny
    same = render_prompts(tokenizer, ["Write a poem about the sea.", "Write a poem about the sea!"])
    batch = batch_of(tokenizer, same)
    assert (batch["attention_mask"] == 1).all()
    config = generation_config(model, tokenizer, NEW)
    assert torch.equal(ours(model, batch, config), plain(model, batch, config))
    single = batch_of(tokenizer, same[:1])
    assert torch.equal(ours(model, single, config), plain(model, single, config))


def test_generate_returns_the_callers_order(tiny):
    """Batches are sorted by length inside; each output is the prompt's own (generated alone, unpadded)."""
    model, tokenizer = tiny
    alone = [generate(model, tokenizer, [p], max_new_tokens=8, batch_size=1, progress=False)[0] for p in PROMPTS]
    together = generate(model, tokenizer, PROMPTS, max_new_tokens=8, batch_size=4, progress=False)
    assert together == alone
    assert len(set(together)) > 1


def test_generate_batches_sorted_longest_first_and_uses_the_own_loop(tiny, monkeypatch):
    model, tokenizer = tiny
    texts = render_prompts(tokenizer, PROMPTS)
    config = generation_config(model, tokenizer, 4)
    calls: list[tuple[int, object]] = []
    original = model.generate

    def spy(*args, **kwargs):
        calls.append((kwargs["input_ids"].shape[1], kwargs.get("custom_generate")))
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "generate", spy)
    batches = list(generate_batches(model, tokenizer, texts, config, batch_size=2))
    lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
    firsts = [batch[0][0] for batch in batches]
    assert [lengths[i] for i in firsts] == sorted((lengths[i] for i in firsts), reverse=True)
    assert sorted(i for batch in batches for i, _ in batch) == list(range(len(texts)))
    assert all(custom is greedy_decode for _, custom in calls)


def test_plain_switch_keeps_callers_order_and_generates_own_loop_with_the_same_tokens(tiny, monkeypatch):
    model, tokenizer = tiny
    texts = render_prompts(tokenizer, PROMPTS)
    config = generation_config(model, tokenizer, 6)
    ours_out = {i: ids for b in generate_batches(model, tokenizer, texts, config, batch_size=2) for i, ids in b}
    customs: list[object] = []
    original = model.generate
    monkeypatch.setattr(
        model, "generate", lambda *a, **k: customs.append(k.get("custom_generate")) or original(*a, **k)
    )
    monkeypatch.setenv(PLAIN_ENV, "1")
    batches = list(generate_batches(model, tokenizer, texts, config, batch_size=2))
    assert [[i for i, _ in b] for b in batches] == [[0, 1], [2, 3], [4, 5]]
    assert customs == [None, None, None]
    stop = set(config.eos_token_id)
    cut = lambda ids: ids[: next((k + 1 for k, t in enumerate(ids) if t in stop), len(ids))]  # noqa: E731
    assert {i: cut(ids) for b in batches for i, ids in b} == {i: cut(ids) for i, ids in ours_out.items()}
    monkeypatch.setenv(PLAIN_ENV, "sometimes")
    with pytest.raises(ValueError, match="CIRCUIT_BREAKERS_PLAIN_GENERATE='sometimes' is not a switch"):
        list(generate_batches(model, tokenizer, texts, config, batch_size=2))


def test_sampling_keeps_generates_own_loop(tiny, monkeypatch):
    model, tokenizer = tiny
    seen: list[object] = []
    original = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: seen.append(k.get("custom_generate")) or original(*a, **k))
    out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, do_sample=True, progress=False)
    assert len(out) == 2 and seen == [None]


def test_peft_model_gives_the_same_ids(tiny):
    from peft import LoraConfig, get_peft_model

    model, tokenizer = tiny
    fresh = make_model("llama", vocab_size=len(tokenizer))
    peft_model = get_peft_model(fresh, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.eval()
    batch = batch_of(tokenizer, render_prompts(tokenizer, PROMPTS))
    config = generation_config(peft_model, tokenizer, NEW)
    with torch.no_grad():
        reference = peft_model.generate(**batch, generation_config=config)
        result = peft_model.generate(**batch, generation_config=config, custom_generate=greedy_decode)
    assert torch.equal(result, reference)


def test_generation_count_adds_the_real_tokens(tiny):
    model, tokenizer = tiny
    texts = render_prompts(tokenizer, PROMPTS)
    batch = batch_of(tokenizer, texts)
    config, _ = early_stop_config(model, tokenizer, batch)
    before = generation_count()
    got = [ids for b in generate_batches(model, tokenizer, texts, config, batch_size=4) for _, ids in b]
    spent = generation_count() - before
    stops = set(config.eos_token_id)
    real = sum(next((i + 1 for i, t in enumerate(ids) if t in stops), len(ids)) for ids in got)
    assert spent.rows == len(PROMPTS) and spent.tokens == real < len(PROMPTS) * NEW
    assert spent.seconds > 0


def test_cpu_bf16_support_from_the_cpu_flags(tmp_path):
    with_bf16 = tmp_path / "bf16"
    with_bf16.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 avx512_vnni\n")
    amx = tmp_path / "amx"
    amx.write_text("flags\t\t: fpu avx512f amx_tile amx_bf16\n")
    without = tmp_path / "plain"
    without.write_text("flags\t\t: fpu sse avx2 avx512f\n")
    assert cpu_bf16_supported(with_bf16) and cpu_bf16_supported(amx)
    assert not cpu_bf16_supported(without) and not cpu_bf16_supported(tmp_path / "missing")


def test_bf16_autocast_is_a_setting_off_by_default(tiny, monkeypatch):
    import circuit_breakers.generation as generation

    model, _ = tiny
    monkeypatch.delenv(BF16_ENV, raising=False)
    monkeypatch.setattr(generation, "cpu_bf16_supported", lambda *a: True)
    assert not bf16_autocast_wanted(model)
    assert bf16_autocast_wanted(model, True)
    monkeypatch.setenv(BF16_ENV, "1")
    assert bf16_autocast_wanted(model) and not bf16_autocast_wanted(model, False)
    monkeypatch.setattr(generation, "cpu_bf16_supported", lambda *a: False)
    assert not bf16_autocast_wanted(model, True)  # emulated bf16 is slower: never on such a CPU


def test_bf16_setting_refuses_a_value_that_is_not_a_switch_and_warns_where_unsupported(tiny, monkeypatch, caplog):
    import circuit_breakers.generation as generation

    model, _ = tiny
    monkeypatch.setenv(BF16_ENV, "maybe")
    with pytest.raises(ValueError, match="CIRCUIT_BREAKERS_BF16='maybe' is not a switch: set it to 1"):
        bf16_autocast_wanted(model)
    monkeypatch.setattr(generation, "cpu_bf16_supported", lambda *a: False)
    with caplog.at_level("WARNING", logger="circuit_breakers"):
        assert not bf16_autocast_wanted(model, True)
    assert "no native bf16" in caplog.text


def test_bf16_autocast_runs_generation_in_bf16(tiny, monkeypatch):
    import circuit_breakers.generation as generation

    model, tokenizer = tiny
    monkeypatch.setattr(generation, "cpu_bf16_supported", lambda *a: True)
    dtypes: list[torch.dtype] = []
    handle = model.lm_head.register_forward_hook(lambda _m, _a, out: dtypes.append(out.dtype))
    try:
        out = generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False, bf16=True)
        generate(model, tokenizer, PROMPTS[:2], max_new_tokens=3, progress=False)
    finally:
        handle.remove()
    assert len(out) == 2
    assert torch.bfloat16 in dtypes and dtypes[-1] == torch.float32
    assert next(model.parameters()).dtype == torch.float32  # the model itself is untouched


def test_main_job_records_generated_tokens_per_stage(tiny, tmp_path):
    """A stage that generates records its tokens and generation seconds; one that does not records none."""
    from circuit_breakers.experiments.main_job import Run, Stage

    model, tokenizer = tiny
    run = Run(tmp_path)
    before = generation_count()
    run.stage(
        Stage("data", {"k": 1}, lambda: generate(model, tokenizer, PROMPTS[:3], max_new_tokens=5, progress=False))
    )
    run.stage(Stage("train", {"k": 2}, lambda: None))
    spent = generation_count() - before
    rates = run.generation()
    assert list(rates) == ["data"] and rates["data"]["tokens"] == spent.tokens > 0
    assert rates["data"]["tokens_per_s"] == round(spent.tokens / max(round(spent.seconds, 1), 0.1), 1)
    assert Run(tmp_path).generation() == rates  # read back from stages.json


@pytest.mark.slow
def test_embedded_model_gives_generates_ids():
    """On the embedded model (SmolLM2-135M-Instruct, float32): benign and HarmBench prompts of mixed
    lengths, the system turn shared, give `model.generate`'s greedy ids."""
    from circuit_breakers.data.prompts import load_builtin_prompts
    from circuit_breakers.data.sources import load_source
    from circuit_breakers.models import load_model, load_tokenizer

    torch.set_num_threads(1)
    tokenizer = load_tokenizer("embedded")
    model = load_model("embedded", dtype=torch.float32).eval()
    prompts = [p.text for p in load_builtin_prompts("benign")[:4]] + [
        p.text for p in load_source("harmbench", None)[:4]
    ]
    batch = batch_of(tokenizer, render_prompts(tokenizer, prompts))
    config = generation_config(model, tokenizer, 16)
    assert torch.equal(ours(model, batch, config), plain(model, batch, config))
