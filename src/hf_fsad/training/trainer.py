"""The Accelerate training loop every trainable method shares.

A subclass says how to compute the loss of one (micro-)batch, `compute_loss(batch_index)`; the base class
owns devices, mixed precision (autocast), gradient accumulation, the gradient reduction across processes,
atomic checkpoints (Accelerate state + the trainable weights as safetensors) and exact resume. Batches are
chosen by their index alone (seeded draws), so a resumed run continues exactly as an uninterrupted one.

Gradients are reduced across processes explicitly rather than through DDP: meta-learning takes inner
gradients with `torch.autograd.grad`, which DDP's reducer does not see, and one mechanism serves all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file

from ..distributed import multi_process_cpu
from ..io import replace_directory
from ..progress import progress_bar

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..modeling_base import FsadPreTrainedModel

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class FsadTrainingArguments:
    """What every trainer takes. max_steps: optimiser updates (0 runs none). gradient_accumulation_steps:
    batches per update. mixed_precision: "no", "bf16" or "fp16" (Accelerate autocast). checkpoint_every /
    log_every: in updates. seed: of the batch draws. encode_batch_size and feature_cache_dir: encoding of the frozen
    backbone's features (cached in memory, or on disk in that directory)."""

    max_steps: int = 200
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    encode_batch_size: int = 16
    feature_cache_dir: str | None = None

    def __post_init__(self):
        if self.max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {self.max_steps}.")
        if min(self.gradient_accumulation_steps, self.checkpoint_every, self.log_every) < 1:
            raise ValueError("gradient_accumulation_steps, checkpoint_every, log_every must be >= 1.")


