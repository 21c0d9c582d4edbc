"""Images/s of `hf-fsad score`'s engines side by side: the local engine, and Ray with 1 and 2 scoring actors,
for WinCLIP+ and MetaCAN on a tiny and a paper-sized (ViT-B/16+ at 240 px, random weights) backbone.

    python benchmarks/ray_throughput.py --images 24 --sizes tiny --out benchmarks/results
    python benchmarks/ray_throughput.py --images 8 --sizes paper --methods metacan --out benchmarks/results

Each figure is the wall time of scoring the same `--images` random images against a bank of 2 references,
after one warm-up run of the same engine (Ray: cluster started, actors created, model put in the object
store: that start-up is reported apart). The local engine is `score_paths` of the CLI's own loop, timed
in this process; Ray's is `hf_fsad.ray_engine.score_to_file`. On a 2-core machine the second actor competes
with the first for the same cores: its figure measures Ray's overhead and contention, not scaling.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import torch
from PIL import Image

from hf_fsad.batch_scoring import RecordOptions, batch_scorer, image_record
from hf_fsad.calibration_policy import calibrated_bank
from hf_fsad.io import batched, read_image
from hf_fsad.models.metacan.configuration_metacan import MetaCanConfig
from hf_fsad.models.metacan.modeling_metacan import MetaCanModel
from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.ray_engine import RayResources, score_to_file
from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config, vit_b16_plus_240_config

METHODS = {"winclip": (WinClipModel, WinClipConfig), "metacan": (MetaCanModel, MetaCanConfig)}
# MetaCAN's layers and heads as its tests size them, for the 2-block tiny backbone (untrained: costs only).
TINY_OPTIONS = {
    "metacan": {"feature_layers": [1, 2], "differentiator_hidden_size": 16, "detector_hidden_sizes": [8, 4]}
}


def build(method: str, size: str):
    model_class, config_class = METHODS[method]
    clip = tiny_clip_config() if size == "tiny" else vit_b16_plus_240_config()
    torch.manual_seed(0)
    options = TINY_OPTIONS.get(method, {}) if size == "tiny" else {}
    model = model_class(config_class(clip_config=clip, **options))
    model.tokenizer = byte_level_clip_tokenizer()
    return model.eval()


def local_images_per_second(model, bank, paths, batch_size: int) -> float:
    """The local engine's loop (read, preprocess, score, record) over `paths`, in this process."""
    scorer, processor, options = batch_scorer(model, bank), model.image_processor(), RecordOptions()
    started = time.perf_counter()
    for batch in batched(paths, batch_size):
        images = [read_image(path) for path in batch]
        result = scorer(processor(images, return_tensors="pt").pixel_values)
        for index, (path, image) in enumerate(zip(batch, images)):
            image_record(path, image, result, index, bank.calibration, options)
    return len(paths) / (time.perf_counter() - started)


def ray_images_per_second(
    model, bank, paths, batch_size: int, workers: int, folder: Path
) -> tuple[float, float]:
    """(images/s of a warm run, seconds of the first run's start-up beyond it) with `workers` actors."""
    resources = RayResources(num_workers=workers, num_cpus=0.5)
    times = []
    for run in range(2):
        started = time.perf_counter()
        score_to_file(
            paths,
            model,
            bank,
            folder / f"ray{workers}-{run}.jsonl",
            resources=resources,
            batch_size=batch_size,
        )
        times.append(time.perf_counter() - started)
    return len(paths) / times[1], times[0] - times[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--sizes", nargs="+", default=["tiny", "paper"], choices=["tiny", "paper"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    folder = Path(tempfile.mkdtemp())
    rng = np.random.default_rng(0)
    paths = []
    for index in range(args.images + 2):
        path = folder / f"{index:03d}.png"
        Image.fromarray(rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    references, queries = paths[:2], paths[2:]
    rows = []
    for size in args.sizes:
        for method in args.methods:
            model = build(method, size)
            bank = calibrated_bank(model, [read_image(path) for path in references], calibrate=False).bank
            local_images_per_second(model, bank, queries[: args.batch_size], args.batch_size)  # warm-up
            row = {"method": method, "backbone": size, "images": len(queries), "batch_size": args.batch_size}
            row["bank_mb"] = sum(t.numel() * t.element_size() for t in bank.tensors.values()) / 1e6
            row["model_mb"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 1e6
            row["local"] = local_images_per_second(model, bank, queries, args.batch_size)
            for workers in (1, 2):
                rate, start_up = ray_images_per_second(model, bank, queries, args.batch_size, workers, folder)
                row[f"ray_{workers}"], row[f"ray_{workers}_start_up_s"] = rate, start_up
            print(json.dumps(row), flush=True)
            rows.append(row)
            write(Path(args.out), rows)


def write(out: Path, rows: list[dict]) -> None:
    """The rows so far and the machine, into OUT/ray_throughput.json (a run cut short keeps its rows)."""
    machine = {
        "processor": platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
    }
    flags = (
        Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
        if Path("/proc/cpuinfo").exists()
        else ""
    )
    machine["simd"] = sorted(
        {flag for flag in flags.split() if flag.startswith(("avx", "sse4", "amx", "fma"))}
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "ray_throughput.json").write_text(json.dumps({"machine": machine, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
