"""Per-image latency, peak memory and score error of PyTorch eager, `--compile`, ONNX Runtime and OpenVINO (f32,
bf16 where the CPU has it, and int8) for each exported method, at batch 1 and 16; the float32 matrix-product
rate of each backend (`matmul_rates`); and with `--elpv`, the agreement of int8 with float32 on real ELPV
images (`elpv_agreement`: image AUROC of each, and the share of verdicts flipped at thresholds calibrated on
each runtime's own scores).

    .venv/bin/python benchmarks/export_speed.py [--methods winclip metacan afclip anomalous_memory vtfusion]
        [--backends eager onnxruntime onnxruntime-int8 ...] [--layers 12] [--repeats 2] [--elpv 24]
        [--out benchmarks/results]

int8 backends: the int8 exports (`hf_fsad.export`, `--precision int8`) calibrated on the 2 toy references
and 6 views generated from them, exported whatever their error (the bound is reported, not applied); the
`-u8u8` and `-u8s8` ONNX Runtime variants quantise the weights unsigned, or signed at 8 bits (the default is
signed 7-bit, `reduce_range`: ONNX Runtime's remedies for saturation on AVX2 without VNNI); `-avx2` runs the
OpenVINO backend with ONEDNN_MAX_CPU_ISA=AVX2 (does OpenVINO's oneDNN take the cap?).

Random weights of ViT-B-16-plus-240 size (12 blocks, 240 px; no pretrained weights can be fetched offline),
the byte-level test tokenizer, a 2-shot bank of toy images (the anomalous memory: plus one anomalous toy image
and its mask; VTFusion: fitted on them for 2 steps), 16 toy query images. Each backend runs in a fresh
process that loads only what it needs (the saved model and bank for PyTorch, the export folder for the
runtimes, which import no torch), so its peak memory is what a process scoring with it holds (VmHWM).
Batch 1: median of `--repeats` calls after one warm-up call; batch 16: one call (`--compile`: after a
warm-up call, which compiles that shape). Score error: the largest difference to PyTorch eager's scores and
maps on the 16 images. The CPU's model, core count and vector flags are written with every table.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

BACKENDS = (
    "eager",
    "compile",
    "onnxruntime",
    "openvino-f32",
    "openvino-bf16",
    "onnxruntime-int8",
    "onnxruntime-int8-u8s8",
    "onnxruntime-int8-u8u8",
    "openvino-int8",
    "openvino-f32-avx2",
    "openvino-int8-avx2",
)
# The int8 export each int8 backend runs: (export format, ONNX Runtime weight mode).
INT8_EXPORTS = {
    "onnxruntime-int8": ("onnx", "u8s8-reduce-range"),
    "onnxruntime-int8-u8s8": ("onnx", "u8s8"),
    "onnxruntime-int8-u8u8": ("onnx", "u8u8"),
    "openvino-int8": ("openvino", None),
    "openvino-int8-avx2": ("openvino", None),
}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_description() -> dict:
    """Model name, logical cores and the vector flags that decide the runtimes' kernels."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    flags = set(lines.get("flags\t\t", "").split())
    return {
        "model": lines.get("model name\t", "unknown").strip(),
        "cores": os.cpu_count(),
        "flags": [flag for flag in CPU_FLAGS if flag in flags],
    }


def peak_resident_mb() -> float:
    """This process's peak resident memory (VmHWM; ru_maxrss would carry the parent's over fork + exec)."""
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return int(status["VmHWM"].split()[0]) / 1024


def timed(function, repeats: int, warm_up: bool) -> float:
    if warm_up:
        function()
    runs = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        runs.append(time.perf_counter() - started)
    return statistics.median(runs)


