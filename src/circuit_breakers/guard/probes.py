"""Harmfulness probes on hidden states, and a generation monitor that halts when one fires (issue 9).

A probe is a linear classifier (or a one-hidden-layer MLP) on the hidden state of one layer at each
completion token: harmful completions are 1, benign ones 0. Features are computed batch by batch while
the probe trains (nothing is stacked into one big matrix), so the data can be larger than memory.
The monitor fires when the mean token probability over the last `window` tokens exceeds the
threshold, so a completion's score is the largest such window mean (the mean of all its tokens when
it is shorter). A single token is a noisy witness: with the largest token probability instead, one
benign token that resembles harmful text halts a benign answer (a third to a half of held-out benign
answers on the embedded model in small trials; docs/probes.md). The threshold is calibrated on benign
completions so that at most `target_fpr` of them would be halted. A probe is saved as `probe.safetensors`
(weights) + `probe.json` (layer, threshold, ...).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import StoppingCriteria

from ..data.batching import pad_examples
from ..data.render import Example
from ..models import find_decoder_layers
from ..representations import hidden_states

PROBE_WEIGHTS = "probe.safetensors"
PROBE_CONFIG = "probe.json"
PROBE_REPORT = "probe_report.json"
PROBE_FOLDER = "probe"
"""Where a probe lives beside its model (MODEL_DIR/probe): `serve --probe auto` looks there."""


@dataclass
class ProbeSettings:
    """What a probe is and how it was trained; saved in probe.json beside the weights."""

    layer: int
    """hidden_states index read (0 = embeddings, i = output of block i-1)."""
    hidden_size: int
    kind: str = "linear"
    """linear or mlp (one hidden layer of `width` units)."""
    width: int = 64
    threshold: float = 0.5
    """Window-mean probability above which the probe fires; set by `calibrate`."""
    window: int = 8
    """Tokens whose probabilities are averaged before comparing with the threshold."""
    target_fpr: float | None = None
    """The benign false-positive rate the threshold was calibrated for."""


class Probe(nn.Module):
    """Token-level harmfulness classifier on standardised hidden states of one layer."""

    def __init__(self, settings: ProbeSettings) -> None:
        super().__init__()
        if settings.kind not in ("linear", "mlp"):
            raise ValueError(f"probe kind must be linear or mlp, not {settings.kind!r}")
        self.settings = settings
        h = settings.hidden_size
        self.register_buffer("mean", torch.zeros(h))
        self.register_buffer("std", torch.ones(h))
        if settings.kind == "linear":
            self.net: nn.Module = nn.Linear(h, 1)
        else:
            self.net = nn.Sequential(nn.Linear(h, settings.width), nn.ReLU(), nn.Linear(settings.width, 1))

    def forward(self, hidden: Tensor) -> Tensor:
        """Logits [...] of hidden states [..., H]."""
        x = (hidden.to(self.mean.dtype) - self.mean) / self.std
        return self.net(x).squeeze(-1)

    def probability(self, hidden: Tensor) -> Tensor:
        return torch.sigmoid(self.forward(hidden))

    def save(self, out_dir: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, str(out / PROBE_WEIGHTS))
        (out / PROBE_CONFIG).write_text(json.dumps(asdict(self.settings), indent=2))
        return out

    @classmethod
    def load(cls, path: str | Path) -> Probe:
        """A saved probe (safetensors only: loading it runs no code)."""
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / PROBE_CONFIG).is_file() or not (folder / PROBE_WEIGHTS).is_file():
            raise FileNotFoundError(f"{folder} holds no probe ({PROBE_CONFIG} and {PROBE_WEIGHTS})")
        settings = ProbeSettings(**json.loads((folder / PROBE_CONFIG).read_text()))
        probe = cls(settings)
        probe.load_state_dict(load_file(str(folder / PROBE_WEIGHTS)))
        return probe.eval()


def token_features(
    model: nn.Module, examples: Sequence[Example], layer: int, batch_size: int = 8, pad_token_id: int = 0
) -> Iterator[tuple[list[int], Tensor, Tensor]]:
    """Per batch: (example indices, hidden states [n, H] of the batch's completion tokens, the example
    index of each of those n tokens). The forward stops at `layer`; no logits are computed."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for lo in range(0, len(examples), batch_size):
            index = list(range(lo, min(lo + batch_size, len(examples))))
            ids, attention, mask = pad_examples([examples[i] for i in index], pad_token_id)
            with torch.no_grad():
                states = hidden_states(model, ids.to(device), attention.to(device), [layer])[layer]
            keep = (mask * attention).bool()
            rows = torch.tensor(index)[:, None].expand_as(keep)[keep]
            yield index, states[keep.to(states.device)].float().cpu(), rows
    finally:
        model.train(was_training)


