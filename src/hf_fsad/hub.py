"""Model cards for saved hf_fsad models (a stub the Hub publishing work extends)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

_USAGE = """```python
import hf_fsad  # registers the hf_fsad methods with AutoModel
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo}")
processor = model.image_processor()
bank = model.build_reference_bank({bank_inputs})
scores = model(processor(images).pixel_values, reference_bank=bank).image_scores
```"""


def model_card(
    model, base_model: str | None = None, datasets: list[str] | None = None, training: str | None = None
) -> ModelCard:
    """A model card for `model`: front matter (library, tags, base model, datasets) and usage text."""
    model_type = model.config.model_type
    data = ModelCardData(
        library_name="hf_fsad",
        tags=["anomaly-detection", "few-shot", "clip", f"hf_fsad-{model_type}"],
        base_model=base_model,
        datasets=datasets or None,
    )
    sections = [
        f"# {type(model).__name__}",
        (type(model).__doc__ or "").strip(),
        "## Usage",
        # a method fitted per category holds its normal images' prototypes already
        _USAGE.format(
            repo="path/or/hub-id",
            bank_inputs=""
            if getattr(model, "fits_per_category", False)
            else "processor(normal_images).pixel_values",
        ),
    ]
    if training:
        sections += ["## Training", training]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(directory: str | os.PathLike, card: ModelCard) -> Path:
    """Save `card` as `directory/README.md`."""
    path = Path(directory) / "README.md"
    card.save(path)
    return path
