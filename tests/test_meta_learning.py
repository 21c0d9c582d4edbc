"""AD meta-learning (MetaCAN Algorithm 1, Eqs. 9-12): losses, task draws, the meta-step by hand, training on
toy data, several processes and resuming."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import concatenate_datasets
from safetensors.torch import load_file
from torch.func import functional_call

from hf_fsad.data import load_benchmark
from hf_fsad.metrics.functional import image_auroc
from hf_fsad.models.metacan.configuration_metacan import MetaCanConfig
from hf_fsad.models.metacan.losses_metacan import anomaly_loss, official_focal_loss
from hf_fsad.models.metacan.modeling_metacan import CategoryToAnomalyHead
from hf_fsad.models.metacan.training_metacan import (
    MetaCanTrainingArguments,
    MetaLearner,
    TaskBatch,
    adapt,
    draw_task,
    meta_objective,
    set_loss,
    task_pools,
)
from hf_fsad.testing import tiny_clip_config
from hf_fsad.training.losses import focal_loss
from hf_fsad.training.recipes import load_config
from hf_fsad.training.trainer import latest_checkpoint
from test_metacan import MetaCanModelTester

REPO = Path(__file__).resolve().parents[1]
TOY_CONFIG = REPO / "training" / "configs" / "metacan_toy.yaml"
# The toy recipe's data, cut down for speed: 6 + 2 normal and 4 anomalous images per task.
SMALL_DATA = ["data.num_train=6", "data.num_test_good=2", "data.num_test_anomalous=4"]


def test_focal_and_bce_losses_by_hand():
    scores, labels = torch.tensor([0.9, 0.2]), torch.tensor([1, 1])
    expected_focal = [-(0.1**2) * np.log(0.9), -(0.8**2) * np.log(0.2)]
    # float32 log and powers vs numpy float64 rounded to float32: ~1 ulp, float32 defaults
    torch.testing.assert_close(focal_loss(scores, labels), torch.tensor(expected_focal, dtype=torch.float32))
    scores, labels = torch.tensor([0.9, 0.2]), torch.tensor([1, 0])
    bce = [-np.log(0.9), -np.log(0.8)]
    focal = [-(0.1**2) * np.log(0.9), -(0.2**2) * np.log(0.8)]
    total = anomaly_loss(scores, labels, "bce+focal")
    # float32 logs of two scores vs numpy float64: a few ulp (6e-8 rel) each, rel 1e-6
    assert total.item() == pytest.approx(sum(bce) + sum(focal), rel=1e-6)
    assert anomaly_loss(scores, labels, "bce", reduction="mean").item() == pytest.approx(
        np.mean(bce), rel=1e-6
    )
    assert torch.isfinite(anomaly_loss(torch.tensor([0.0, 1.0]), torch.tensor([1, 0])))
    with pytest.raises(ValueError, match="Unknown loss"):
        anomaly_loss(scores, labels, "hinge")


def test_official_focal_is_focal_with_logits_on_the_probabilities_averaged():
    scores, labels = [0.9, 0.2, 0.6], [1, 0, 0]
    expected = []
    for s, y in zip(scores, labels):  # the official BinaryFocalLoss(logits=True) in float64 by hand
        p = 1 / (1 + np.exp(-s))  # the score (already a probability) taken as a logit
        bce = -(y * np.log(p) + (1 - y) * np.log(1 - p))
        expected.append((1 - np.exp(-bce)) ** 2 * bce)
    scores_t, labels_t = torch.tensor(scores, dtype=torch.float64), torch.tensor(labels)
    # float64 defaults (rtol 1e-7): the same exp / log, in another order (~1e-16)
    torch.testing.assert_close(
        official_focal_loss(scores_t, labels_t), torch.tensor(expected, dtype=torch.float64)
    )
    args = MetaCanTrainingArguments(loss="official_focal")
    assert anomaly_loss(scores_t, labels_t, args.loss, reduction="mean").item() == pytest.approx(
        np.mean(expected), rel=1e-12
    )  # float64 throughout
    # Not the focal loss of the probabilities: a confident right score (0.9, label 1) still costs ~0.03.
    assert official_focal_loss(scores_t, labels_t)[0] > 10 * focal_loss(scores_t, labels_t)[0]


def _toy_auxiliary(categories=("stripes", "weave"), **sizes):
    sizes = {"num_train": 6, "num_test_good": 2, "num_test_anomalous": 4} | sizes
    parts = []
    for category in categories:
        data = load_benchmark("toy", category=category, **sizes)
        parts += [data["train"], data["test"]]
    return concatenate_datasets(parts)


def test_task_draws_are_seeded_per_step_and_keep_references_out_of_the_queries():
    dataset = _toy_auxiliary()
    args = MetaCanTrainingArguments(
        num_shots=2, support_normal=3, support_anomalous=2, query_normal=8, query_anomalous=5
    )
    pools = task_pools(dataset, args.num_shots)
    assert [pool.category for pool in pools] == ["stripes", "weave"]
    draw = draw_task(pools[0], args, step=3, task_index=0)
    assert draw == draw_task(pools[0], args, step=3, task_index=0)
    assert draw != draw_task(pools[0], args, step=4, task_index=0)
    assert len(draw.references) == 2 and not set(draw.references) & set(draw.support + draw.query)
    labels = dataset["label"]
    for rows, row_labels in ((draw.support, draw.support_labels), (draw.query, draw.query_labels)):
        assert [labels[row] for row in rows] == row_labels
        assert {dataset["category"][row] for row in rows} == {"stripes"}
    assert draw.query_labels == [0] * 8 + [1] * 5
    # 8 normal query images from a pool of 6 - 2 = 6 others: every image once before any repeats
    assert set(draw.query[:6]) == set(pools[0].normal_rows) - set(draw.references)
    with pytest.raises(ValueError, match="anomalous image"):
        task_pools(load_benchmark("toy", category="grid", num_train=4)["train"], 2)


def _tiny_tasks(head_config: MetaCanConfig, num_tasks: int = 3) -> list[TaskBatch]:
    generator = torch.Generator().manual_seed(0)

    def levels(count):
        return [
            torch.randn(count, 9, 4, generator=generator, dtype=torch.float64)
            for _ in head_config.feature_layers
        ]

    return [
        TaskBatch(
            levels(2), levels(4), torch.tensor([0, 0, 1, 1]), levels(6), torch.tensor([0, 0, 0, 1, 1, 1])
        )
        for _ in range(num_tasks)
    ]


def _tiny_head() -> tuple[CategoryToAnomalyHead, MetaCanConfig]:
    config = MetaCanConfig(
        clip_config=tiny_clip_config(),
        image_size=48,
        feature_layers=[1, 2],
        differentiator_hidden_size=6,
        detector_hidden_sizes=[5],
        text_logit_scale=5.0,
    )
    torch.manual_seed(0)
    return CategoryToAnomalyHead(config, vision_width=4, embedding_size=3).double(), config


def _hand_meta_step(head, tasks, text, args):
    """Eqs. 9-12 written out: per task the support loss, its gradient, Theta_i, the query loss; then the
    gradient of the summed query losses w.r.t. Theta."""
    from torch.func import functional_call

    theta = {name: p.detach().clone().requires_grad_(True) for name, p in head.named_parameters()}

    def f(params, queries, labels, references):  # Eq. 9 with L_b = BCE + focal, summed
        s = functional_call(head, params, (queries, references, text))["score"]
        y = labels.double()
        p_t = y * s + (1 - y) * (1 - s)
        return (-p_t.log() - (1 - p_t) ** 2 * p_t.log()).sum()

    inner, query_losses = [], []
    for task in tasks:
        support_loss = f(theta, task.support, task.support_labels, task.references)
        grads = torch.autograd.grad(support_loss, list(theta.values()), create_graph=True)
        theta_i = {
            name: value - args.inner_lr * g for (name, value), g in zip(theta.items(), grads)
        }  # Eq. 10
        inner.append(theta_i)
        query_losses.append(f(theta_i, task.query, task.query_labels, task.references))
    total = sum(query_losses)  # Eq. 11
    outer_gradient = torch.autograd.grad(total, list(theta.values()))
    return theta, inner, query_losses, dict(zip(theta, outer_gradient))


def test_meta_step_equals_eqs_10_to_12_by_hand():
    head, config = _tiny_head()
    tasks = _tiny_tasks(config)
    text = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    args = MetaCanTrainingArguments(inner_lr=0.05)
    _, inner, query_losses, outer_gradient = _hand_meta_step(head, tasks, text, args)

    params = dict(head.named_parameters())
    for task, expected in zip(tasks, inner):
        adapted = adapt(head, params, task, text, args)
        for name in params:
            # float64 both sides, same ops in another order (second-order autograd): ~1e-14; 1e-10 bound
            torch.testing.assert_close(adapted[name], expected[name], rtol=0, atol=1e-10)
    total, losses = meta_objective(head, params, tasks, text, args)
    for loss, expected in zip(losses, query_losses):
        assert loss.item() == pytest.approx(expected.item(), abs=1e-10)
    head.zero_grad()
    total.backward()
    for name, parameter in head.named_parameters():
        torch.testing.assert_close(parameter.grad, outer_gradient[name], rtol=0, atol=1e-10)
    # The second-order terms matter: the first-order variant gives another gradient.
    head.zero_grad()
    meta_objective(head, params, tasks, text, MetaCanTrainingArguments(inner_lr=0.05, first_order=True))[
        0
    ].backward()
    # a difference, not rounding: allclose's defaults (rtol 1e-5) are far below the second-order terms
    assert not torch.allclose(head.differentiator[0].weight.grad, outer_gradient["differentiator.0.weight"])


def test_every_tasks_query_loss_reaches_the_outer_gradient():
    head, config = _tiny_head()
    tasks = _tiny_tasks(config, num_tasks=3)
    text = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    args = MetaCanTrainingArguments(inner_lr=0.05)
    params = dict(head.named_parameters())

    def gradient(selected):
        head.zero_grad()
        meta_objective(head, params, selected, text, args)[0].backward()
        return torch.cat([p.grad.flatten().clone() for p in head.parameters()])

    per_task = [gradient([task]) for task in tasks]
    total = gradient(tasks)
    # float64: the same per-task gradients, summed by autograd vs here (reduction order ~1e-16)
    torch.testing.assert_close(total, sum(per_task), rtol=1e-10, atol=1e-12)
    for index, task_gradient in enumerate(per_task):
        assert task_gradient.norm() > 1e-3
        without = gradient(tasks[:index] + tasks[index + 1 :])
        assert (total - without).norm() > 1e-3  # removing any task changes the outer gradient


def test_running_statistics_move_in_the_query_forwards_only():
    head, config = _tiny_head()  # official detector, training mode: BatchNorm uses batch statistics
    tasks = _tiny_tasks(config)
    text = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    args = MetaCanTrainingArguments(inner_lr=0.05)
    params = dict(head.named_parameters())
    before = {name: buffer.clone() for name, buffer in head.named_buffers()}
    adapted = adapt(head, params, tasks[0], text, args)
    for name, buffer in head.named_buffers():  # the inner step updates scratch copies only
        assert torch.equal(buffer, before[name]), name
    scratch = {name: buffer.clone() for name, buffer in head.named_buffers()}
    query = tasks[0]
    image_text_map = functional_call(head, {**scratch, **adapted}, (query.query, query.references, text))
    hidden = torch.relu(
        image_text_map["image_text_map"] @ adapted["detector.0.weight"].T + adapted["detector.0.bias"]
    ).detach()
    set_loss(head, adapted, query.query, query.query_labels, query.references, text, args)
    # PyTorch's BatchNorm update (momentum 0.1; the running variance is the unbiased batch variance)
    expected_mean = 0.9 * before["detector.2.running_mean"] + 0.1 * hidden.mean(0)
    expected_var = 0.9 * before["detector.2.running_var"] + 0.1 * hidden.var(0, unbiased=True)
    buffers = dict(head.named_buffers())
    # float64 both sides: the same momentum update, mean and variance in another order (~1e-16)
    torch.testing.assert_close(buffers["detector.2.running_mean"], expected_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(buffers["detector.2.running_var"], expected_var, rtol=1e-12, atol=1e-12)
    # float64 on both sides. The whole objective: one update per task, from its query forward.
    meta_objective(head, params, tasks, text, args)
    assert buffers["detector.2.num_batches_tracked"].item() == 1 + len(tasks)


def test_set_loss_averages_the_official_focal_and_sums_the_others():
    head, config = _tiny_head()
    head.eval()
    task = _tiny_tasks(config, num_tasks=1)[0]
    text = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    params = dict(head.named_parameters())
    scores = functional_call(head, params, (task.query, task.references, text))["score"]
    inputs = (head, params, task.query, task.query_labels, task.references, text)
    official = set_loss(*inputs, MetaCanTrainingArguments(loss="official_focal"))
    expected = official_focal_loss(scores, task.query_labels).mean()  # the official code's mean
    assert official.item() == pytest.approx(expected.item(), rel=1e-12)  # float64 throughout
    summed = set_loss(*inputs, MetaCanTrainingArguments(loss="bce+focal"))
    expected = anomaly_loss(scores, task.query_labels, "bce+focal", reduction="sum")  # Eq. 9's sum
    assert summed.item() == pytest.approx(expected.item(), rel=1e-12)


def test_one_outer_step_of_the_learner_is_theta_minus_alpha_times_the_hand_gradient(tmp_path):
    model = MetaCanModelTester.tiny_model().double()
    args = MetaCanTrainingArguments(
        support_normal=2,
        support_anomalous=2,
        query_normal=3,
        query_anomalous=3,
        inner_lr=0.05,
        outer_lr=0.1,
        outer_optimizer="sgd",
        max_steps=1,
    )
    learner = MetaLearner(model, _toy_auxiliary(), args, tmp_path)
    text = model.text_embeddings()
    tasks = [learner.task_batch(0, index) for index in range(len(learner.pools))]
    theta, _, _, outer_gradient = _hand_meta_step(model.head, tasks, text, args)
    learner.training_step(0)
    for name, parameter in model.head.named_parameters():
        expected = theta[name].detach() - args.outer_lr * outer_gradient[name]
        # float64 both sides, same ops in another order (second-order autograd): ~1e-14; 1e-10 bound
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-10)


def _held_out_auroc(model, held_out, seeds=(0, 1, 2)) -> float:
    processor = model.image_processor()
    test = processor(
        [image.convert("RGB") for image in held_out["test"]["image"]], return_tensors="pt"
    ).pixel_values
    labels = np.asarray(held_out["test"]["label"])
    values = []
    for seed in seeds:
        rows = np.random.default_rng(seed).permutation(held_out["train"].num_rows)[:2]
        references = processor(
            [held_out["train"][int(row)]["image"].convert("RGB") for row in rows], return_tensors="pt"
        ).pixel_values
        scores = model.eval()(test, reference_bank=model.build_reference_bank(references)).image_scores
        values.append(image_auroc(labels, scores.numpy()))
    return float(np.mean(values))


def test_meta_learning_on_toy_lowers_the_meta_loss_on_seen_and_held_out_categories(
    tmp_path, tiny_clip_dir, one_thread
):
    """The toy recipe (training/configs/metacan_toy.yaml): tasks stripes + weave, held-out grid. The meta-loss
    (Eq. 11 in eval mode, BatchNorm on its running statistics) of fixed task draws falls on the training
    categories and on the category training never saw.

    Held-out AUROC is no criterion here: with a random backbone the image-text branch has no ranking signal
    to learn (its AUROC alone stays near 0.5 before and after training, on the training categories too), so
    the fused score's AUROC shows only how much the detector's calibration perturbs the image-image ranking.
    """
    from hf_fsad.training.recipes import _auxiliary_dataset, build_model

    config = load_config(TOY_CONFIG, [f"model.clip={tiny_clip_dir}"])
    args = MetaCanTrainingArguments(**config["training"])
    model = build_model(config["model"], args.seed, config["method"])
    learner = MetaLearner(model, _auxiliary_dataset(config["data"]), args, tmp_path)
    held_out = MetaLearner(model, _auxiliary_dataset(config["data"] | {"categories": ["grid"]}), args, None)
    text = model.text_embeddings()
    seen = [learner.task_batch(10_000 + step, task) for step in range(4) for task in range(2)]
    unseen = [held_out.task_batch(10_000 + step, 0) for step in range(8)]

    def meta_loss(tasks) -> float:
        model.head.eval()
        return meta_objective(model.head, dict(model.head.named_parameters()), tasks, text, args)[0].item()

    before = meta_loss(seen), meta_loss(unseen)
    result = learner.train()
    after = meta_loss(seen), meta_loss(unseen)
    print(f"meta-loss seen {before[0]:.2f} -> {after[0]:.2f}; held-out {before[1]:.2f} -> {after[1]:.2f}")
    # Everything is seeded (random CLIP, model init, task draws, toy images) and one thread fixes the float32
    # reductions; measured: seen 107.9 -> 85.1 (0.79x), held-out 144.7 -> 103.8 (0.72x), against 0.9x.
    assert after[0] < 0.9 * before[0] and after[1] < 0.9 * before[1]
    assert result.steps == args.max_steps and (tmp_path / "checkpoints" / "checkpoint-60").is_dir()


def test_checkpoints_keep_the_running_statistics_and_resume_restores_them(tmp_path):
    args = MetaCanTrainingArguments(
        support_normal=2, support_anomalous=2, query_normal=2, query_anomalous=2, max_steps=1
    )
    model = MetaCanModelTester.tiny_model()
    MetaLearner(model, _toy_auxiliary(), args, tmp_path).train()
    saved = load_file(tmp_path / "checkpoints" / "checkpoint-1" / "trainable.safetensors")
    statistics = {f"head.{name}": b for name, b in model.head.named_buffers() if "running" in name}
    assert statistics and all(torch.equal(saved[name], value) for name, value in statistics.items())
    assert not torch.equal(statistics["head.detector.2.running_var"], torch.ones(8))  # moved from its init
    fresh = MetaCanModelTester.tiny_model()
    MetaLearner(fresh, _toy_auxiliary(), args, tmp_path).load_checkpoint(
        tmp_path / "checkpoints" / "checkpoint-1"
    )
    for name, buffer in fresh.head.named_buffers():
        assert torch.equal(buffer, dict(model.head.named_buffers())[name]), name


def test_official_detector_refuses_one_query_sets(tmp_path):
    args = MetaCanTrainingArguments(support_normal=1, support_anomalous=0)
    with pytest.raises(ValueError, match="at least 2 queries"):
        MetaLearner(MetaCanModelTester.tiny_model(), _toy_auxiliary(), args, tmp_path)
    MetaLearner(
        MetaCanModelTester.tiny_model(detector_type="paper", detector_hidden_sizes=[8]),
        _toy_auxiliary(),
        args,
        tmp_path,
    )


def _train_command(config_path: Path, clip_dir: str, output_dir: Path, *extra: str) -> list[str]:
    return [
        str(REPO / "training" / "train_metacan.py"),
        "--config",
        str(config_path),
        "--output-dir",
        str(output_dir),
        "--set",
        f"model.clip={clip_dir}",
        *SMALL_DATA,
        *extra,
    ]


def _summary(output_dir: Path) -> dict:
    return json.loads((output_dir / "training_summary.json").read_text())


def _train_in_process(
    clip_dir: str, output_dir: Path, overrides: list[str], dtype: torch.dtype, train: bool = True
) -> dict:
    """The toy recipe's model cast to `dtype`, trained in this process unless `train` is False; returns the
    head's weights."""
    from hf_fsad.training.recipes import _auxiliary_dataset, build_model

    config = load_config(TOY_CONFIG, [f"model.clip={clip_dir}", *overrides])
    args = MetaCanTrainingArguments(**config["training"])
    model = build_model(config["model"], args.seed, config["method"]).to(dtype)
    if train:
        MetaLearner(model, _auxiliary_dataset(config["data"]), args, output_dir).train()
    return {f"head.{name}": parameter.detach() for name, parameter in model.head.named_parameters()}


