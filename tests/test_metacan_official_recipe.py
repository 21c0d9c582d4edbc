"""MetaCAN's `recipe="official"`: the official code's training (anony-mous-rep/MetaCAN `train.py`), each of
its distinctive behaviours checked on a tiny model."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from hf_fsad.models.metacan.training_metacan import MetaCanTrainingArguments, MetaLearner, meta_objective
from hf_fsad.training.recipes import load_config
from test_meta_learning import _toy_auxiliary
from test_metacan import MetaCanModelTester

REPO = Path(__file__).resolve().parents[1]
# What training/configs/metacan_official.yaml sets beside the recipe's own settings.
FIXED_BY_THE_YAML = {
    "checkpoint_every": 5,
    "feature_cache_dir": "runs/metacan-mvtec-official/feature_cache",
}
SMALL_SETS = {"support_normal": 2, "support_anomalous": 2, "query_normal": 3, "query_anomalous": 3}


def test_recipes_give_their_settings_to_the_unset_fields_only():
    official = MetaCanTrainingArguments(recipe="official")
    assert (official.max_steps, official.inner_lr, official.loss) == (15, 0.01, "official_focal")
    assert (official.outer_lr, official.outer_optimizer, official.num_shots) == (1e-3, "adam", 2)
    paper = MetaCanTrainingArguments()
    assert (paper.recipe, paper.max_steps, paper.inner_lr, paper.loss) == ("paper", 200, 1e-3, "bce+focal")
    explicit = MetaCanTrainingArguments(recipe="official", max_steps=3, loss="focal")
    assert (explicit.max_steps, explicit.inner_lr, explicit.loss) == (3, 0.01, "focal")
    with pytest.raises(ValueError, match="recipe must be one of"):
        MetaCanTrainingArguments(recipe="maml")


def test_the_official_yaml_trains_with_the_official_recipe():
    config = load_config(REPO / "training" / "configs" / "metacan_official.yaml")
    args = MetaCanTrainingArguments(**config["training"])
    assert asdict(args) == asdict(MetaCanTrainingArguments(recipe="official", **FIXED_BY_THE_YAML))
    assert config["model"]["detector_type"] == "official"


def _learner(tmp_path, recipe: str, **arguments) -> MetaLearner:
    model = MetaCanModelTester.tiny_model().double()
    args = MetaCanTrainingArguments(recipe=recipe, **SMALL_SETS, **arguments)
    return MetaLearner(model, _toy_auxiliary(), args, tmp_path)


def test_official_meta_loss_is_the_last_tasks_query_loss_over_the_number_of_tasks(tmp_path):
    learner = _learner(tmp_path, "official")
    learner.model.train()
    head, text = learner.head, learner.model.text_embeddings()
    params = dict(head.named_parameters())
    tasks = [learner.task_batch(0, index) for index in range(len(learner.pools))]
    assert len(tasks) == 2

    def gradient(loss: torch.Tensor) -> torch.Tensor:
        head.zero_grad()
        loss.backward()
        return torch.cat([p.grad.flatten().clone() for p in head.parameters()])

    learned = gradient(learner.compute_loss(0))
    last_only = gradient(meta_objective(head, params, tasks[-1:], text, learner.args)[0] / len(tasks))
    first_only = gradient(meta_objective(head, params, tasks[:1], text, learner.args)[0] / len(tasks))
    # float64, the same operations on the same tensors: bit-identical
    torch.testing.assert_close(learned, last_only, rtol=0, atol=0)
    assert (learned - first_only).norm() > 1e-3 * learned.norm()  # the first task does not reach it


def test_official_recipe_renews_the_optimiser_and_never_updates_batchnorm_statistics(tmp_path):
    official = _learner(tmp_path / "official", "official", max_steps=3)
    result = official.train()
    head = official.head
    assert result.steps == 3
    # A fresh Adam each update: after three updates every parameter's Adam has taken one step.
    steps = {int(state["step"]) for state in official.optimizer.state.values()}
    assert steps == {1}
    statistics = dict(head.named_buffers())
    for name, buffer in statistics.items():
        if name.endswith("running_mean"):
            assert torch.equal(buffer, torch.zeros_like(buffer)), name
        elif name.endswith("running_var"):
            assert torch.equal(buffer, torch.ones_like(buffer)), name
        elif name.endswith("num_batches_tracked"):
            assert buffer.item() == 0, name

    paper = _learner(tmp_path / "paper", "paper", max_steps=3)
    paper.train()
    assert {int(state["step"]) for state in paper.optimizer.state.values()} == {3}
    assert not torch.equal(dict(paper.head.named_buffers())["detector.2.running_mean"], torch.zeros(8))


def test_official_recipe_runs_fifteen_updates(tmp_path):
    learner = _learner(tmp_path, "official")
    assert learner.train().steps == 15
    assert (tmp_path / "checkpoints" / "checkpoint-15").is_dir()
