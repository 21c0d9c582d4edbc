"""hf_fsad's WinCLIP against anomalib's, the most used implementation: same CLIP, same images, one run.

    make install-anomalib   # its own environment, .venv-anomalib: anomalib[clip] is not a dependency of ours
    .venv-anomalib/bin/python benchmarks/compare_anomalib.py --out benchmarks/results
    .venv-anomalib/bin/python benchmarks/compare_anomalib.py --agreement-only   # scores only, a few minutes

Both models sit on one randomly initialised OpenCLIP ViT-B-16-plus-240 (the WinCLIP paper's backbone; no
pretrained weights can be fetched offline): anomalib's uses it as open_clip built it, ours gets it through
`hf_fsad.backbones.convert` with the BPE tokenizer open_clip ships. Ours is configured as anomalib's
(anomalib's 21 prompt templates, raw-embedding ensemble means) so scores can agree. Both get the same pixel
tensors. Timings alternate between the implementations call by call and report medians. Setup is measured
from nothing on both sides (prompt ensemble + reference encoding), and as a user of a saved hf_fsad model
meets it: the prompt embeddings saved with the model, and a saved reference bank.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
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


def random_inputs(ours, seed: int, k: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k reference and `batch_size` query pixel tensors, the same for both implementations."""
    size = ours.config.image_size
    generator = torch.Generator().manual_seed(seed)
    references = torch.randn(k, 3, size, size, generator=generator)
    return references, torch.randn(batch_size, 3, size, size, generator=generator)


def max_difference(first: torch.Tensor, second: torch.Tensor) -> float:
    return float((first - second).abs().max())


@torch.no_grad()
def agreement(seed: int, k: int, batch_size: int) -> dict:
    """The scores' agreement alone (no timing): what `--agreement-only` prints in a few minutes."""
    theirs, ours = build_models(seed)
    references, queries = random_inputs(ours, seed, k, batch_size)
    theirs.setup(CLASS_NAME, references)
    their_output = theirs(queries)
    our_output = ours(queries, reference_bank=ours.build_reference_bank(references, CLASS_NAME))
    return {
        "max_abs_diff_image_scores": max_difference(their_output.pred_score, our_output.image_scores),
        "max_abs_diff_anomaly_maps": max_difference(their_output.anomaly_map, our_output.anomaly_maps),
    }


@torch.no_grad()
def compare(seed: int, k: int, batch_size: int, repeats: int, folder: Path) -> dict:
    from hf_fsad.bank import ReferenceBank
    from hf_fsad.evaluation import alternating_medians, matmul_flops, median_seconds
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel

    theirs, ours = build_models(seed)
    references, queries = random_inputs(ours, seed, k, batch_size)
    clear = ours.backbone.clear_text_cache

    setup_text = alternating_medians(
        {"anomalib": lambda: theirs.setup(CLASS_NAME), "hf_fsad": lambda: ours.text_embeddings(CLASS_NAME)},
        repeats,
        before={"hf_fsad": clear},
    )
    setup_references = alternating_medians(
        {
            # What `setup` does with references (`setup` itself also re-encodes the prompts of a set class).
            "anomalib": lambda: theirs._collect_visual_embeddings(references),
            "hf_fsad": lambda: ours.encode_images(references, "reference_pixel_values"),
        },
        repeats,
    )
    setup_cold = alternating_medians(
        {
            "anomalib": lambda: theirs.setup(CLASS_NAME, references),
            "hf_fsad": lambda: ours.build_reference_bank(references, CLASS_NAME),
        },
        repeats,
        before={"hf_fsad": clear},
    )
    # What a saved model and a saved bank give: the prompt embeddings come with the model, the bank from disk.
    bank = ours.build_reference_bank(references, CLASS_NAME)
    ours.save_pretrained(folder / "winclip")
    bank.save(folder / "bank.safetensors")
    loaded = WinClipModel.from_pretrained(folder / "winclip").eval()
    setup_saved = alternating_medians(
        {
            "anomalib": lambda: theirs.setup(CLASS_NAME, references),
            "hf_fsad (saved model: prompt embeddings cached)": lambda: loaded.build_reference_bank(
                references, CLASS_NAME
            ),
            "hf_fsad (saved model + saved bank)": lambda: loaded.checked_bank(
                ReferenceBank.load(folder / "bank.safetensors")
            ),
        },
        repeats,
    )

    latency = alternating_medians(
        {"anomalib": lambda: theirs(queries[:1]), "hf_fsad": lambda: ours(queries[:1], reference_bank=bank)},
        repeats,
    )
    bare = median_seconds(lambda: ours.backbone.encode_image(queries[:1]), repeats)
    flops = {
        "anomalib": matmul_flops(lambda: theirs(queries[:1])),
        "hf_fsad": matmul_flops(lambda: ours(queries[:1], reference_bank=bank)),
        "bare": matmul_flops(lambda: ours.backbone.encode_image(queries[:1])),
    }
    their_output = theirs(queries)
    our_output = ours(queries, reference_bank=bank)

    started = time.perf_counter()
    loaded.compile_backbone()
    compiled_output = loaded(queries, reference_bank=bank)
    loaded(queries[:1], reference_bank=bank)
    compile_seconds = time.perf_counter() - started
    compiled = alternating_medians(
        {
            "anomalib": lambda: theirs(queries[:1]),
            "hf_fsad compiled": lambda: loaded(queries[:1], reference_bank=bank),
        },
        repeats,
    )

    return {
        "backbone": f"OpenCLIP ViT-B-16-plus-240, random weights (seed {seed})",
        "k": k,
        "batch_size": batch_size,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "setup_text_s": setup_text,
        "setup_references_s": setup_references,
        "setup_cold_s": setup_cold,
        "setup_saved_s": setup_saved,
        "per_image_s": latency,
        "per_image_compiled_s": compiled,
        "compile_s": compile_seconds,
        "bare_forward_s": bare,
        "flops_per_image": flops,
        "max_abs_diff_image_scores": max_difference(their_output.pred_score, our_output.image_scores),
        "max_abs_diff_anomaly_maps": max_difference(their_output.anomaly_map, our_output.anomaly_maps),
        "max_abs_diff_image_scores_compiled": max_difference(
            their_output.pred_score, compiled_output.image_scores
        ),
        "max_abs_diff_anomaly_maps_compiled": max_difference(
            their_output.anomaly_map, compiled_output.anomaly_maps
        ),
    }