def _max_difference(first: dict, second: dict) -> float:
    return max((first[name].double() - second[name].double()).abs().max().item() for name in second)


# Plain SGD where runs are compared. Adam divides each gradient by its own size, which turns the rounding
# noise of gradients that are zero in exact arithmetic (the bias of a Linear before BatchNorm) into full steps.
SGD = ("training.outer_optimizer=sgd",)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_keep_parameters_identical(tmp_path, tiny_clip_dir):
    """Two processes, one task each, sum their gradients: the ranks stay bit-identical, and the result is
    the single process's up to float32 rounding."""
    training = ["training.max_steps=4", "training.checkpoint_every=1", *SGD]
    torchrun = Path(sys.executable).with_name("torchrun")
    output = tmp_path / "distributed"
    completed = subprocess.run(
        [
            str(torchrun),
            "--standalone",  # a free port for the rendezvous, not the fixed 29500
            "--nproc_per_node",
            "2",
            *_train_command(TOY_CONFIG, tiny_clip_dir, output, *training),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    digests = _summary(output)["result"]["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical ranks after 4 updates
    # The first update against one process's, in float32 and in float64: from the second update on, the tiny
    # random model's image-text branch (a differentiator output with few positive units, then normalised)
    # amplifies rounding differences until runs are unrelated after four.
    distributed = load_file(output / "checkpoints" / "checkpoint-1" / "trainable.safetensors")
    overrides = [*SMALL_DATA, "training.max_steps=1", *SGD]
    single = _train_in_process(tiny_clip_dir, tmp_path / "single", overrides, torch.float32)
    exact = _train_in_process(tiny_clip_dir, tmp_path / "float64", overrides, torch.float64)
    initial = _train_in_process(tiny_clip_dir, tmp_path, overrides, torch.float64, train=False)
    assert single.keys() == exact.keys() and set(single) <= set(distributed)
    # Both float32 runs evaluate the same sum of the two tasks' gradients, rounded differently (the order
    # of the sum, the batches the frozen backbone encodes, the kernels each thread count picks). The single
    # run's distance from float64 is what float32 rounding does to this computation; the distributed run is
    # allowed 10 times that (measured, max over the head: 1.1e-4 distributed, 1.0e-4 single, of an update
    # that moves a weight by up to 1.6). A mean for the sum (half the step) or a dropped task lands far
    # outside the bound.
    float32_rounding = _max_difference(single, exact)
    assert _max_difference(distributed, exact) <= 10 * float32_rounding
    assert _max_difference(exact, initial) > 1000 * float32_rounding  # the update moved the weights
    # BatchNorm buffers: the batch counts add up to one process's; the running statistics, averaged over the
    # processes after each update rather than updated task after task, differ slightly and are not compared.
    for name in (n for n in distributed if n.endswith("num_batches_tracked")):
        assert distributed[name].item() == 2  # 1 update x 2 tasks


# `python -c KILLED_AT_CHECKPOINT_12 script args...` runs the training script, which kills itself with
# SIGKILL while checkpoint-12 is half written: a fixed point of the run, not a race against a polling loop.
KILLED_AT_CHECKPOINT_12 = """
import os, runpy, signal, sys
from hf_fsad.training import trainer

save_file = trainer.save_file

def save_file_or_die(tensors, path, *args, **kwargs):
    if "checkpoint-12.tmp" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
    return save_file(tensors, path, *args, **kwargs)

trainer.save_file = save_file_or_die
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint_like_an_uninterrupted_run(tmp_path, tiny_clip_dir):
    """Every run is a process of its own with one thread, so all three compute alike, bit for bit."""
    uninterrupted, interrupted = tmp_path / "uninterrupted", tmp_path / "interrupted"
    settings = ["training.max_steps=20", "training.checkpoint_every=2"]

    def run(launcher: list[str], output_dir: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*launcher, *_train_command(TOY_CONFIG, tiny_clip_dir, output_dir, *settings), *extra],
            capture_output=True,
            text=True,
            timeout=600,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
            check=False,
        )

    completed = run([sys.executable], uninterrupted)
    assert completed.returncode == 0, completed.stderr[-3000:]
    killed = run([sys.executable, "-c", KILLED_AT_CHECKPOINT_12], interrupted)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert latest_checkpoint(interrupted).name == "checkpoint-10"
    assert (interrupted / "checkpoints" / "checkpoint-12.tmp").is_dir()  # the half-written one is passed over

    completed = run([sys.executable], interrupted, "--resume")
    assert completed.returncode == 0, completed.stderr[-3000:]
    resumed, reference = _summary(interrupted)["result"], _summary(uninterrupted)["result"]
    assert resumed["resumed_from"] == 10
    assert resumed["rank_parameter_digests"] == reference["rank_parameter_digests"]
    # The same losses at every logged step (the resumed run also logs its first step, 11).
    assert [entry for entry in resumed["history"] if entry["step"] != 11] == reference["history"]
    # Every checkpoint after the resume point matches the uninterrupted run's, bit for bit.
    for step in range(12, 21, 2):
        weights = Path("checkpoints") / f"checkpoint-{step}" / "trainable.safetensors"
        resumed_head, reference_head = load_file(interrupted / weights), load_file(uninterrupted / weights)
        assert resumed_head.keys() == reference_head.keys()
        assert all(torch.equal(resumed_head[name], reference_head[name]) for name in reference_head)
    assert not (interrupted / "checkpoints" / "checkpoint-12.tmp").exists()


def test_training_refuses_a_model_without_trainable_parts(tmp_path):
    model = MetaCanModelTester.tiny_model(use_detector=False)
    with pytest.raises(ValueError, match="Nothing to train"):
        MetaLearner(model, _toy_auxiliary(), MetaCanTrainingArguments(), tmp_path)


def test_recipe_trains_saves_a_loadable_model_with_a_card(tmp_path, tiny_clip_dir):
    from transformers import AutoModel

    from hf_fsad.training.recipes import main

    main(
        [
            "--config",
            str(TOY_CONFIG),
            "--output-dir",
            str(tmp_path),
            "--max-steps",
            "2",
            "--set",
            f"model.clip={tiny_clip_dir}",
            "data.num_train=6",
            "data.num_test_good=2",
            "data.num_test_anomalous=4",
        ]
    )
    model = AutoModel.from_pretrained(tmp_path)
    assert model.config.trained_on == "toy" and model.config.feature_layers == [1, 2]
    assert model.config.trained_parts == "trained" and model.untrained_weights is None
    card = (tmp_path / "README.md").read_text()
    assert "library_name: hf_fsad" in card and "AD meta-learning on `toy`" in card
    summary = _summary(tmp_path)
    assert summary["arguments"]["max_steps"] == 2 and len(summary["result"]["history"]) >= 1
    with pytest.raises(ValueError, match="section.key=value"):
        load_config(TOY_CONFIG, ["training.max_steps"])


def test_gradient_accumulation_averages_meta_batches(tmp_path):
    args = MetaCanTrainingArguments(
        support_normal=2, support_anomalous=2, query_normal=2, query_anomalous=2, inner_lr=0.05,
        outer_lr=0.1, outer_optimizer="sgd", gradient_accumulation_steps=2,
    )  # fmt: skip
    model = MetaCanModelTester.tiny_model().double()
    learner = MetaLearner(model, _toy_auxiliary(), args, tmp_path)
    text = model.text_embeddings()
    theta = {name: p.detach().clone() for name, p in model.head.named_parameters()}
    gradients = []
    for meta_batch in (0, 1):  # outer step 0 uses meta-batches 0 and 1
        tasks = [learner.task_batch(meta_batch, index) for index in range(len(learner.pools))]
        gradients.append(_hand_meta_step(model.head, tasks, text, args)[3])
    learner.training_step(0)
    for name, parameter in model.head.named_parameters():
        expected = theta[name] - args.outer_lr * (gradients[0][name] + gradients[1][name]) / 2
        # float64 both sides, same ops in another order (second-order autograd): ~1e-14; 1e-10 bound
        torch.testing.assert_close(parameter.detach(), expected, rtol=0, atol=1e-10)


# `python -c RECORDING_HEAD_DTYPES script args...` runs the training script and writes the dtypes of the
# head's linear layers' outputs, as training computed them, to the JSON file $HEAD_DTYPES.
RECORDING_HEAD_DTYPES = """
import json, os, runpy, sys
import torch
from hf_fsad.models.metacan.training_metacan import MetaLearner

dtypes = set()
on_train_start = MetaLearner.on_train_start

def on_train_start_recording(self):
    for module in self.head.modules():
        if isinstance(module, torch.nn.Linear):
            module.register_forward_hook(lambda module, inputs, output: dtypes.add(str(output.dtype)))
    on_train_start(self)

MetaLearner.on_train_start = on_train_start_recording
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(os.environ["HEAD_DTYPES"], "w") as file:
        json.dump(sorted(dtypes), file)
"""


def test_bf16_mixed_precision_trains_the_float32_head_through_bfloat16_layers(tmp_path, tiny_clip_dir):
    """Accelerate's precision is fixed per process, so the run gets its own process."""
    command = [
        sys.executable,
        "-c",
        RECORDING_HEAD_DTYPES,
        *_train_command(TOY_CONFIG, tiny_clip_dir, tmp_path, "training.mixed_precision=bf16"),
    ]
    recorded = tmp_path / "head_dtypes.json"
    completed = subprocess.run(
        [*command, "--max-steps", "3"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=os.environ | {"HEAD_DTYPES": str(recorded)},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert json.loads(recorded.read_text()) == ["torch.bfloat16"]  # autocast ran every head layer in bf16
    history = _summary(tmp_path)["result"]["history"]
    assert all(np.isfinite(entry["loss"]) for entry in history)
    from transformers import AutoModel

    trained, initial = AutoModel.from_pretrained(tmp_path), build_model_from(tiny_clip_dir)
    # The saved head is the trained one: bit for bit the weights and statistics of the last checkpoint,
    # kept in float32 (mixed precision computes in bf16 on float32 weights).
    final = load_file(tmp_path / "checkpoints" / "checkpoint-3" / "trainable.safetensors")
    saved = dict(trained.named_parameters()) | dict(trained.named_buffers())
    assert {name for name in saved if name.startswith("head.")} == set(final)
    for name, value in final.items():
        assert torch.equal(saved[name], value), name
    assert {value.dtype for value in final.values() if value.is_floating_point()} == {torch.float32}
    # ... and not the initial one. Adam's first update moves every weight whose gradient is not zero by
    # outer_lr (m / sqrt(v) = +-1); the three updates move most weights by more than half of that.
    change = (parameter_vector(trained) - parameter_vector(initial)).abs()
    outer_lr = load_config(TOY_CONFIG)["training"]["outer_lr"]
    assert change.max() >= outer_lr  # measured: 3 outer_lr, three full steps
    assert (change >= 0.5 * outer_lr).float().mean() > 0.5  # measured: 76 % of the head's weights


def build_model_from(clip_dir: str):
    from hf_fsad.training.recipes import build_model

    config = load_config(TOY_CONFIG, [f"model.clip={clip_dir}"])
    return build_model(config["model"], MetaCanTrainingArguments(**config["training"]).seed, config["method"])


def parameter_vector(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in model.head.parameters()])
