"""Gallery of the synthetic anomaly types (hf_fsad.synthesis) on toy textures and a real ELPV solar cell.

.venv/bin/python benchmarks/synthesis_gallery.py --out docs/synthesis_gallery.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib
import numpy as np

from hf_fsad.data import load_benchmark
from hf_fsad.synthesis import SYNTHESIS_KINDS, synthesize

matplotlib.use("Agg")
from matplotlib import pyplot as plt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--size", type=int, default=160)
    args = parser.parse_args()
    toy = load_benchmark("toy", num_train=1, num_test_good=0, num_test_anomalous=0, image_size=args.size)
    images = [(f"toy {row['category']}", row["image"]) for row in toy["train"]]
    elpv = load_benchmark("elpv")["train"]
    images.append(("ELPV cell", elpv[0]["image"].convert("RGB").resize((args.size, args.size))))
    figure, axes = plt.subplots(
        len(images), 1 + len(SYNTHESIS_KINDS), figsize=(2 * (1 + len(SYNTHESIS_KINDS)), 2 * len(images))
    )
    for row, (name, image) in enumerate(images):
        axes[row, 0].imshow(image)
        axes[row, 0].set_title(name, fontsize=9)
        for column, kind in enumerate(SYNTHESIS_KINDS, start=1):
            anomalous, mask = synthesize(image, kind, np.random.default_rng(row * 10 + column))
            axes[row, column].imshow(anomalous)
            axes[row, column].contour(mask, levels=[0.5], colors="red", linewidths=0.6)
            axes[row, column].set_title(kind, fontsize=9)
    for axis in axes.flat:
        axis.axis("off")
    figure.suptitle("Synthetic anomalies (red: the exact mask)", fontsize=10)
    figure.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(args.out, dpi=80)


if __name__ == "__main__":
    main()
