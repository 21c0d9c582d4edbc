"""The AF-CLIP authors' weights: the converter, and the converted model against the official code.

The fixture (tests/fixtures/afclip_official, written by its make_fixture.py) holds a prompt and an adaptor
in exactly the official files' format, the tiny random backbone they were used with, and what the official
code computed from them at 98 px on a 56 px checkpoint (so the position grid is resized, as at 518 px).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, CLIPModel

from hf_fsad.backbones.convert import convert_state_dict
from hf_fsad.cli import main
from hf_fsad.models.afclip.convert_afclip import (
    convert_official_afclip,
    load_official_adaptor,
    load_official_prompt,
)
from hf_fsad.testing import byte_level_clip_tokenizer, clip_config

FIXTURE = Path(__file__).parent / "fixtures" / "afclip_official"
PROMPT, ADAPTOR = FIXTURE / "prompt.pt", FIXTURE / "adaptor.pt"
RUN_SIZE, NUM_SETS = 98, 12
# Both sides compute in float32 from the same weights, in other orders: transformers' attention (separate
# q/k/v, SDPA) vs nn.MultiheadAttention, a grouped convolution vs unfold for the Gaussian windows, logits
# summed before vs after dividing by the temperature. Each reduction over up to 512 terms rounds at float32's
# 1.2e-7 per term at worst: 1e-5 of the values' size (~1) bounds it (measured: raw tokens equal, projected
# tokens within 6e-7 relative).
TOKEN_TOLERANCE = {"rtol": 1e-5, "atol": 1e-5}
# A probability sums 12 cosines / 0.07: a 6e-7 token error moves the logits by <= 12 x 6e-7 / 0.07 = 1e-4 and
# the probability by a quarter of that (softmax's largest slope), 2.5e-5; maps are the probabilities resampled
# and blurred with weights summing to 1, so they keep the bound (measured: 1e-6). Bicubic position grids or
# scipy's "mirror" border would move them by 3e-3 and 1.4e-4.
SCORE_TOLERANCE = {"rtol": 0, "atol": 3e-5}


@pytest.fixture(scope="module")
def official() -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURE / "official.safetensors"))


def official_clip(official: dict[str, torch.Tensor]) -> CLIPModel:
    """The fixture's backbone as a transformers `CLIPModel` (OpenAI's names are open_clip's)."""
    config = clip_config(64, 4, 64, 2, 32, image_size=56, patch_size=14, hidden_act="quick_gelu")
    config.vision_config.num_attention_heads = config.text_config.num_attention_heads = 1  # width // 64
    state = {
        name.removeprefix("backbone."): tensor
        for name, tensor in official.items()
        if name.startswith("backbone.")
    }
    token_embedding = torch.zeros(config.text_config.vocab_size, config.text_config.hidden_size)
    token_embedding[state.pop("token_embedding.ids")] = state.pop("token_embedding.rows")
    state["token_embedding.weight"] = token_embedding
    clip = CLIPModel(config)
    missing, unexpected = clip.load_state_dict(convert_state_dict(state, config), strict=False)
    assert not unexpected and all(name.endswith("position_ids") for name in missing)
    return clip.eval()


def converted_model(official, tmp_path: Path, tokenizer):
    clip_dir = tmp_path / "clip"
    official_clip(official).save_pretrained(clip_dir)
    tokenizer.save_pretrained(clip_dir)
    output = convert_official_afclip(PROMPT, ADAPTOR, clip_dir, tmp_path / "afclip", image_size=RUN_SIZE)
    return AutoModel.from_pretrained(output)


def test_official_files_load_as_the_adapter_and_prompt(official, tmp_path):
    prompt = load_official_prompt(PROMPT)
    assert prompt.shape == (12, 64)
    assert torch.equal(prompt, torch.load(PROMPT, weights_only=True)[0].detach())  # the (1, 12, W) parameter
    adapter, heads = load_official_adaptor(ADAPTOR)
    assert heads == 8 and adapter["query.weight"].shape == (8 * 64, 64)
    # The same weights saved as a bare state dict under the official names load the same.
    official_names = {
        "query": "attention.attn.to_q",
        "key": "attention.attn.to_k",
        "value": "attention.attn.to_v",
    }
    official_names |= {"output": "attention.attn.to_out.0", "norm": "attention.norm"}
    state = {
        f"{official_names[module]}.{leaf}": tensor
        for name, tensor in adapter.items()
        for module, _, leaf in [name.partition(".")]
    }
    torch.save(state, tmp_path / "state_dict.pt")
    again, heads_again = load_official_adaptor(tmp_path / "state_dict.pt")
    assert heads_again == 8 and all(torch.equal(again[name], adapter[name]) for name in adapter)


