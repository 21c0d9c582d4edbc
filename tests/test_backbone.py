"""The shared backbone against transformers' own CLIP forward passes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_fsad.backbones.clip import ClipBackbone, window_packing
from hf_fsad.scoring import window_token_indices
from hf_fsad.testing import tiny_clip_config


@pytest.fixture
def backbone(tiny_winclip):
    return tiny_winclip.backbone


def test_block_outputs_match_transformers_hidden_states(backbone):
    pixels = torch.randn(2, 3, 240, 240)
    features = backbone.encode_image(pixels, layers=[1, 2])
    reference = backbone.clip.vision_model(pixel_values=pixels, output_hidden_states=True)
    # same weights through our block loop vs transformers' forward: float32 defaults for kernel order
    torch.testing.assert_close(features.hidden_states[1], reference.hidden_states[1])
    torch.testing.assert_close(features.hidden_states[2], reference.hidden_states[2])
    torch.testing.assert_close(features.last_hidden_state, reference.last_hidden_state)
    assert features.grid_size == (15, 15)


def test_projected_cls_is_clip_image_embedding(backbone):
    pixels = torch.randn(2, 3, 240, 240)
    features = backbone.encode_image(pixels)
    expected = backbone.clip.get_image_features(pixel_values=pixels).pooler_output
    # same layers, called separately: float32 defaults for a different kernel's reduction order
    torch.testing.assert_close(backbone.project(features.last_hidden_state[:, 0]), expected)


def test_other_sizes_interpolate_position_embeddings(backbone):
    pixels = torch.randn(1, 3, 160, 192)
    features = backbone.encode_image(pixels)
    expected = backbone.clip.vision_model(
        pixel_values=pixels, interpolate_pos_encoding=True
    ).last_hidden_state
    # our resize vs transformers' interpolate_pos_encoding: float32 defaults (bicubic weight rounding)
    torch.testing.assert_close(features.last_hidden_state, expected)
    assert features.grid_size == (10, 12)


def _bilinear_by_hand(grid: np.ndarray, size: int) -> np.ndarray:
    """Half-pixel-centre bilinear resize of an (n, n, D) grid to (size, size, D), in float64, written out:
    output index i samples input coordinate (i + 0.5) n / size - 0.5, clamped to the grid."""
    side = grid.shape[0]
    coordinates = np.clip((np.arange(size) + 0.5) * side / size - 0.5, 0, side - 1)
    low = np.floor(coordinates).astype(int)
    high = np.minimum(low + 1, side - 1)
    weight = coordinates - low
    rows = (1 - weight)[:, None, None] * grid[low] + weight[:, None, None] * grid[high]
    return (1 - weight)[None, :, None] * rows[:, low] + weight[None, :, None] * rows[:, high]


def test_bilinear_position_interpolation_at_518_px_is_an_explicit_bilinear_resize_of_the_grid():
    """AF-CLIP's setting: a 336 px, patch-14 tower (24x24 grid) run at 518 px (37x37). The CLS position stays
    apart; the grid is resized bilinearly, which differs from transformers' bicubic resize."""
    torch.manual_seed(0)
    config = tiny_clip_config(image_size=336, patch_size=14)
    bilinear = ClipBackbone(config, position_interpolation="bilinear").eval()
    bicubic = ClipBackbone(config).eval()
    bicubic.load_state_dict(bilinear.state_dict())
    pixels = torch.randn(1, 3, 518, 518)
    with torch.no_grad():
        embeddings = bilinear.encode_image(pixels).embeddings
        bicubic_embeddings = bicubic.encode_image(pixels).embeddings
    vision = bilinear.clip.vision_model.embeddings
    positions = vision.position_embedding.weight.detach().double().numpy()
    grid = _bilinear_by_hand(positions[1:].reshape(24, 24, -1), 37).reshape(37 * 37, -1)
    expected_positions = torch.from_numpy(np.concatenate([positions[:1], grid])).float()
    with torch.no_grad():
        patches = vision.patch_embedding(pixels).flatten(2).transpose(1, 2)
    tokens = torch.cat([vision.class_embedding.detach().expand(1, 1, -1), patches], dim=1)
    assert embeddings.shape == (1, 1 + 37 * 37, 32)
    # float32 embeddings vs a float64 resize: the weights and sums round at ~1e-7 relative, on values ~1
    torch.testing.assert_close(embeddings, tokens + expected_positions, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(embeddings[:, 0], bicubic_embeddings[:, 0], rtol=0, atol=0)  # CLS: same sum
    assert (embeddings[:, 1:] - bicubic_embeddings[:, 1:]).abs().max() > 1e-3


def test_afclip_config_interpolates_bilinearly_and_other_methods_bicubically():
    from hf_fsad.models.afclip.configuration_afclip import AfClipConfig
    from hf_fsad.models.afclip.modeling_afclip import AfClipModel
    from hf_fsad.models.winclip.configuration_winclip import WinClipConfig

    config = tiny_clip_config()
    assert WinClipConfig(clip_config=config).position_interpolation == "bicubic"
    afclip = AfClipModel(AfClipConfig(clip_config=config, feature_layers=[1, 2]))
    assert afclip.backbone.position_interpolation == "bilinear"
    with pytest.raises(ValueError, match="position_interpolation"):
        WinClipConfig(clip_config=config, position_interpolation="nearest")


def test_position_interpolation_enters_the_feature_key_only_where_it_changes_the_features():
    from hf_fsad.models.afclip.configuration_afclip import AfClipConfig
    from hf_fsad.models.afclip.modeling_afclip import AfClipModel

    def feature_key(**config) -> str:
        torch.manual_seed(0)
        config = AfClipConfig(clip_config=tiny_clip_config(), feature_layers=[1, 2], **config)
        return AfClipModel(config).feature_key()

    assert feature_key() == feature_key(position_interpolation="bicubic")  # 240 px: the checkpoint's grid
    assert feature_key(image_size=320) != feature_key(image_size=320, position_interpolation="bicubic")


def test_missing_block_is_rejected(backbone):
    with pytest.raises(ValueError, match="blocks 1..2"):
        backbone.encode_image(torch.randn(1, 3, 240, 240), layers=[3])


def test_window_embeddings_match_one_window_at_a_time(backbone):
    """The batched pass equals running single windows (CLS + window tokens) through the tower by hand."""
    pixels = torch.randn(2, 3, 240, 240)
    features = backbone.encode_image(pixels)
    batched = backbone.encode_windows(features.embeddings, features.grid_size, [2, 3])
    vision = backbone.clip.vision_model
    for scale, embeddings in zip([2, 3], batched):
        indices = window_token_indices((15, 15), scale)
        assert embeddings.shape == (2, len(indices), backbone.clip.config.projection_dim)
        for window in (0, 17, len(indices) - 1):
            tokens = torch.cat(
                [features.embeddings[:, :1], features.embeddings[:, 1:][:, indices[window]]], dim=1
            )
            hidden = vision.pre_layrnorm(tokens)
            for layer in vision.encoder.layers:
                hidden = layer(hidden, None)
            expected = backbone.clip.visual_projection(vision.post_layernorm(hidden[:, 0]))
            # packed rows with an attention mask vs one window alone: float32 defaults for reduction order
            torch.testing.assert_close(embeddings[:, window], expected)


def test_window_passes_in_small_chunks_give_the_single_pass_embeddings(backbone):
    features = backbone.encode_image(torch.randn(2, 3, 240, 240))
    backbone.window_tokens_per_pass = 10**9
    whole = backbone.encode_windows(features.embeddings, features.grid_size, [2, 3])
    backbone.window_tokens_per_pass = 45  # four 10-token rows per pass, the last of 534 rows shorter
    chunked = backbone.encode_windows(features.embeddings, features.grid_size, [2, 3])
    for expected, actual in zip(whole, chunked, strict=True):
        # other batch shapes, other kernel blocking: float32 rounding ~1e-7 rel through 2 blocks, 1e-5 bound
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_text_embeddings_are_encoded_once_per_prompt_and_match_clip(backbone, monkeypatch):
    """Each distinct prompt runs through the text tower once (length-sorted batches), and the result equals
    CLIP's embedding of that prompt alone."""
    encoded = []
    original = backbone.clip.get_text_features

    def counting(**tokens):
        encoded.append(tokens["input_ids"].shape[0])
        return original(**tokens)

    monkeypatch.setattr(backbone.clip, "get_text_features", counting)
    prompts = ["a photo of a screw.", "a photo of a damaged screw.", "a photo of a screw.", "screw"]
    first = backbone.encode_text(prompts)
    assert sum(encoded) == 3
    for prompt, embedding in zip(prompts, first):
        tokens = backbone.tokenizer([prompt], return_tensors="pt")
        # padded length-sorted batch vs the prompt alone: float32 defaults (reduction order)
        torch.testing.assert_close(embedding, original(**tokens).pooler_output[0])
    again = backbone.encode_text(["screw", "a photo of a nut."])
    assert sum(encoded) == 4
    assert torch.equal(again[0], first[3])  # from the cache
    backbone.clear_text_cache()
    backbone.encode_text(["screw"])
    assert sum(encoded) == 5


def test_text_without_tokenizer_explains(backbone):
    backbone.tokenizer = None
    with pytest.raises(ValueError, match="no tokenizer"):
        backbone.encode_text(["a photo of a screw."])


def test_window_packing_fills_rows_without_padding_for_the_papers_scales():
    """Scales 2 and 3 (5- and 10-token windows): two scale-2 windows share a row, every position is a
    window token, and each window attends exactly to its own tokens."""
    packing = window_packing((15, 15), (2, 3))
    assert packing.token_index.shape == (98 + 169, 10)
    assert packing.attend.sum(dim=(1, 2)).tolist() == [2 * 25] * 98 + [100] * 169
    first_pair = packing.attend[0]
    assert first_pair[:5, :5].all() and not first_pair[:5, 5:].any() and first_pair[5:, 5:].all()
    assert packing.token_index[0].tolist() == [0, 1, 2, 16, 17, 0, 2, 3, 17, 18]  # CLS + 2x2 windows
    assert packing.window_slots[0][:3].tolist() == [0, 1, 2] and packing.window_slots[1][0] == 98 * 2


def test_window_packing_pads_rows_that_windows_do_not_fill():
    """Scales 1 and 2 (2 and 5 tokens): two 2-token windows per 5-token row, the fifth position padding
    that attends only to itself."""
    packing = window_packing((3, 3), (1, 2))
    assert packing.token_index.shape == (5 + 4, 5)
    assert packing.attend[0, 4].tolist() == [False, False, False, False, True]
    assert packing.attend[4].sum() == 2 * 2 + 3  # the last scale-1 row: one window and 3 padding tokens
    assert len(packing.window_slots[0]) == 9 and len(packing.window_slots[1]) == 4


def test_text_cache_survives_save_and_load(tiny_winclip, tmp_path, monkeypatch):
    """A saved model keeps the prompt embeddings it computed; the loaded one does not run the text tower
    for them and gives the same state embeddings."""
    expected = tiny_winclip.text_embeddings("screw")
    tiny_winclip.save_pretrained(tmp_path)
    assert (tmp_path / "text_embeddings.safetensors").is_file()
    loaded = type(tiny_winclip).from_pretrained(tmp_path)

    def no_text_tower(**tokens):
        raise AssertionError("the text tower ran for a cached prompt")

    monkeypatch.setattr(loaded.backbone.clip, "get_text_features", no_text_tower)
    # the cache file stores the float32 tensors as they are: exact
    torch.testing.assert_close(loaded.text_embeddings("screw"), expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="text tower ran"):
        loaded.text_embeddings("nut")


def test_text_cache_file_of_another_kind_is_refused(backbone, tmp_path):
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a text-embedding cache"):
        backbone.load_text_cache(tmp_path / "other.safetensors")


@pytest.mark.slow
def test_compiled_passes_match_eager(tiny_winclip):
    """`torch.compile` (weights frozen in) computes the same features as the eager passes."""
    pixels = torch.randn(2, 3, 240, 240)
    with torch.no_grad():
        expected = tiny_winclip.encode_images(pixels)
        compiled = tiny_winclip.compile_backbone().encode_images(pixels)
    for name, tensor in expected.items():
        # inductor fuses and reorders float32 reductions in 2 blocks: ~1e-6 seen, 10x margin for SIMD widths
        torch.testing.assert_close(compiled[name], tensor, rtol=1e-4, atol=1e-5)
