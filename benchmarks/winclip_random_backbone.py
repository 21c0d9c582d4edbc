"""WinCLIP+ through `hf-fsad benchmark` on real data offline, on a randomly initialised backbone.

    .venv/bin/python benchmarks/winclip_random_backbone.py elpv --layers 1 --out benchmarks/elpv_winclip
    .venv/bin/python benchmarks/winclip_random_backbone.py profile --layers 12 --out benchmarks/profile_winclip

No pretrained CLIP can be downloaded here, so the model is WinCLIP on a random ViT-B-16-plus-240-sized CLIP
(`--layers` vision blocks; 12 is the real depth) with the byte-level test tokenizer. The ELPV scores show the
runner working end to end on real images, not WinCLIP's accuracy; timings and cache figures are real.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hf_fsad.cli import main as cli
from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config


def save_random_winclip(directory: Path, layers: int) -> Path:
    torch.manual_seed(0)
    model = WinClipModel(WinClipConfig(clip_config=vit_b16_plus_240_config(layers)))
    model.tokenizer = byte_level_clip_tokenizer()
    model.save_pretrained(directory)
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["elpv", "profile"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = str(save_random_winclip(Path(folder) / "winclip", args.layers))
        common = ["benchmark", "--methods", f"winclip={model}", "--out", str(args.out)]
        if args.job == "elpv":
            title = (
                f"WinCLIP+ on ELPV, random ViT-B-16-plus-240-sized backbone ({args.layers} vision blocks): "
                "the pipeline working, not WinCLIP's accuracy"
            )
            argv = [*common, "--datasets", "elpv", "--k", "2", "4", "8", "--seeds", "0", "1", "2", "--title", title]
        else:
            argv = [*common, "--datasets", "elpv:", "--profile", "--batch-size", "4"]
        cli(argv)


if __name__ == "__main__":
    main()
