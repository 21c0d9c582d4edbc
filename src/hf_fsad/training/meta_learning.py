"""AD meta-learning (MetaCAN Algorithm 1, Eqs. 9-12) with Accelerate.

One task per auxiliary category. Each outer step samples, per task, k normal references shared by a support
set and a query set of normal and anomalous queries; one inner SGD step on the support loss gives adapted
parameters (Eq. 10), run with `torch.func.functional_call`; the query losses of all tasks at their adapted
parameters are summed (Eq. 11) and one outer optimiser step is taken on that sum (Eq. 12).

The CLIP backbone is frozen, so each training image is encoded once and its features cached
(`hf_fsad.benchmark.FeatureCache`, in memory or on disk). Task draws are seeded by (seed, step, task), so
a resumed run continues exactly as an uninterrupted one. With several processes the tasks are split
between them and the gradients summed, which is the gradient of Eq. 11's sum over all tasks.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from ..benchmark import FeatureCache
from .losses import LOSSES, anomaly_loss

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ..models.metacan.modeling_metacan import MetaCanModel

CHECKPOINT_PREFIX = "checkpoint-"


@dataclass
class MetaLearningArguments:
    """Hyper-parameters of AD meta-learning (defaults: the MetaCAN paper's where it states them).

    num_shots: k normal references per task (2). support_normal/support_anomalous and
    query_normal/query_anomalous: queries per set; 4+4 and 16+16 follow the reference code, the paper's
    text says support/query batches of 32/8 (set 16+16 and 4+4 for that). inner_lr: beta of Eq. 10 (paper
    1e-3; reference code 0.01). outer_lr: alpha of Eq. 12 (1e-3, Adam as in the paper; "sgd" gives Eq. 12
    literally). first_order: drop second-order terms of the inner step (default False: full
    second-order). meta_learning: False is Table 4's ablation, plain joint training on the same draws (the
    support and query losses at the shared parameters). loss: per-sample loss L_b of Eq. 9, summed over a set;
    "bce+focal" (default, the paper's "combination of binary classification loss and focal loss"), "focal"
    (the reference code) or "bce". max_steps: outer updates (Algorithm 1's S; 200 is ~15 passes over MVTec AD
    with the default set sizes). gradient_accumulation_steps: meta-batches per outer update.
    """

    num_shots: int = 2
    support_normal: int = 4
    support_anomalous: int = 4
    query_normal: int = 16
    query_anomalous: int = 16
    inner_lr: float = 1e-3
    outer_lr: float = 1e-3
    outer_optimizer: str = "adam"
    first_order: bool = False
    meta_learning: bool = True
    loss: str = "bce+focal"
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0
    max_steps: int = 200
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"
    checkpoint_every: int = 50
    log_every: int = 10
    seed: int = 0
    encode_batch_size: int = 16
    feature_cache_dir: str | None = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}.")
        if self.outer_optimizer not in ("adam", "sgd"):
            raise ValueError(f"outer_optimizer must be 'adam' or 'sgd', got {self.outer_optimizer!r}.")
        if self.num_shots < 1:
            raise ValueError("num_shots must be at least 1.")
        if min(self.support_normal + self.support_anomalous, self.query_normal + self.query_anomalous) < 1:
            raise ValueError("Support and query sets must each hold at least one query.")
        if min(self.max_steps, self.gradient_accumulation_steps, self.checkpoint_every, self.log_every) < 1:
            raise ValueError(
                "max_steps, gradient_accumulation_steps, checkpoint_every, log_every must be >= 1."
            )


# --- Tasks ------------------------------------------------------------------------------------------------


@dataclass
class TaskPool:
    """The rows of one auxiliary category (one task), split by label."""

    category: str
    normal_rows: list[int]
    anomalous_rows: list[int]


@dataclass
class TaskDraw:
    """Rows of one task at one step: references shared by the support and query sets, and their queries."""

    references: list[int]
    support: list[int]
    support_labels: list[int]
    query: list[int]
    query_labels: list[int]


def task_pools(dataset: Dataset, num_shots: int) -> list[TaskPool]:
    """One pool per category of `dataset` (features `category`, `label`), sorted by category name.

    Each category needs more than `num_shots` normal images (references plus at least one normal query) and
    at least one anomalous image.
    """
    categories, labels = dataset["category"], dataset["label"]
    pools = []
    for category in sorted(set(categories)):
        rows = [row for row, name in enumerate(categories) if name == category]
        pool = TaskPool(category, [r for r in rows if labels[r] == 0], [r for r in rows if labels[r] == 1])
        if len(pool.normal_rows) <= num_shots or not pool.anomalous_rows:
            raise ValueError(
                f"Category {category!r} has {len(pool.normal_rows)} normal and {len(pool.anomalous_rows)} "
                f"anomalous images; a meta-learning task needs more than num_shots={num_shots} normal and at "
                "least one anomalous image (use the train and test splits together)."
            )
        pools.append(pool)
    if not pools:
        raise ValueError("The auxiliary dataset is empty.")
    return pools


def _draw(rng: np.random.Generator, rows: Sequence[int], count: int) -> list[int]:
    """`count` rows without replacement while the pool lasts, then the pool again in a new order."""
    if count == 0:
        return []
    rounds = math.ceil(count / len(rows))
    return [int(row) for row in np.concatenate([rng.permutation(rows) for _ in range(rounds)])[:count]]


def draw_task(pool: TaskPool, args: MetaLearningArguments, step: int, task_index: int) -> TaskDraw:
    """The rows task `task_index` uses at meta-batch `step`: a pure function of (seed, step, task)."""
    rng = np.random.default_rng([args.seed, step, task_index])
    normals = rng.permutation(pool.normal_rows)
    references, others = [int(r) for r in normals[: args.num_shots]], normals[args.num_shots :]

    def queries(num_normal: int, num_anomalous: int) -> tuple[list[int], list[int]]:
        rows = _draw(rng, others, num_normal) + _draw(rng, pool.anomalous_rows, num_anomalous)
        return rows, [0] * num_normal + [1] * num_anomalous

    support, support_labels = queries(args.support_normal, args.support_anomalous)
    query, query_labels = queries(args.query_normal, args.query_anomalous)
    return TaskDraw(references, support, support_labels, query, query_labels)


@dataclass
class TaskBatch:
    """Features of one task: per pyramid level, references (k, N, D) and support/query queries (n, N, D)."""

    references: list[torch.Tensor]
    support: list[torch.Tensor]
    support_labels: torch.Tensor
    query: list[torch.Tensor]
    query_labels: torch.Tensor


# --- The meta-objective (Eqs. 9-11) -----------------------------------------------------------------------


def set_loss(
    head: nn.Module,
    params: dict[str, torch.Tensor],
    queries: list[torch.Tensor],
    labels: torch.Tensor,
    references: list[torch.Tensor],
    text_embeddings: torch.Tensor,
    args: MetaLearningArguments,
) -> torch.Tensor:
    """Eq. 9: f(params, D) = sum over the set's queries of L_b(s, y), with the head run on `params`."""
    scores = functional_call(head, params, (queries, references, text_embeddings))["score"]
    return anomaly_loss(scores.float(), labels, args.loss, args.focal_alpha, args.focal_gamma)


def adapt(
    head: nn.Module,
    params: dict[str, torch.Tensor],
    task: TaskBatch,
    text_embeddings: torch.Tensor,
    args: MetaLearningArguments,
) -> dict[str, torch.Tensor]:
    """Eq. 10: Theta_i = Theta - beta grad f(Theta, D_i^spt); differentiable in Theta unless first-order."""
    loss = set_loss(head, params, task.support, task.support_labels, task.references, text_embeddings, args)
    gradients = torch.autograd.grad(
        loss, list(params.values()), create_graph=not args.first_order, allow_unused=True
    )
    return {
        name: value if gradient is None else value - args.inner_lr * gradient
        for (name, value), gradient in zip(params.items(), gradients)
    }


def meta_objective(
    head: nn.Module,
    params: dict[str, torch.Tensor],
    tasks: Sequence[TaskBatch],
    text_embeddings: torch.Tensor,
    args: MetaLearningArguments,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 11: the sum over tasks of f(Theta_i, D_i^query); returns it and each task's term.

    Without meta-learning (ablation) each task's term is f(Theta, D_i^spt) + f(Theta, D_i^query).
    """
    losses = []
    for task in tasks:
        references = task.references
        if args.meta_learning:
            adapted = adapt(head, params, task, text_embeddings, args)
            loss = set_loss(head, adapted, task.query, task.query_labels, references, text_embeddings, args)
        else:
            loss = set_loss(
                head, params, task.support, task.support_labels, references, text_embeddings, args
            )
            loss = loss + set_loss(
                head, params, task.query, task.query_labels, references, text_embeddings, args
            )
        losses.append(loss)
    # A process dealt no task still takes part in the gradient sum, with zeros.
    total = torch.stack(losses).sum() if losses else sum(p.sum() * 0 for p in params.values())
    return total, losses


# --- Training loop ----------------------------------------------------------------------------------------


def _multi_process_cpu() -> bool:
    """True under a multi-process launcher (torchrun, mpirun) on a machine without CUDA: Accelerate then
    needs `cpu=True` to run the processes as a gloo group instead of as independent single runs."""
    world_size = max(
        int(os.environ.get(name, "1")) for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
    )
    return world_size > 1 and not torch.cuda.is_available()


def parameter_digest(module: nn.Module) -> str:
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
    """What `MetaLearner.train` did: steps run, meta-loss per logged step, seconds per outer step, and
    the trainable parameters' digest on every process (equal when the processes stayed in sync)."""

    steps: int
    history: list[dict] = field(default_factory=list)
    seconds_per_step: float | None = None
    rank_parameter_digests: list[str] = field(default_factory=list)
    resumed_from: int | None = None


class MetaLearner:
    """Trains a MetaCAN model's head on an auxiliary dataset by AD meta-learning.

    ```python
    learner = MetaLearner(model, auxiliary_dataset, MetaLearningArguments(max_steps=200), "runs/metacan")
    result = learner.train(resume=True)   # continues from the last checkpoint in runs/metacan/checkpoints
    ```
    The dataset needs `image`, `label`, `category` and `path` (e.g. a `load_benchmark` split, or train and
    test concatenated so each category has anomalies). Checkpoints go to `output_dir/checkpoints`.
    """

    def __init__(
        self,
        model: MetaCanModel,
        dataset: Dataset,
        args: MetaLearningArguments,
        output_dir: str | os.PathLike,
        accelerator: Accelerator | None = None,
    ):
        from accelerate import Accelerator

        if not model.config.use_detector:
            raise ValueError(
                "Nothing to train: without the detector (use_detector=False) MetaCAN has no parameters; "
                "use the model as it is."
            )
        self.accelerator = accelerator or Accelerator(
            cpu=_multi_process_cpu(),
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
        )
        self.model = model.to(self.accelerator.device)
        self.model.freeze_backbone()
        self.head = self.model.head
        self.dataset = dataset
        self.args = args
        self.output_dir = Path(output_dir)
        self.pools = task_pools(dataset, args.num_shots)
        # Tasks are dealt round-robin to processes; each process encodes only the images its tasks use.
        accelerator = self.accelerator
        self.task_indices = list(range(accelerator.process_index, len(self.pools), accelerator.num_processes))
        self.cache = FeatureCache(args.feature_cache_dir)
        self._broadcast_parameters()
        if args.outer_optimizer == "adam":
            optimizer = torch.optim.Adam(self.head.parameters(), lr=args.outer_lr)
        else:
            optimizer = torch.optim.SGD(self.head.parameters(), lr=args.outer_lr)
        self.optimizer = accelerator.prepare(optimizer)

    def _broadcast_parameters(self) -> None:
        """Start every process from the main process's parameters."""
        if self.accelerator.num_processes > 1:
            for parameter in self.head.parameters():
                torch.distributed.broadcast(parameter.data, src=0)

    def _features(self, rows: list[int]) -> list[torch.Tensor]:
        features = self.cache.features(
            self.model, self.dataset, rows, self.args.encode_batch_size, "encoding"
        )
        device = self.accelerator.device
        return [level.to(device) for level in self.model.levels(features)]

    def task_batch(self, step: int, task_index: int) -> TaskBatch:
        """The features and labels of task `task_index` at meta-batch `step`."""
        draw = draw_task(self.pools[task_index], self.args, step, task_index)
        device = self.accelerator.device
        return TaskBatch(
            references=self._features(draw.references),
            support=self._features(draw.support),
            support_labels=torch.tensor(draw.support_labels, device=device),
            query=self._features(draw.query),
            query_labels=torch.tensor(draw.query_labels, device=device),
        )

    def _sum_gradients_across_processes(self) -> None:
        if self.accelerator.num_processes == 1:
            return
        for parameter in self.head.parameters():
            if parameter.grad is None:
                parameter.grad = torch.zeros_like(parameter)
            torch.distributed.all_reduce(parameter.grad, op=torch.distributed.ReduceOp.SUM)

    def outer_step(self, step: int, text_embeddings: torch.Tensor) -> float:
        """One outer update (Eq. 12) from `gradient_accumulation_steps` meta-batches; returns the summed meta-loss
        over all processes' tasks (averaged over the meta-batches)."""
        accelerator = self.accelerator
        params = {name: p for name, p in self.head.named_parameters() if p.requires_grad}
        accumulation = self.args.gradient_accumulation_steps
        total = torch.zeros((), device=accelerator.device)
        for micro_step in range(accumulation):
            meta_batch = step * accumulation + micro_step
            tasks = [self.task_batch(meta_batch, index) for index in self.task_indices]
            with accelerator.autocast():
                loss, _ = meta_objective(self.head, params, tasks, text_embeddings, self.args)
            accelerator.backward(loss)  # divides by gradient_accumulation_steps
            total += loss.detach() / accumulation
        self._sum_gradients_across_processes()
        self.optimizer.step()
        self.optimizer.zero_grad()
        return float(accelerator.reduce(total, reduction="sum"))

    def save_checkpoint(self, step: int, history: list[dict]) -> Path:
        """`output_dir/checkpoints/checkpoint-<step>`: Accelerate state (optimiser, RNG), the head as
        safetensors and the step; written under a temporary name and renamed once complete."""
        accelerator = self.accelerator
        final = self.output_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
        temporary = final.with_name(final.name + ".tmp")
        if accelerator.is_main_process and temporary.exists():
            shutil.rmtree(temporary)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(temporary))
        if accelerator.is_main_process:
            head_state = {name: p.detach().cpu().contiguous() for name, p in self.head.state_dict().items()}
            save_file(head_state, temporary / "head.safetensors")
            (temporary / "trainer_state.json").write_text(json.dumps({"step": step, "history": history}))
            if final.exists():
                shutil.rmtree(final)
            os.replace(temporary, final)
        accelerator.wait_for_everyone()
        return final

    def load_checkpoint(self, checkpoint: Path) -> tuple[int, list[dict]]:
        self.accelerator.load_state(str(checkpoint))
        self.head.load_state_dict(
            load_file(checkpoint / "head.safetensors", device=str(self.accelerator.device))
        )
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        return int(state["step"]), list(state["history"])

    def train(self, resume: bool | str | os.PathLike = False) -> TrainingResult:
        """Run outer steps until `max_steps`. resume=True continues from the latest checkpoint in
        `output_dir` (from scratch when there is none); a path resumes from that checkpoint."""
        accelerator, args = self.accelerator, self.args
        start, history, resumed_from = 0, [], None
        checkpoint = (
            latest_checkpoint(self.output_dir) if resume is True else (Path(resume) if resume else None)
        )
        if checkpoint is not None:
            start, history = self.load_checkpoint(checkpoint)
            resumed_from = start
        self.head.train()
        with torch.no_grad():
            text_embeddings = self.model.text_embeddings()
        progress = tqdm(
            range(start, args.max_steps),
            desc="meta-learning",
            unit="step",
            disable=not accelerator.is_local_main_process,
        )
        timed_steps, started = 0, None
        for step in progress:
            loss = self.outer_step(step, text_embeddings)
            # The first step encodes most images; time the steps after it.
            if started is None:
                started = time.perf_counter()
            else:
                timed_steps += 1
            done = step + 1
            progress.set_postfix(meta_loss=f"{loss:.4f}")
            if done % args.log_every == 0 or done == args.max_steps or step == start:
                history.append({"step": done, "meta_loss": loss})
            if done % args.checkpoint_every == 0 or done == args.max_steps:
                self.save_checkpoint(done, history)
        self.head.eval()
        seconds = (time.perf_counter() - started) / timed_steps if timed_steps else None
        return TrainingResult(
            steps=args.max_steps,
            history=history,
            seconds_per_step=seconds,
            rank_parameter_digests=self._gather_digests(),
            resumed_from=resumed_from,
        )

    def _gather_digests(self) -> list[str]:
        digest = parameter_digest(self.head)
        if self.accelerator.num_processes == 1:
            return [digest]
        gathered: list[str | None] = [None] * self.accelerator.num_processes
        torch.distributed.all_gather_object(gathered, digest)
        return [str(item) for item in gathered]


def training_summary(args: MetaLearningArguments, result: TrainingResult) -> dict:
    """A JSON-ready record of a run: its arguments and results."""
    return {"arguments": asdict(args), "result": asdict(result)}
