"""Every method's nearest-neighbour memory: whole by default (exact search), thinned to a coreset only when
`max_memory_items` asks for it, with a warning naming the method, the memory and both sizes."""

from __future__ import annotations

import warnings

import pytest
import torch

from hf_fsad.registry import method_spec
from hf_fsad.scoring import greedy_coreset
from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config

# The tiny tower's 15 x 15 grid: a scale-s window memory holds (16 - s)^2 items per image; 2 normal references
# (and for the anomalous memory 1 anomalous reference without a mask, all of whose items are defects).
WHOLE_MEMORIES = {
    "winclip": {"patch_tokens": 2 * 225, "window_embeddings.2": 2 * 14**2, "window_embeddings.3": 2 * 13**2},
    "anomalous_memory": {
        **{
            f"reference.{level}": 2 * size
            for level, size in (("patch", 225), ("window2", 196), ("window3", 169))
        },
        **{
            f"anomalous.{level}": size for level, size in (("patch", 225), ("window2", 196), ("window3", 169))
        },
        "reference.window7": 2 * 81,
        "anomalous.window7": 81,
    },
    "afclip": {f"memory.{layer}.{window}": 2 * 225 for layer in (1, 2) for window in (1, 3, 5)},
    "one_to_normal": {"memory.1": 2 * 225, "memory.2": 2 * 225},
}
LIMIT = 100


def build(model_type: str, **config):
    torch.manual_seed(0)
    model = (
        method_spec(model_type)
        .model(method_spec(model_type).config(clip_config=tiny_clip_config(), **config))
        .eval()
    )
    model.tokenizer = byte_level_clip_tokenizer()
    return model


def bank_of(model, references: torch.Tensor, anomalous: torch.Tensor):
    inputs = {"anomalous_pixel_values": anomalous} if model.needs_anomalous_references else {}
    with torch.no_grad():
        return model.build_reference_bank(references, **inputs)


@pytest.mark.parametrize("model_type", sorted(WHOLE_MEMORIES))
def test_every_memory_is_whole_by_default_and_thinned_only_on_request_with_a_warning(
    model_type, coreset_warnings
):
    references, anomalous = torch.randn(2, 3, 240, 240), torch.randn(1, 3, 240, 240)
    exact_model, thinned_model = build(model_type), build(model_type, max_memory_items=LIMIT)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the default thins nothing, so it warns of nothing
        exact = bank_of(exact_model, references, anomalous)
    memories = {
        name: tensor for name, tensor in exact.tensors.items() if name.startswith(exact_model.memory_prefixes)
    }
    assert {name: tensor.shape[0] for name, tensor in memories.items()} == WHOLE_MEMORIES[model_type]

    with pytest.warns(UserWarning) as caught:
        thinned = bank_of(thinned_model, references, anomalous)
    assert coreset_warnings(caught) == {
        f"{model_type}: memory '{name}' holds {size} items; keeping a greedy k-center coreset of {LIMIT}"
        for name, size in WHOLE_MEMORIES[model_type].items()
        if size > LIMIT
    }
    for name, tensor in exact.tensors.items():
        if name in memories and tensor.shape[0] > LIMIT:
            # the k-center picks of the exact memory, in their order (not any LIMIT of its rows)
            assert torch.equal(thinned.tensors[name], tensor[greedy_coreset(tensor, LIMIT)])
        else:  # small memories and every other tensor (text embeddings, weights) are kept as they are
            assert torch.equal(thinned.tensors[name], tensor)


def test_metacan_keeps_every_reference_patch_whatever_the_limit():
    """MetaCAN's Eqs. 1-2 average each patch's k nearest of all k*N reference patches: `max_memory_items`
    does not apply (its config says so), and its bank keeps them all."""
    model = build("metacan", max_memory_items=LIMIT, feature_layers=[1, 2])
    assert model.memory_prefixes == ()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        bank = bank_of(model, torch.randn(2, 3, 240, 240), torch.randn(1, 3, 240, 240))
    tokens = {
        name: tuple(tensor.shape[:2]) for name, tensor in bank.tensors.items() if name.startswith("tokens.")
    }
    assert tokens == {"tokens.1": (2, 1 + 225), "tokens.2": (2, 1 + 225)}  # per reference: CLS + every patch
