"""How often VTFusion's Eq. 4 hinge (AFS) is active during a toy fit: per update, the share of the synthetic
defects' locations whose distance D to the nearest prototype is below the margin (r + alpha)^2, and L_AFS.

    python benchmarks/vtfusion_separation_margin.py --steps 60 > benchmarks/results/vtfusion_separation_margin.json

Random small backbone, toy "weave", k = 4, the toy recipe's rates. Prints a JSON summary (docs/faithfulness.md,
"Training recipes and settings", quotes it).
"""

from __future__ import annotations

import argparse
import json
import tempfile

import numpy as np
import torch

from hf_fsad.data import load_benchmark
from hf_fsad.models.vtfusion import training_vtfusion
from hf_fsad.models.vtfusion.modeling_vtfusion import VtFusionModel
from hf_fsad.testing import save_random_clip, small_clip_config


def measure(steps: int, distance: str, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory() as clip_dir:
        save_random_clip(small_clip_config(), clip_dir)
        model = VtFusionModel.from_clip(clip_dir, feature_layers=[1, 2], distance=distance)
    normals = list(load_benchmark("toy", category="weave", seed=1, num_train=4)["train"]["image"])
    margin = (model.config.radius + model.config.margin) ** 2
    records = []
    loss = training_vtfusion.vtfusion_loss

    def recorded(normal, anomalous, locations, *args, **kwargs):
        terms = loss(normal, anomalous, locations, *args, **kwargs)
        defect = anomalous.detach()[locations]
        records.append(
            {
                "active": float((defect < margin).double().mean()) if defect.numel() else float("nan"),
                "separation": float(terms["separation"].detach()),
                "defect_distance_median": float(defect.median()) if defect.numel() else float("nan"),
                "normal_distance_median": float(normal.detach().median()),
            }
        )
        return terms

    training_vtfusion.vtfusion_loss = recorded
    try:
        model.fit(normals, "weave", steps=steps, learning_rate=1e-3, seed=seed)
    finally:
        training_vtfusion.vtfusion_loss = loss
    active = np.array([r["active"] for r in records])
    separation = np.array([r["separation"] for r in records])
    first, last = records[: max(1, steps // 10)], records[-max(1, steps // 10) :]
    return {
        "distance": distance,
        "steps": steps,
        "margin": margin,
        "active_share_mean": float(np.nanmean(active)),
        "updates_with_nonzero_afs": int((separation > 0).sum()),
        "afs_first_tenth": float(np.mean([r["separation"] for r in first])),
        "afs_last_tenth": float(np.mean([r["separation"] for r in last])),
        "defect_distance_median_first_tenth": float(
            np.nanmedian([r["defect_distance_median"] for r in first])
        ),
        "defect_distance_median_last_tenth": float(np.nanmedian([r["defect_distance_median"] for r in last])),
        "normal_distance_median_first_tenth": float(np.median([r["normal_distance_median"] for r in first])),
        "normal_distance_median_last_tenth": float(np.median([r["normal_distance_median"] for r in last])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--distance", nargs="+", default=["squared_euclidean", "mean_squared"])
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    print(json.dumps([measure(arguments.steps, distance) for distance in arguments.distance], indent=2))


if __name__ == "__main__":
    main()
