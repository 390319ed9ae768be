"""Completion masks on ChatML, Llama-3 and Mistral templates: exactly the completion plus end-of-turn."""

from __future__ import annotations

import pytest
from tokenizers import processors

from circuit_breakers.data.records import DataError, Record
from circuit_breakers.data.render import DropRow, render, render_all
from helpers import make_tokenizer

STYLES = ("chatml", "llama3", "mistral")
EOT = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>", "mistral": "</s>"}
PROMPT = "How do I bake bread?"
COMPLETION = "Mix flour, water, yeast and salt, then knead and bake."


@pytest.fixture(scope="module")
def tokenizers():
    return {style: make_tokenizer(style) for style in STYLES}


def masked_text(tok, example) -> str:
    return tok.decode([i for i, m in zip(example.input_ids, example.loss_mask) if m], skip_special_tokens=False)


def chat(*turns: str) -> list[dict]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": t} for i, t in enumerate(turns)]


@pytest.mark.parametrize("style", STYLES)
def test_mask_is_exactly_completion_plus_end_of_turn(tokenizers, style):
    tok = tokenizers[style]
    example = render(tok, Record.from_prompt(PROMPT, COMPLETION, "retain"))
    assert masked_text(tok, example) == COMPLETION + EOT[style]
    # The mask is one contiguous run that ends the sequence (nothing after the end-of-turn token).
    assert example.loss_mask == [0] * example.completion_start + [1] * (len(example) - example.completion_start)
    assert example.completion_end == len(example)
    assert example.input_ids[-1] == tok.convert_tokens_to_ids(EOT[style])
    assert not example.truncated
    assert example.full_completion_length == example.completion_end - example.completion_start


@pytest.mark.parametrize("style", STYLES)
def test_multi_turn_masks_only_the_last_assistant_turn(tokenizers, style):
    tok = tokenizers[style]
    messages = chat("Write a poem about the sea.", "The waves roll in.", PROMPT, COMPLETION)
    record = Record(messages=messages, kind="retain")
    example = render(tok, record)
    assert masked_text(tok, example) == COMPLETION + EOT[style]
    prompt_text = tok.decode(example.input_ids[: example.completion_start], skip_special_tokens=False)
    assert "The waves roll in." in prompt_text


@pytest.mark.parametrize("style", STYLES)
def test_explicit_completion_index_masks_an_earlier_turn(tokenizers, style):
    tok = tokenizers[style]
    record = Record(messages=chat(PROMPT, COMPLETION, "Thanks!", "You are welcome."), kind="retain", completion_index=1)
    example = render(tok, record)
    assert masked_text(tok, example) == COMPLETION + EOT[style]
    assert "Thanks" not in tok.decode(example.input_ids)  # later turns are not part of the example


def test_completion_text_also_in_prompt_is_masked_in_the_completion_only(tokenizers):
    tok = tokenizers["chatml"]
    example = render(tok, Record.from_prompt("Reply with: yes", "yes", "retain"))
    assert masked_text(tok, example) == "yes<|im_end|>"
    assert tok.decode(example.input_ids[: example.completion_start]).endswith("<|im_start|>assistant\n")


def test_template_that_trims_content_still_masks_the_text_it_renders(tokenizers):
    tok = tokenizers["llama3"]  # the Llama-3 template trims message content
    example = render(tok, Record.from_prompt(PROMPT, "  " + COMPLETION + " \n", "retain"))
    assert masked_text(tok, example) == COMPLETION + "<|eot_id|>"


@pytest.mark.parametrize("style", ("llama3", "mistral"))
def test_no_bos_twice_even_when_the_tokenizer_adds_one(style):
    tok = make_tokenizer(style)
    bos = tok.bos_token
    # Real Llama/Mistral tokenizers add BOS when encoding; the template already writes one.
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)]
    )
    record = Record.from_prompt(PROMPT, COMPLETION, "retain")
    text = tok.apply_chat_template(record.messages, tokenize=False)
    assert tok(text)["input_ids"].count(tok.bos_token_id) == 2  # the trap the renderer must avoid
    example = render(tok, record)
    assert example.input_ids.count(tok.bos_token_id) == 1
    assert example.input_ids[0] == tok.bos_token_id
    assert masked_text(tok, example) == COMPLETION + EOT[style]


