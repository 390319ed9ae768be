"""The circuit-breaker Trainer: a frozen pass and an adapted pass per step, rerouting + retain losses.

Subclassing transformers' Trainer gives checkpoints, resume, logging integrations, accelerate and
DeepSpeed for free; only `compute_loss`, `log` and the sampler change.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
from contextlib import nullcontext
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from .. import losses
from ..config import CircuitBreakerConfig, ConfigError
from ..representations import hidden_states, perturbed, stacked

logger = logging.getLogger("circuit_breakers")

LAYER_WEIGHTS_FILE = "layer_weights.safetensors"
"""The learned layer-weight logits, saved in each checkpoint beside the adapter (layer_weights=learned)."""


LAT_SUFFIX_FILE = "lat_suffix.safetensors"
"""RR + LAT's universal soft suffix (lat_positions=suffix), saved in each checkpoint so a resumed run goes on
with the adversary it had."""


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; training stopped and the last good checkpoint is kept."""


class TrainingInterrupted(RuntimeError):
    """SIGTERM or SIGINT stopped training after a checkpoint of the current step was written."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at step {step}; checkpoint {checkpoint} written. "
            "Resume with --resume_from_checkpoint last"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + self.signum


class CheckpointError(RuntimeError):
    """A checkpoint or export could not be written (disk full, ...); the previous checkpoint is intact."""


STAGING_PREFIX = ".tmp-"
"""Checkpoints are written to `.tmp-checkpoint-N` and renamed into place when complete: the name never
matches transformers' `checkpoint-N` pattern, so resume cannot pick a half-written one."""


def resolve_retain_layers(spec: str, target_layers: list[int]) -> list[int]:
    """`target` -> the target layers; `all` -> every hidden-state index 1..deepest target; else a comma list."""
    if spec == "target":
        return list(target_layers)
    if spec == "all":
        return list(range(1, max(target_layers) + 1))
    try:
        return sorted({int(x) for x in spec.split(",") if x.strip()})
    except ValueError as err:
        raise ValueError(f"retain_layers must be target, all or a comma list of integers, not {spec!r}") from err


