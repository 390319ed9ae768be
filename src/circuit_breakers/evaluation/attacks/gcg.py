"""GCG (Zou et al. 2023, arXiv 2307.15043): an adversarial token suffix found by greedy coordinate search.

Each step: the gradient of the target loss with respect to a one-hot encoding of the suffix ranks,
for every suffix position, the `topk` tokens most likely to lower the loss; `search_width` random
single-token swaps drawn from those are evaluated exactly in batches, and the suffix moves to the
best one. The lowest-loss suffix seen is returned.

Two backends. `builtin` (this module, the default) and `nanogcg` (GraySwan's package, opt-in).
nanogcg 0.3.0 declares `transformers<=4.47.1`, so it cannot be a dependency of this project (pip's
resolver refuses it next to transformers 5.23) and has to be installed with `--no-deps` (plus scipy,
which it imports). Under transformers 5.23 it runs only with `use_prefix_cache=False` (its prefix
cache indexes a `DynamicCache` like the old tuple format: "'DynamicCache' object is not
subscriptable"), which this adapter sets; without the cache, and with a `gc.collect()` after every
candidate batch, it is several times slower than the builtin on a CPU; and it scores its own
segment tokenization, which can differ from the rendered prompt (so the adapter re-measures the
losses it reports with `target_loss`). `backend="auto"` picks nanogcg when importable.

The builtin keeps only candidates whose text re-tokenizes, inside the fully rendered prompt, to the
same ids, so the suffix optimised is the suffix generation sees (`target_loss` on the returned text
equals the reported loss).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from .base import Attack, AttackError, AttackInput, Message, coerce_prompts, encode, with_suffix
from .loss import Segments, embeds_loss, ids_loss, optimising, target_loss

log = logging.getLogger(__name__)


@dataclass
class GCGResult:
    """Outcome of one optimisation: the suffix text to append to the user turn, and its losses."""

    suffix: str
    suffix_ids: list[int]
    initial_loss: float
    best_loss: float
    losses: list[float] = field(default_factory=list)
    """Loss after each step, as the backend measured it."""
    backend: str = "builtin"


def allowed_tokens(tokenizer: PreTrainedTokenizerBase, vocab_size: int, ascii_only: bool = True) -> Tensor:
    """Boolean mask `[vocab_size]` of tokens a suffix may use: no special tokens, no ids the tokenizer
    does not know, nothing that decodes to empty or (with `ascii_only`) non-printable-ASCII text."""
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    special = set(tokenizer.all_special_ids)
    special.update(i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if getattr(t, "special", False))
    n = min(vocab_size, len(tokenizer))
    texts = tokenizer.batch_decode([[i] for i in range(n)])
    for i, text in enumerate(texts):
        if i in special or not text.strip():
            continue
        if ascii_only and not (text.isascii() and text.isprintable()):
            continue
        mask[i] = True
    return mask


def _retokenizes(tokenizer: PreTrainedTokenizerBase, segments: Segments, candidates: Tensor) -> Tensor:
    """Which candidate suffixes survive decode -> render -> encode unchanged (`[N]` bool)."""
    texts = tokenizer.batch_decode(candidates.tolist())
    full = [segments.before_text + t + segments.after_text for t in texts]
    encoded = tokenizer(full, add_special_tokens=False)["input_ids"]
    head, tail = segments.before.tolist(), segments.after.tolist()
    ok = [e == head + c + tail for e, c in zip(encoded, candidates.tolist(), strict=True)]
    return torch.tensor(ok, dtype=torch.bool)


def _token_gradient(model: nn.Module, segments: Segments, suffix: Tensor) -> Tensor:
    """d loss / d one-hot(suffix): `[k, V]`; lower means swapping in that token should help."""
    weight = model.get_input_embeddings().weight
    one_hot = torch.zeros(len(suffix), weight.shape[0], dtype=weight.dtype, device=weight.device)
    one_hot.scatter_(1, suffix.unsqueeze(1), 1.0)
    one_hot.requires_grad_(True)
    loss = embeds_loss(model, segments, (one_hot @ weight).unsqueeze(0))[0]
    (grad,) = torch.autograd.grad(loss, [one_hot])
    return grad / grad.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _sample_swaps(suffix: Tensor, top: Tensor, width: int, generator: torch.Generator) -> Tensor:
    """`width` copies of `suffix`, each with one position replaced by one of that position's top tokens."""
    k, topk = top.shape
    positions = torch.randint(0, k, (width,), generator=generator)
    choices = torch.randint(0, topk, (width,), generator=generator)
    candidates = suffix.cpu().repeat(width, 1)
    candidates[torch.arange(width), positions] = top.cpu()[positions, choices]
    return candidates


