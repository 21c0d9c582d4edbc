"""Profiling: per-image latency and work of each method beside a bare backbone forward, setup costs, peak
memory and how latency grows with the number of references (`profile_models` -> profile.{json,md,png})."""

from __future__ import annotations

import copy
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Self

import numpy as np
import torch

from ..io import atomic_write_text
from ..modeling_base import FsadPreTrainedModel
from ..progress import progress_bar


@dataclass
class ProfileRow:
    """One method's costs, measured beside a bare backbone forward of the same size in the same run.

    Per batch size: seconds per image, images per second, and the bare forward's seconds per image (the
    smallest batch size is timed after a warm-up call, larger ones without, to keep long runs bearable). Setup:
    the prompt ensemble + bank assembly from encoded references (text cache cleared), encoding the 2
    references, and for methods fitted per category one fit of `fit_steps` updates on them. Peak memory:
    growth of the process's resident memory (CUDA: allocated memory) while the largest batch is timed. Work:
    the floating-point operations of scoring one query and of one bare forward (`matmul_flops`).
    """

    method: str
    per_image_seconds: dict[int, float]
    images_per_second: dict[int, float]
    bare_forward_seconds: dict[int, float]
    text_setup_seconds: float
    reference_seconds: float | None
    fit_seconds: float | None
    fit_steps: int | None
    peak_memory_mb: float
    k_scaling: dict[int, float] | None
    flops_per_image: int
    bare_forward_flops: int

    def bare_forward_multiple(self, batch_size: int) -> float:
        """Per-image cost in bare backbone forwards of the same batch size."""
        return self.per_image_seconds[batch_size] / self.bare_forward_seconds[batch_size]

    def work_multiple(self) -> float:
        """Per-image work (`matmul_flops`, one query scored) in bare backbone forwards: the floor of
        `bare_forward_multiple` where both run at the same arithmetic rate."""
        return self.flops_per_image / self.bare_forward_flops


