"""`make demo` / `hf-fsad demo`: WinCLIP+ k-shot on generated toy images, with a Markdown report, and pass/fail
verdicts at a calibrated threshold on `good/` and `queries/` folders that `hf-fsad score` can run on next."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calibration_policy import calibrated_bank
from .data.toy import load_toy
from .metrics import image_auroc, pixel_auroc
from .models.winclip.configuration_winclip import WinClipConfig
from .models.winclip.modeling_winclip import WinClipModel
from .testing import byte_level_clip_tokenizer, vit_b16_config
from .visualization import mask_array, save_heatmap_panels

logger = logging.getLogger(__name__)

DEMO_CATEGORIES = ("stripes", "weave")


# The verdict part: normal references in good/ and a few normal and defective queries in queries/.
VERDICT_CATEGORY = "stripes"
VERDICT_CLASS_NAME = "textured surface"
VERDICT_REFERENCES = 8
VERDICT_NORMAL_QUERIES = 2
VERDICT_DEFECTIVE_QUERIES = 3


@dataclass
class DemoResult:
    """What the demo leaves: the report, the two folders, and the calibration line then one verdict line per
    query."""

    report: Path
    good_dir: Path
    queries_dir: Path
    verdicts: list[str]
    pretrained: bool


def hub_reachable(repo_id: str, timeout: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers for `repo_id` (a quick check before a download's slow retries).

    Asked through huggingface_hub, so `HF_HUB_OFFLINE`, `HF_ENDPOINT` and the proxy variables are honoured; an
    answer that the repository is missing or gated counts as reachable, for the download to say why.
    """
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        return False
    try:
        HfApi().model_info(repo_id, timeout=timeout)
    except HfHubHTTPError:
        return True
    except Exception:  # noqa: BLE001  (connection errors: httpx's or httpx2's, by huggingface_hub version)
        return False
    return True


def load_demo_model(backbone: str) -> tuple[WinClipModel, bool]:
    """WinCLIP on the pretrained `backbone` (cache first, then the Hub); else a random ViT-B/16 backbone.

    Returns the model and whether its weights are pretrained.
    """
    try:
        return WinClipModel.from_clip(backbone, hub_kwargs={"local_files_only": True}), True
    except OSError:
        pass
    if hub_reachable(backbone):
        return WinClipModel.from_clip(backbone), True
    logger.warning(
        "The Hugging Face Hub cannot be reached and %s is not in the local cache, so the demo uses a randomly "
        "initialised backbone of the same architecture (ViT-B/16): its scores show the pipeline working, not "
        "WinCLIP's accuracy.",
        backbone,
    )
    torch.manual_seed(0)
    model = WinClipModel(WinClipConfig(clip_config=vit_b16_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    return model, False


def save_images(images, names: list[str], directory: Path) -> list[Path]:
    """`images` saved as PNG under `directory` (emptied of earlier PNGs first) with the given names."""
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("*.png"):
        stale.unlink()
    paths = [directory / f"{name}.png" for name in names]
    for image, path in zip(images, paths):
        image.save(path)
    return paths


def run_verdicts(model: WinClipModel, out_dir: Path) -> tuple[Path, Path, list[str]]:
    """Write good/ and queries/ for one toy category, calibrate a threshold on good/ by the CLI's bank policy
    (`calibrated_bank`: leave-one-out, 5% false-alarm rate) and give each query its pass/fail verdict; returns the folders and the lines to show
    (the calibration, then one verdict per query)."""
    dataset = load_toy(
        VERDICT_CATEGORY,
        num_train=VERDICT_REFERENCES,
        num_test_good=VERDICT_NORMAL_QUERIES,
        num_test_anomalous=VERDICT_DEFECTIVE_QUERIES,
        seed=1,
    )
    train, test = dataset["train"], dataset["test"]
    good_dir, queries_dir = out_dir / "good", out_dir / "queries"
    save_images(train["image"], [f"good_{index}" for index in range(len(train))], good_dir)
    names = [f"part{index}_{defect}" for index, defect in enumerate(test["defect_type"])]
    queries = save_images(test["image"], names, queries_dir)
    bank = calibrated_bank(model, list(train["image"]), class_name=VERDICT_CLASS_NAME, calibrate=True).bank
    with torch.no_grad():
        pixel_values = model.image_processor()(list(test["image"]), return_tensors="pt").pixel_values
        output = model(pixel_values, reference_bank=bank)
    verdicts = [
        f"{path}: score {score:.4f} -> {'fail (anomalous)' if label else 'pass'}"
        for path, score, label in zip(queries, output.image_scores.tolist(), output.labels.tolist())
    ]
    return good_dir, queries_dir, [f"calibration: {bank.calibration.describe()}", *verdicts]


def run_demo(out_dir: Path, backbone: str = "openai/clip-vit-base-patch16", k: int = 2) -> DemoResult:
    """Score the toy categories with WinCLIP+ k-shot; write report.md and heatmap PNGs to `out_dir`, then
    the pass/fail verdicts on `out_dir`/queries at a threshold calibrated on `out_dir`/good."""
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    model, pretrained = load_demo_model(backbone)
    processor = model.image_processor()
    size = model.config.image_size
    rows, figures = [], []
    for category in DEMO_CATEGORIES:
        dataset = load_toy(category, num_train=k, num_test_good=5, num_test_anomalous=5, seed=0)
        references = processor(list(dataset["train"]["image"]), return_tensors="pt").pixel_values
        test = dataset["test"]
        with torch.no_grad():
            bank = model.build_reference_bank(references, class_name="textured surface")
            output = model(
                processor(list(test["image"]), return_tensors="pt").pixel_values, reference_bank=bank
            )
        maps = output.anomaly_maps.numpy()
        masks = np.stack([mask_array(mask, size) for mask in test["mask"]])
        rows.append((category, image_auroc(test["label"], output.image_scores), pixel_auroc(masks, maps)))
        shown = [i for i, label in enumerate(test["label"]) if label][:3] + [0]
        figure = out_dir / f"heatmaps_{category}.png"
        save_heatmap_panels(
            figure,
            [test[i]["image"] for i in shown],
            masks[shown],
            maps[shown],
            [test[i]["defect_type"] for i in shown],
            [float(output.image_scores[i]) for i in shown],
        )
        figures.append((figure.name, category))

    good_dir, queries_dir, verdicts = run_verdicts(model, out_dir)
    weights = f"pretrained `{backbone}`" if pretrained else "a randomly initialised ViT-B/16 backbone"
    lines = [
        f"# hf_fsad demo: WinCLIP+ {k}-shot on toy textures",
        "",
        f"Backbone: {weights}.",
        ""
        if pretrained
        else "Random weights: these scores show the pipeline working, not WinCLIP's accuracy.",
        "",
        "| category | image AUROC | pixel AUROC |",
        "|---|---|---|",
        *[f"| {category} | {image:.3f} | {pixel:.3f} |" for category, image, pixel in rows],
        "",
        (
            "Each row: the test image, its true defect mask, and the anomaly map over the image "
            "(jet colours, red = anomalous, one colour scale per category)."
        ),
        "",
        *[f"![{category}]({name})" for name, category in figures],
        "",
        f"## Pass/fail on {queries_dir}/ at a threshold calibrated on {good_dir}/ ({VERDICT_CATEGORY})",
        "",
        "```text",
        *verdicts,
        "```",
        "",
        f"Finished in {time.perf_counter() - started:.0f} s.",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return DemoResult(report, good_dir, queries_dir, verdicts, pretrained)
