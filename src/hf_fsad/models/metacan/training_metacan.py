"""AD meta-learning (MetaCAN Algorithm 1, Eqs. 9-12) with Accelerate.

One task per auxiliary category. Each outer step samples, per task, k normal references shared by a support
set and a query set of normal and anomalous queries; one inner SGD step on the support loss gives adapted
parameters (Eq. 10), run with `torch.func.functional_call`; the query losses of all tasks at their adapted
parameters are summed (Eq. 11) and one outer optimiser step is taken on that sum (Eq. 12). A task's queries
never include its own references (the official sampler draws both from the same normal images, so a query
can be one of its references). `MetaCanTrainingArguments(recipe="official")` reproduces the official code's
outer loop, loss and BatchNorm handling instead of the paper's Algorithm 1.

BatchNorm (the official detector) normalises with batch statistics while training; its running statistics,
which eval mode uses, are updated only by the query-set forwards of the outer objective (the inner step
runs on scratch copies; without meta-learning, by every forward) and kept in checkpoints; with several
processes they are averaged after each update.

The CLIP backbone is frozen, so each training image is encoded once and its features cached
(`hf_fsad.features.FeatureCache`, in memory or on disk). Task draws are seeded by (seed, step, task), so
a resumed run continues exactly as an uninterrupted one. With several processes the tasks are split
between them and the gradients summed, which is the gradient of Eq. 11's sum over all tasks.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
from datasets import Dataset
from torch import nn
from torch.func import functional_call

from ...features import FeatureCache
from ...training.trainer import FsadTrainer, FsadTrainingArguments
from .losses_metacan import LOSSES, anomaly_loss

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .modeling_metacan import MetaCanModel


RECIPES = ("paper", "official")
# What each recipe gives the settings left at None.
RECIPE_DEFAULTS = {
    "paper": {"max_steps": 200, "inner_lr": 1e-3, "loss": "bce+focal"},
    "official": {"max_steps": 15, "inner_lr": 0.01, "loss": "official_focal"},
}


@dataclass
class MetaCanTrainingArguments(FsadTrainingArguments):
    """Hyper-parameters of AD meta-learning.

    recipe: "paper" (default) trains as the paper's Algorithm 1 states: the query losses of all N tasks
    summed (Eq. 11), one Adam for the run, BatchNorm running statistics updated by the query-set forwards
    (so eval mode uses statistics of the training data). "official" reproduces the official code's
    `train.py` (anony-mous-rep/MetaCAN), which produced the paper's tables: a new Adam (fresh moments) for
    every outer update, only the last task's query loss divided by N (its loss index is never incremented),
    BatchNorm normalising with batch statistics and its running statistics never updated (evaluation then
    uses mean 0, variance 1), 15 outer updates, inner lr 0.01 and the official focal loss. The recipe sets
    max_steps, inner_lr and loss where they are left at None; a value given explicitly is kept.

    num_shots: k normal references per task (2). support_normal/support_anomalous and
    query_normal/query_anomalous: queries per set; 4+4 and 16+16 follow the official code, the paper's
    text says support/query batches of 32/8 (set 16+16 and 4+4 for that). inner_lr: beta of Eq. 10 (paper
    1e-3, "paper" recipe; official code 0.01). outer_lr: alpha of Eq. 12 (1e-3, Adam, paper and official
    code; "sgd" gives Eq. 12 literally). first_order: drop second-order terms of the inner step (default
    False: full second-order, as both). meta_learning: False is Table 4's ablation, plain joint training on
    the same draws (the support and query losses at the shared parameters). loss: per-sample loss L_b of
    Eq. 9, summed over a set; "bce+focal" ("paper" recipe, the paper's "combination of binary
    classification loss and focal loss"), "focal" (Lin et al.'s focal loss of the scores), "bce", or
    "official_focal" ("official" recipe): what the official code computes, its focal-with-logits loss
    applied to the scores (already probabilities), averaged over the set (`losses.official_focal_loss`).
    max_steps: outer updates (Algorithm 1's S). "paper": 200 (ours; the paper's "15 epochs" are 15 outer
    updates in the official code, 9,000 query draws on MVTec AD, under two passes over its 5,354 images;
    200 x 15 tasks x 40 queries = 120,000 draws, ~22 passes). "official": 15, the official loop (its test
    configuration loads the checkpoint after 10, `checkpoints/trained_on_mvtec/checkpoint_10.pyth`). A
    meta-batch (all tasks once) is one batch of `FsadTrainingArguments`.
    """

    recipe: str = "paper"
    max_steps: int | None = None
    num_shots: int = 2
    support_normal: int = 4
    support_anomalous: int = 4
    query_normal: int = 16
    query_anomalous: int = 16
    inner_lr: float | None = None
    outer_lr: float = 1e-3
    outer_optimizer: str = "adam"
    first_order: bool = False
    meta_learning: bool = True
    loss: str | None = None
    focal_alpha: float = 1.0
    focal_gamma: float = 2.0

    def __post_init__(self):
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {RECIPES}, got {self.recipe!r}.")
        for name, value in RECIPE_DEFAULTS[self.recipe].items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        super().__post_init__()
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


def draw_task(pool: TaskPool, args: MetaCanTrainingArguments, step: int, task_index: int) -> TaskDraw:
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
    args: MetaCanTrainingArguments,
    buffers: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Eq. 9: f(params, D) = sum over the set's queries of L_b(s, y), with the head run on `params` (the mean
    for "official_focal", as the official code). BatchNorm running statistics (buffers) are updated in place
    unless `buffers` gives scratch copies to update instead."""
    tensors = params if buffers is None else {**buffers, **params}
    scores = functional_call(head, tensors, (queries, references, text_embeddings))["score"]
    reduction = "mean" if args.loss == "official_focal" else "sum"
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32))  # half precision under autocast
    return anomaly_loss(scores, labels, args.loss, args.focal_alpha, args.focal_gamma, reduction)


