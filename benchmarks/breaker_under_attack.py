"""Issue 9, RR + LAT: does an attack undo the circuit breaker itself, and which adversary rule can too?

Two readings of a finished circuit-broken model against its base model, judge-free:

1. `attack`: the soft-prompt embedding attack (evaluation/attacks/embedding.py) towards each prompt's
   HarmBench target, then greedy generation; the cosine between the circuit-broken and the base model's
   hidden states (same input) at a few layers, over the target's tokens and over what follows, attacked
   vs the same text after the plain prompt. A rerouted token has a low cosine; an attack that brings it
   back near 1 has undone the breaker, not just forced a prefix.
2. `adversary`: the LAT adversary's job on training rows (prompt + harmful completion): shift the
   prompt's input embeddings within a relative L2 ball to raise the mean cosine over the completion at
   the target layers, with the textbook L2 rule (normalised steps of 2.5 eps / steps) or signed steps of
   a fixed relative size (the attack's rule, `lat_step_size`). Prints the best layer-20 cosine per row.

    .venv/bin/python benchmarks/breaker_under_attack.py attack --model runs/fresh/train/merged \
        --prompts runs/lat/emb/heldout_targets.jsonl --n 4
    .venv/bin/python benchmarks/breaker_under_attack.py adversary --model runs/fresh/train/merged \
        --rows runs/fresh/data/circuit_breaker.jsonl --n 6
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from circuit_breakers.evaluation.attacks.embedding import embedding_optimize
from circuit_breakers.evaluation.attacks.loss import Segments
from circuit_breakers.models import load_model, load_model_and_tokenizer

LAYERS = (10, 20, 25, 30)


def cosines(model, base, embeds: torch.Tensor) -> dict[int, torch.Tensor]:
    """Per-position cosine per layer between `model` and `base` hidden states on the same input: {layer: [T]}."""
    with torch.no_grad():
        mine = model(inputs_embeds=embeds, output_hidden_states=True).hidden_states
        theirs = base(inputs_embeds=embeds, output_hidden_states=True).hidden_states
    return {
        layer: F.cosine_similarity(mine[layer][0], theirs[layer][0], dim=-1) for layer in LAYERS if layer < len(mine)
    }


def span(per_layer: dict[int, torch.Tensor], start: int, stop: int) -> dict[int, float]:
    """Mean of each layer's cosine over positions [start, stop)."""
    return {layer: round(float(cos[start:stop].mean()), 3) for layer, cos in per_layer.items()}


def attack(model, tokenizer, base, prompts: list[dict], steps: int) -> None:
    embed = model.get_input_embeddings()
    for row in prompts:
        messages = [{"role": "user", "content": row["text"]}]
        soft = embedding_optimize(model, tokenizer, messages, row["target"], steps=steps)[0]
        seg = Segments.build(model, tokenizer, messages, row["target"])
        with torch.no_grad():
            prompt = torch.cat([embed(seg.before), soft.embeds.to(embed.weight.dtype), embed(seg.after)])[None]
            ids = model.generate(
                inputs_embeds=prompt,
                attention_mask=torch.ones(prompt.shape[:2], dtype=torch.long),
                max_new_tokens=60,
                do_sample=False,
            )[0]
            attacked = torch.cat([prompt[0], embed(ids)])[None]
            plain = torch.cat([embed(seg.before), embed(seg.after), embed(ids)])[None]
        n, p, q = len(seg.target), prompt.shape[1], len(seg.before) + len(seg.after)
        on_attacked, on_plain = cosines(model, base, attacked), cosines(model, base, plain)
        print(
            json.dumps(
                {
                    "prompt_id": row.get("id"),
                    "target_loss": round(soft.best_loss, 4),
                    "completion": tokenizer.decode(ids, skip_special_tokens=True)[:160],
                    "attacked_target": span(on_attacked, p, p + n),
                    "attacked_beyond": span(on_attacked, p + n, p + len(ids)),
                    "plain_target": span(on_plain, q, q + n),
                    "plain_beyond": span(on_plain, q + n, q + len(ids)),
                }
            ),
            flush=True,
        )


def adversary(model, tokenizer, base, rows: list[dict], rule: str, eps: float, steps: int, size: float) -> list[float]:
    """Best layer-20 cosine per row reached by `steps` updates (candidates: 0..steps updates)."""
    embed, best_per_row = model.get_input_embeddings(), []
    for row in rows:
        prompt = tokenizer.apply_chat_template(row["messages"][:1], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(
            prompt + row["messages"][-1]["content"], add_special_tokens=False, return_tensors="pt"
        ).input_ids
        p = len(tokenizer(prompt, add_special_tokens=False).input_ids)
        clean = embed(ids).detach()
        with torch.no_grad():
            reference = base(inputs_embeds=clean, output_hidden_states=True).hidden_states
        norm = clean[0].norm(dim=-1, keepdim=True)
        movable = (torch.arange(ids.shape[1]) < p).float()[:, None]
        radius = eps * norm * movable
        delta = torch.zeros_like(clean[0], requires_grad=True)
        best, best20 = -2.0, None
        for step in range(steps + 1):
            states = model(inputs_embeds=clean + delta[None], output_hidden_states=True).hidden_states
            cos = {
                layer: F.cosine_similarity(states[layer][0, p:], reference[layer][0, p:], dim=-1).mean()
                for layer in (10, 20)
            }
            objective = (cos[10] + cos[20]) / 2
            if objective.item() > best:
                best, best20 = objective.item(), cos[20].item()
            if step == steps:
                break
            (grad,) = torch.autograd.grad(objective, [delta])
            with torch.no_grad():
                if rule == "l2":
                    delta += (2.5 * radius / steps) * grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                else:
                    delta += size * norm * movable * grad.sign() / grad.shape[-1] ** 0.5
                length = delta.norm(dim=-1, keepdim=True)
                delta *= torch.where(length > radius, radius / length.clamp_min(1e-12), torch.ones_like(length))
        best_per_row.append(round(best20, 3))
    return best_per_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reading", choices=["attack", "adversary"])
    parser.add_argument("--model", required=True, help="circuit-broken merged model")
    parser.add_argument("--base", default="embedded")
    parser.add_argument("--prompts", help="JSONL with text + target (attack)")
    parser.add_argument("--rows", help="JSONL of circuit-breaker chat records (adversary)")
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100, help="attack steps")
    args = parser.parse_args()
    model, tokenizer = load_model_and_tokenizer(args.model)
    base = load_model(args.base)
    for m in (model, base):
        m.eval().requires_grad_(False)
    if args.reading == "attack":
        attack(model, tokenizer, base, [json.loads(line) for line in open(args.prompts)][: args.n], args.steps)
        return
    rows = [json.loads(line) for line in open(args.rows)][: args.n]
    print("no shift:", adversary(model, tokenizer, base, rows, "sign", 0.0, 0, 0.0))
    for rule, eps, steps, size in (
        ("l2", 3.0, 6, 0),
        ("l2", 1.0, 6, 0),
        ("sign", 1.0, 8, 0.05),
        ("sign", 1.0, 4, 0.05),
        ("sign", 1.0, 2, 0.1),
    ):
        print(
            f"{rule} eps {eps} steps {steps} size {size}:",
            adversary(model, tokenizer, base, rows, rule, eps, steps, size),
        )


if __name__ == "__main__":
    main()
