"""Model-level (tamper) attacks: what an attacker holding the weights does to a defended model.

- `finetune`: LoRA fine-tuning on a few harmful completions, the model at chosen steps;
- `weights`: interpolation back to the base, top-k truncation of the delta, refusal-direction
  orthogonalisation of the weights.

Each yields or edits an ordinary model that `evaluate_models` (ASR) and `capability` (benign loss) read;
probe obfuscation, which needs the guard's probes, is `guard/obfuscation.py`.
"""
