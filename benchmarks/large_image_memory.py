"""Peak resident memory of `hf-fsad score` (with a full-size heatmap) as the input image grows.

    .venv/bin/python benchmarks/large_image_memory.py --out benchmarks/results

Each size is scored by its own `hf-fsad score` process on a tiny random WinCLIP, so what grows with the
image (decoding, the processor, the full-size map and heatmap) is not hidden under a large model's weights;
a baseline row at 240x240 gives the process's fixed cost. Peak memory is the child's maximum resident set.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from hf_fsad.testing import save_random_clip, tiny_clip_config

SIZES = {
    "0.06 Mpx (240x240)": (240, 240),
    "1 Mpx": (1200, 900),
    "16 Mpx": (4800, 3600),
    "108 Mpx": (12000, 9000),
}

_MEASURE = """
import resource, subprocess, sys
status = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
print(status, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
"""


def _gradient(width: int, height: int) -> Image.Image:
    """A smooth colour image (compresses well, decodes to the full size like any other)."""
    red = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    green = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.dstack([red, green, 255 - red]).astype(np.uint8))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        from hf_fsad.models.winclip.modeling_winclip import WinClipModel

        WinClipModel.from_clip(save_random_clip(tiny_clip_config(), folder / "clip")).save_pretrained(
            folder / "model"
        )
        for label, (width, height) in SIZES.items():
            image = folder / f"{width}x{height}.png"
            _gradient(width, height).save(image, compress_level=1)
            command = [sys.executable, "-m", "hf_fsad.cli", "score", "--model", str(folder / "model")]
            command += ["--output", str(folder / "out.jsonl"), "--heatmaps", str(folder / "maps")]
            command += ["--max-pixels", "0", str(image)]
            status, kilobytes = subprocess.run(
                [sys.executable, "-c", _MEASURE, *command], capture_output=True, text=True, check=True
            ).stdout.split()
            if status != "0":
                raise RuntimeError(f"hf-fsad score failed on {label} (exit status {status})")
            rows.append(
                {"image": label, "width": width, "height": height, "peak_rss_mb": int(kilobytes) / 1024}
            )
            print(f"{label}: peak resident memory {rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
            image.unlink()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "large_image_memory.json").write_text(json.dumps(rows, indent=1) + "\n")
    table = ["| image | peak resident memory (MB) | above the 240x240 baseline (MB) |", "|---|---|---|"]
    base = rows[0]["peak_rss_mb"]
    table += [f"| {r['image']} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} |" for r in rows]
    (args.out / "large_image_memory.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
