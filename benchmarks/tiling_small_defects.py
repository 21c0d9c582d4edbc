"""Small defects in large images, tiled vs untiled: image AUROC, pixel AUROC and AUPRO, cost and peak memory.

    .venv/bin/python benchmarks/tiling_small_defects.py --out benchmarks/results

Data: toy stripes (`hf_fsad.data.toy_records`) generated at 1440 x 1440 px (2.1 Mpx) with scratch defects only,
whose masks cover about 0.1-0.2 % of the image (the table states the measured range): a scratch 5-8 px wide
becomes about one pixel of the model's 240 px input when the whole image is squashed. 2 normal references, 4 normal
and 4 anomalous test images. Methods: WinCLIP+ (k-shot, training-free) and MetaCAN (single pass; its
trained layers random here) on one small random CLIP (`hf_fsad.testing.small_clip_config`, 240 px) with the
byte-level test tokenizer. Random weights: the comparison between untiled and tiled rows, not the absolute
accuracy, is the result.

Each (method, tiling) runs in its own process: untiled (the image resized whole to 240 px, its map resized
back bilinearly), tiled by 240 px tiles side by side (6 x 6 = 36 tiles per image) and overlapping (stride 160,
9 x 9 = 81 tiles, the last ones flush with the border), pooled banks, 8 tiles per batch. Metrics at the
images' full 1440 x 1440 resolution. Cost: wall seconds per test image on this machine's CPU threads; memory: the process's peak resident set, and how
much scoring the test images added to it (model, bank and the decoded images already loaded; the images are
generated once, by the parent process, and read from PNG files).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SIZE = 1440
TILE = 240
SETTINGS = {"untiled": None, "tiled 240": TILE, "tiled 240, stride 160": 160}  # name -> tile stride
# method -> config fields fitting the two-block CLIP (MetaCAN's as its tests' tiny model)
METHODS = {
    "winclip": {},
    "metacan": {"feature_layers": [1, 2], "differentiator_hidden_size": 16, "detector_hidden_sizes": [8, 4]},
}
NUM_REFERENCES, NUM_GOOD, NUM_ANOMALOUS = 2, 4, 4
BATCH_SIZE = 8


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def write_data(folder: Path) -> None:
    """The references, test images and masks as PNG files in `folder`, with the test labels (labels.json)."""
    from hf_fsad.data.toy import toy_records

    records = toy_records(
        "stripes",
        NUM_REFERENCES,
        NUM_GOOD,
        NUM_ANOMALOUS,
        image_size=IMAGE_SIZE,
        defects=("scratch",),
        seed=0,
    )
    for index, record in enumerate(records["train"]):
        record.image.save(folder / f"reference_{index}.png")
    for index, record in enumerate(records["test"]):
        record.image.save(folder / f"test_{index}.png")
        mask = record.mask or Image.new("L", record.image.size)
        mask.save(folder / f"mask_{index}.png")
    (folder / "labels.json").write_text(json.dumps([record.label for record in records["test"]]))


def read_data(folder: Path):
    """(references, test images, labels (N,), boolean masks (N, H, W)) as `write_data` wrote them."""
    labels = np.array(json.loads((folder / "labels.json").read_text()))

    def read(name: str) -> Image.Image:
        with Image.open(folder / name) as image:
            return image.convert("RGB")

    references = [read(f"reference_{index}.png") for index in range(NUM_REFERENCES)]
    images = [read(f"test_{index}.png") for index in range(len(labels))]
    masks = np.stack(
        [np.asarray(Image.open(folder / f"mask_{index}.png")) > 127 for index in range(len(labels))]
    )
    return references, images, labels, masks


def _model(method: str):
    import torch

    from hf_fsad.registry import method_spec
    from hf_fsad.testing import byte_level_clip_tokenizer, small_clip_config

    torch.manual_seed(0)
    spec = method_spec(method)
    model = spec.model(spec.config(clip_config=small_clip_config(image_size=TILE), **METHODS[method]))
    model.tokenizer = byte_level_clip_tokenizer()
    return model.eval()


def measure(method: str, setting: str, data: Path) -> dict:
    """Score the test images in `data` with `method` as `setting` says, in this process; metrics at full
    resolution."""
    import warnings

    import torch

    from hf_fsad.metrics import image_auroc, pixel_aupro, pixel_auroc
    from hf_fsad.tiled_scoring import build_tiled_bank, resized_maps, score_tiled
    from hf_fsad.tiling import Tiling

    warnings.filterwarnings("ignore", message=".*untrained.*")  # random weights, said in the table
    references, images, labels, masks = read_data(data)
    model = _model(method)
    stride = SETTINGS[setting]
    with torch.no_grad():
        if stride is None:
            processor = model.image_processor()
            bank = model.build_reference_bank(
                processor(references, return_tensors="pt").pixel_values, class_name="textured surface"
            )
        else:
            tiling = Tiling(TILE, stride)
            bank = build_tiled_bank(model, references, tiling, "textured surface", batch_size=BATCH_SIZE)
        before = _peak_rss_mb()
        start = time.perf_counter()
        scores, maps = [], []
        for image in images:
            if stride is None:
                output = model(processor([image], return_tensors="pt").pixel_values, reference_bank=bank)
                full_map = resized_maps(output.anomaly_maps, IMAGE_SIZE, IMAGE_SIZE)[0]
            else:
                output = score_tiled(model, image, bank, batch_size=BATCH_SIZE)
                full_map = output.anomaly_maps[0]
            scores.append(output.image_scores.item())
            maps.append(full_map.numpy())
        seconds = time.perf_counter() - start
    peak = _peak_rss_mb()
    maps = np.stack(maps)
    return {
        "method": method,
        "setting": setting,
        "tiles_per_image": 1 if stride is None else len(tiling.boxes(IMAGE_SIZE, IMAGE_SIZE)),
        "image_auroc": image_auroc(labels, np.array(scores)),
        "pixel_auroc": pixel_auroc(masks, maps),
        "pixel_aupro": pixel_aupro(masks, maps),
        "seconds_per_image": seconds / len(images),
        "peak_rss_mb": round(peak),
        "scoring_added_mb": round(peak - before),
        "defect_area_percent": [float(100 * m.mean()) for m in masks[labels == 1]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--method", choices=METHODS, help="measure one method in this process (internal)")
    parser.add_argument("--setting", choices=list(SETTINGS), help="with --method (internal)")
    parser.add_argument("--data", type=Path, help="with --method: the images `write_data` wrote (internal)")
    args = parser.parse_args()
    if args.method is not None:
        print(json.dumps(measure(args.method, args.setting, args.data)))
        return
    rows = []
    with tempfile.TemporaryDirectory() as data:
        write_data(Path(data))
        for method in METHODS:
            for setting in SETTINGS:
                command = [sys.executable, __file__, "--method", method, "--setting", setting, "--data", data]
                completed = subprocess.run(command, capture_output=True, text=True, check=False)
                if completed.returncode != 0:
                    sys.exit(completed.stderr)
                rows.append(json.loads(completed.stdout.splitlines()[-1]))
                print(rows[-1], flush=True)
    areas = rows[0]["defect_area_percent"]
    table = [
        (
            f"{IMAGE_SIZE} x {IMAGE_SIZE} px toy stripes, {NUM_ANOMALOUS} scratches of {min(areas):.3f}-{max(areas):.3f} % "
            f"of the image area, {NUM_GOOD} normal images, k = {NUM_REFERENCES}; small random CLIP (240 px): the "
            "comparison, not the accuracy, is the result. Metrics x100 at full resolution."
        ),
        "",
        (
            "| method | scoring | tiles per image | image AUROC | pixel AUROC | AUPRO | s per image | peak memory (MB) "
            "| scoring added (MB) |"
        ),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"winclip": "WinCLIP+", "metacan": "MetaCAN (random)"}
    table += [
        f"| {names[r['method']]} | {r['setting']} | {r['tiles_per_image']} | {100 * r['image_auroc']:.1f} | "
        f"{100 * r['pixel_auroc']:.1f} | {100 * r['pixel_aupro']:.1f} | {r['seconds_per_image']:.2f} | "
        f"{r['peak_rss_mb']} | {r['scoring_added_mb']} |"
        for r in rows
    ]
    print("\n".join(table))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "tiling_small_defects.json").write_text(json.dumps(rows, indent=1) + "\n")
        (args.out / "tiling_small_defects.md").write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