def run_backend(backend: str, folder: Path, batch_sizes: list[int], repeats: int) -> dict:
    """In this (fresh) process: seconds per image at each batch size, the outputs of the largest batch and the
    peak resident memory."""
    queries = np.load(folder / "queries.npy")
    if backend in ("eager", "compile"):
        import torch

        from hf_fsad.bank import ReferenceBank
        from hf_fsad.loading import load_method

        model = load_method(str(folder / "model")).eval()
        bank = ReferenceBank.load(folder / "bank.safetensors")
        if backend == "compile":
            model.compile_backbone()

        def score(pixels: np.ndarray) -> dict:
            with torch.no_grad():
                output = model(torch.from_numpy(pixels), reference_bank=bank)
            maps = output.anomaly_maps
            return {
                "image_scores": output.image_scores.numpy(),
                "anomaly_maps": None if maps is None else maps.numpy(),
            }
    else:
        export = folder / export_folder(backend)
        spec = importlib.util.spec_from_file_location("run_exported", export / "run_exported.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)  # the copy in the export folder: no torch in this process
        exported = runner.ExportedModel(export, precision="bfloat16" if "bf16" in backend else None)

        def score(pixels: np.ndarray) -> dict:
            outputs = exported(pixels)
            return {"image_scores": outputs["image_scores"], "anomaly_maps": outputs.get("anomaly_maps")}

    seconds = {}
    for batch in batch_sizes:
        batch_repeats = repeats if batch == 1 else 1
        warm_up = batch == 1 or backend == "compile"
        seconds[batch] = timed(lambda batch=batch: score(queries[:batch]), batch_repeats, warm_up) / batch
    outputs = score(queries[: max(batch_sizes)])
    np.save(folder / f"{backend}.scores.npy", outputs["image_scores"])
    if outputs["anomaly_maps"] is not None:
        np.save(folder / f"{backend}.maps.npy", outputs["anomaly_maps"])
    peak_mb = peak_resident_mb()
    return {"seconds_per_image": seconds, "peak_memory_mb": peak_mb}


def export_folder(backend: str) -> str:
    """The export folder (under a method's work folder) that a runtime `backend` scores with."""
    if backend in INT8_EXPORTS:
        export_format, weight_mode = INT8_EXPORTS[backend]
        return f"{export_format}-int8" + (f"-{weight_mode}" if weight_mode else "")
    return "onnx" if backend == "onnxruntime" else "openvino"


def matmul_rates(rows: int = 3616, width: int = 896, repeats: int = 5) -> dict:
    """GFLOP/s of one float32 matrix product of the tower's MLP shape ((rows, width) @ (width, 4 width);
    3,616 rows = 16 images' 226 tokens) in PyTorch, ONNX Runtime and OpenVINO: the rate each backend's
    matrix products run at, which bounds what a graph made of them can gain over eager."""
    import onnx
    import onnxruntime
    import openvino
    import torch
    from onnx import TensorProto, helper

    generator = np.random.default_rng(0)
    inputs = generator.standard_normal((rows, width), dtype=np.float32)
    weight = generator.standard_normal((width, 4 * width), dtype=np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, width])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, 4 * width])],
        [helper.make_tensor("w", TensorProto.FLOAT, weight.shape, weight.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.TemporaryDirectory() as work:
        path = str(Path(work) / "matmul.onnx")
        onnx.save(model, path)
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        request = (
            openvino.Core()
            .compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            .create_infer_request()
        )
    torch_inputs, torch_weight = torch.from_numpy(inputs), torch.from_numpy(weight)
    flops = 2 * rows * width * 4 * width
    products = {
        "torch": lambda: torch.mm(torch_inputs, torch_weight),
        "onnxruntime": lambda: session.run(None, {"x": inputs}),
        "openvino-f32": lambda: request.infer({"x": inputs}),
    }
    return {name: flops / timed(product, repeats, True) / 1e9 for name, product in products.items()}


def random_model(method: str, layers: int):
    """`method` on a random CLIP of ViT-B-16-plus-240 size with `layers` blocks (seeded), and the test tokenizer."""
    import torch

    from hf_fsad.registry import method_spec
    from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config

    torch.manual_seed(0)
    spec = method_spec(method)
    model = spec.model(spec.config(clip_config=vit_b16_plus_240_config(layers))).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    return model


def export_all(model, bank, folder: Path, backends: list[str], references: list) -> dict:
    """Export `model` and `bank` into `folder` for each runtime `backends` needs (the int8 ones calibrated on
    `references`, whatever their error). Returns {export folder: (seconds, its manifest's int8 record)}."""
    from hf_fsad.export import export_model
    from hf_fsad.quantization import quantize_onnx

    exports = {}
    for name in dict.fromkeys(
        export_folder(backend) for backend in backends if "-" in backend or backend == "onnxruntime"
    ):
        started = time.perf_counter()
        export_format = "onnx" if name.startswith("onnx") else "openvino"
        if "int8" not in name:
            export_model(model, bank, folder / name, format=export_format)
        else:
            weight_mode = name.removeprefix("onnx-int8-") if export_format == "onnx" else None
            defaults = quantize_onnx.__defaults__
            if weight_mode:  # the weight mode of ONNX Runtime's quantiser, for this export only
                quantize_onnx.__defaults__ = (weight_mode,)
            try:
                export_model(model, bank, folder / name, export_format, "int8", references, float("inf"))
            finally:
                quantize_onnx.__defaults__ = defaults
        manifest = json.loads((folder / name / "hf_fsad_export.json").read_text())
        exports[name] = {"seconds": time.perf_counter() - started, "int8": manifest["int8"]}
    return exports


def prepare(method: str, layers: int, folder: Path, backends: list[str]) -> dict:
    """Save a random model of `method`, its toy bank and 16 toy queries into `folder`; export it there for
    the runtimes of `backends`. Returns the exports' times and int8 records (`export_all`)."""
    import torch

    from hf_fsad.data import load_toy

    model = random_model(method, layers)
    toy = load_toy("stripes", num_train=2, num_test_good=8, num_test_anomalous=8)
    processor = model.image_processor()
    references = processor(list(toy["train"]["image"]), return_tensors="pt").pixel_values
    queries = processor(list(toy["test"]["image"]), return_tensors="pt").pixel_values
    anomalous = {}
    if model.needs_anomalous_references:
        mask = torch.from_numpy(np.asarray(toy["test"]["mask"][-1]) > 0)[None]
        anomalous = {"anomalous_pixel_values": queries[-1:], "anomalous_masks": mask}
    if model.fits_per_category:  # VTFusion: fitted on the 2 references (2 steps: speed is not accuracy)
        model.fit(list(toy["train"]["image"]), class_name="stripes", steps=2)
        bank = model.build_reference_bank()
    else:
        with torch.no_grad():
            bank = model.build_reference_bank(references, "stripes", **anomalous)
    model.save_pretrained(folder / "model")
    bank.save(folder / "bank.safetensors")
    np.save(folder / "queries.npy", queries.numpy())
    return export_all(model, bank, folder, backends, list(toy["train"]["image"]))


def measure(method: str, args: argparse.Namespace, backends: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        results = {"exports": prepare(method, args.layers, folder, backends), "backends": {}}
        for backend in backends:
            command = [
                sys.executable,
                __file__,
                "--child",
                backend,
                "--folder",
                work,
                "--repeats",
                str(args.repeats),
            ]
            command += ["--batch-sizes", *map(str, args.batch_sizes)]
            environment = os.environ | ({"ONEDNN_MAX_CPU_ISA": "AVX2"} if backend.endswith("-avx2") else {})
            completed = subprocess.run(command, check=False, capture_output=True, text=True, env=environment)
            if completed.returncode:  # e.g. killed for memory: recorded, and the other backends still run
                error = (completed.stderr.strip().splitlines() or [f"exit status {completed.returncode}"])[-1]
                results["backends"][backend] = {"failed": error, "returncode": completed.returncode}
            else:
                results["backends"][backend] = json.loads(completed.stdout.strip().splitlines()[-1])
            print(method, backend, results["backends"][backend], file=sys.stderr, flush=True)
        reference_scores = np.load(folder / "eager.scores.npy")
        maps_path = folder / "eager.maps.npy"
        reference_maps = np.load(maps_path) if maps_path.exists() else None
        for backend, result in results["backends"].items():
            if "failed" in result:
                continue
            result["score_error"] = float(
                np.abs(np.load(folder / f"{backend}.scores.npy") - reference_scores).max()
            )
            if reference_maps is not None:
                maps = np.load(folder / f"{backend}.maps.npy")
                result["map_error"] = float(np.abs(maps - reference_maps).max())
        results["score_range"] = [float(reference_scores.min()), float(reference_scores.max())]
        if args.elpv:
            results["elpv"] = elpv_agreement(method, args.layers, folder, args.elpv, backends)
    return results


def elpv_agreement(method: str, layers: int, folder: Path, count: int, backends: list[str]) -> dict:
    """On ELPV (mono cells): the bank of 2 normal train cells, thresholds calibrated on 8 other normal train
    cells (5 % false alarms, each runtime on its own scores), `count` test cells (half defective). Per runtime
    backend of `backends` (float32 and int8): image AUROC, and against its float32 runtime the largest score
    difference and the share of test verdicts flipped."""
    import torch

    from hf_fsad.calibration import fit_calibration
    from hf_fsad.data import load_benchmark
    from hf_fsad.deploy.run_exported import ExportedModel
    from hf_fsad.metrics.functional import image_auroc

    data = load_benchmark("elpv", None, "mono")
    train, test = data["train"], data["test"]
    labels = np.asarray(test["label"])
    chosen = [*np.flatnonzero(labels == 0)[: count // 2], *np.flatnonzero(labels == 1)[: count - count // 2]]
    test = test.select(chosen)
    model = random_model(method, layers)
    references = [image.convert("RGB") for image in train.select(range(2))["image"]]
    held_out = [image.convert("RGB") for image in train.select(range(2, 10))["image"]]
    processor = model.image_processor()
    if model.needs_anomalous_references or model.fits_per_category:
        return {"skipped": "builds its bank from defective cells or fits per category: toy rows only"}
    with torch.no_grad():
        bank = model.build_reference_bank(processor(references, return_tensors="pt").pixel_values, "mono")
    runtimes = [
        backend
        for backend in backends
        if backend in ("onnxruntime", "openvino-f32") or backend in INT8_EXPORTS
    ]
    elpv_folder = folder / "elpv"
    export_all(model, bank, elpv_folder, runtimes, references)
    test_pixels = processor(
        [image.convert("RGB") for image in test["image"]], return_tensors="np"
    ).pixel_values
    held_out_pixels = processor(held_out, return_tensors="np").pixel_values
    results = {"test_images": len(chosen), "held_out_normals": len(held_out), "runtimes": {}}
    verdicts = {}
    for backend in runtimes:
        exported = ExportedModel(elpv_folder / export_folder(backend))
        scores = np.concatenate(
            [exported(test_pixels[i : i + 4])["image_scores"] for i in range(0, len(test_pixels), 4)]
        )
        normal = exported(held_out_pixels)
        calibration = fit_calibration(
            torch.from_numpy(normal["image_scores"]), None, normal_source="held_out", false_alarm_rate=0.05
        )
        verdicts[backend] = scores > calibration.image_threshold
        results["runtimes"][backend] = {
            "image_auroc": float(image_auroc(labels[chosen], scores)),
            "scores": scores.tolist(),
        }
    for backend, row in results["runtimes"].items():
        float_backend = "onnxruntime" if backend.startswith("onnxruntime") else "openvino-f32"
        if backend != float_backend and float_backend in verdicts:
            row["flipped"] = float(np.mean(verdicts[backend] != verdicts[float_backend]))
            row["max_score_error"] = float(
                np.abs(np.asarray(row["scores"]) - results["runtimes"][float_backend]["scores"]).max()
            )
    return results


def markdown(report: dict) -> str:
    cpu = report["cpu"]
    batches = " | ".join(f"batch {size}: s/image (× eager)" for size in report["batch_sizes"])
    lines = [
        f"CPU: {cpu['model']}, {cpu['cores']} logical cores, flags: {', '.join(cpu['flags']) or 'none of ' + str(CPU_FLAGS)}.",
        "",
        f"| method | backend | {batches} | peak memory (MB) | max score error | max map error |",
        "|---|---|" + "---|" * len(report["batch_sizes"]) + "---|---|---|",
    ]
    for method, result in report["methods"].items():
        eager = result["backends"]["eager"]["seconds_per_image"]
        for backend, row in result["backends"].items():
            if "failed" in row:
                lines.append(f"| {method} | {backend} | failed (exit {row['returncode']}): {row['failed']} |")
                continue
            cells = [
                f"{row['seconds_per_image'][key]:.3f} ({row['seconds_per_image'][key] / eager[key]:.2f}×)"
                for key in sorted(row["seconds_per_image"], key=int)
            ]
            map_error = f"{row['map_error']:.1e}" if "map_error" in row else "–"
            lines.append(
                f"| {method} | {backend} | {' | '.join(cells)} | {row['peak_memory_mb']:.0f} | "
                f"{row['score_error']:.1e} | {map_error} |"
            )
    rates = report.get("matmul_gflops")
    if rates:
        lines += [
            "",
            "Float32 matrix product of the tower's MLP shape (3616 x 896 @ 896 x 3584), GFLOP/s: "
            + ", ".join(f"{name} {rate:.0f}" for name, rate in rates.items())
            + ".",
        ]
    lines += [
        "",
        "Export time (s): "
        + "; ".join(
            f"{method}: ONNX {r['export_seconds']['onnx']:.0f}, OpenVINO {r['export_seconds']['openvino']:.0f}"
            for method, r in report["methods"].items()
        )
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--methods", nargs="+", default=["winclip", "metacan", "afclip", "anomalous_memory", "vtfusion"]
    )
    parser.add_argument(
        "--backends", nargs="+", choices=BACKENDS, help="default: all (bf16 where the CPU has it)"
    )
    parser.add_argument("--elpv", type=int, default=0, help="ELPV test cells of the int8 agreement (0: none)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--child", choices=BACKENDS, help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = run_backend(args.child, Path(args.folder), args.batch_sizes, args.repeats)
        print(json.dumps(result))
        return
    from hf_fsad.io import atomic_write_text  # here: a runtime child imports no hf_fsad (and so no torch)

    cpu = cpu_description()
    has_bf16 = bool({"avx512_bf16", "amx_bf16"} & set(cpu["flags"]))
    backends = [backend for backend in args.backends or BACKENDS if backend != "openvino-bf16" or has_bf16]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"cpu": cpu, "layers": args.layers, "repeats": args.repeats, "batch_sizes": args.batch_sizes}
    previous = out / "export_speed.json"
    # methods measured by earlier runs with the same settings are kept (one method per run is fine)
    if previous.exists():
        kept = json.loads(previous.read_text())
        if {key: kept.get(key) for key in report} == report:
            report["methods"] = kept["methods"]
    report.setdefault("methods", {})
    report["matmul_gflops"] = matmul_rates()
    for method in args.methods:
        report["methods"][method] = measure(method, args, backends)
        # written after each method, so a long run leaves what it measured so far
        atomic_write_text(out / "export_speed.json", json.dumps(report, indent=2) + "\n")
        atomic_write_text(out / "export_speed.md", markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