def _standardisation(
    model: nn.Module, examples: Sequence[Example], layer: int, batch_size: int, pad_token_id: int
) -> tuple[Tensor, Tensor]:
    """Per-dimension mean and std over every completion token (streamed sums, float64)."""
    total, total_sq, n = None, None, 0
    for _, feats, _ in token_features(model, examples, layer, batch_size, pad_token_id):
        f = feats.double()
        total = f.sum(0) if total is None else total + f.sum(0)
        total_sq = (f * f).sum(0) if total_sq is None else total_sq + (f * f).sum(0)
        n += f.shape[0]
    if not n:
        raise ValueError("no completion tokens to train a probe on (are the loss masks empty?)")
    mean = total / n
    std = (total_sq / n - mean * mean).clamp_min(1e-12).sqrt()
    return mean.float(), std.float().clamp_min(1e-4)


def train_probe(
    model: nn.Module,
    harmful: Sequence[Example],
    benign: Sequence[Example],
    layer: int,
    kind: str = "linear",
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 8,
    width: int = 64,
    window: int = 8,
    weight_decay: float = 1e-2,
    pad_token_id: int = 0,
    seed: int = 0,
) -> Probe:
    """Fit a probe on completion tokens of `harmful` (1) and `benign` (0) examples.

    Classes are weighted so that each counts half whatever its token count. Hidden states are computed
    afresh each epoch, batch by batch: memory holds one batch of features, never the data set.
    """
    if not harmful or not benign:
        raise ValueError("a probe needs both harmful and benign examples")
    blocks = len(find_decoder_layers(model))
    if not 0 <= layer <= blocks:
        raise ValueError(f"probe layer {layer} is out of range: the model has {blocks} blocks (0..{blocks})")
    torch.manual_seed(seed)
    examples = [*harmful, *benign]
    labels = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    hidden_size = int(getattr(model.config, "hidden_size"))
    probe = Probe(ProbeSettings(layer=layer, hidden_size=hidden_size, kind=kind, width=width, window=window))
    probe.mean, probe.std = _standardisation(model, examples, layer, batch_size, pad_token_id)
    n_pos = sum(sum(e.loss_mask) for e in harmful)
    n_neg = sum(sum(e.loss_mask) for e in benign)
    pos_weight = torch.tensor(n_neg / max(n_pos, 1))
    optimizer = torch.optim.AdamW(probe.net.parameters(), lr=lr, weight_decay=weight_decay)
    rng = random.Random(seed)
    from tqdm.auto import tqdm

    for _epoch in tqdm(range(epochs), desc=f"probe (layer {layer})", unit="epoch", leave=False):
        order = list(range(len(examples)))
        rng.shuffle(order)  # mixed batches: both classes in most steps
        shuffled = [examples[i] for i in order]
        for index, feats, rows in token_features(model, shuffled, layer, batch_size, pad_token_id):
            target = labels[[order[i] for i in rows.tolist()]]
            loss = nn.functional.binary_cross_entropy_with_logits(probe(feats), target, pos_weight=pos_weight)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return probe.eval()


def window_score(probs: Sequence[float], window: int) -> float:
    """The largest mean of `window` consecutive probabilities (of all of them if there are fewer)."""
    if not probs:
        return 0.0
    if len(probs) <= window:
        return sum(probs) / len(probs)
    total = sum(probs[:window])
    best = total
    for i in range(window, len(probs)):
        total += probs[i] - probs[i - window]
        best = max(best, total)
    return best / window


@torch.no_grad()
def example_scores(
    model: nn.Module, probe: Probe, examples: Sequence[Example], batch_size: int = 8, pad_token_id: int = 0
) -> list[float]:
    """Each example's largest window-mean probability: what the monitor compares with the threshold."""
    probs: list[list[float]] = [[] for _ in examples]
    for _, feats, rows in token_features(model, examples, probe.settings.layer, batch_size, pad_token_id):
        for row, p in zip(rows.tolist(), probe.probability(feats).tolist()):
            probs[row].append(p)  # tokens come in sequence order
    return [window_score(p, probe.settings.window) for p in probs]


def calibrate(probe: Probe, benign_scores: Sequence[float], target_fpr: float = 0.05) -> float:
    """Set the threshold to the lowest value that fires on at most `target_fpr` of benign examples."""
    if not benign_scores:
        raise ValueError("calibration needs benign scores")
    if not 0 <= target_fpr < 1:
        raise ValueError("target_fpr must be in [0, 1)")
    ranked = sorted(benign_scores, reverse=True)
    allowed = int(math.floor(target_fpr * len(ranked) + 1e-9))  # benign examples that may fire
    threshold = ranked[allowed] if allowed < len(ranked) else ranked[-1]
    probe.settings.threshold, probe.settings.target_fpr = float(threshold), target_fpr
    return float(threshold)


