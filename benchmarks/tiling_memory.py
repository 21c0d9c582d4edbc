"""Peak memory of tiled scoring on a 20 Mpx image, per tile batch size.

    .venv/bin/python benchmarks/tiling_memory.py --out benchmarks/results

A tiny random WinCLIP+ (`hf_fsad.testing.tiny_clip_config`, 240 px input), so the model's weights stay small
and what scoring a large image costs shows. The 5472 x 3648 image (20.0 Mpx) is cut into tiles of the model's
input size (240 px, side by side: 23 x 16 = 368 tiles) and scored against a pooled bank of one 960 x 960
reference's 16 tiles. Each batch size (368: all tiles in one batch, for comparison) runs in its own process,
which reports its maximum resident set before scoring (model, bank and image ready) and after, and the seconds
scoring took.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

WIDTH, HEIGHT = 5472, 3648
BATCH_SIZES = (1, 8, 32, 368)  # 368: every tile at once, what streaming avoids


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def _image(width: int, height: int, seed: int) -> Image.Image:
    """A colour gradient with uint8 noise, built without a float copy of the image."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 64, (height, width, 3), dtype=np.uint8)
    pixels[..., 0] += np.linspace(0, 191, width).astype(np.uint8)[None, :]
    pixels[..., 1] += np.linspace(0, 191, height).astype(np.uint8)[:, None]
    return Image.fromarray(pixels)


def measure(batch_size: int) -> dict:
    """Score the 20 Mpx image tiled, `batch_size` tiles at a time, in this process."""
    import torch

    from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config
    from hf_fsad.tiled_scoring import build_tiled_bank, score_tiled
    from hf_fsad.tiling import Tiling

    torch.manual_seed(0)
    model = WinClipModel(WinClipConfig(clip_config=tiny_clip_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    tiling = Tiling(model.config.image_size)
    bank = build_tiled_bank(model, [_image(960, 960, seed=1)], tiling, "texture")
    image = _image(WIDTH, HEIGHT, seed=2)
    before = _peak_rss_mb()
    start = time.perf_counter()
    output = score_tiled(model, image, bank, batch_size=batch_size)
    seconds = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "tiles": len(tiling.boxes(HEIGHT, WIDTH)),
        "map_shape": list(output.anomaly_maps.shape),
        "peak_rss_before_scoring_mb": round(before),
        "peak_rss_mb": round(_peak_rss_mb()),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--batch-size", type=int, help="measure this batch size in this process (internal)")
    args = parser.parse_args()
    if args.batch_size is not None:
        print(json.dumps(measure(args.batch_size)))
        return
    rows = []
    for batch_size in BATCH_SIZES:
        command = [sys.executable, __file__, "--batch-size", str(batch_size)]
        rows.append(json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout))
        print(rows[-1], flush=True)
    table = [
        "| tile batch | tiles | peak resident memory (MB) | of which scoring added (MB) | seconds |",
        "|---|---|---|---|---|",
    ]
    table += [
        f"| {r['batch_size']} | {r['tiles']} | {r['peak_rss_mb']} | "
        f"{r['peak_rss_mb'] - r['peak_rss_before_scoring_mb']} | {r['seconds']} |"
        for r in rows
    ]
    print("\n".join(table))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tiling_memory.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "tiling_memory.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
