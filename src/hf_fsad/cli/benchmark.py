"""`hf-fsad benchmark`: evaluate methods on benchmarks with the papers' protocol, or profile them."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._engine import add_engine, check_engine, init_ray
from ._errors import CliError
from ._options import add_allow_untrained, add_batch_size, add_device, add_runtime, add_tiling, tiling_of


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("benchmark", help="evaluate methods on benchmarks (papers' protocol)")
    parser.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="[LABEL=]PATH_OR_HUB_ID of a saved model, or [LABEL=]METHOD@CLIP for a fresh method on a CLIP",
    )
    parser.add_argument(
        "--datasets", nargs="+", required=True, help="NAME[:ROOT[:CATEGORY]], e.g. elpv mvtec_ad:/data/mvtec"
    )
    parser.add_argument(
        "--k", nargs="+", type=int, default=[2, 4, 8], help="shots (0 = zero-shot; default 2 4 8)"
    )
    parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the reference draws (default 0 1 2)"
    )
    parser.add_argument(
        "--anomalous",
        nargs="+",
        type=int,
        default=[0],
        help="anomalous references drawn from the test split, for methods that use them (e.g. 1; default 0)",
    )
    parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="normal train images kept for weight validation (default %(default)s)",
    )
    parser.add_argument(
        "--max-test", type=int, help="score at most this many test images per category (seeded; default: all)"
    )
    parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.05,
        help="false-alarm rate of each cell's calibrated threshold (F1 and false alarms at it are reported; "
        "default %(default)s)",
    )
    parser.add_argument("--out", required=True, help="output directory (results.json, results.md, plots/)")
    parser.add_argument("--feature-cache", help="feature cache directory (default: OUT/feature_cache)")
    parser.add_argument("--title", help="heading of the results table (say in it if the weights are random)")
    add_tiling(
        parser,
        "score each cell tiled (its own cells): references and test images cut into tiles, metrics at the test "
        "images' full resolution (docs/benchmarks.md)",
    )
    add_batch_size(parser)
    add_device(parser)
    add_allow_untrained(parser)
    parser.add_argument(
        "--profile", action="store_true", help="measure latency, memory and k-scaling instead"
    )
    add_runtime(
        parser,
        help="score the test images with PyTorch (default) or each cell's model and bank exported to ONNX "
        "Runtime or OpenVINO (CPU; one export per cell; references and calibration stay in PyTorch)",
    )
    parser.add_argument(
        "--profile-k",
        nargs="+",
        type=int,
        default=[2, 8, 32, 128, 256],
        help="with --profile: bank sizes of the k-scaling (default 2 8 32 128 256)",
    )
    parser.add_argument(
        "--profile-batch-sizes",
        nargs="+",
        type=int,
        default=[1, 16],
        help="with --profile: batch sizes timed (default 1 16)",
    )
    parser.add_argument(
        "--profile-repeats",
        type=int,
        default=3,
        help="with --profile: timed calls per figure (median; default %(default)s)",
    )
    parser.add_argument(
        "--fit-steps",
        type=int,
        default=2,
        help="with --profile: updates of the timed fit of per-category methods (default %(default)s)",
    )
    add_engine(
        parser,
        "where the cells run: one after another in this process, or as Ray tasks (the ray extra; "
        "docs/scale.md), a category's cells at once; this process collects them and writes results.json",
        "local (default) or ray; with ray give --feature-cache a folder every node reads and writes (each "
        "node encodes what it misses into it)",
        pool=False,
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from hf_fsad.data import load_benchmark
    from hf_fsad.evaluation import DatasetSpec, Protocol, profile_models, run_benchmark
    from hf_fsad.features import FeatureCache
    from hf_fsad.io import prepare_output_dir
    from hf_fsad.loading import ModelLoadError, load_method, take_untrained_warning

    check_engine(args)
    if args.profile and args.engine == "ray":
        raise CliError("--profile times this process; --engine ray runs benchmark cells")
    try:
        tiling = tiling_of(args)
        out = prepare_output_dir(args.out, "--out")
        datasets = [DatasetSpec.parse(text) for text in args.datasets]
        protocol = Protocol(tuple(args.anomalous), args.validation, args.max_test, args.false_alarm_rate)
    except ValueError as error:
        raise CliError(str(error)) from None
    models = {}
    for entry in args.methods:
        label, equals, source = entry.rpartition("=")
        source = source if equals else entry
        try:
            model = load_method(source, allow_untrained=args.allow_untrained)
        except ModelLoadError as error:
            raise CliError(f"--methods {entry}: {error}") from None
        untrained = take_untrained_warning(model)
        if untrained is not None:
            print(f"warning: --methods {entry}: {untrained}", file=sys.stderr)
        models[label or Path(source.split("@")[-1]).name or source] = model.to(args.device).eval()
    if args.profile:
        if tiling is not None:
            raise CliError("--tile-size is for benchmark cells; --profile measures untiled scoring")
        spec = datasets[0]
        data = load_benchmark(spec.name, spec.root, spec.categories[0] if spec.categories else None)
        count = min(data["test"].num_rows, max(args.profile_batch_sizes) + 2)
        images = data["test"].select(range(count))["image"]
        profile_models(
            models,
            images,
            out / "profile",
            ks=args.profile_k,
            batch_sizes=args.profile_batch_sizes,
            repeats=args.profile_repeats,
            fit_steps=args.fit_steps,
        )
        print(f"profile: {out / 'profile' / 'profile.md'}")
        return 0
    if args.runtime != "torch":
        from hf_fsad.export import check_exportable

        try:
            if args.device != "cpu":
                raise ValueError(f"the exported graphs run on the CPU; --device {args.device} is for torch")
            for model in models.values():
                check_exportable(model)
        except ValueError as error:
            raise CliError(f"--runtime {args.runtime}: {error}") from None
    cache = FeatureCache(args.feature_cache or out / "feature_cache")
    cell_map = None
    if args.engine == "ray":
        init_ray(args)
        from hf_fsad.ray_engine import ray_cell_map

        cell_map = ray_cell_map(args.num_cpus_per_worker, args.num_gpus_per_worker)
    results = run_benchmark(
        models,
        datasets,
        args.k,
        args.seeds,
        out,
        args.batch_size,
        cache,
        args.title,
        protocol=protocol,
        runtime=args.runtime,
        tiling=tiling,
        cell_map=cell_map,
    )
    print(
        f"{len(results['cells'])} cells ({results['skipped_cells']} already done), feature-cache hit rate "
        f"{100 * results['feature_cache']['hit_rate']:.1f} %, {results['wall_seconds']:.0f} s -> {out / 'results.md'}"
    )
    return 0
