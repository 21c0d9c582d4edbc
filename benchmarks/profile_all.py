"""Every method's cost, side by side in one run: `hf-fsad benchmark --profile` on one shared backbone.

    .venv/bin/python benchmarks/profile_all.py --out benchmarks/profile_all [--layers 12] [--repeats 2]

All methods sit on the same random ViT-B-16-plus-240-sized CLIP (`--layers` vision blocks; 12 is the real
depth; the byte-level test tokenizer, about 3x the tokens of CLIP's BPE, so prompt setup is an upper bound)
and are saved, then profiled by the CLI on ELPV images (real solar-cell images, offline). No pretrained
weights can be fetched here: the figures are costs, not accuracy. VTFusion is fitted inside the profile
(`--fit-steps` updates timed). One-to-Normal personalizes every query with the tests' tiny random Stable
Diffusion pipeline (32 px, `pool_size` 3), so its row shows its CLIP side plus a toy diffusion; its cost at
the paper's settings is extrapolated in benchmarks/results/one_to_normal_profile.md.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hf_fsad.cli import main as cli
from hf_fsad.registry import method_spec
from hf_fsad.testing import byte_level_clip_tokenizer, save_tiny_diffusion_pipeline, vit_b16_plus_240_config

# Windowless methods first: rows are written as each method finishes, and windows cost ~12x more.
METHODS = ["metacan", "afclip", "vtfusion", "one_to_normal", "winclip", "anomalous_memory"]


def save_methods(folder: Path, layers: int) -> list[str]:
    """Every method on one random CLIP, saved; returns LABEL=DIRECTORY arguments for the CLI."""
    torch.manual_seed(0)
    clip_config = vit_b16_plus_240_config(layers)
    shared = None
    arguments = []
    for method in METHODS:
        extra = {}
        fields = method_spec(method).config.__dataclass_fields__
        if layers < 12 and "feature_layers" in fields:
            extra["feature_layers"] = [layers]  # a shallow tower for a quick check of the script
        if "diffusion_model" in fields:  # a method that personalizes queries by diffusion (One-to-Normal)
            extra = {
                "diffusion_model": save_tiny_diffusion_pipeline(folder / "tiny_sd"),
                "diffusion_resolution": 32,
                "pool_size": 3,
            }
        model = method_spec(method).model(method_spec(method).config(clip_config=clip_config, **extra)).eval()
        if shared is None:
            shared = model.backbone.clip.state_dict()
        model.backbone.load_clip_weights(shared)
        model.tokenizer = byte_level_clip_tokenizer()
        model.save_pretrained(folder / method)
        arguments.append(f"{method}={folder / method}")
    return arguments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as folder:
        methods = save_methods(Path(folder), args.layers)
        cli(["benchmark", "--methods", *methods, "--datasets", "elpv", "--profile",
             "--profile-repeats", str(args.repeats), "--out", str(args.out)])  # fmt: skip


if __name__ == "__main__":
    main()
