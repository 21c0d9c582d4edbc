"""Shared fixtures: tiny random CLIP backbones (no pretrained weights can be fetched here); the tiny WinCLIP,
the model most tests share, is its tester's (tests/test_winclip.py)."""

from __future__ import annotations

import os

import pytest
import torch

from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.testing import save_random_clip, save_tiny_diffusion_pipeline, tiny_clip_config
from test_winclip import WinClipModelTester


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist (`make test` runs `-n 2`), each worker computes on one intra-op thread, and so do
    the CLIs it starts, so that two workers on two cores do not oversubscribe them."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"


@pytest.fixture
def coreset_warnings():
    """coreset_warnings(caught): the coreset warnings among those `pytest.warns` caught, without their
    config hint. Other warnings (a ResourceWarning for an event loop a Space test left to the garbage
    collector) are not the model's."""

    def messages(caught) -> set[str]:
        return {
            str(warning.message).split(" (config")[0]
            for warning in caught
            if warning.category is UserWarning and "k-center coreset" in str(warning.message)
        }

    return messages


@pytest.fixture
def make_winclip():
    """Factory of tiny random WinCLIP models: make_winclip(seed=0, **config)."""
    return WinClipModelTester.tiny_model


@pytest.fixture
def tiny_winclip() -> WinClipModel:
    return WinClipModelTester.tiny_model()


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory) -> str:
    """A saved random tiny CLIPModel + tokenizer, loadable with `from_clip`."""
    return save_random_clip(tiny_clip_config(), tmp_path_factory.mktemp("tiny_clip"))


@pytest.fixture(scope="session")
def saved_winclip_dir(tmp_path_factory) -> str:
    directory = tmp_path_factory.mktemp("winclip")
    WinClipModelTester.tiny_model().save_pretrained(directory)
    return str(directory)


@pytest.fixture
def one_thread():
    """Run the test on one intra-op thread (then restore the count): float32 reductions then follow one
    order on every machine, so thresholds measured here hold elsewhere."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def diffusion_dir(tmp_path_factory) -> str:
    """A saved tiny random Stable Diffusion pipeline (One-to-Normal's personalizer), loadable offline."""
    return save_tiny_diffusion_pipeline(tmp_path_factory.mktemp("tiny_sd"))