class CircuitBreakerTrainer(Trainer):
    """Representation rerouting (Zou et al. 2024) on a peft model.

    Batches come from `PairedCollator`: `input_ids`, `attention_mask`, `cb_mask`, `retain_mask`.
    """

    args: CircuitBreakerConfig

    def __init__(self, *args: Any, target_layers: list[int], retain_layers: list[int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.target_layers = list(target_layers)
        self.retain_layers = list(retain_layers)
        lat = [self.args.lat_layer] if self.args.lat_epsilon > 0 else []
        self.capture_layers = sorted(set(self.target_layers) | set(self.retain_layers) | set(lat))
        if lat and (self.is_fsdp_enabled or self.is_deepspeed_enabled):
            raise ConfigError("lat_epsilon > 0 (RR + LAT) runs its adversary on the unwrapped model: use one device or "
                              "DDP, not FSDP or DeepSpeed")
        if lat and not 0 <= self.args.lat_layer < max(self.target_layers):
            raise ConfigError(f"lat_layer {self.args.lat_layer} must lie below the deepest target layer {max(self.target_layers)}")
        if lat and self.args.lat_positions == "suffix" and self.accelerator.num_processes > 1 and self.args.max_chunk_tokens > 0:
            raise ConfigError("lat_positions=suffix on several processes moves one shared suffix in step on all of them: "
                              "run whole batches (--max_chunk_tokens 0), as chunk counts differ between processes")
        self.layer_logits: nn.Parameter | None = None
        if self.args.layer_weights == "learned":  # softmax weights over target_layers, trained with the adapters
            self.layer_logits = nn.Parameter(torch.zeros(len(self.target_layers), device=self.args.device))
        self.outlier_dims: list[int] | None = None
        self.lat_suffix: Tensor | None = None  # [k, H] float32: the universal soft suffix (lat_positions=suffix)
        self._slot_tokens: tuple[Tensor, Tensor] | None = None  # (suffix init ids, end-of-user-turn ids)
        self._suffix_origin: tuple[Tensor, float] | None = None  # (placeholder embeddings, typical token norm)
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let Trainer divide by GA steps
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.cosine_history: list[tuple[int, float, float]] = []  # (step, rerouting cos, retain cos)
        self.stall_warned = False
        self._staging_dir: str | None = None
        self._stop_signal: int | None = None  # set by the handler; acted on at the next step end
        self.stopped_by: int | None = None
        self.add_callback(_StepEnd(self))

    # --- distribution ---------------------------------------------------------------------------
    def _through(self, model: nn.Module) -> nn.Module | None:
        """The wrapper whose forward must run (DDP, FSDP, DeepSpeed), or None for a plain model."""
        if self.accelerator.num_processes > 1 or self.is_fsdp_enabled or self.is_deepspeed_enabled:
            return model
        return None

    def _global_count_scale(self, local: Tensor, layers: int) -> Tensor:
        """Turn a per-device mean over masked tokens into this device's share of the global mean.

        DDP averages gradients over devices; a mean of per-device means is the global mean only when
        every device has the same number of masked tokens. Multiplying by n * local / total makes the
        average exactly the mean over all masked tokens of the global batch, as on one device.
        """
        total = self.accelerator.reduce(local.detach().float().clone(), reduction="sum")
        n = self.accelerator.num_processes
        return n * (local.float() * layers).clamp_min(1.0) / (total.float() * layers).clamp_min(1.0)

    def engine(self) -> dict[str, Any]:
        """What ran the step: accelerate's distributed type, FSDP version or ZeRO stage, process count."""
        state = self.accelerator.state
        info: dict[str, Any] = {"type": str(state.distributed_type.value), "processes": self.accelerator.num_processes}
        if self.is_fsdp_enabled:
            info["fsdp_version"] = getattr(state.fsdp_plugin, "fsdp_version", 1)
        if self.is_deepspeed_enabled:
            info["zero_stage"] = state.deepspeed_plugin.zero_stage
        return info

    # --- learned layer weights -----------------------------------------------------------------
    def layer_weights(self) -> Tensor | None:
        """Softmax weights over target_layers for the rerouting loss (None: uniform, the plain mean)."""
        return None if self.layer_logits is None else torch.softmax(self.layer_logits, dim=0)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Trainer's optimizer, plus the layer-weight logits as their own group (own lr, no decay)."""
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        logits = self.layer_logits
        if logits is not None and not any(p is logits for group in optimizer.param_groups for p in group["params"]):
            optimizer.add_param_group({"params": [logits], "lr": self.args.layer_weight_lr, "weight_decay": 0.0})
        return optimizer

    def _sync_layer_grad(self) -> None:
        """DDP averages the adapters' gradients, not those of parameters outside the model: do it here.
        (Averaging after every micro-batch is exact: the mean is linear and the past part is equal on all ranks.)"""
        logits = self.layer_logits
        if logits is not None and logits.grad is not None and self.accelerator.num_processes > 1:
            logits.grad.copy_(self.accelerator.reduce(logits.grad.detach().clone(), reduction="mean"))

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        super()._save(output_dir, state_dict)
        if self.layer_logits is not None:
            from safetensors.torch import save_file

            save_file({"logits": self.layer_logits.detach().cpu().contiguous()},
                      os.path.join(output_dir or str(self.args.output_dir), LAYER_WEIGHTS_FILE))
        if self.lat_suffix is not None:
            from safetensors.torch import save_file

            save_file({"suffix": self.lat_suffix.detach().cpu().contiguous()},
                      os.path.join(output_dir or str(self.args.output_dir), LAT_SUFFIX_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = Path(resume_from_checkpoint, LAYER_WEIGHTS_FILE)
        if self.layer_logits is not None and path.is_file():
            from safetensors.torch import load_file

            with torch.no_grad():
                self.layer_logits.copy_(load_file(str(path))["logits"].to(self.layer_logits.device))
        path = Path(resume_from_checkpoint, LAT_SUFFIX_FILE)
        if self.args.lat_epsilon > 0 and self.args.lat_positions == "suffix" and path.is_file():
            from safetensors.torch import load_file

            self.lat_suffix = load_file(str(path))["suffix"].to(self.args.device)

    # --- sampling -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # Grouped by the global batch, so that N devices see the same global batches, in the same
            # order, as one device with N times the batch (the dataloader then shards each of them).
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return EpochLengthGroupedSampler(global_batch, dataset.lengths, self.args.data_seed or self.args.seed,
                                             lambda: self.state.epoch)
        return super()._get_train_sampler(train_dataset)

    # --- the step -------------------------------------------------------------------------------
    def _frozen_states(self, model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> dict[int, Tensor]:
        """Hidden states of the original model: adapters off, eval mode (no dropout), no graph.

        The adapters are switched off on the unwrapped peft model (a flag on each LoRA layer, no
        parameter moves), but under FSDP, ZeRO-3 or DDP the forward runs through the wrapper, which
        gathers the sharded base weights; calling the inner module directly would see only shards.
        """
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with torch.no_grad(), peft_model.disable_adapter():
                return hidden_states(peft_model, input_ids, attention_mask, self.capture_layers, self._through(model))
        finally:
            peft_model.train(was_training)

    def training_step(
        self, model: nn.Module, inputs: dict[str, Tensor], num_items_in_batch: Tensor | int | None = None
    ) -> Tensor:
        """Trainer's step, except that a batch larger than `max_chunk_tokens` runs the adapted pass and its
        backward in chunks of rows: activation memory falls with the chunk size, the gradient is unchanged
        (each chunk's loss is its share of the batch's token mean, so the chunks' gradients add up to it).

        `num_items_in_batch` (from `_get_num_items_in_batch`): the masked tokens of the whole optimizer step;
        the loss is then already normalised for gradient accumulation and must not be divided again.
        """
        counts = _step_counts(num_items_in_batch)
        self.loss_is_scaled_for_ga = counts is not None
        groups = chunk_rows(inputs["attention_mask"], self.args.max_chunk_tokens) if self._chunking(model) else []
        if len(groups) < 2:
            loss = super().training_step(model, inputs, num_items_in_batch)
            self._sync_layer_grad()
            return loss
        model.train()
        if hasattr(self.optimizer, "train") and callable(self.optimizer.train):
            self.optimizer.train()
        inputs = self._prepare_inputs(inputs)
        scale = 1.0
        if counts is None:
            scale = 1.0 / getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        with self.compute_loss_context_manager():
            loss = self._step(model, inputs, counts, groups, lambda chunk_loss: self.accelerator.backward(chunk_loss * scale))
        self._sync_layer_grad()
        return loss.detach() * scale

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """[circuit-breaker tokens, retain tokens] masked in every micro-batch of this optimizer step, summed
        over processes. Losses divide by these, so gradient accumulation and several devices give exactly
        the mean over every masked token of the global batch, as one device with the whole batch would."""
        if not batch_samples or "cb_mask" not in batch_samples[0]:
            return super()._get_num_items_in_batch(batch_samples, device)
        counts = sum(torch.stack([(b["cb_mask"] * b["attention_mask"]).sum(), (b["retain_mask"] * b["attention_mask"]).sum()])
                     for b in batch_samples).float().to(device)
        if self.accelerator.num_processes > 1:
            counts = self.accelerator.reduce(counts, reduction="sum")
        return counts

    def _chunking(self, model: nn.Module) -> bool:
        """Chunked backward needs several backward calls per step: fine on one device and under DDP
        (gradient sync deferred to the last chunk), not under FSDP or DeepSpeed, whose engines own it."""
        return self.args.max_chunk_tokens > 0 and not (self.is_fsdp_enabled or self.is_deepspeed_enabled)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """loss = c_cb(t) L_rerouting + c_retain(t) L_retain at optimizer step t (the global step)."""
        loss = self._step(model, inputs, _step_counts(num_items_in_batch))
        return (loss, {}) if return_outputs else loss

    def _step(self, model: nn.Module, inputs: dict[str, Tensor], counts: Tensor | None = None,
              groups: list[tuple[Tensor, int]] | None = None, backward: Any = None) -> Tensor:
        """The batch's loss. `groups` (from `chunk_rows`): the rows run chunk by chunk (None: all at once);
        with `backward` (a function of a chunk's loss) each chunk's loss is passed to it as soon as it is
        computed and the detached total is returned; without, the attached total.

        `counts`: masked [circuit-breaker, retain] tokens of the whole optimizer step on all devices (see
        `_get_num_items_in_batch`); without them, the means are over this batch (and all devices).

        Everything that depends on the whole batch (token counts, the centring mean, outlier dimensions,
        the global scaling across devices) is computed from the frozen passes before any adapted one.
        """
        args = self.args
        slots = None
        if args.lat_epsilon > 0 and args.lat_positions == "suffix":
            suffix_ids, turn_end = self._suffix_tokens(inputs["input_ids"].device)
            inputs, slots = insert_slots(inputs, suffix_ids, turn_end, self._pad_id())
            groups = [(rows, width + len(suffix_ids)) for rows, width in groups] if groups else None
        attention_mask = inputs["attention_mask"]
        cb_mask = inputs["cb_mask"] * attention_mask
        retain_mask = inputs["retain_mask"] * attention_mask
        slot_mask = slots if slots is not None else attention_mask  # without a suffix: a stand-in, never read
        chunks = [_take(rows, width, inputs["input_ids"], attention_mask, cb_mask, retain_mask, slot_mask)
                  for rows, width in (groups or [(None, None)])]
        frozen = [self._frozen_states(model, ids, attn) for ids, attn, *_ in chunks]

        distributed = self.accelerator.num_processes > 1
        n_target, n_retain = len(self.target_layers), len(self.retain_layers)
        local_cb, local_retain = cb_mask.sum().float() * n_target, retain_mask.sum().float() * n_retain
        count_cb, count_retain = local_cb, local_retain
        scale_cb = scale_retain = 1.0
        if counts is not None:  # devices average their gradients: n x (local sum / global count) sums them
            count_cb, count_retain = counts[0] * n_target, counts[1] * n_retain
            scale_cb = scale_retain = float(self.accelerator.num_processes)
        elif distributed:
            scale_cb = self._global_count_scale(cb_mask.sum(), n_target)
            scale_retain = self._global_count_scale(retain_mask.sum(), n_retain)
        center = self._center(frozen, chunks) if args.representation == "centered" else None
        if args.representation == "no_outliers" and self.outlier_dims is None:
            self._find_outlier_dims(frozen, chunks)

        step = self.state.global_step
        c_cb, c_retain = losses.coefficients(
            step, args.max_steps, args.alpha, args.schedule, args.decay_multiplier, args.retain_weight,
            args.reroute_warmup_steps,
        )
        stats: dict[str, Tensor] = defaultdict(lambda: torch.zeros(()))
        total = torch.zeros((), device=attention_mask.device)
        for i, ((ids, attn, m_cb, m_retain, slot_i), frozen_i) in enumerate(zip(chunks, frozen)):
            last = i == len(chunks) - 1
            sync = nullcontext() if last or not distributed or backward is None else self.accelerator.no_sync(model)
            delta = None
            if slots is not None:
                delta = self._suffix_adversary(model, ids, attn, m_cb, slot_i.bool(), frozen_i, center)
            elif args.lat_epsilon > 0:
                delta = self._adversary(model, ids, attn, m_cb, frozen_i, center)
            with sync, perturbed(model, args.lat_layer, delta):
                adapted = hidden_states(model, ids, attn, self.capture_layers, self._through(model))
                frozen_cb, adapted_cb = stacked(frozen_i, self.target_layers), stacked(adapted, self.target_layers)
                if center is not None:
                    cos_adapted, cos_frozen = adapted_cb - center, frozen_cb - center
                else:
                    cos_adapted, cos_frozen = losses.for_cosine(
                        adapted_cb, frozen_cb, m_cb, args.representation, self.outlier_dims or ()
                    )
                weights = self.layer_weights()  # per chunk: each chunk's backward frees its own graph
                loss_cb = losses.rerouting_loss(cos_adapted, cos_frozen, m_cb, count_cb, weights) * scale_cb
                frozen_r, adapted_r = stacked(frozen_i, self.retain_layers), stacked(adapted, self.retain_layers)
                loss_retain = losses.retain_loss(adapted_r, frozen_r, m_retain, args.retain_distance, count_retain)
                loss_retain = loss_retain * scale_retain
                loss = c_cb * loss_cb + c_retain * loss_retain
                seen = (cos_adapted, cos_frozen) if args.representation != "raw" else None
                _accumulate(stats, loss_cb, loss_retain, adapted_cb, frozen_cb, seen, adapted_r, frozen_r, m_cb, m_retain)
                if backward is None:
                    total = total + loss
                else:
                    backward(loss)
                    total = total + loss.detach()
                del adapted, adapted_cb, adapted_r, cos_adapted, loss
        if not torch.isfinite(total):  # once per step (one sync); the optimizer has not stepped yet
            checkpoint = self.state.best_model_checkpoint or "the last checkpoint in " + str(args.output_dir)
            raise TrainingDiverged(
                f"loss became {float(total)} at step {step} (rerouting {float(stats['loss_rerouting'])}, retain "
                f"{float(stats['loss_retain'])}); training stopped, {checkpoint} is intact. Lower learning_rate "
                "or alpha, or use float32."
            )
        stats["chunks"] = torch.tensor(float(len(chunks)))
        if self.layer_logits is not None:
            for layer, w in zip(self.target_layers, self.layer_weights().detach()):
                stats[f"layer_weight_{layer}"] = w.float()
        # the logged component losses are this batch's own means, whatever the normalisation above
        for key, count, scale, local in (("loss_rerouting", count_cb, scale_cb, local_cb),
                                         ("loss_retain", count_retain, scale_retain, local_retain)):
            stats[key] = stats[key] * (count / scale / local.clamp_min(1.0)).to(stats[key].device)
        self._record(stats, c_cb, c_retain)
        return total

    def _adversary(self, model: nn.Module, ids: Tensor, attn: Tensor, m_cb: Tensor, frozen: dict[int, Tensor],
                   center: Tensor | None) -> Tensor | None:
        """RR + LAT: a perturbation of hidden state `lat_layer` on the circuit-breaker rows that undoes the
        circuit breaker as far as it can: `lat_steps` of projected gradient ascent on the mean rerouting
        cosine (adapted vs frozen, the representation the loss sees; no ReLU, so it still has a gradient
        once rerouted), each token's shift kept within an L2 ball of lat_epsilon x that token's own norm;
        each row keeps the shift with its highest cosine among those evaluated (the first being none).
        Steps are signed gradients, each of L2 size lat_step_size x the token's norm: the embedding attack's
        rule. Per-token L2-normalised steps of 2.5 eps / steps (PGD's textbook rule, used before) overshot:
        against the finished embedded circuit breaker they restored a layer-20 cosine of 0.55-0.93 where 8
        signed steps of 0.05 restore 0.97-0.99 (clean: -0.38), as the attack itself does (docs/extensions.md).
        Rows are independent (per-coordinate signed steps, per-row choice), so chunks and devices give the
        same shifts as one whole batch.
        The step's rerouting loss is then computed on the perturbed rows, so rerouting must hold under it.
        Runs on the unwrapped model (replicated under DDP) and touches no parameter's gradient."""
        args = self.args
        rows = (m_cb > 0).any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return None
        net = self.accelerator.unwrap_model(model)
        ids, attn, m_cb = ids[rows], attn[rows], m_cb[rows]  # only circuit-breaker rows: retain rows stay clean
        clean = frozen[args.lat_layer][rows]
        movable = (attn > 0) & ((m_cb == 0) if args.lat_positions == "prompt" else True)
        scale = clean.float().norm(dim=-1, keepdim=True) * movable[..., None]  # 0 where the adversary may not move
        radius = args.lat_epsilon * scale
        step = args.lat_step_size * scale / clean.shape[-1] ** 0.5  # per coordinate: L2 size lat_step_size x norm
        delta = torch.zeros_like(clean, dtype=torch.float32, requires_grad=True)
        best, best_value = torch.zeros_like(delta), torch.full((len(rows),), float("-inf"), device=delta.device)
        frozen_cb = stacked(frozen, self.target_layers)[:, rows]
        for _ in range(args.lat_steps):
            per_row = self._row_cosines(net, ids, attn, m_cb, frozen_cb, center, delta.to(clean.dtype))
            (grad,) = torch.autograd.grad(per_row.sum(), [delta])
            with torch.no_grad():  # each row keeps its own best (before rerouting: no shift at all)
                better = per_row.detach() > best_value
                best[better] = delta.detach()[better]
                best_value = torch.maximum(best_value, per_row.detach())
                delta += step * grad.sign()
                norm = delta.norm(dim=-1, keepdim=True)
                delta *= torch.where(norm > radius, radius / norm.clamp_min(1e-12), torch.ones_like(norm))
        full = torch.zeros_like(frozen[args.lat_layer])
        full[rows] = best.to(full.dtype)
        return full

    def _row_cosines(self, net: nn.Module, ids: Tensor, attn: Tensor, m_cb: Tensor, frozen_cb: Tensor,
                     center: Tensor | None, delta: Tensor) -> Tensor:
        """[b]: each row's mean rerouting cosine (adapted, shifted by `delta` at lat_layer, vs frozen) over its
        masked tokens and the target layers, in the representation the loss sees: what the adversary raises."""
        args = self.args
        with perturbed(net, args.lat_layer, delta):
            adapted_cb = stacked(hidden_states(net, ids, attn, self.target_layers), self.target_layers)
        if center is not None:
            a, f = adapted_cb - center, frozen_cb - center
        else:
            a, f = losses.for_cosine(adapted_cb, frozen_cb, m_cb, args.representation, self.outlier_dims or ())
        cos = torch.nn.functional.cosine_similarity(a.float(), f.float(), dim=-1)  # [L, b, T]
        weights = m_cb.float()[None]  # [1, b, T]
        return (cos * weights).sum(dim=(0, 2)) / (weights.sum(dim=(0, 2)) * cos.shape[0]).clamp_min(1.0)

    def _suffix_tokens(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(ids of lat_suffix_init, ids the chat template writes between the user's text and the answer):
        the soft suffix's placeholders and the sequence it is inserted before (its last token dropped, as
        it may merge with the answer's first characters)."""
        if self._slot_tokens is None:
            from ..data.slots import encode, split_at_slot

            tokenizer = self.processing_class
            if tokenizer is None:
                raise ConfigError("lat_positions=suffix needs the tokenizer (processing_class) to find the user turn's end")
            suffix = encode(tokenizer, self.args.lat_suffix_init)
            _, after = split_at_slot(tokenizer, [{"role": "user", "content": "Hello"}])
            turn_end = encode(tokenizer, after)
            if not suffix or not turn_end:
                raise ConfigError("lat_suffix_init and the chat template's generation prompt must each give tokens")
            self._slot_tokens = (torch.tensor(suffix), torch.tensor(turn_end[:max(1, len(turn_end) - 1)]))
        return tuple(t.to(device) for t in self._slot_tokens)  # type: ignore[return-value]

    def _pad_id(self) -> int:
        pad = getattr(self.processing_class, "pad_token_id", None)
        return int(pad) if pad is not None else 0

    def _suffix_adversary(self, model: nn.Module, ids: Tensor, attn: Tensor, m_cb: Tensor, slots: Tensor,
                          frozen: dict[int, Tensor], center: Tensor | None) -> Tensor | None:
        """RR + LAT shaped like the embedding attack (lat_positions=suffix): the circuit-breaker rows carry
        the placeholder tokens of a soft suffix at the end of the user turn (`insert_slots`), and the
        adversary moves one universal suffix, shared by every row and kept from step to step, so that its
        `lat_steps` signed steps per training step add up, over a run, to hundreds of attack steps (the
        evaluation's attack takes 100) instead of starting from nothing each step. Steps and radius are in units of
        the typical token-embedding norm (per coordinate: lat_step_size x the embedding matrix's rms, the
        attack's rule); the suffix stays within lat_epsilon such norms of its starting embeddings, per
        token. It ascends the mean rerouting cosine of the step's rows (gradients averaged over devices);
        each row is then trained on the suffix state with its highest cosine among those evaluated.
        Runs on the unwrapped model and touches no parameter's gradient."""
        args = self.args
        rows = (m_cb > 0).any(dim=1).nonzero().flatten()
        if len(rows) == 0:
            return None
        net = self.accelerator.unwrap_model(model)
        embed = net.get_input_embeddings()
        suffix_ids, _ = self._suffix_tokens(ids.device)
        k, hidden = len(suffix_ids), embed.weight.shape[-1]
        if self._suffix_origin is None:  # the embeddings are frozen: computed once, not every step
            with torch.no_grad():
                origin = embed(suffix_ids).float()  # the placeholders' own embeddings: what the frozen pass read
                unit = float(embed.weight.float().pow(2).mean().sqrt()) * hidden ** 0.5  # typical token norm
            self._suffix_origin = (origin, unit)
        origin, unit = self._suffix_origin
        if self.lat_suffix is None:
            self.lat_suffix = origin.clone()
        ids, attn, m_cb, slots = ids[rows], attn[rows], m_cb[rows], slots[rows]
        if not bool((slots.sum(dim=1) == k).all()):
            raise RuntimeError("every circuit-breaker row must carry the whole soft suffix")
        where = slots.nonzero()[:, 1].view(len(rows), k)[..., None].expand(len(rows), k, hidden)
        frozen_cb = stacked(frozen, self.target_layers)[:, rows]
        dtype = frozen[0].dtype
        suffix = self.lat_suffix.detach().clone().requires_grad_(True)
        best = torch.zeros(len(rows), ids.shape[1], hidden, device=ids.device)
        best_value = torch.full((len(rows),), float("-inf"), device=ids.device)
        for _ in range(args.lat_steps):
            shift = (suffix - origin).unsqueeze(0).expand(len(rows), k, hidden)
            delta = torch.zeros_like(best).scatter(1, where, shift)
            per_row = self._row_cosines(net, ids, attn, m_cb, frozen_cb, center, delta.to(dtype))
            (grad,) = torch.autograd.grad(per_row.mean(), [suffix])
            if self.accelerator.num_processes > 1:
                grad = self.accelerator.reduce(grad.contiguous(), reduction="mean")
            with torch.no_grad():
                better = per_row.detach() > best_value
                best[better] = delta.detach()[better]
                best_value = torch.maximum(best_value, per_row.detach())
                suffix += args.lat_step_size * unit / hidden ** 0.5 * grad.sign()
                offset = suffix - origin
                norm = offset.norm(dim=-1, keepdim=True)
                radius = args.lat_epsilon * unit
                suffix.copy_(origin + offset * torch.where(norm > radius, radius / norm.clamp_min(1e-12), 1.0))
        self.lat_suffix = suffix.detach()
        full = torch.zeros_like(frozen[args.lat_layer])
        full[rows] = best.to(dtype)
        return full

    def _center(self, frozen: list[dict[int, Tensor]], chunks: list[tuple[Tensor, ...]]) -> Tensor:
        """[L, 1, 1, H]: the frozen mean over the batch's masked circuit-breaker tokens (all devices)."""
        sums = []
        for states, (_, _, m_cb, *_) in zip(frozen, chunks):
            f = stacked(states, self.target_layers)
            w = m_cb.to(f.dtype)[None, :, :, None]
            sums.append(torch.cat([(f * w).sum(dim=(1, 2)), w.sum(dim=(1, 2)).expand(f.shape[0], 1)], dim=-1))
        total = torch.stack(sums).sum(dim=0).float()  # [L, H + 1]
        if self.accelerator.num_processes > 1:
            total = self.accelerator.reduce(total, reduction="sum")
        dtype = frozen[0][self.target_layers[0]].dtype
        return (total[:, :-1] / total[:, -1:].clamp_min(1.0)).to(dtype)[:, None, None, :]

    def _find_outlier_dims(self, frozen: list[dict[int, Tensor]], chunks: list[tuple[Tensor, ...]]) -> None:
        """`representation=no_outliers`: the dimensions of largest frozen energy; rank 0's choice on every device."""
        energy = sum(losses.dimension_energy(stacked(states, self.target_layers), m_cb)
                     for states, (_, _, m_cb, *_) in zip(frozen, chunks))
        dims = losses.top_dimensions(energy, self.args.num_outlier_dims)
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            dims = broadcast_object_list([dims], from_process=0)[0]
        self.outlier_dims = dims
        logger.info("rerouting cosine excludes outlier dimensions %s", self.outlier_dims)

    def _record(self, stats: dict[str, Tensor], c_cb: float, c_retain: float) -> None:
        """Turn the step's summed statistics into the logged metrics (one transfer from the device)."""
        keys = sorted(stats)
        values = dict(zip(keys, torch.stack([stats[k] for k in keys]).tolist()))
        n_cb = values["n_cb"]

        def mean(key: str) -> float:
            return values[key] / n_cb if n_cb else float("nan")

        metrics = {
            "loss_rerouting": values["loss_rerouting"],
            "loss_retain": values["loss_retain"],
            "coef_rerouting": c_cb,
            "coef_retain": c_retain,
            "cos_rerouting": mean("cos"),
            "cos_rerouting_pos_frac": mean("cos_pos"),
            "cos_retain": values["cos_retain"] / max(values["n_retain"], 1.0),
            "norm_rerouting_adapted": mean("norm_adapted"),
            "norm_rerouting_frozen": mean("norm_frozen"),
        }
        metrics["chunks"] = values["chunks"]  # row chunks the step ran in (max_chunk_tokens)
        metrics.update({k: v for k, v in values.items() if k.startswith("layer_weight_")})
        if self.args.representation != "raw":  # the cosine the loss sees, beside the raw one (issue 10)
            metrics["cos_rerouting_seen"] = values["cos_seen"] / max(n_cb, 1.0)
        for key, value in metrics.items():
            self._metrics[key].append(value)

    # --- interruption: SIGTERM / SIGINT save a checkpoint, then stop --------------------------------
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """Trainer.train, with SIGTERM and SIGINT turned into "checkpoint this step, then stop".

        The handler only records the signal; the step in flight finishes, a checkpoint is written
        (atomically, see `_save_checkpoint`) and TrainingInterrupted is raised. A second SIGINT
        while that happens aborts at once, as usual.
        """
        if threading.current_thread() is not threading.main_thread():
            return super().train(*args, **kwargs)
        self._stop_signal = self.stopped_by = None

        def handler(signum: int, _frame: Any) -> None:
            self._stop_signal = signum
            if signum == signal.SIGINT:
                signal.signal(signal.SIGINT, signal.default_int_handler)
            logger.warning("%s received: saving a checkpoint at the end of this step, then stopping",
                           signal.Signals(signum).name)

        finished = self._finished_checkpoint(kwargs.get("resume_from_checkpoint", args[0] if args else None))
        if finished is not None:
            # transformers would run one more step from a checkpoint already at max_steps; load it instead
            logger.info("%s already reached max_steps %d: loading it, nothing left to train", finished, self.args.max_steps)
            self._load_from_checkpoint(finished)
            self.state = TrainerState.load_from_json(os.path.join(finished, TRAINER_STATE_NAME))
            return TrainOutput(self.state.global_step, float("nan"), {})
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            output = super().train(*args, **kwargs)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
        if self.stopped_by is not None:
            last = get_last_checkpoint(str(self.args.output_dir)) if Path(self.args.output_dir).is_dir() else None
            raise TrainingInterrupted(self.stopped_by, self.state.global_step, last)
        if self._stop_signal is not None:  # arrived after the last step: do what the signal would have done
            signal.raise_signal(self._stop_signal)
        return output

    def _finished_checkpoint(self, resume: Any) -> str | None:
        """The checkpoint to resume from, if it already holds the last step (DeepSpeed: left to Trainer)."""
        if resume is True:
            resume = get_last_checkpoint(str(self.args.output_dir)) if Path(self.args.output_dir).is_dir() else None
        if not isinstance(resume, str) or self.is_deepspeed_enabled:
            return None
        state_file = Path(resume, TRAINER_STATE_NAME)
        if not state_file.is_file():
            return None
        step = TrainerState.load_from_json(str(state_file)).global_step
        return resume if self.args.max_steps > 0 and step >= self.args.max_steps else None

    def _agreed_stop_signal(self) -> int | None:
        """The signal that stops training at this step; under several processes, any rank's (all agree)."""
        value = self._stop_signal or 0
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([value], device=self.accelerator.device)
            value = int(self.accelerator.gather(flag).max().item())
        return value or None

    # --- atomic checkpoints ---------------------------------------------------------------------
    def _get_output_dir(self, trial: Any) -> str:
        return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, written to `.tmp-checkpoint-N` and renamed to `checkpoint-N` only when
        every file (by every process) is complete; older checkpoints are rotated out only after that.

        A crash or a full disk mid-save therefore leaves the previous checkpoint as the last one.
        """
        run_dir = Path(super()._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = run_dir / f"{STAGING_PREFIX}{name}"
        if self.args.should_save:
            shutil.rmtree(staging, ignore_errors=True)  # left by a crash mid-save
            staging.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._staging_dir = str(staging)
        error: BaseException | None = None
        try:
            super()._save_checkpoint(model, trial)
        except Exception as err:  # noqa: BLE001 - re-raised below, once every rank knows
            error = err
        finally:
            self._staging_dir = None
        failed = error is not None
        if self.accelerator.num_processes > 1:
            flag = torch.tensor([int(failed)], device=self.accelerator.device)
            failed = bool(self.accelerator.reduce(flag, reduction="sum").item())
        if failed:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            previous = get_last_checkpoint(str(run_dir)) if run_dir.is_dir() else None
            reason = error if error is not None else "another process failed to write its part"
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                reason = f"disk full ({error.filename or run_dir})"
            raise CheckpointError(
                f"could not write {run_dir / name}: {reason}; the previous checkpoint "
                f"{previous or '(none)'} is intact. Free space, then resume with --resume_from_checkpoint last"
            ) from error
        if self.args.should_save:
            final = run_dir / name
            if final.exists():  # the same step saved twice (a resumed run): replace it as a whole
                old = run_dir / f"{STAGING_PREFIX}old-{name}"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
                os.replace(staging / name, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(staging / name, final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging:
                self.state.best_model_checkpoint = str(final)
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    # --- logging, stall detection ---------------------------------------------------------------
    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the averaged circuit-breaker metrics since the last log; check for a stalled reroute."""
        if self._metrics and "loss" in logs:
            keys = sorted(self._metrics)
            means = torch.tensor([sum(self._metrics[k]) / len(self._metrics[k]) for k in keys], dtype=torch.float64)
            if self.accelerator.num_processes > 1:  # every rank calls log() at the same step
                means = self.accelerator.reduce(means.to(self.accelerator.device), reduction="mean").cpu()
            for key, value in zip(keys, means.tolist()):
                logs[key] = round(value, 6)
            self._metrics.clear()
            self._seed_history()
            self.cosine_history.append((self.state.global_step, logs["cos_rerouting"], logs["cos_retain"]))
            self._check_stall()
        super().log(logs, start_time)

    def _seed_history(self) -> None:
        """After a resume, the cosines logged before the checkpoint come back from its log history."""
        if not self.cosine_history:
            self.cosine_history = [(row["step"], row["cos_rerouting"], row["cos_retain"])
                                   for row in self.state.log_history if "cos_rerouting" in row]

    def _check_stall(self) -> None:
        n = self.args.stall_check_steps
        if not n or self.stall_warned or not self.cosine_history:
            return
        step, cos_now, _ = self.cosine_history[-1]
        if step < n:
            return
        start = self.cosine_history[0][1]
        if 1.0 - cos_now < self.args.stall_margin:  # against adapted == frozen: a continued adapter starts rerouted
            self.stall_warned = True
            if not self.is_world_process_zero():
                return
            if self.args.lat_epsilon > 0:  # the logged cosine is on the adversary's shifted rows
                logger.warning(
                    "rerouting does not hold under the adversary (RR + LAT): cosine on the shifted circuit-breaker "
                    "rows %.4f -> %.4f after %d steps. Either rerouting never started, or the adversary undoes it "
                    "every step; trained on, such a run can lose the circuit breaker instead of hardening it (on "
                    "the embedded model: direct-request ASR 0%% -> 65%%, docs/extensions.md). Levers: a smaller "
                    "lat_step_size or lat_steps, lat_layer 0, a lower retain_weight, or continue an adapter that "
                    "already reroutes (init_adapter).",
                    start, cos_now, step,
                )
                return
            logger.warning(
                "rerouting has not started: cosine on rerouted tokens %.4f -> %.4f after %d steps. At the start "
                "adapted == frozen, where the cosine's gradient is zero; zero-initialised lora_B keeps it there "
                "(common with small or float32 models). Levers: lora_init=random, reroute_warmup_steps, "
                "representation=centered or no_outliers, a higher learning_rate or alpha.",
                start, cos_now, step,
            )

    def rerouting_summary(self) -> dict[str, Any]:
        """Cosine on rerouted tokens at the first and last log, retain cosine, and whether rerouting happened."""
        self._seed_history()
        if not self.cosine_history:
            return {"rerouted": None}
        start, end = self.cosine_history[0], self.cosine_history[-1]
        seen = [row["cos_rerouting_seen"] for row in self.state.log_history if "cos_rerouting_seen" in row]
        return {
            **({"cos_rerouting_seen_start": seen[0], "cos_rerouting_seen_end": seen[-1]} if seen else {}),
            "cos_rerouting_start": start[1],
            "cos_rerouting_end": end[1],
            "cos_retain_end": end[2],
            "rerouted": bool(1.0 - end[1] >= self.args.stall_margin),
            "stall_warning": self.stall_warned,
            **({"layer_weights": {str(layer): round(float(w), 6) for layer, w in zip(self.target_layers, self.layer_weights())}}
               if self.layer_logits is not None else {}),
        }


class EpochLengthGroupedSampler(LengthGroupedSampler):
    """transformers' length-grouped sampler, with an order that depends only on (seed, epoch).

    The plain one shuffles with the global RNG as it is when an epoch starts; a run resumed in the middle
    of epoch 2 or later draws that epoch's order from another RNG state and so trains on other batches
    than the uninterrupted run did. The epoch comes from the trainer's state (`epoch_of`), not from
    `set_epoch`, which accelerate's batch-skipping wrapper does not pass on under several processes.
    """

    def __init__(self, batch_size: int, lengths: list[int], seed: int, epoch_of: Callable[[], float]) -> None:
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch_of = seed, epoch_of

    def __iter__(self) -> Any:
        self.generator = torch.Generator().manual_seed(self.seed + int(self.epoch_of() or 0))
        return super().__iter__()

def chunk_rows(attention_mask: Tensor, max_tokens: int) -> list[tuple[Tensor, int]]:
    """Rows grouped into chunks of at most `max_tokens` padded tokens (always at least one row), longest
    rows first, each chunk trimmed to its own longest row: [(row indices, width)].

    Sorting by length means short rows no longer pad to the batch's longest one. `max_tokens <= 0`:
    one chunk with every row.
    """
    present = attention_mask.bool()
    cols = torch.arange(1, attention_mask.shape[1] + 1, device=attention_mask.device)
    ends = (present * cols).amax(dim=1).tolist()  # one past the last real token (right or left padding)
    if max_tokens <= 0:
        return [(torch.arange(len(ends)), max(ends, default=0))]
    order = sorted(range(len(ends)), key=lambda i: -ends[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and (len(groups[-1]) + 1) * ends[groups[-1][0]] <= max_tokens:
            groups[-1].append(i)
        else:
            groups.append([i])
    return [(torch.tensor(sorted(g)), ends[g[0]]) for g in groups]


def insert_slots(inputs: dict[str, Tensor], slot_ids: Tensor, turn_end: Tensor,
                 pad_id: int) -> tuple[dict[str, Tensor], Tensor]:
    """The batch with `slot_ids` inserted into each circuit-breaker row right before the last occurrence of
    `turn_end` (the template's tokens after the user's text: where the embedding attack puts its soft
    prompt); other rows are right-padded by as many tokens, so the batch stays rectangular. Inserted
    tokens are attended to and lie outside both loss masks. Returns the new batch and the [B, T + k]
    mask of the inserted positions. A circuit-breaker row without `turn_end` is refused."""
    ids, attn = inputs["input_ids"], inputs["attention_mask"]
    k, n = len(slot_ids), len(turn_end)
    is_cb = ((inputs["cb_mask"] * attn) > 0).any(dim=1)
    pieces: dict[str, list[Tensor]] = {key: [] for key, value in inputs.items() if value.shape == ids.shape}
    slots = torch.zeros(ids.shape[0], ids.shape[1] + k, dtype=torch.bool, device=ids.device)
    for row in range(ids.shape[0]):
        at = ids.shape[1]
        if is_cb[row]:
            hits = torch.zeros(0)
            if ids.shape[1] >= n:
                windows, present = ids[row].unfold(0, n, 1), attn[row].unfold(0, n, 1) > 0
                hits = ((windows == turn_end).all(dim=1) & present.all(dim=1)).nonzero()
            if len(hits) == 0:
                raise ConfigError(
                    f"lat_positions=suffix: circuit-breaker row {row} has no end of a user turn (the chat template's "
                    f"token ids {turn_end.tolist()}) to put the soft suffix before")
            at = int(hits[-1])
            slots[row, at:at + k] = True
        for key in pieces:
            if key == "input_ids":
                fill = slot_ids if is_cb[row] else torch.full((k,), pad_id)
            elif key == "attention_mask":
                fill = torch.full((k,), int(is_cb[row]))
            else:  # loss masks
                fill = torch.zeros(k)
            value = inputs[key]
            pieces[key].append(torch.cat([value[row, :at], fill.to(value), value[row, at:]]))
    return {**inputs, **{key: torch.stack(rows) for key, rows in pieces.items()}}, slots


def _step_counts(num_items_in_batch: Any) -> Tensor | None:
    """Our `_get_num_items_in_batch` value ([circuit-breaker, retain] tokens), or None (called directly)."""
    if isinstance(num_items_in_batch, Tensor) and num_items_in_batch.numel() == 2:
        return num_items_in_batch
    return None


def _take(rows: Tensor | None, width: int | None, *tensors: Tensor) -> tuple[Tensor, ...]:
    """The chunk's rows, cut to its width (all of each tensor when `rows` is None)."""
    if rows is None:
        return tensors
    rows = rows.to(tensors[0].device)
    return tuple(t.index_select(0, rows)[:, :width] for t in tensors)


@torch.no_grad()
def _accumulate(stats: dict[str, Tensor], loss_cb: Tensor, loss_retain: Tensor, adapted_cb: Tensor, frozen_cb: Tensor,
                seen: tuple[Tensor, Tensor] | None, adapted_r: Tensor, frozen_r: Tensor, cb_mask: Tensor,
                retain_mask: Tensor) -> None:
    """Add a chunk's sums (of cosines, norms, masked pairs) to the step's, so metrics are batch means.
    `seen`: the (adapted, frozen) representation the rerouting cosine sees, when it is not the raw one."""
    cosine = torch.nn.functional.cosine_similarity
    w = cb_mask.float().unsqueeze(0).expand(adapted_cb.shape[:3])
    cos = cosine(adapted_cb.float(), frozen_cb.float(), dim=-1)
    w_r = retain_mask.float().unsqueeze(0).expand(adapted_r.shape[:3])
    cos_r = cosine(adapted_r.float(), frozen_r.float(), dim=-1)
    parts = {
        "loss_rerouting": loss_cb.float(),
        "loss_retain": loss_retain.float(),
        "n_cb": w.sum(),
        "cos": (cos * w).sum(),
        "cos_pos": ((cos > 0).float() * w).sum(),
        "norm_adapted": (adapted_cb.float().norm(dim=-1) * w).sum(),
        "norm_frozen": (frozen_cb.float().norm(dim=-1) * w).sum(),
        "n_retain": w_r.sum(),
        "cos_retain": (cos_r * w_r).sum(),
    }
    if seen is not None:
        parts["cos_seen"] = (cosine(seen[0].float(), seen[1].float(), dim=-1) * w).sum()
    for key, value in parts.items():
        stats[key] = stats[key].to(value.device) + value.detach()


class _StepEnd(TrainerCallback):
    """At the end of each optimizer step: clear the layer-weight gradient (Trainer zeroes only the model's);
    if a stop signal arrived, checkpoint this step and stop."""

    def __init__(self, trainer: CircuitBreakerTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if self.trainer.layer_logits is not None:
            self.trainer.layer_logits.grad = None
        signum = self.trainer._agreed_stop_signal()
        if signum is not None:
            self.trainer.stopped_by = signum
            control.should_save = True
            control.should_training_stop = True
        return control
