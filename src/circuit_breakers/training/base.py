"""A Trainer whose checkpoints are never half-written and which stops cleanly on SIGTERM / SIGINT.

Kept apart from the circuit-breaker step (as TRL keeps its base trainer apart from each algorithm): any
Trainer subclass gets atomic checkpoints, a checkpoint-then-stop on signals and a resume that does not run
past a finished run.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput, get_last_checkpoint

from ..fileio import STAGING_PREFIX, replace_dir, umask_permissions
from .callbacks import StepEnd

logger = logging.getLogger("circuit_breakers")


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


def last_checkpoint(run_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` in `run_dir` (None: none, or no such folder)."""
    return get_last_checkpoint(str(run_dir)) if Path(run_dir).is_dir() else None


class BaseTrainer(Trainer):
    """transformers' Trainer with atomic checkpoints and a checkpoint-then-stop on SIGTERM / SIGINT."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._staging_dir: str | None = None
        self._stop_signal: int | None = None  # set by the handler; acted on at the next step end
        self.stopped_by: int | None = None
        self.add_callback(StepEnd(self))

    def checkpoint_note(self) -> str:
        """For an error that stops training: which checkpoint is intact, or that none was written yet."""
        last = self.state.best_model_checkpoint or last_checkpoint(self.args.output_dir)
        return f"the last checkpoint {last} is intact" if last else "no checkpoint was written yet"

    def outside_parameters(self) -> list[Tensor]:
        """Parameters trained beside the model, whose gradients Trainer does not clear (none here)."""
        return []

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
            logger.warning(
                "%s received: saving a checkpoint at the end of this step, then stopping", signal.Signals(signum).name
            )

        finished = self.finished_checkpoint(kwargs.get("resume_from_checkpoint", args[0] if args else None))
        if finished is not None:
            # transformers would run one more step from a checkpoint already at max_steps; load it instead
            logger.info(
                "%s already reached max_steps %d: loading it, nothing left to train", finished, self.args.max_steps
            )
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
            raise TrainingInterrupted(self.stopped_by, self.state.global_step, last_checkpoint(self.args.output_dir))
        if self._stop_signal is not None:  # arrived after the last step: do what the signal would have done
            signal.raise_signal(self._stop_signal)
        return output

    def finished_checkpoint(self, resume: Any) -> str | None:
        """The checkpoint to resume from, if it already holds the last step (DeepSpeed: left to Trainer).
        `resume`: Trainer's `resume_from_checkpoint` (True: the last one in output_dir)."""
        if resume is True:
            resume = last_checkpoint(self.args.output_dir)
        if not isinstance(resume, str) or self.is_deepspeed_enabled:
            return None
        state_file = Path(resume, TRAINER_STATE_NAME)
        if not state_file.is_file():
            return None
        step = TrainerState.load_from_json(str(state_file)).global_step
        return resume if self.args.max_steps > 0 and step >= self.args.max_steps else None

    def agreed_stop_signal(self) -> int | None:
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

        A crash or a full disk mid-save therefore leaves the previous checkpoint as the last one; the staging
        name (STAGING_PREFIX) never matches transformers' `checkpoint-N`, so resume cannot pick a half-written one.
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
            previous = last_checkpoint(run_dir)
            reason = error if error is not None else "another process failed to write its part"
            if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                reason = f"disk full ({error.filename or run_dir})"
            raise CheckpointError(
                f"could not write {run_dir / name}: {reason}; the previous checkpoint "
                f"{previous or '(none)'} is intact. Free space, then resume with --resume_from_checkpoint last"
            ) from error
        if self.args.should_save:
            umask_permissions(staging / name)  # safetensors writes its files 0600
            final = replace_dir(staging / name, run_dir / name)  # the same step saved twice (a resume): replaced whole
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