@pytest.mark.parametrize("style", STYLES)
def test_mask_mode_full_covers_prompt_and_completion(tokenizers, style):
    tok = tokenizers[style]
    example = render(tok, Record.from_prompt(PROMPT, COMPLETION, "circuit_breaker"), mask_mode="full")
    assert example.loss_mask == [1] * len(example)
    assert tok.decode(example.input_ids).endswith(COMPLETION + EOT[style])


@pytest.mark.parametrize("style", STYLES)
def test_mask_mode_completion_plus_last_prompt_tokens(tokenizers, style):
    tok = tokenizers[style]
    record = Record.from_prompt(PROMPT, COMPLETION, "circuit_breaker")
    plain = render(tok, record)
    example = render(tok, record, mask_mode="completion_plus_last_prompt_tokens", prompt_tokens=3)
    assert example.input_ids == plain.input_ids
    start = plain.completion_start - 3
    assert example.loss_mask == [0] * start + [1] * (len(example) - start)
    assert masked_text(tok, example) == tok.decode(plain.input_ids[start:], skip_special_tokens=False)
    assert masked_text(tok, example).endswith(COMPLETION + EOT[style])


def test_prompt_tokens_beyond_the_prompt_cover_everything(tokenizers):
    tok = tokenizers["chatml"]
    record = Record.from_prompt(PROMPT, COMPLETION, "retain")
    example = render(tok, record, "completion_plus_last_prompt_tokens", prompt_tokens=10_000)
    assert example.loss_mask == [1] * len(example)


def test_unknown_mask_mode_is_an_error_not_a_dropped_row(tokenizers):
    with pytest.raises(DataError, match="unknown mask mode"):
        render_all(tokenizers["chatml"], [Record.from_prompt(PROMPT, COMPLETION, "retain")], mask_mode="prompt")


@pytest.mark.parametrize("style", STYLES)
def test_truncation_cuts_the_prompt_from_the_left_and_keeps_the_completion(tokenizers, style):
    tok = tokenizers[style]
    long_prompt = " ".join(f"Step {i}: explain photosynthesis." for i in range(40))
    record = Record.from_prompt(long_prompt, COMPLETION, "retain")
    full = render(tok, record, max_length=100_000)
    comp_ids = full.input_ids[full.completion_start :]
    example = render(tok, record, max_length=64)
    assert example.truncated and len(example) == 64
    assert example.input_ids[example.completion_start :] == comp_ids  # the whole completion survives
    assert masked_text(tok, example) == COMPLETION + EOT[style]
    prompt_ids = example.input_ids[: example.completion_start]
    if tok.bos_token_id in full.input_ids[:1]:  # a leading BOS is kept, then the tail of the prompt
        assert prompt_ids[0] == tok.bos_token_id
        prompt_ids = prompt_ids[1:]
    assert prompt_ids == full.input_ids[full.completion_start - len(prompt_ids) : full.completion_start]
    assert example.full_completion_length == len(comp_ids)


@pytest.mark.parametrize("style", STYLES)
def test_truncation_of_a_long_completion_keeps_its_start(tokenizers, style):
    tok = tokenizers[style]
    completion = " ".join(f"Knead the dough {i} times." for i in range(60))
    record = Record.from_prompt(PROMPT, completion, "circuit_breaker")
    full = render(tok, record, max_length=100_000)
    example = render(tok, record, max_length=48)
    assert example.truncated and len(example) == 48
    assert example.completion_start >= 12  # a quarter of max_length stays for the prompt
    kept = example.input_ids[example.completion_start :]
    assert kept == full.input_ids[full.completion_start : full.completion_start + len(kept)]
    assert completion.startswith(masked_text(tok, example)[:20])
    assert sum(example.loss_mask) == len(kept)
    assert example.full_completion_length == len(full) - full.completion_start


