"""`--engine ray` of `hf-fsad score` and `benchmark`: the options, their checks, and the run on a Ray cluster
(`hf_fsad.ray_engine`, imported only when asked, so the CLI starts without ray)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ._errors import CliError
from ._options import non_negative_float, positive_int

if TYPE_CHECKING:
    from hf_fsad.batch_scoring import RecordOptions


def add_engine(parser: argparse.ArgumentParser, description: str, engine_help: str, pool: bool) -> None:
    """`--engine local|ray` and the Ray options; `pool`: the work runs in a pool of actors (`--num-workers`),
    else in one Ray task per unit of work, each reserving the resources asked."""
    engine = parser.add_argument_group("engine", description)
    engine.add_argument("--engine", choices=("local", "ray"), default="local", help=engine_help)
    engine.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="the Ray cluster to join (e.g. ray://head:10001; default: RAY_ADDRESS, else a local cluster)",
    )
    worker = "actor" if pool else "task"
    if pool:
        engine.add_argument(
            "--num-workers", type=positive_int, default=1, help="scoring actors (default %(default)s)"
        )
    engine.add_argument(
        "--num-gpus-per-worker",
        type=non_negative_float,
        default=0.0,
        help=f"GPUs each {worker} reserves (default %(default)s: runs on the CPU)",
    )
    engine.add_argument(
        "--num-cpus-per-worker",
        type=non_negative_float,
        default=1.0,
        help=f"CPUs each {worker} reserves (default %(default)s)"
        + (
            "; leave some to the read tasks, which wait forever when the actors hold every CPU"
            if pool
            else ""
        ),
    )


def check_engine(args: argparse.Namespace) -> None:
    """Refuse the Ray options without `--engine ray`."""
    if args.engine == "ray":
        return
    defaults = {"ray_address": None, "num_workers": 1, "num_gpus_per_worker": 0.0, "num_cpus_per_worker": 1.0}
    given = [
        "--" + name.replace("_", "-")
        for name, default in defaults.items()
        if getattr(args, name, default) != default
    ]
    if given:
        raise CliError(f"{', '.join(given)} go with --engine ray")


def check_score_engine(args: argparse.Namespace, tiled: bool) -> None:
    """Refuse `hf-fsad score` options that do not go with the `--engine` asked."""
    from hf_fsad.ray_engine import is_parquet_input

    check_engine(args)
    if args.engine == "local":
        tables = [item for item in args.inputs if is_parquet_input(item)]
        if tables:
            raise CliError(f"{tables[0]}: Parquet inputs are read by --engine ray")
        if args.output.endswith(".parquet"):
            raise CliError(
                f"--output {args.output}: the local engine writes JSON lines; Parquet needs --engine ray"
            )
        return
    if tiled:
        raise CliError("--engine ray scores whole images: tiled scoring runs on --engine local")
    if args.compile:
        raise CliError("--compile compiles the model of this process; --engine ray scores in its actors")
    if args.precision == "int8":
        raise CliError(
            "--precision int8 runs on --engine local: the int8 export is quantised on the reference images, "
            "which --engine ray does not carry to its actors"
        )


def init_ray(args: argparse.Namespace):
    """The `ray` module, joined to `--ray-address` (or RAY_ADDRESS, else a new local cluster); a CliError
    when the ray extra is missing."""
    try:
        import ray
    except ImportError as error:
        raise CliError(f"--engine ray needs the ray extra (pip install 'hf-fsad[ray]'): {error}") from None
    if not ray.is_initialized():
        ray.init(address=args.ray_address)
    return ray


def score_on_ray(
    model, bank, output: Path, heatmap_dir: Path | None, args: argparse.Namespace, options: RecordOptions
) -> int:
    """Score `args.inputs` on Ray (`hf_fsad.ray_engine.score_to_file`) and report as the local engine does;
    a bank saved tiled is refused there."""
    init_ray(args)
    from hf_fsad.batch_scoring import verdict_summary
    from hf_fsad.ray_engine import RayResources, print_summary, read_records, score_to_file

    if bank.tiling is not None:
        raise CliError("--engine ray scores whole images: a tiled bank scores on --engine local")
    try:
        summary = score_to_file(
            args.inputs,
            model,
            bank,
            output,
            resume=args.resume,
            options=options,
            resources=RayResources(args.num_workers, args.num_gpus_per_worker, args.num_cpus_per_worker),
            batch_size=args.batch_size,
            runtime=args.runtime,
            precision=args.precision,
            device=args.device,
            max_pixels=args.max_pixels,
            heatmap_dir=heatmap_dir,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    except KeyboardInterrupt:
        print(f"interrupted: results so far -> {output}; run again with --resume to go on", file=sys.stderr)
        return 130
    print_summary(summary, output)
    if bank.calibration is not None or args.threshold is not None:
        scored_records = [record for record in read_records(output) if record.get("score") is not None]
        print(verdict_summary(scored_records), file=sys.stderr)
    scored = summary.scored - summary.errors
    return 0 if scored or not summary.scored else 1