def gcg_optimize(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    target: str,
    steps: int = 250,
    search_width: int = 512,
    topk: int = 256,
    init: str = " ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! ! !",
    batch_size: int = 128,
    seed: int = 0,
    ascii_only: bool = True,
    prefix_cache: bool = True,
) -> GCGResult:
    """The builtin GCG. `init` is appended verbatim to the last user turn; its tokens fix the length.

    `prefix_cache` runs the prompt before the suffix once and reuses its keys/values (same losses,
    about half the compute on a chat prompt with a system message).
    """
    with optimising(model):
        return _gcg(
            model,
            tokenizer,
            messages,
            target,
            steps,
            search_width,
            topk,
            init,
            batch_size,
            seed,
            ascii_only,
            prefix_cache,
        )


def _gcg(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    target: str,
    steps: int,
    search_width: int,
    topk: int,
    init: str,
    batch_size: int,
    seed: int,
    ascii_only: bool,
    prefix_cache: bool,
) -> GCGResult:
    segments = Segments.build(model, tokenizer, messages, target)
    if prefix_cache:
        segments.cache_prefix(model)
    device = segments.before.device
    suffix = torch.tensor(encode(tokenizer, init), dtype=torch.long, device=device)
    if len(suffix) == 0:
        raise AttackError("the GCG init string is empty after tokenization")
    allowed = allowed_tokens(tokenizer, model.get_input_embeddings().weight.shape[0], ascii_only).to(device)
    generator = torch.Generator().manual_seed(seed)
    current_loss = float(ids_loss(model, segments, suffix.unsqueeze(0))[0])
    best, best_loss, losses = suffix.clone(), current_loss, [current_loss]
    initial_loss = current_loss
    for _ in range(steps):
        grad = _token_gradient(model, segments, suffix)
        grad[:, ~allowed] = float("inf")
        top = (-grad).topk(min(topk, int(allowed.sum())), dim=1).indices
        candidates = _sample_swaps(suffix, top, search_width, generator)
        candidates = candidates[_retokenizes(tokenizer, segments, candidates)].to(device)
        if len(candidates) == 0:
            losses.append(current_loss)
            continue
        cand_losses = ids_loss(model, segments, candidates, batch_size)
        pick = int(cand_losses.argmin())
        suffix, current_loss = candidates[pick], float(cand_losses[pick])
        losses.append(current_loss)
        if current_loss < best_loss:
            best, best_loss = suffix.clone(), current_loss
    ids = best.tolist()
    return GCGResult(tokenizer.decode(ids), ids, initial_loss, best_loss, losses, "builtin")


def nanogcg_available() -> bool:
    try:
        import nanogcg  # noqa: F401
    except ImportError:
        return False
    return True