def parameter_digest(module: torch.nn.Module) -> str:
    """SHA-256 of a module's trainable parameters (bitwise), to compare processes and runs."""
    digest = hashlib.sha256()
    for name, parameter in sorted(module.named_parameters()):
        if parameter.requires_grad:
            digest.update(name.encode())
            digest.update(parameter.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step in `output_dir/checkpoints`, or None."""
    directory = Path(output_dir) / "checkpoints"
    if not directory.is_dir():
        return None
    steps = [
        int(path.name[len(CHECKPOINT_PREFIX) :])
        for path in directory.iterdir()
        if path.name.startswith(CHECKPOINT_PREFIX) and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return directory / f"{CHECKPOINT_PREFIX}{max(steps)}" if steps else None


@dataclass
class TrainingResult:
    """What `FsadTrainer.train` did: steps run, loss per logged step, seconds per update (after the first,
    which encodes most images), and the trainable parameters' digest on every process (equal when the
    processes stayed in sync)."""

    steps: int
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float | None = None
    rank_parameter_digests: list[str] = field(default_factory=list)
    resumed_from: int | None = None


def training_summary(args: FsadTrainingArguments, result: TrainingResult) -> dict:
    """A JSON-ready record of a run: its arguments and results."""
    return {"arguments": asdict(args), "result": asdict(result)}


class FsadTrainer:
    """Trains the parameters of `model` that require gradients (the backbone stays frozen).

    Checkpoints go to `output_dir/checkpoints` (none when output_dir is None).
    Subclasses implement `compute_loss(batch_index)` and may set `gradient_reduction`: "sum" when the loss
    of each process is a part of a sum over processes, "mean" when each process averages its own share.
    """

    gradient_reduction = "mean"

    def __init__(
        self,
        model: FsadPreTrainedModel,
        args: FsadTrainingArguments,
        output_dir: str | os.PathLike | None,
        optimizer_factory,
        accelerator: Accelerator | None = None,
    ):
        from accelerate import Accelerator

        self.accelerator = accelerator or Accelerator(
            cpu=multi_process_cpu(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        self.model = model.to(self.accelerator.device)
        self.model.freeze_backbone()
        self.args = args
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.parameters = {
            name: p for name, p in self.trainable_module().named_parameters() if p.requires_grad
        }
        if not self.parameters:
            raise ValueError(f"{type(model).__name__} has no trainable parameters with this config.")
        self._broadcast_parameters()
        self.optimizer = self.accelerator.prepare(optimizer_factory(self.parameter_groups()))

    def parameter_groups(self) -> list:
        """What the optimiser factory receives: the trainable parameters, or groups of them with their own
        settings (e.g. learning rates)."""
        return list(self.parameters.values())

    def compute_loss(self, batch_index: int) -> torch.Tensor:
        raise NotImplementedError

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps of the model besides Accelerate's state: the trainable parameters, and in
        subclasses any state training changes too (e.g. BatchNorm running statistics)."""
        return self.parameters

    def trainable_module(self) -> torch.nn.Module:
        """The module whose parameters that require gradients are trained: the model, unless a subclass
        trains something beside it (One-to-Normal's diffusion UNet)."""
        return self.model

    def on_train_start(self) -> None:
        """Called before the first step (e.g. to set training mode, precompute fixed inputs)."""

    def _broadcast_parameters(self) -> None:
        """Start every process from the main process's parameters."""
        if self.accelerator.num_processes > 1:
            for parameter in self.parameters.values():
                torch.distributed.broadcast(parameter.data, src=0)

    def _reduce_gradients(self) -> None:
        world = self.accelerator.num_processes
        if world == 1:
            return
        for parameter in self.parameters.values():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)
            if self.gradient_reduction == "mean":
                parameter.grad /= world

    def training_step(self, step: int) -> float:
        """One optimiser update from `gradient_accumulation_steps` batches; returns the loss (reduced over
        processes like the gradients, averaged over the accumulated batches)."""
        accelerator = self.accelerator
        accumulation = self.args.gradient_accumulation_steps
        total = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            with accelerator.autocast():
                loss = self.compute_loss(step * accumulation + micro_step)
            accelerator.backward(loss)  # divides by gradient_accumulation_steps
            total += loss.detach().float() / accumulation
        self._reduce_gradients()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(accelerator.reduce(total, reduction=self.gradient_reduction))

    def save_checkpoint(self, step: int, history: list[dict]) -> Path:
        """`output_dir/checkpoints/checkpoint-<step>`: Accelerate state (optimiser, RNG), the trainable weights
        as safetensors and the step; written under a temporary name and renamed once complete."""
        accelerator = self.accelerator
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
        temporary = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            weights = {name: t.detach().cpu().contiguous() for name, t in self.checkpoint_tensors().items()}
            save_file(weights, temporary / "trainable.safetensors")
            (temporary / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
            replace_directory(temporary, final)
        accelerator.wait_for_everyone()
        logger.info("saved checkpoint %s", final)
        return final

    @torch.no_grad()
    def load_checkpoint(self, checkpoint: Path) -> tuple[int, list[dict]]:
        self.accelerator.load_state(str(checkpoint))
        weights = load_file(checkpoint / "trainable.safetensors", device=str(self.accelerator.device))
        tensors = self.checkpoint_tensors()
        if set(weights) != set(tensors):
            raise ValueError(f"{checkpoint} holds other trainable weights than this model has.")
        for name, value in weights.items():
            tensors[name].copy_(value)
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return int(state["step"]), list(state["history"])

    def train(self, resume: bool | str | os.PathLike = False) -> TrainingResult:
        """Run updates until `max_steps`. resume=True continues from the latest checkpoint in `output_dir`
        (from scratch when there is none); a path resumes from that checkpoint."""
        accelerator, args = self.accelerator, self.args
        start, history, resumed_from = 0, [], None
        if resume and self.output_dir is None:
            raise ValueError("This trainer writes no checkpoints (no output_dir), so it cannot resume.")
        checkpoint = (
            latest_checkpoint(self.output_dir) if resume is True else (Path(resume) if resume else None)
        )
        if checkpoint is not None:
            start, history = self.load_checkpoint(checkpoint)
            resumed_from = start
            logger.info("resumed from %s at step %d", checkpoint, start)
        self.trainable_module().train()
        self.on_train_start()
        progress = progress_bar(
            range(start, args.max_steps),
            desc=f"training {self.model.config.model_type}",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        timed_steps, started = 0, None
        for step in progress:
            loss = self.training_step(step)
            if started is None:
                started = time.perf_counter()
            else:
                timed_steps += 1
            done = step + 1
            progress.set_postfix(loss=f"{loss:.4f}")
            if done % args.log_every == 0 or done == args.max_steps or step == start:
                history.append({"step": done, "loss": loss})
                logger.info("step %d/%d: loss %.4f", done, args.max_steps, loss)
            if self.output_dir is not None and (done % args.checkpoint_every == 0 or done == args.max_steps):
                self.save_checkpoint(done, history)
        self.trainable_module().eval()
        self.model.invalidate_feature_key()  # trained weights may enter the features (LoRA)
        self.model.config.trained_parts = "trained"
        seconds = (time.perf_counter() - started) / timed_steps if timed_steps else None
        return TrainingResult(
            steps=args.max_steps,
            history=history,
            seconds_per_step=seconds,
            rank_parameter_digests=self._gather_digests(),
            resumed_from=resumed_from,
        )

    def _gather_digests(self) -> list[str]:
        digest = parameter_digest(self.trainable_module())
        if self.accelerator.num_processes == 1:
            return [digest]
        gathered: list[str | None] = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(gathered, digest)
        return [str(item) for item in gathered]
