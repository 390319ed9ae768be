"""Cost of the drift cells (KL base -> defended and greedy agreement on benign prompts), before and after
the one-pass change, timed in one run on the same models and prompts.

Before: both models generate their first N greedy tokens (text compared for agreement), then both read
each prompt + the base text answer, re-rendered through the chat template, with full-vocabulary logits
at every position. After (`evaluation.drift`): only the base model generates (token ids); both read
prompt + answer ids once (the prompts' shared start once per model), with logits only at the answer
positions, and agreement is the defended model's argmax matching the base tokens. The defended model
is the base model with small noise on one block's weights, so some answers agree and some do not. Both
paths are warmed up on four prompts first.

Usage (CPU, embedded model):  OMP_NUM_THREADS=1 nice -n 10 python benchmarks/drift_cost.py --prompts 64
The last line printed is `ratio R` (R = before seconds / after seconds, summed over `--repeats`).
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from circuit_breakers.data.batching import pad_examples
from circuit_breakers.data.prompts import load_builtin_prompts
from circuit_breakers.data.records import Record
from circuit_breakers.data.render import render_all
from circuit_breakers.evaluation.drift import answer_drift, greedy_answer_ids, kl_summary, prefix_agreement
from circuit_breakers.generation import generate
from circuit_breakers.models import load_model_and_tokenizer


def before(base, other, tokenizer, prompts, n_tokens, batch_size):
    """The first implementation: two generations, then a full-logit KL pass over re-rendered records."""
    conversations = [p.to_messages() for p in prompts]
    answers = generate(base, tokenizer, conversations, max_new_tokens=n_tokens, batch_size=batch_size, progress=False)
    theirs = generate(other, tokenizer, conversations, max_new_tokens=n_tokens, batch_size=batch_size, progress=False)
    records = [
        Record(messages=[*p.to_messages(), {"role": "assistant", "content": a}], kind="retain")
        for p, a in zip(prompts, answers)
    ]
    examples = [render_all(tokenizer, [r], mask_mode="completion", max_length=512).examples[0] for r in records]
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            batch = [examples[i] for i in order[start : start + batch_size]]
            ids, attention, mask = pad_examples(batch, tokenizer.pad_token_id or 0)
            keep = mask[:, 1:].bool()
            log_p, log_q = (
                m(input_ids=ids, attention_mask=attention).logits[:, :-1][keep].float().log_softmax(-1)
                for m in (base, other)
            )
            total += float((log_p.exp() * (log_p - log_q)).sum())
            tokens += int(keep.sum())
    return total / tokens, sum(a == b for a, b in zip(answers, theirs))


def after(base, other, tokenizer, prompts, n_tokens, batch_size):
    """`evaluation.drift`: base answer ids, then one teacher-forced pass per model."""
    ids = greedy_answer_ids(base, tokenizer, prompts, n_tokens, batch_size)
    rows = answer_drift(base, other, tokenizer, prompts, ids, batch_size)
    return kl_summary(rows).value, prefix_agreement(rows).k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--noise", type=float, default=0.02, help="relative noise on one block of the 'defended' copy")
    parser.add_argument("--repeats", type=int, default=1, help="alternate before / after this many times (load drifts)")
    args = parser.parse_args()

    base, tokenizer = load_model_and_tokenizer(args.model, dtype="float32")
    base.eval()
    other = copy.deepcopy(base)
    torch.manual_seed(0)
    with torch.no_grad():
        block = other.model.layers[len(other.model.layers) // 2]
        for p in block.parameters():
            p.add_(torch.randn_like(p) * p.std() * args.noise)
    prompts = load_builtin_prompts("benign")[: args.prompts]
    for fn in (before, after):  # warm-up, untimed: first calls pay for allocation and dispatch set-up
        fn(base, other, tokenizer, prompts[:4], 2, args.batch)
    times = {"before": 0.0, "after": 0.0}
    for repeat in range(args.repeats):
        order = (("before", before), ("after", after))
        for name, fn in order if repeat % 2 == 0 else order[::-1]:
            started = time.perf_counter()
            kl, agreed = fn(base, other, tokenizer, prompts, args.tokens, args.batch)
            seconds = time.perf_counter() - started
            times[name] += seconds
            print(f"{name}: {seconds:.1f} s, KL per token {kl:.4f}, agreement {agreed}/{len(prompts)}", flush=True)
    print(f"ratio {times['before'] / times['after']:.2f}")


if __name__ == "__main__":
    main()
