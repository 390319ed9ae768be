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
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_pt_utils import LengthGroupedSampler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from . import losses
from .config import CircuitBreakerConfig
from .representations import hidden_states, stacked

logger = logging.getLogger("circuit_breakers")


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
        self.capture_layers = sorted(set(self.target_layers) | set(self.retain_layers))
        self.outlier_dims: list[int] | None = None
        self.loss_is_scaled_for_ga = False  # our loss is a per-batch mean: let Trainer divide by GA steps
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self.cosine_history: list[tuple[int, float, float]] = []  # (step, rerouting cos, retain cos)
        self.stall_warned = False
        self._staging_dir: str | None = None
        self._stop_signal: int | None = None  # set by the handler; acted on at the next step end
        self.stopped_by: int | None = None
        self.add_callback(_StopOnSignal(self))

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

    # --- sampling -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset: Any = None) -> torch.utils.data.Sampler | None:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        if self.args.train_sampling_strategy == "group_by_length" and hasattr(dataset, "lengths"):
            # Grouped by the global batch, so that N devices see the same global batches, in the same
            # order, as one device with N times the batch (the dataloader then shards each of them).
            global_batch = self.args.train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
            return LengthGroupedSampler(global_batch, lengths=dataset.lengths)
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

    def _centered(self, adapted: Tensor, frozen: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        """`representation=centered` with the mean over the global batch's masked tokens (all devices)."""
        w = mask.to(frozen.dtype)[None, :, :, None]
        counts = w.sum(dim=(1, 2)).expand(frozen.shape[0], 1)
        sums = torch.cat([(frozen.detach() * w).sum(dim=(1, 2)), counts], dim=-1)  # [L, H + 1]
        sums = self.accelerator.reduce(sums.float(), reduction="sum").to(frozen.dtype)
        mean = (sums[:, :-1] / sums[:, -1:].clamp_min(1.0))[:, None, None, :]
        return adapted - mean, frozen - mean

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Tensor | int | None = None,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """loss = c_cb(t) L_rerouting + c_retain(t) L_retain at optimizer step t (the global step)."""
        args = self.args
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        cb_mask = inputs["cb_mask"] * attention_mask
        retain_mask = inputs["retain_mask"] * attention_mask

        frozen = self._frozen_states(model, input_ids, attention_mask)
        adapted = hidden_states(model, input_ids, attention_mask, self.capture_layers, self._through(model))

        distributed = self.accelerator.num_processes > 1
        frozen_cb, adapted_cb = stacked(frozen, self.target_layers), stacked(adapted, self.target_layers)
        if args.representation == "no_outliers" and self.outlier_dims is None:
            dims = losses.outlier_dimensions(frozen_cb, cb_mask, args.num_outlier_dims)
            if distributed:  # every device must exclude the same dimensions: rank 0's choice
                from accelerate.utils import broadcast_object_list

                dims = broadcast_object_list([dims], from_process=0)[0]
            self.outlier_dims = dims
            logger.info("rerouting cosine excludes outlier dimensions %s", self.outlier_dims)
        if args.representation == "centered" and distributed:
            cos_adapted, cos_frozen = self._centered(adapted_cb, frozen_cb, cb_mask)
        else:
            cos_adapted, cos_frozen = losses.for_cosine(
                adapted_cb, frozen_cb, cb_mask, args.representation, self.outlier_dims or ()
            )
        loss_cb = losses.rerouting_loss(cos_adapted, cos_frozen, cb_mask)
        frozen_r, adapted_r = stacked(frozen, self.retain_layers), stacked(adapted, self.retain_layers)
        loss_retain = losses.retain_loss(adapted_r, frozen_r, retain_mask, args.retain_distance)
        if distributed:
            loss_cb = loss_cb * self._global_count_scale(cb_mask.sum(), len(self.target_layers))
            loss_retain = loss_retain * self._global_count_scale(retain_mask.sum(), len(self.retain_layers))

        step = self.state.global_step
        c_cb, c_retain = losses.coefficients(
            step, args.max_steps, args.alpha, args.schedule, args.decay_multiplier, args.retain_weight,
            args.reroute_warmup_steps,
        )
        loss = c_cb * loss_cb + c_retain * loss_retain
        if not torch.isfinite(loss):
            checkpoint = self.state.best_model_checkpoint or "the last checkpoint in " + str(args.output_dir)
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {step} (rerouting {loss_cb.item()}, retain {loss_retain.item()}); "
                f"training stopped, {checkpoint} is intact. Lower learning_rate or alpha, or use float32."
            )
        self._record(loss_cb, loss_retain, c_cb, c_retain, adapted_cb, frozen_cb, adapted_r, frozen_r, cb_mask, retain_mask)
        if args.representation != "raw":  # the cosine the loss sees, beside the raw one (issue 10)
            self._metrics["cos_rerouting_seen"].append(losses.masked_cosine(cos_adapted, cos_frozen, cb_mask).item())
        return (loss, {}) if return_outputs else loss

    @torch.no_grad()
    def _record(self, loss_cb: Tensor, loss_retain: Tensor, c_cb: float, c_retain: float, adapted_cb: Tensor,
                frozen_cb: Tensor, adapted_r: Tensor, frozen_r: Tensor, cb_mask: Tensor, retain_mask: Tensor) -> None:
        cos = torch.nn.functional.cosine_similarity(adapted_cb.float(), frozen_cb.float(), dim=-1)
        w = cb_mask.unsqueeze(0).expand_as(cos).bool()
        metrics = {
            "loss_rerouting": loss_cb.item(),
            "loss_retain": loss_retain.item(),
            "coef_rerouting": c_cb,
            "coef_retain": c_retain,
            "cos_rerouting": cos[w].mean().item() if w.any() else float("nan"),
            "cos_rerouting_pos_frac": (cos[w] > 0).float().mean().item() if w.any() else float("nan"),
            "cos_retain": losses.masked_cosine(adapted_r, frozen_r, retain_mask).item(),
            "norm_rerouting_adapted": adapted_cb.float().norm(dim=-1)[w].mean().item() if w.any() else float("nan"),
            "norm_rerouting_frozen": frozen_cb.float().norm(dim=-1)[w].mean().item() if w.any() else float("nan"),
        }
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
        if start - cos_now < self.args.stall_margin:
            self.stall_warned = True
            if not self.is_world_process_zero():
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
            "rerouted": bool(start[1] - end[1] >= self.args.stall_margin),
            "stall_warning": self.stall_warned,
        }


class _StopOnSignal(TrainerCallback):
    """At the end of each optimizer step: if a stop signal arrived, checkpoint this step and stop."""

    def __init__(self, trainer: CircuitBreakerTrainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        signum = self.trainer._agreed_stop_signal()
        if signum is not None:
            self.trainer.stopped_by = signum
            control.should_save = True
            control.should_training_stop = True
        return control