class RunsCode:
    """An object whose unpickling would run a shell command."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("loader", [load_official_prompt, load_official_adaptor])
def test_files_naming_other_code_are_refused_without_running_it(tmp_path, loader):
    marker = tmp_path / "ran"
    torch.save(RunsCode(f"touch {marker}"), tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"names `(posix|os|nt)\.system`"):
        loader(tmp_path / "evil.pt")
    assert not marker.exists()
    torch.save({"weights": torch.zeros(2), "hook": RunsCode(f"touch {marker}")}, tmp_path / "nested.pt")
    with pytest.raises(ValueError, match="system"):
        loader(tmp_path / "nested.pt")
    assert not marker.exists()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        loader(tmp_path / "missing.pt")


def test_cli_writes_an_afclip_model_with_the_official_weights_and_settings(official, tmp_path):
    clip_dir = tmp_path / "clip"
    official_clip(official).save_pretrained(clip_dir)
    byte_level_clip_tokenizer().save_pretrained(clip_dir)
    command = ["convert", "--afclip-official", str(PROMPT), str(ADAPTOR), "--clip", str(clip_dir)]
    assert main([*command, "--trained-on", "mvtec_ad", str(tmp_path / "out")]) == 0
    model = AutoModel.from_pretrained(tmp_path / "out")
    config = model.config
    assert (config.image_size, config.position_interpolation, config.context_placement) == (
        518,
        "bilinear",
        "before_start",
    )
    assert (config.adapter_num_heads, config.adapter_head_dim, config.trained_on) == (8, 64, "mvtec_ad")
    assert config.trained_parts == "converted"  # scored without a warning, --trained-on given or not
    assert torch.equal(model.context, load_official_prompt(PROMPT))
    adapter, _ = load_official_adaptor(ADAPTOR)
    assert all(torch.equal(model.adapter.state_dict()[name], tensor) for name, tensor in adapter.items())
    assert main(["convert", "--open-clip", "ViT-B-16", "--trained-on", "visa", str(tmp_path / "x")]) == 2
    assert main([*command, "--pretrained", "openai", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(SystemExit):  # one source only
        main(
            [
                "convert",
                "--afclip-official",
                str(PROMPT),
                str(ADAPTOR),
                "--open-clip",
                "ViT-B-16",
                str(tmp_path),
            ]
        )


@torch.no_grad()
def test_converted_model_computes_the_official_image_features_and_scores(official, tmp_path):
    """Everything but the text tower (whose tokenizer needs open_clip's vocabulary, see the `convert` test
    below): raw tokens at 98 px, the 12 adapted and projected token sets, and, with the official text features
    put in the bank, the zero-shot and AF-CLIP+ scores and maps."""
    model = converted_model(official, tmp_path, byte_level_clip_tokenizer())
    pixels, references = official["pixels"], official["references"]
    features = model.encode_images(pixels)
    for block in (1, 2, 3, 4):
        torch.testing.assert_close(
            features[f"tokens.{block}"], official[f"tokens.{block}"], **TOKEN_TOLERANCE
        )
    projected = model.project_sets(model.token_sets(features))
    assert len(projected) == NUM_SETS
    for index, tokens in enumerate(projected):
        torch.testing.assert_close(tokens, official[f"projected.{index}"], **TOKEN_TOLERANCE)

    for bank, name in (
        (model.build_reference_bank(), "zero_shot"),
        (model.build_reference_bank(references), "few_shot"),
    ):
        bank.tensors["text_embeddings"] = official["text_features"]
        output = model(pixels, reference_bank=bank)
        torch.testing.assert_close(output.image_scores, official[f"{name}.image_scores"], **SCORE_TOLERANCE)
        torch.testing.assert_close(output.anomaly_maps, official[f"{name}.anomaly_maps"], **SCORE_TOLERANCE)


@pytest.mark.convert
@torch.no_grad()
def test_converted_model_reproduces_the_official_outputs_end_to_end(official, tmp_path):
    """With CLIP's BPE tokenizer (open_clip's vocabulary file) the prompts get the official token ids, and the
    converted model's own text features, scores and maps equal the official ones."""
    open_clip = pytest.importorskip("open_clip", reason="needs the `convert` extra (open_clip_torch)")
    from hf_fsad.backbones.convert import tokenizer_from_bpe

    tokenizer = tokenizer_from_bpe(open_clip.tokenizer.default_bpe())
    model = converted_model(official, tmp_path, tokenizer)
    for prompt, official_ids in zip(model.config.state_prompts, official["prompt_token_ids"]):
        assert tokenizer(prompt)["input_ids"] == official_ids[official_ids > 0].tolist()
    torch.testing.assert_close(model.text_embeddings(), official["text_features"], **TOKEN_TOLERANCE)
    zero_shot = model(official["pixels"])
    few_shot = model(official["pixels"], reference_bank=model.build_reference_bank(official["references"]))
    for output, name in ((zero_shot, "zero_shot"), (few_shot, "few_shot")):
        torch.testing.assert_close(output.image_scores, official[f"{name}.image_scores"], **SCORE_TOLERANCE)
        torch.testing.assert_close(output.anomaly_maps, official[f"{name}.anomaly_maps"], **SCORE_TOLERANCE)
