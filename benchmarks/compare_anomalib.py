"""hf_fsad's WinCLIP against anomalib's, the most used implementation: same CLIP, same images, one run.

    make install-anomalib   # its own environment, .venv-anomalib: anomalib[clip] is not a dependency of ours
    .venv-anomalib/bin/python benchmarks/compare_anomalib.py --out benchmarks/results

Both models sit on one randomly initialised OpenCLIP ViT-B-16-plus-240 (the WinCLIP paper's backbone; no
pretrained weights can be fetched offline): anomalib's uses it as open_clip built it, ours gets it through
`hf_fsad.backbones.convert` with the BPE tokenizer open_clip ships. Ours is configured as anomalib's
(anomalib's 21 prompt templates, raw-embedding ensemble means) so scores can agree. Both get the same pixel
tensors. Timings alternate between the two implementations call by call and report medians; setup (text
ensemble + reference encoding) starts from nothing each time on both sides.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

CLASS_NAME = "bottle"


def build_models(seed: int):
    """anomalib's WinClipModel on a random ViT-B-16-plus-240 and ours on the same weights."""
    import open_clip
    from anomalib.models.image.winclip import prompting, torch_model

    from hf_fsad.backbones.convert import clip_from_open_clip_model, tokenizer_from_bpe
    from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel

    torch_model.PRETRAINED = None  # random weights: the Hub is out of reach
    torch.manual_seed(seed)
    theirs = torch_model.WinClipModel(scales=(2, 3)).eval()
    clip = clip_from_open_clip_model(theirs.clip)
    config = WinClipConfig(
        clip_config=clip.config,
        window_scales=[2, 3],
        temperature=torch_model.TEMPERATURE,
        normalize_prompt_embeddings=False,
        prompt_templates=list(prompting.TEMPLATES),
        image_mean=list(theirs.clip.visual.preprocess_cfg["mean"]),
        image_std=list(theirs.clip.visual.preprocess_cfg["std"]),
    )
    ours = WinClipModel(config)
    ours.backbone.load_clip_weights(clip.state_dict())
    ours.tokenizer = tokenizer_from_bpe(open_clip.tokenizer.default_bpe())
    ours.freeze_backbone()
    return theirs, ours.eval()


def alternating_medians(functions: dict[str, Callable[[], object]], repeats: int, before=None) -> dict:
    """Median seconds per function, calling them in turn (one warm-up round untimed)."""
    times = {name: [] for name in functions}
    for attempt in range(repeats + 1):
        for name, function in functions.items():
            if before is not None:
                before[name]()
            started = time.perf_counter()
            function()
            if attempt:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def compare(seed: int, k: int, batch_size: int, repeats: int) -> dict:
    theirs, ours = build_models(seed)
    size = ours.config.image_size
    generator = torch.Generator().manual_seed(seed)
    references = torch.randn(k, 3, size, size, generator=generator)
    queries = torch.randn(batch_size, 3, size, size, generator=generator)

    def their_setup():
        theirs.setup(CLASS_NAME, references)

    def our_setup():
        return ours.build_reference_bank(references, CLASS_NAME)

    clear = {"anomalib": lambda: None, "hf_fsad": ours.backbone.clear_text_cache}
    setup = alternating_medians({"anomalib": their_setup, "hf_fsad": our_setup}, repeats, clear)
    bank = our_setup()
    their_setup()

    latency = alternating_medians(
        {"anomalib": lambda: theirs(queries[:1]), "hf_fsad": lambda: ours(queries[:1], reference_bank=bank)},
        repeats,
    )
    bare = alternating_medians(
        {"bare": lambda: ours.backbone.clip.vision_model(pixel_values=queries[:1])}, repeats
    )

    their_output = theirs(queries)
    our_output = ours(queries, reference_bank=bank)
    return {
        "backbone": f"OpenCLIP ViT-B-16-plus-240, random weights (seed {seed})",
        "k": k,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "setup_s": setup,
        "per_image_s": latency,
        "bare_forward_s": bare["bare"],
        "max_abs_diff_image_scores": float((their_output.pred_score - our_output.image_scores).abs().max()),
        "max_abs_diff_anomaly_maps": float((their_output.anomaly_map - our_output.anomaly_maps).abs().max()),
        "image_scores": {
            "anomalib": their_output.pred_score.tolist(),
            "hf_fsad": our_output.image_scores.tolist(),
        },
    }


def markdown(result: dict) -> str:
    setup, latency = result["setup_s"], result["per_image_s"]
    rows = [
        ("per-image latency, batch 1 (s)", latency),
        (f"setup: prompt ensemble + {result['k']} references (s)", setup),
    ]
    lines = [
        (
            f"{result['backbone']}; torch {result['torch']}, {result['torch_threads']} threads; WinCLIP+ "
            f"{result['k']}-shot, class '{CLASS_NAME}'."
        ),
        "",
        "| what | anomalib | hf_fsad | hf_fsad / anomalib |",
        "|---|---|---|---|",
        *[
            f"| {name} | {values['anomalib']:.3f} | {values['hf_fsad']:.3f} | "
            f"{values['hf_fsad'] / values['anomalib']:.2f} |"
            for name, values in rows
        ],
        "",
        (
            f"Max absolute difference: image scores {result['max_abs_diff_image_scores']:.2e}, anomaly maps "
            f"{result['max_abs_diff_anomaly_maps']:.2e}. Bare backbone forward: {result['bare_forward_s']:.3f} s."
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(2)
    result = compare(args.seed, args.k, args.batch_size, args.repeats)
    report = markdown(result)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "anomalib_comparison.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "anomalib_comparison.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
