"""Per-image latency, peak memory and score error of PyTorch eager, `--compile`, ONNX Runtime and OpenVINO (f32,
and bf16 where the CPU has it) for each exported method, at batch 1 and 16; and the float32 matrix-product
rate of each backend (`matmul_rates`).

    .venv/bin/python benchmarks/export_speed.py [--methods winclip metacan afclip anomalous_memory vtfusion]
        [--layers 12] [--repeats 2] [--out benchmarks/results]

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

BACKENDS = ("eager", "compile", "onnxruntime", "openvino-f32", "openvino-bf16")
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
        export = folder / ("onnx" if backend == "onnxruntime" else "openvino")
        spec = importlib.util.spec_from_file_location("run_exported", export / "run_exported.py")
        runner = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(runner)  # the copy in the export folder: no torch in this process
        precision = backend.rpartition("-")[2] if backend.startswith("openvino") else "f32"
        exported = runner.ExportedModel(export, precision=precision)

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


def prepare(method: str, layers: int, folder: Path) -> dict:
    """Save a random model of `method`, its toy bank and 16 toy queries into `folder`; export it to ONNX and
    OpenVINO there. Returns the export times."""
    import torch

    from hf_fsad.data import load_toy
    from hf_fsad.export import export_model
    from hf_fsad.registry import method_spec
    from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config

    torch.manual_seed(0)
    spec = method_spec(method)
    model = spec.model(spec.config(clip_config=vit_b16_plus_240_config(layers))).eval()
    model.tokenizer = byte_level_clip_tokenizer()
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
    export_seconds = {}
    for name in ("onnx", "openvino"):
        started = time.perf_counter()
        export_model(model, bank, folder / name, format=name)
        export_seconds[name] = time.perf_counter() - started
    return export_seconds


def measure(method: str, args: argparse.Namespace, backends: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        export_seconds = prepare(method, args.layers, folder)
        results = {"export_seconds": export_seconds, "backends": {}}
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
            completed = subprocess.run(command, check=False, capture_output=True, text=True)
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
    backends = [backend for backend in BACKENDS if backend != "openvino-bf16" or has_bf16]
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