def scratch_buffers(head: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the head's buffers, for a forward that must leave the BatchNorm running statistics alone."""
    return {name: buffer.clone() for name, buffer in head.named_buffers()}


def adapt(
    head: nn.Module,
    params: dict[str, torch.Tensor],
    task: TaskBatch,
    text_embeddings: torch.Tensor,
    args: MetaCanTrainingArguments,
) -> dict[str, torch.Tensor]:
    """Eq. 10: Theta_i = Theta - beta grad f(Theta, D_i^spt); differentiable in Theta unless first-order.
    The inner forward leaves the running statistics as they are."""
    scratch = scratch_buffers(head)
    loss = set_loss(
        head, params, task.support, task.support_labels, task.references, text_embeddings, args, scratch
    )
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
    args: MetaCanTrainingArguments,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Eq. 11: the sum over tasks of f(Theta_i, D_i^query); returns it and each task's term.

    Without meta-learning (ablation) each task's term is f(Theta, D_i^spt) + f(Theta, D_i^query). The
    "official" recipe never updates the running statistics (every forward on scratch copies).
    """

    def loss_of(parameters, queries, labels, references):  # BatchNorm's statistics: see the docstring
        buffers = scratch_buffers(head) if args.recipe == "official" else None
        return set_loss(head, parameters, queries, labels, references, text_embeddings, args, buffers)

    losses = []
    for task in tasks:
        if args.meta_learning:
            adapted = adapt(head, params, task, text_embeddings, args)
            loss = loss_of(adapted, task.query, task.query_labels, task.references)
        else:
            loss = loss_of(params, task.support, task.support_labels, task.references)
            loss = loss + loss_of(params, task.query, task.query_labels, task.references)
        losses.append(loss)
    # A process dealt no task still takes part in the gradient sum, with zeros.
    total = torch.stack(losses).sum() if losses else sum(p.sum() * 0 for p in params.values())
    return total, losses


# --- Training loop ----------------------------------------------------------------------------------------


class MetaLearner(FsadTrainer):
    """Trains a MetaCAN model's head on an auxiliary dataset by AD meta-learning.

    ```python
    learner = MetaLearner(model, auxiliary_dataset, MetaCanTrainingArguments(max_steps=200), "runs/metacan")
    result = learner.train(resume=True)   # continues from the last checkpoint in runs/metacan/checkpoints
    ```
    The dataset needs `image`, `label`, `category` and `path` (e.g. a `load_benchmark` split, or train and
    test concatenated so each category has anomalies). Tasks are dealt round-robin to processes, each
    encoding only the images its tasks use; their gradients are summed (Eq. 11 sums over all tasks).
    """

    gradient_reduction = "sum"

    def __init__(
        self,
        model: MetaCanModel,
        dataset: Dataset,
        args: MetaCanTrainingArguments,
        output_dir: str | os.PathLike,
        accelerator: Accelerator | None = None,
    ):
        if not model.config.use_detector:
            raise ValueError(
                "Nothing to train: without the detector (use_detector=False) MetaCAN has no parameters; "
                "use the model as it is."
            )
        smallest_set = min(
            args.support_normal + args.support_anomalous, args.query_normal + args.query_anomalous
        )
        if model.config.detector_type == "official" and smallest_set < 2:
            raise ValueError(
                "The official detector's BatchNorm normalises each set with its own statistics while training: "
                f"support and query sets need at least 2 queries each, got {smallest_set}."
            )
        if args.outer_optimizer == "adam":
            optimizer_factory = partial(torch.optim.Adam, lr=args.outer_lr)
        else:
            optimizer_factory = partial(torch.optim.SGD, lr=args.outer_lr)
        super().__init__(model, args, output_dir, optimizer_factory, accelerator)
        self.head = self.model.head
        self.dataset = dataset
        self.pools = task_pools(dataset, args.num_shots)
        accelerator = self.accelerator
        self.task_indices = list(range(accelerator.process_index, len(self.pools), accelerator.num_processes))
        self.cache = FeatureCache(args.feature_cache_dir)
        self.text_embeddings = None

    def on_train_start(self) -> None:
        with torch.no_grad():
            self.text_embeddings = self.model.text_embeddings()

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable parameters and the head's buffers (BatchNorm running statistics)."""
        return self.parameters | {f"head.{name}": buffer for name, buffer in self.head.named_buffers()}

    def training_step(self, step: int) -> float:
        """`FsadTrainer.training_step`, then the processes' BatchNorm buffers merged (each updated them on its own
        tasks): running statistics averaged, batch counts summed. The running statistics then differ slightly
        from a single process's, which updates them task after task; the parameters do not. The "official"
        recipe first empties the optimiser's state (moments, step count)."""
        if self.args.recipe == "official":
            self.optimizer.state.clear()  # the official code builds a new Adam for every outer update
        world = self.accelerator.num_processes
        counts = {name: b.clone() for name, b in self.head.named_buffers() if not b.is_floating_point()}
        loss = super().training_step(step)
        if world > 1:
            for name, buffer in self.head.named_buffers():
                if buffer.is_floating_point():
                    torch.distributed.all_reduce(buffer, op=torch.distributed.ReduceOp.SUM)
                    buffer /= world
                else:
                    added = buffer - counts[name]
                    torch.distributed.all_reduce(added, op=torch.distributed.ReduceOp.SUM)
                    buffer.copy_(counts[name] + added)
        return loss

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

    def compute_loss(self, batch_index: int) -> torch.Tensor:
        """Eq. 11 over this process's tasks at meta-batch `batch_index`; the "official" recipe's meta-loss is
        the last task's query loss divided by the number of tasks, as the official code computes it."""
        if self.text_embeddings is None:
            self.on_train_start()
        params = {name: p for name, p in self.head.named_parameters() if p.requires_grad}
        indices = self.task_indices
        if self.args.recipe == "official":
            indices = [index for index in indices if index == len(self.pools) - 1]
        tasks = [self.task_batch(batch_index, index) for index in indices]
        total = meta_objective(self.head, params, tasks, self.text_embeddings, self.args)[0]
        return total / len(self.pools) if self.args.recipe == "official" else total