def nanogcg_optimize(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    messages: Sequence[Message],
    target: str,
    steps: int,
    search_width: int,
    topk: int,
    init: str,
    batch_size: int,
    seed: int,
    ascii_only: bool,
    prefix_cache: bool = False,
) -> GCGResult:
    """GCG through nanogcg, with its prefix cache off whatever `prefix_cache` says (see the module
    docstring for why).

    nanogcg switches on `torch.use_deterministic_algorithms` when given a seed and leaves it on;
    the previous setting is restored afterwards.
    """
    import nanogcg

    config = nanogcg.GCGConfig(
        num_steps=steps,
        search_width=search_width,
        topk=topk,
        optim_str_init=init,
        batch_size=batch_size,
        seed=seed,
        allow_non_ascii=not ascii_only,
        use_prefix_cache=False,
        verbosity="WARNING",
    )
    chat = with_suffix(messages, "{optim_str}")
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        with optimising(model):
            result = nanogcg.run(model, tokenizer, chat, target, config)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    # nanogcg scores its own segment tokenization (BOS re-added by the tokenizer, suffix tokenized
    # apart from its context); the losses reported here are re-measured on the prompt as rendered.
    initial = target_loss(model, tokenizer, messages, target, init)
    best = target_loss(model, tokenizer, messages, target, result.best_string)
    ids = encode(tokenizer, result.best_string)
    return GCGResult(
        result.best_string,
        ids,
        initial,
        best,
        [float(x) for x in result.losses],
        f"nanogcg {metadata.version('nanogcg')}",
    )


@dataclass
class GCGAttack(Attack):
    """A GCG suffix per prompt, optimised towards the prompt's target string.

    Paper budget (Zou et al. 2023; HarmBench): 500 steps, search width 512, top-k 256, 20 tokens.
    `budget="cpu"` is a smoke-level search that shows the mechanism, not the attack's strength.
    """

    name: ClassVar[str] = "gcg"
    presets: ClassVar[dict[str, dict[str, Any]]] = {
        "cpu": {"steps": 10, "search_width": 32, "topk": 32, "n_tokens": 10},
        "default": {"steps": 250, "search_width": 512, "topk": 256, "n_tokens": 20},
        "paper": {"steps": 500, "search_width": 512, "topk": 256, "n_tokens": 20},
    }
    steps: int = 250
    search_width: int = 512
    topk: int = 256
    n_tokens: int = 20
    init: str | None = None
    """Initial suffix text (appended verbatim); default: `n_tokens` times " !"."""
    batch_size: int = 128
    seed: int = 0
    ascii_only: bool = True
    prefix_cache: bool = True
    backend: Literal["auto", "builtin", "nanogcg"] = "builtin"

    @property
    def needs_model(self) -> bool:
        return True

    def resolved_backend(self) -> str:
        if self.backend == "auto":
            return "nanogcg" if nanogcg_available() else "builtin"
        if self.backend == "nanogcg" and not nanogcg_available():
            raise AttackError("backend 'nanogcg' needs: pip install --no-deps nanogcg==0.3.0 scipy")
        if self.backend not in ("builtin", "nanogcg"):
            raise AttackError(f"unknown GCG backend {self.backend!r}")
        return self.backend

    def settings(self) -> dict[str, Any]:
        out = super().settings()
        out["backend"] = self.resolved_backend()
        return out

    def prepare(
        self, model: nn.Module | None, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[Any]
    ) -> list[AttackInput]:
        if model is None:
            raise AttackError("GCG needs the model")
        optimize = nanogcg_optimize if self.resolved_backend() == "nanogcg" else gcg_optimize
        init = self.init if self.init is not None else " !" * self.n_tokens
        out = []
        for i, p in enumerate(coerce_prompts(prompts)):
            messages = p.chat()
            result = optimize(
                model,
                tokenizer,
                messages,
                p.target_or_default(),
                steps=self.steps,
                search_width=self.search_width,
                topk=self.topk,
                init=init,
                batch_size=self.batch_size,
                seed=self.seed + i,
                ascii_only=self.ascii_only,
                prefix_cache=self.prefix_cache,
            )
            final = with_suffix(messages, result.suffix)
            # Re-measured on the prompt exactly as generation will render it (one forward pass).
            measured = target_loss(model, tokenizer, final, p.target_or_default())
            log.info("gcg prompt %d: loss %.3f -> %.3f", i, result.initial_loss, measured)
            out.append(
                AttackInput(
                    final,
                    p,
                    i,
                    self.name,
                    settings={
                        "suffix": result.suffix,
                        "initial_loss": result.initial_loss,
                        "best_loss": measured,
                        "search_loss": result.best_loss,
                        "backend": result.backend,
                        "target_source": "benchmark" if p.target else "default",
                    },
                )
            )
        return out