def markdown(result: dict) -> str:
    k = result["k"]
    rows = [
        ("per-image latency, batch 1", result["per_image_s"]),
        ("per-image latency, batch 1, hf_fsad with `compile_backbone()`", result["per_image_compiled_s"]),
        ("setup: prompt ensemble", result["setup_text_s"]),
        (f"setup: encoding {k} references", result["setup_references_s"]),
        (f"setup: prompt ensemble + {k} references, from nothing", result["setup_cold_s"]),
    ]
    lines = [
        (
            f"{result['backbone']}; torch {result['torch']}, {result['torch_threads']} threads; WinCLIP+ "
            f"{k}-shot, class '{CLASS_NAME}'; medians of {result['repeats']} alternating calls after a warm-up."
        ),
        "",
        "| what | anomalib (s) | hf_fsad (s) | hf_fsad / anomalib |",
        "|---|---|---|---|",
    ]
    for name, values in rows:
        ours = next(value for key, value in values.items() if key != "anomalib")
        lines.append(f"| {name} | {values['anomalib']:.3f} | {ours:.3f} | {ours / values['anomalib']:.2f} |")
    saved, flops = result["setup_saved_s"], result["flops_per_image"]
    for name, value in saved.items():
        if name != "anomalib":
            lines.append(
                f"| setup, {name.removeprefix('hf_fsad ')} | {saved['anomalib']:.3f} | {value:.3f} | "
                f"{value / saved['anomalib']:.3f} |"
            )
    lines += [
        "",
        (
            f"Max absolute difference over {result['batch_size']} images: image scores "
            f"{result['max_abs_diff_image_scores']:.2e}, anomaly maps {result['max_abs_diff_anomaly_maps']:.2e} "
            f"(compiled: {result['max_abs_diff_image_scores_compiled']:.2e}, "
            f"{result['max_abs_diff_anomaly_maps_compiled']:.2e}). One-off compile: {result['compile_s']:.0f} s. "
            f"Bare backbone forward: {result['bare_forward_s']:.3f} s."
        ),
        "",
        (
            f"Matrix-product work per image (torch's FlopCounterMode): anomalib {flops['anomalib'] / 1e9:.0f} "
            f"GFLOP, hf_fsad {flops['hf_fsad'] / 1e9:.0f} GFLOP ({flops['hf_fsad'] / flops['anomalib']:.2f}x), "
            f"a bare backbone forward {flops['bare'] / 1e9:.0f} GFLOP. Where both run their products at the "
            "processor's float32 peak, the latency ratio cannot fall much below the work ratio."
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
    parser.add_argument(
        "--agreement-only",
        action="store_true",
        help="print the scores' agreement only (no timing, nothing written)",
    )
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.agreement_only:
        print(json.dumps(agreement(args.seed, args.k, args.batch_size), indent=1))
        return
    with tempfile.TemporaryDirectory() as folder:
        result = compare(args.seed, args.k, args.batch_size, args.repeats, Path(folder))
    report = markdown(result)
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "anomalib_comparison.json").write_text(json.dumps(result, indent=1) + "\n")
        (args.out / "anomalib_comparison.md").write_text(report + "\n")


if __name__ == "__main__":
    main()