def matmul_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of `function`'s matrix products, convolutions and attention, as torch's
    FlopCounterMode counts them (elementwise work is not counted; MultiheadAttention's fused fast path is
    off meanwhile, so its products are counted too). The algorithm's work, whatever the machine."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_attention not in torch.utils.flop_counter.flop_registry:

        @register_flop_formula(cpu_attention)
        def _(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            function()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def alternating_medians(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    before: dict[str, Callable[[], object]] | None = None,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds that call them in turn, after one untimed
    round if `warm_up`; `before[name]` runs untimed before each call of `name`. Alternating keeps ratios
    between the functions honest on a machine whose speed drifts."""
    times = {name: [] for name in functions}
    for attempt in range(repeats + warm_up):
        for name, function in functions.items():
            if before is not None and name in before:
                before[name]()
            started = time.perf_counter()
            function()
            if attempt or not warm_up:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(
    function: Callable[[], object],
    repeats: int,
    before: Callable[[], object] | None = None,
    warm_up: bool = True,
) -> float:
    """Median wall time of one function (see `alternating_medians`)."""
    return alternating_medians({"": function}, repeats, None if before is None else {"": before}, warm_up)[""]


class _PeakMemory:
    """Peak memory growth (MB) inside a `with` block: CUDA's allocator peak, or on CPU the growth of the
    resident set size's high-water mark, which Linux keeps exactly (VmHWM, reset through
    /proc/self/clear_refs). Where the mark cannot be reset, a background thread samples the resident size
    every few milliseconds instead, and a peak shorter than that can be missed."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _status_mb(field: str) -> float:
        with open("/proc/self/status") as handle:
            line = next(line for line in handle if line.startswith(f"{field}:"))
        return int(line.split()[1]) / 1024  # kB

    @staticmethod
    def _reset_high_water_mark() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as handle:
                handle.write("5")  # Linux >= 4.0: VmHWM := VmRSS
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._highest = max(self._highest, self._status_mb("VmRSS"))

    def __enter__(self) -> Self:
        import threading

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
            return self
        self._start = self._highest = self._status_mb("VmRSS")
        self._sampler = None
        if not self._reset_high_water_mark():
            self._stop = threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        elif self._sampler is None:
            self.peak_mb = self._status_mb("VmHWM") - self._start
        else:
            self._stop.set()
            self._sampler.join()
            self.peak_mb = max(self._highest, self._status_mb("VmRSS")) - self._start


@torch.no_grad()
def profile_models(
    models: dict[str, FsadPreTrainedModel],
    images: Sequence,
    out_dir: str | os.PathLike,
    ks: Sequence[int] = (2, 8, 32, 128, 256),
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 3,
    fit_steps: int = 2,
) -> list[ProfileRow]:
    """Profile every model side by side: per-image latency and images/s at each batch size, each as a
    multiple of a bare backbone forward of the same size; setup (prompt ensemble, 2 references, a short
    fit for per-category methods); peak memory; per-image latency as the bank grows to k references (the 2
    encoded references repeated: the search costs as for k distinct images). Writes profile.{json,md} and
    plots to `out_dir`, rewritten after each method so a long run keeps what it has measured.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, model in progress_bar(models.items(), desc="profiling", unit="method"):
        rows.append(_profile_model(method, model, images, ks, batch_sizes, repeats, fit_steps))
        _write_profile(out_dir, rows, ks, batch_sizes)
    return rows


def _profile_model(
    method: str,
    model: FsadPreTrainedModel,
    images: Sequence,
    ks: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int,
    fit_steps: int,
) -> ProfileRow:
    images = [image.convert("RGB") for image in images]
    largest = max(batch_sizes)
    if len(images) < largest + 2:
        raise ValueError(f"Profiling needs at least {largest + 2} images, got {len(images)}.")
    pixels = model.image_processor()(images[: largest + 2], return_tensors="pt").pixel_values
    references, queries = pixels[:2].to(model.device), pixels[2:].to(model.device)

    fit_seconds = None
    if model.fits_per_category:
        model = copy.deepcopy(model)
        started = time.perf_counter()
        with torch.enable_grad():
            model.fit(images[:2], class_name=model.config.default_class_name, steps=fit_steps)
        fit_seconds = time.perf_counter() - started
        model.eval()
    # Methods that keep what they learnt from their references (VTFusion's prototypes) build banks without.
    own_references = model.saves_its_references
    reference_features = None if own_references else model.encode_images(references)

    def bank_from_features():
        return _profile_bank(model, reference_features)

    text_setup = median_seconds(bank_from_features, repeats, before=model.backbone.clear_text_cache)
    reference_seconds = (
        None if own_references else median_seconds(lambda: model.encode_images(references), repeats)
    )
    bank = bank_from_features()
    per_image, bare = {}, {}
    for size in sorted(batch_sizes):  # the smallest batch warms up; the largest is timed for peak memory
        batch, warm_up = queries[:size], size == min(batch_sizes)
        with _PeakMemory(model.device) as memory:
            timed = alternating_medians(
                {
                    "model": _scorer(model, batch, bank),
                    "bare": lambda batch=batch: model.backbone.encode_image(batch),
                },
                repeats,
                warm_up=warm_up,
            )
        per_image[size], bare[size] = timed["model"] / size, timed["bare"] / size
    flops = matmul_flops(_scorer(model, queries[:1], bank))
    bare_flops = matmul_flops(lambda: model.backbone.encode_image(queries[:1]))
    scaling = None
    if not own_references:
        scaling = {}
        for k in ks:
            repeat = -(-k // 2)
            tiled = {
                name: tensor.repeat_interleave(repeat, dim=0)[:k]
                for name, tensor in reference_features.items()
            }
            scaling[k] = median_seconds(_scorer(model, queries[:1], _profile_bank(model, tiled)), repeats)
    return ProfileRow(
        method=method,
        per_image_seconds=per_image,
        images_per_second={size: 1 / seconds for size, seconds in per_image.items()},
        bare_forward_seconds=bare,
        text_setup_seconds=text_setup,
        reference_seconds=reference_seconds,
        fit_seconds=fit_seconds,
        fit_steps=fit_steps if fit_seconds is not None else None,
        peak_memory_mb=memory.peak_mb,
        k_scaling=scaling,
        flops_per_image=flops,
        bare_forward_flops=bare_flops,
    )


def _profile_bank(model: FsadPreTrainedModel, reference_features: dict[str, torch.Tensor] | None):
    """A bank of the given references (none: the model's own, e.g. fitted prototypes); for methods that need
    anomalous references the last one serves as a mask-less anomalous reference (same search cost)."""
    if reference_features is None:
        return model.build_reference_bank()
    if not model.needs_anomalous_references:
        return model.build_reference_bank(reference_features=reference_features)
    normal = {name: tensor[:-1] for name, tensor in reference_features.items()}
    anomalous = {name: tensor[-1:] for name, tensor in reference_features.items()}
    return model.build_reference_bank(reference_features=normal, anomalous_features=anomalous)


def _scorer(model: FsadPreTrainedModel, pixel_values: torch.Tensor, bank):
    return lambda: model(pixel_values, reference_bank=bank)


def _write_profile(
    out_dir: Path, rows: list[ProfileRow], ks: Sequence[int], batch_sizes: Sequence[int]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    atomic_write_text(out_dir / "profile.json", json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    speed = " | ".join(f"batch {size}: s/image (× bare) | batch {size}: images/s" for size in batch_sizes)
    lines = [
        f"| method | work: GFLOP/image (× bare) | {speed} | setup: prompts + bank (s) | setup: 2 refs (s) "
        + "| fit (s) | peak memory (MB) |",
        "|---|---|" + "---|---|" * len(batch_sizes) + "---|---|---|---|",
    ]
    for row in rows:
        cells = " | ".join(
            f"{row.per_image_seconds[size]:.3f} ({row.bare_forward_multiple(size):.2f}×) | "
            f"{row.images_per_second[size]:.2f}"
            for size in batch_sizes
        )
        fit = "–" if row.fit_seconds is None else f"{row.fit_seconds:.1f} ({row.fit_steps} updates)"
        references = "–" if row.reference_seconds is None else f"{row.reference_seconds:.2f}"
        lines.append(
            f"| {row.method} | {row.flops_per_image / 1e9:.1f} ({row.work_multiple():.2f}×) | {cells} "
            f"| {row.text_setup_seconds:.2f} | {references} | {fit} | {row.peak_memory_mb:.0f} |"
        )
    scaled = [row for row in rows if row.k_scaling]
    lines += [
        "",
        "| method | " + " | ".join(f"k={k} (× k={ks[0]})" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for row in scaled:
        base = row.k_scaling[ks[0]]
        ratios = " | ".join(f"{row.k_scaling[k]:.3f} s ({row.k_scaling[k] / base:.2f}×)" for k in ks)
        lines.append(f"| {row.method} | {ratios} |")
        axes[1].plot(list(ks), [row.k_scaling[k] / base for k in ks], marker="o", label=row.method)
    axes[1].set(xscale="log", xlabel="references k", ylabel=f"latency / latency at k={ks[0]}")
    axes[1].set_xticks(list(ks), [str(k) for k in ks])
    axes[1].axhline(1.0, color="grey", linestyle=":")
    if scaled:
        axes[1].legend(fontsize=7)
    positions = np.arange(len(rows))
    width = 0.8 / len(batch_sizes)
    for offset, size in enumerate(batch_sizes):
        multiples = [row.bare_forward_multiple(size) for row in rows]
        axes[0].bar(positions + offset * width, multiples, width, label=f"batch {size}")
    axes[0].axhline(1.3, color="grey", linestyle=":", label="1.3×")
    axes[0].set_xticks(
        positions + width * (len(batch_sizes) - 1) / 2, [row.method for row in rows], rotation=30, ha="right"
    )
    axes[0].set(yscale="log", ylabel="per-image cost / bare backbone forward")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "profile.png", dpi=90)
    plt.close(figure)
    atomic_write_text(out_dir / "profile.md", "\n".join(lines) + "\n\n![cost and k scaling](profile.png)\n")
