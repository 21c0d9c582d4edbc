"""The per-image feature cache: backbone features encoded once per image and reused.

Benchmarks and trainers of frozen-backbone methods ask for the features of many images again and again (per
k, seed, method, training step); `FeatureCache` encodes each image once per `model.feature_key()` and paper
preprocessing, and keeps the result in memory or as safetensors on disk.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file

from .io import IMAGE_READING_RULE, to_upright_rgb
from .modeling_base import FsadPreTrainedModel
from .progress import progress_bar


class FeatureCache:
    """Per-image features keyed by (model.feature_key(), the paper preprocessing, the image reading rule, image
    id), in memory or as safetensors on disk. Images are preprocessed with `model.paper_image_processor()`."""

    recent_requests = 2

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        # The last few stacked requests (a cell asks for its references, then the same test set again).
        self._recent: dict[tuple, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def _file(self, key: str, image_id: str) -> Path:
        return self.directory / key / f"{hashlib.sha1(image_id.encode()).hexdigest()}.safetensors"

    def _get(self, key: str, image_id: str) -> dict[str, torch.Tensor] | None:
        if self.directory is None:
            return self._memory.get((key, image_id))
        file = self._file(key, image_id)
        return load_file(file) if file.is_file() else None

    def _put(self, key: str, image_id: str, features: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self._memory[(key, image_id)] = features
            return
        file = self._file(key, image_id)
        file.parent.mkdir(parents=True, exist_ok=True)
        # A temporary of this process's own: cells running at once on a shared cache may write one file.
        handle, temporary = tempfile.mkstemp(dir=file.parent, prefix=file.name, suffix=".tmp")
        os.close(handle)
        try:
            save_file({name: tensor.contiguous() for name, tensor in features.items()}, temporary)
            os.replace(temporary, file)
        finally:
            Path(temporary).unlink(missing_ok=True)

    def features(
        self,
        model: FsadPreTrainedModel,
        dataset: Dataset,
        rows: Sequence[int],
        batch_size: int = 8,
        desc: str = "",
    ) -> dict[str, torch.Tensor]:
        """Stacked `model.encode_images` features of `dataset[rows]`, encoding only the images not cached."""
        if not rows:
            raise ValueError(f"No images to encode ({desc or 'empty selection'}).")
        key = f"{model.feature_key()}-{model.config.paper_preprocessing}-read{IMAGE_READING_RULE}"
        prefix = dataset.info.dataset_name or "dataset"
        ids = [f"{prefix}:{path}" for path in dataset.select(rows)["path"]]
        request = (key, tuple(ids))
        if request in self._recent:
            self.hits += len(ids)
            return self._recent[request]
        found = {image_id: self._get(key, image_id) for image_id in ids}
        missing = [row for row, image_id in zip(rows, ids) if found[image_id] is None]
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        processor = model.paper_image_processor()
        for start in progress_bar(
            range(0, len(missing), batch_size), desc=desc or "encoding", unit="batch", disable=not missing
        ):
            batch = dataset.select(missing[start : start + batch_size])
            pixel_values = processor(
                [to_upright_rgb(image) for image in batch["image"]], return_tensors="pt"
            ).pixel_values
            encoded = model.encode_images(pixel_values)
            for index, path in enumerate(batch["path"]):
                features = {name: tensor[index].detach().cpu().clone() for name, tensor in encoded.items()}
                self._put(key, f"{prefix}:{path}", features)
                found[f"{prefix}:{path}"] = features
        stacked = {name: torch.stack([found[image_id][name] for image_id in ids]) for name in found[ids[0]]}
        self._recent[request] = stacked
        while len(self._recent) > self.recent_requests:
            self._recent.pop(next(iter(self._recent)))
        return stacked
