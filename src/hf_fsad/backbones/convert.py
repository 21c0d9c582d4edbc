"""open_clip checkpoint -> `transformers.CLIPModel` + `CLIPTokenizer` + image processor config.

The papers' backbones (OpenCLIP ViT-B-16-plus-240 on LAION-400M, OpenAI ViT-L-14-336) become ordinary
`save_pretrained` directories that every hf_fsad method loads with `from_clip`. Needs the `convert` extra
(open_clip_torch) only when reading open_clip models; the mapping itself is plain torch.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch
from transformers import CLIPConfig, CLIPImageProcessorPil, CLIPModel, CLIPTokenizer

BOS_TOKEN, EOS_TOKEN = "<|startoftext|>", "<|endoftext|>"
# open_clip's BPE file: a header line, then the merges it uses.
NUM_BPE_MERGES = 49152 - 256 - 2


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode character table (the byte-level BPE alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    characters = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            characters.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, characters)))


def tokenizer_from_bpe(bpe_path: str | os.PathLike, context_length: int = 77) -> CLIPTokenizer:
    """Build the CLIP tokenizer from the gzipped BPE merges file that open_clip ships.

    Vocabulary order as CLIP's: 256 byte characters, the same with `</w>`, one token per merge, then the
    start and end tokens (ids 49406 and 49407 for the standard file).
    """
    with gzip.open(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_BPE_MERGES + 1]]
    alphabet = list(bytes_to_unicode().values())
    tokens = alphabet + [character + "</w>" for character in alphabet] + ["".join(merge) for merge in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=context_length)


def _check_supported(model) -> None:
    visual = model.visual
    unsupported = {
        "attentional pooling": getattr(visual, "attn_pool", None) is not None,
        "a final LayerNorm after pooling": getattr(visual, "final_ln_after_pool", False),
        "pooling other than the class token": getattr(visual, "pool_type", "tok") != "tok",
        "no LayerNorm before the transformer": isinstance(getattr(visual, "ln_pre", None), torch.nn.Identity),
        "text pooling other than argmax/eos": getattr(model, "text_pool_type", "argmax")
        not in ("argmax", "eos"),
        "layer scale": not isinstance(visual.transformer.resblocks[0].ls_1, torch.nn.Identity),
    }
    found = [name for name, present in unsupported.items() if present]
    if not hasattr(model, "token_embedding"):
        found.append("a text tower other than open_clip's built-in transformer")
    if found:
        raise ValueError(
            f"This open_clip model cannot be expressed as a transformers CLIPModel: {', '.join(found)}."
        )


def clip_config_from_open_clip(model) -> CLIPConfig:
    """The `CLIPConfig` of an instantiated open_clip `CLIP` model (read from its modules)."""
    _check_supported(model)
    visual = model.visual
    vision_block = visual.transformer.resblocks[0]
    text_block = model.transformer.resblocks[0]
    quick_gelu = type(vision_block.mlp.gelu).__name__ == "QuickGELU"
    vision_width = visual.conv1.out_channels
    text_width = model.token_embedding.embedding_dim
    patch_size = visual.conv1.kernel_size[0]
    grid = visual.grid_size[0]
    return CLIPConfig(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": vision_block.mlp.c_fc.out_features,
            "num_hidden_layers": len(visual.transformer.resblocks),
            "num_attention_heads": vision_block.attn.num_heads,
            "image_size": grid * patch_size,
            "patch_size": patch_size,
            "hidden_act": "quick_gelu" if quick_gelu else "gelu",
            "layer_norm_eps": visual.ln_pre.eps,
        },
        text_config={
            "hidden_size": text_width,
            "intermediate_size": text_block.mlp.c_fc.out_features,
            "num_hidden_layers": len(model.transformer.resblocks),
            "num_attention_heads": text_block.attn.num_heads,
            "vocab_size": model.vocab_size,
            "max_position_embeddings": model.context_length,
            "hidden_act": "quick_gelu" if quick_gelu else "gelu",
            "layer_norm_eps": model.ln_final.eps,
            "bos_token_id": model.vocab_size - 2,
            "eos_token_id": model.vocab_size - 1,
            "pad_token_id": model.vocab_size - 1,
        },
        projection_dim=visual.proj.shape[1],
        logit_scale_init_value=float(model.logit_scale.detach()),
    )


def _convert_blocks(state: dict, source: str, target: str, num_layers: int) -> dict[str, torch.Tensor]:
    converted = {}
    for index in range(num_layers):
        old, new = f"{source}.resblocks.{index}", f"{target}.layers.{index}"
        for name in ("weight", "bias"):
            query, key, value = state[f"{old}.attn.in_proj_{name}"].chunk(3)
            converted[f"{new}.self_attn.q_proj.{name}"] = query
            converted[f"{new}.self_attn.k_proj.{name}"] = key
            converted[f"{new}.self_attn.v_proj.{name}"] = value
            for old_name, new_name in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("ln_1", "layer_norm1"),
                ("ln_2", "layer_norm2"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                converted[f"{new}.{new_name}.{name}"] = state[f"{old}.{old_name}.{name}"]
    return converted


def convert_state_dict(state: dict[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    """Map an open_clip `CLIP` state dict onto `CLIPModel` parameter names."""
    converted = {
        "vision_model.embeddings.patch_embedding.weight": state["visual.conv1.weight"],
        "vision_model.embeddings.class_embedding": state["visual.class_embedding"],
        "vision_model.embeddings.position_embedding.weight": state["visual.positional_embedding"],
        "visual_projection.weight": state["visual.proj"].T,
        "text_model.embeddings.token_embedding.weight": state["token_embedding.weight"],
        "text_model.embeddings.position_embedding.weight": state["positional_embedding"],
        "text_projection.weight": state["text_projection"].T,
        "logit_scale": state["logit_scale"].reshape(()),
    }
    for name in ("weight", "bias"):
        converted[f"vision_model.pre_layrnorm.{name}"] = state[f"visual.ln_pre.{name}"]
        converted[f"vision_model.post_layernorm.{name}"] = state[f"visual.ln_post.{name}"]
        converted[f"text_model.final_layer_norm.{name}"] = state[f"ln_final.{name}"]
    converted |= _convert_blocks(
        state, "visual.transformer", "vision_model.encoder", config.vision_config.num_hidden_layers
    )
    converted |= _convert_blocks(
        state, "transformer", "text_model.encoder", config.text_config.num_hidden_layers
    )
    return {name: tensor.detach().clone().contiguous() for name, tensor in converted.items()}


def clip_from_open_clip_model(model) -> CLIPModel:
    """A `CLIPModel` with the weights of an instantiated open_clip `CLIP` model."""
    config = clip_config_from_open_clip(model)
    clip = CLIPModel(config)
    missing, unexpected = clip.load_state_dict(convert_state_dict(model.state_dict(), config), strict=False)
    missing = [name for name in missing if not name.endswith("position_ids")]
    if missing or unexpected:
        raise RuntimeError(
            f"Conversion left parameters unmatched: missing {missing}, unexpected {unexpected}."
        )
    return clip.eval()


def image_processor_for(model, config: CLIPConfig) -> CLIPImageProcessorPil:
    """The image processor matching an open_clip model's preprocessing (bicubic resize + center crop)."""
    preprocess = getattr(model.visual, "preprocess_cfg", {}) or {}
    size = config.vision_config.image_size
    return CLIPImageProcessorPil(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=list(preprocess.get("mean", CLIPImageProcessorPil.image_mean)),
        image_std=list(preprocess.get("std", CLIPImageProcessorPil.image_std)),
    )


def convert_open_clip(model_name: str, pretrained: str | None, output_dir: str | os.PathLike) -> Path:
    """Convert `open_clip.create_model(model_name, pretrained)` and save it to `output_dir`.

    The directory then holds `config.json` + `model.safetensors`, the tokenizer and the image processor
    config, and loads with `CLIPModel.from_pretrained` or any method's `from_clip`.
    """
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(
            "Converting open_clip checkpoints needs the `convert` extra: pip install 'hf-fsad[convert]'."
        ) from error

    model = open_clip.create_model(model_name, pretrained=pretrained).eval()
    clip = clip_from_open_clip_model(model)
    output_dir = Path(output_dir)
    clip.save_pretrained(output_dir)
    tokenizer_from_bpe(open_clip.tokenizer.default_bpe(), model.context_length).save_pretrained(output_dir)
    image_processor_for(model, clip.config).save_pretrained(output_dir)
    return output_dir