def detection_rates(
    harmful_scores: Sequence[float], benign_scores: Sequence[float], threshold: float
) -> dict[str, float]:
    """Recall on harmful and false-positive rate on benign examples: a score fires when above the threshold."""
    return {
        "recall": sum(s > threshold for s in harmful_scores) / max(len(harmful_scores), 1),
        "false_positive_rate": sum(s > threshold for s in benign_scores) / max(len(benign_scores), 1),
        "threshold": threshold,
        "n_harmful": len(harmful_scores),
        "n_benign": len(benign_scores),
    }


class ProbeMonitor(StoppingCriteria):
    """A stopping criterion that ends a row's generation once the probe fires on its newest tokens.

    A forward hook on the probe's layer keeps the hidden state of each step's last position. With a KV
    cache that is the token fed in at that step: the first call sees the prompt's last token (not
    judged: the probe was trained on completion tokens), each later call the previous generated token.
    A row is halted while generating when the mean probability of its last `window` judged tokens
    exceeds the threshold. `generate` never computes the hidden state of the last token it returns, so
    call `finish` after it (still inside `attached()`): it judges that token with one more cached step,
    and an answer shorter than `window` on the mean of all its tokens, exactly as `window_score` scores
    it for calibration. `fired[i]` says whether row i was halted; `scores[i]` is its largest window mean.
    """

    def __init__(self, model: nn.Module, probe: Probe) -> None:
        self.model, self.probe = model, probe
        self.layer, self.window = probe.settings.layer, probe.settings.window
        self._last: Tensor | None = None
        self._calls = 0
        self._judged = 0
        self._history: list[Tensor] = []
        self.fired: Tensor | None = None
        self.scores: Tensor | None = None

    def _hook(self, _module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any = None) -> None:
        states = output[0] if isinstance(output, tuple) else output
        if output is None:  # pre-hook of block 0: the embeddings (layer 0)
            states = args[0] if args else kwargs["hidden_states"]
        self._last = states[:, -1, :].detach()

    @contextmanager
    def attached(self) -> Iterator[ProbeMonitor]:
        """Hook the model for one `generate` call (removed afterwards, even on error)."""
        blocks = find_decoder_layers(self.model)
        if self.layer == 0:
            handle = blocks[0].register_forward_pre_hook(lambda m, a, k: self._hook(m, a, k), with_kwargs=True)
        else:
            handle = blocks[self.layer - 1].register_forward_hook(
                lambda m, a, k, o: self._hook(m, a, k, o), with_kwargs=True
            )
        self._last, self._calls, self._judged, self._history = None, 0, 0, []
        self.fired, self.scores = None, None
        try:
            yield self
        finally:
            handle.remove()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
        batch = input_ids.shape[0]
        if self.fired is None:
            self.fired = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
            self.scores = torch.zeros(batch, device=input_ids.device)
        self._calls += 1
        if self._calls > 1 and self._last is not None:
            self._judge(self._last, input_ids.device)
        return self.fired.clone()

    def _judge(self, state: Tensor, device: torch.device) -> None:
        """Score one token per row and apply the full-window test."""
        assert self.fired is not None and self.scores is not None
        prob = self.probe.probability(state.to(self.probe.mean.device)).to(device)
        self._history = [*self._history[-(self.window - 1) :], prob] if self.window > 1 else [prob]
        self._judged += 1
        if len(self._history) == self.window:
            mean = torch.stack(self._history).mean(dim=0)
            self.scores = torch.maximum(self.scores, mean)
            self.fired |= mean > self.probe.settings.threshold

    @torch.no_grad()
    def finish(self, sequences: Tensor, past_key_values: Any = None) -> None:
        """After `generate` (inside `attached()`): judge the last generated token, which `generate` never
        fed through the model, with one cached step (a full forward when there is no cache); then, for an
        answer shorter than the window, judge the mean of all its tokens. Rows already halted stay so."""
        if self.fired is None or self.scores is None or bool(self.fired.all()):
            return  # nothing generated, or every row already halted
        self._last = None
        device = sequences.device
        if past_key_values is not None:
            self.model(
                input_ids=sequences[:, -1:],
                attention_mask=torch.ones_like(sequences),
                past_key_values=past_key_values,
                use_cache=True,
            )
        else:
            self.model(input_ids=sequences, attention_mask=torch.ones_like(sequences), use_cache=False)
        if self._last is not None:
            self._judge(self._last, device)
        if 0 < self._judged < self.window:  # a partial window: all the tokens there are
            mean = torch.stack(self._history).mean(dim=0)
            self.scores = torch.maximum(self.scores, mean)
            self.fired |= mean > self.probe.settings.threshold


