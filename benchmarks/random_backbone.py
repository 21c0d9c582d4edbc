"""Benchmark runs offline on real (ELPV) and toy data, on a randomly initialised backbone.

    .venv/bin/python benchmarks/random_backbone.py winclip-elpv --layers 1 --out benchmarks/elpv_winclip
    .venv/bin/python benchmarks/random_backbone.py anomalous-toy --layers 1 --out benchmarks/anomalous_memory_toy
    .venv/bin/python benchmarks/random_backbone.py anomalous-elpv --layers 1 --out benchmarks/anomalous_memory_elpv

No pretrained CLIP can be downloaded here, so the models sit on one random ViT-B-16-plus-240-sized CLIP
(`--layers` vision blocks; 12 is the real depth) with the byte-level test tokenizer. Scores show the runner
and methods working end to end, not their accuracy; timings and cache figures are real.

The anomalous jobs follow the anomalous-memory paper's protocol: per class and seed one anomalous
reference (drawn from the test split) and one normal validation sample, up to 100 test images, 3 seeds;
WinCLIP+ with one normal reference is scored on the same test images.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from hf_fsad.cli import main as cli
from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config

CAVEAT = "random ViT-B-16-plus-240-sized backbone ({layers} vision blocks): the pipeline working, not the methods' accuracy"
ANOMALOUS_PROTOCOL = [
    "--anomalous",
    "0",
    "1",
    "--validation",
    "1",
    "--max-test",
    "100",
    "--seeds",
    "0",
    "1",
    "2",
]


def save_random_models(folder: Path, layers: int) -> tuple[str, str]:
    """WinCLIP and the anomalous memory on the same random CLIP, saved; returns their directories."""
    torch.manual_seed(0)
    clip_config = vit_b16_plus_240_config(layers)
    winclip = WinClipModel(WinClipConfig(clip_config=clip_config))
    memory = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=clip_config))
    memory.backbone.load_state_dict(winclip.backbone.state_dict())
    directories = []
    for name, model in (("winclip", winclip), ("anomalous_memory", memory)):
        model.tokenizer = byte_level_clip_tokenizer()
        model.save_pretrained(folder / name)
        directories.append(str(folder / name))
    return directories[0], directories[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("job", choices=["winclip-elpv", "anomalous-toy", "anomalous-elpv"])
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    caveat = CAVEAT.format(layers=args.layers)
    with tempfile.TemporaryDirectory() as folder:
        winclip, memory = save_random_models(Path(folder), args.layers)
        if args.job == "winclip-elpv":
            argv = ["--methods", f"winclip={winclip}", "--datasets", "elpv", "--k", "2", "4", "8",
                    "--seeds", "0", "1", "2", "--title", f"WinCLIP+ on ELPV, {caveat}"]  # fmt: skip
        elif args.job == "anomalous-toy":
            # Toy masks are exact, so one annotated defect alone (k=0) can give both memories.
            argv = ["--methods", f"winclip={winclip}", f"anomalous_memory={memory}", "--datasets", "toy",
                    "--k", "0", "1", *ANOMALOUS_PROTOCOL,
                    "--title", f"Anomalous memory vs WinCLIP+ on toy textures, {caveat}"]  # fmt: skip
        else:
            # ELPV has no pixel masks: the anomalous reference goes wholly to the anomalous memory, so the
            # normal memory needs a normal reference (k=1 only).
            argv = ["--methods", f"winclip={winclip}", f"anomalous_memory={memory}", "--datasets", "elpv",
                    "--k", "1", *ANOMALOUS_PROTOCOL,
                    "--title", f"Anomalous memory vs WinCLIP+ on ELPV, {caveat}"]  # fmt: skip
        cli(["benchmark", *argv, "--out", str(args.out)])


if __name__ == "__main__":
    main()
