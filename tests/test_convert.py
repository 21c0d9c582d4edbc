"""Converter parity: open_clip models with random weights vs the converted `transformers.CLIPModel`.

Runs in the separate converter environment (`make test-convert`): open_clip needs torchvision, which the
core install must not pull. Depth is shrunk for speed; widths, heads, patch and image sizes are the real ones.
"""

from __future__ import annotations

import pytest
import torch

open_clip = pytest.importorskip("open_clip", reason="needs the `convert` extra (open_clip_torch)")

from hf_fsad.backbones.convert import clip_from_open_clip_model, tokenizer_from_bpe
from hf_fsad.cli import main
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.prompts import winclip_prompts

pytestmark = pytest.mark.convert

TOLERANCE = 1e-5
# The paper backbones: OpenCLIP's LAION ViT-B-16-plus-240 (GELU) and OpenAI's ViT-L-14-336 (quick GELU).
ARCHITECTURES = [("ViT-B-16-plus-240", False), ("ViT-L-14-336", True)]


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def shrunk_open_clip(name: str, quick_gelu: bool, layers: int = 2, seed: int = 0):
    """open_clip `CLIP` of architecture `name` with `layers` blocks per tower and random weights."""
    config = open_clip.get_model_config(name)
    config["vision_cfg"]["layers"] = layers
    config["text_cfg"]["layers"] = layers
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config, quick_gelu=quick_gelu).eval()
    # open_clip zero-initialises some parameters; randomise everything so no mapping error can hide.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.02)
    return model


@pytest.fixture(scope="module", params=ARCHITECTURES, ids=[name for name, _ in ARCHITECTURES])
def converted(request):
    name, quick_gelu = request.param
    model = shrunk_open_clip(name, quick_gelu)
    return model, clip_from_open_clip_model(model)


def test_config_reads_the_architecture(converted):
    model, clip = converted
    vision = clip.config.vision_config
    assert vision.image_size == model.visual.image_size[0]
    assert vision.hidden_size == model.visual.conv1.out_channels
    assert vision.num_attention_heads == model.visual.transformer.resblocks[0].attn.num_heads
    assert clip.config.projection_dim == model.visual.proj.shape[1]


@torch.no_grad()
def test_image_embedding_and_every_block_agree(converted):
    model, clip = converted
    size = clip.config.vision_config.image_size
    pixels = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    block_outputs = []
    hooks = [
        block.register_forward_hook(lambda _module, _inputs, output: block_outputs.append(output))
        for block in model.visual.transformer.resblocks
    ]
    expected_embedding = model.encode_image(pixels)
    for hook in hooks:
        hook.remove()

    vision = clip.vision_model(pixel_values=pixels, output_hidden_states=True)
    assert len(block_outputs) == len(vision.hidden_states) - 1
    for index, expected in enumerate(block_outputs, start=1):
        assert relative_error(vision.hidden_states[index], expected) <= TOLERANCE, f"block {index}"
    embedding = clip.visual_projection(vision.pooler_output)
    assert relative_error(embedding, expected_embedding) <= TOLERANCE


@torch.no_grad()
def test_text_embedding_agrees(converted):
    model, clip = converted
    tokens = open_clip.tokenize(["a photo of a flawless bottle.", "a cropped photo of a damaged screw."])
    expected = model.encode_text(tokens)
    actual = clip.text_projection(clip.text_model(input_ids=tokens).pooler_output)
    assert relative_error(actual, expected) <= TOLERANCE


def test_tokenizer_ids_agree_on_the_winclip_ensemble():
    reference = open_clip.tokenizer.SimpleTokenizer()
    tokenizer = tokenizer_from_bpe(open_clip.tokenizer.default_bpe())
    prompts = [prompt for state in winclip_prompts("metal nut") for prompt in state]
    assert len(prompts) > 200
    for prompt in prompts:
        expected = [reference.sot_token_id, *reference.encode(prompt), reference.eot_token_id]
        assert tokenizer(prompt)["input_ids"] == expected, prompt


@torch.no_grad()
def test_cli_converts_to_a_directory_winclip_loads(tmp_path, monkeypatch):
    name, quick_gelu = ARCHITECTURES[0]
    model = shrunk_open_clip(name, quick_gelu)
    monkeypatch.setattr(open_clip, "create_model", lambda model_name, pretrained=None: model)

    assert main(["convert", "--open-clip", name, str(tmp_path)]) == 0

    winclip = WinClipModel.from_clip(str(tmp_path))
    prompt = "a photo of a flawless bottle."
    expected = model.encode_text(open_clip.tokenize([prompt]))
    assert relative_error(winclip.backbone.encode_text([prompt]), expected) <= TOLERANCE
    assert winclip.config.image_size == 240