def probe_device(probe: Probe, model: nn.Module) -> Probe:
    """The probe on the model's device (float32: it is tiny)."""
    return probe.to(next(model.parameters()).device)


def _split(items: Sequence[Any], fractions: Sequence[float], seed: int) -> list[list[Any]]:
    """Shuffled parts of `items` with the given fractions (the last part takes the rest)."""
    order = list(items)
    random.Random(seed).shuffle(order)
    parts, start = [], 0
    for fraction in fractions[:-1]:
        end = start + int(round(fraction * len(order)))
        parts.append(order[start:end])
        start = end
    parts.append(order[start:])
    return parts


def fit_probe(
    model: nn.Module,
    tokenizer: Any,
    harmful: Sequence[Any],
    benign: Sequence[Any],
    layer: int,
    kind: str = "linear",
    target_fpr: float = 0.05,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    window: int = 8,
) -> tuple[Probe, dict[str, Any]]:
    """Train, calibrate and test a probe on records (prompt + completion), each set split by record:
    harmful 70% train / 30% test; benign 60% train / 20% calibration / 20% test. The threshold comes
    from the calibration part, the reported recall and false-positive rate from the untouched test parts."""
    from ..data.render import render_all

    def rendered(records: Sequence[Any]) -> list[Example]:
        return render_all(tokenizer, list(records), "completion", max_length).examples

    h_train, h_test = (rendered(p) for p in _split(harmful, [0.7, 0.3], seed))
    b_train, b_calib, b_test = (rendered(p) for p in _split(benign, [0.6, 0.2, 0.2], seed + 1))
    if not (h_train and h_test and b_train and b_calib and b_test):
        raise ValueError("too few records for train / calibration / test parts (need several of each kind)")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    probe = train_probe(
        model, h_train, b_train, layer, kind, epochs, lr, batch_size, window=window, pad_token_id=pad, seed=seed
    )
    threshold = calibrate(probe, example_scores(model, probe, b_calib, batch_size, pad), target_fpr)
    report = {
        "layer": layer,
        "kind": kind,
        "window": window,
        "target_fpr": target_fpr,
        "threshold": threshold,
        "counts": {
            "harmful_train": len(h_train),
            "harmful_test": len(h_test),
            "benign_train": len(b_train),
            "benign_calibration": len(b_calib),
            "benign_test": len(b_test),
        },
        "test": detection_rates(
            example_scores(model, probe, h_test, batch_size, pad),
            example_scores(model, probe, b_test, batch_size, pad),
            threshold,
        ),
    }
    return probe, report


def train_probe_for_model(
    model_name: str,
    harmful: Sequence[Any],
    benign: Sequence[Any],
    out_dir: str | Path,
    layer: int | None = None,
    kind: str = "linear",
    target_fpr: float = 0.05,
    epochs: int = 8,
    lr: float = 3e-3,
    batch_size: int = 8,
    max_length: int = 512,
    seed: int = 0,
    window: int = 8,
    device: str = "auto",
    dtype: str = "float32",
) -> tuple[Path, dict[str, Any]]:
    """`fit_probe` on a model loaded by name onto `device` (float32 unless `dtype` says otherwise: the probe
    reads hidden states; `layer` None: the middle of the model), then the
    probe saved in `out_dir` with `probe_report.json` (the model's name and the held-out report), so a
    probe folder says what it reads and how well it did. Returns (the folder, the report)."""
    from ..models import load_model_and_tokenizer, num_layers

    model, tokenizer = load_model_and_tokenizer(model_name, dtype, device=device)
    layer = layer if layer is not None else num_layers(model) // 2
    probe, report = fit_probe(
        model, tokenizer, harmful, benign, layer, kind, target_fpr, epochs, lr, batch_size, max_length, seed, window
    )
    out = probe.save(out_dir)
    (out / PROBE_REPORT).write_text(json.dumps({"model": model_name, **report}, indent=2))
    return out, report


def find_probe(model_name: str, probe: str = "auto") -> str | None:
    """The probe folder to guard `model_name` with: `none` is no guard; `auto` is the probe saved beside a
    local model (MODEL_DIR/probe), if there is one; anything else is a probe folder."""
    from ..models import resolve_model_path

    if probe == "none":
        return None
    if probe != "auto":
        return probe
    local = Path(model_name)
    # a local folder as it is (its files are checked when the model loads); a name resolved to its folder
    beside = (local if local.is_dir() else Path(resolve_model_path(model_name))) / PROBE_FOLDER
    return str(beside) if (beside / PROBE_CONFIG).is_file() else None