def test_dropped_rows_are_counted_by_reason(tokenizers):
    tok = tokenizers["chatml"]
    records = [
        Record.from_prompt(PROMPT, COMPLETION, "retain"),
        Record.from_prompt(PROMPT, "", "retain"),
        Record.from_prompt(PROMPT, "   \n", "retain"),
        # list content passes Record validation but the template cannot concatenate it
        Record(
            messages=[
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                {"role": "assistant", "content": "x"},
            ],
            kind="retain",
        ),
        Record.from_prompt("Tell me a joke.", "Why did the loaf rise? It was well bred.", "retain"),
    ]
    result = render_all(tok, records)
    assert len(result.examples) == 2
    assert dict(result.dropped) == {"empty_completion": 2, "malformed": 1}
    assert result.truncated == 0
    with pytest.raises(DropRow) as info:
        render(tok, records[1])
    assert info.value.reason == "empty_completion"


def test_truncated_rows_are_counted(tokenizers):
    tok = tokenizers["chatml"]
    records = [Record.from_prompt(PROMPT * 20, COMPLETION, "retain"), Record.from_prompt(PROMPT, COMPLETION, "retain")]
    limit = len(render(tok, records[1])) + 2
    result = render_all(tok, records, max_length=limit)
    assert result.truncated == 1 and [e.truncated for e in result.examples] == [True, False]
    assert [len(e) for e in result.examples] == [limit, limit - 2]


@pytest.mark.parametrize("style", ("chatml", "llama3", "mistral"))
def test_completion_without_a_user_turn(tokenizers, style):
    """The paper's augmentation: a rerouting example that is the harmful completion alone."""
    tok = tokenizers[style]
    record = Record(messages=[{"role": "assistant", "content": COMPLETION}], kind="circuit_breaker")
    example = render(tok, record)
    assert masked_text(tok, example) == COMPLETION + EOT[style]


TOOL_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['content'] %}{{ m['content'] }}{% endif %}"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}"
    "{{ '<tool_call>' + (c['function'] | tojson) + '</tool_call>' }}"
    "{% endfor %}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_tool_call_completion_masks_the_call_and_end_of_turn():
    tok = make_tokenizer("chatml")
    tok.chat_template = TOOL_TEMPLATE
    call = {"id": "call00001", "type": "function", "function": {"name": "get_time", "arguments": {"city": "Paris"}}}
    messages = [
        {"role": "user", "content": "Time in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
    ]
    record = Record(messages=messages, kind="retain")
    example = render(tok, record)
    assert masked_text(tok, example) == (
        '<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
    )
    record.messages[-1]["content"] = "Let me check."
    assert masked_text(tok, render(tok, record)) == (
        'Let me check.<tool_call>{"name": "get_time", "arguments": {"city": "Paris"}}</tool_call><|im_end|>'
    )


def test_tool_call_dropped_when_the_template_ignores_tool_calls(tokenizers):
    call = {"type": "function", "function": {"name": "get_time", "arguments": {}}}
    messages = [{"role": "user", "content": "Time?"}, {"role": "assistant", "content": "", "tool_calls": [call]}]
    record = Record(messages=messages, kind="retain")
    result = render_all(tokenizers["chatml"], [record])  # plain ChatML writes only `content`
    assert result.examples == [] and dict(result.dropped) == {"tool_calls_not_rendered": 1}


@pytest.mark.slow
def test_embedded_tokenizer_mask():
    from circuit_breakers.models import load_tokenizer

    tok = load_tokenizer("embedded")
    example = render(tok, Record.from_prompt(PROMPT, COMPLETION, "retain"))
    assert masked_text(tok, example) == COMPLETION + "<|im_end|>"
    assert "You are a helpful AI assistant named SmolLM" in tok.decode(example.input_ids[: example.completion_start])
