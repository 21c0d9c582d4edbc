"""What may calibrate a bank, decided before any image is scored (one place for the CLI, the pipeline and the
Space): references without exact copies (a copy of a left-out reference stays in its leave-one-out bank),
held-out normals that are not references (the bank holds those), generated references counted (a content
hash cannot tell them from photographs: `GENERATED_IMAGE_INFO` marks them), and whether a calibration fits the
runtime and precision the images are scored at.

Light: no torch, so the command line reads it before the model loads.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

    from .calibration import Calibration

# The `PIL.Image.info` key marking a generated image (One-to-Normal's `augment_references_with_generated`).
GENERATED_IMAGE_INFO = "hf_fsad.generated"


@dataclass
class SeparatedImages:
    """The references without exact copies, the held-out normals without the references' images, how many
    references are generated (`ReferenceBank.generated_references`) and notes saying what was left out."""

    references: list[Image.Image]
    held_out_normals: list[Image.Image]
    generated_references: int
    notes: list[str]


def image_digest(image: Image.Image) -> str:
    """SHA-256 of an image's decoded RGB pixels and size: equal for exact copies, whatever their files."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def separate_calibration_images(
    references: Sequence[Image.Image], held_out_normals: Sequence[Image.Image] = ()
) -> SeparatedImages:
    """Exact copies among `references` (same decoded pixels) left out but the first, and the
    `held_out_normals` that are also references left out, each with a note: a copy of a left-out reference
    would stay in its leave-one-out bank, and a held-out image in the bank is not held out. Generated
    references (marked `GENERATED_IMAGE_INFO` by `augment_references_with_generated`) are counted. A ValueError
    when every held-out normal is a reference."""
    kept, seen = [], set()
    for image in references:
        digest = image_digest(image)
        if digest not in seen:
            seen.add(digest)
            kept.append(image)
    notes = []
    if len(kept) < len(references):
        notes.append(
            f"{len(references) - len(kept)} of the {len(references)} reference images are exact copies of "
            "others (same pixels) and were left out: leave-one-out would keep a left-out image's copy in "
            "the bank"
        )
    held_out = [image for image in held_out_normals if image_digest(image) not in seen]
    if held_out_normals and not held_out:
        raise ValueError(
            f"all {len(held_out_normals)} held-out normal images are also reference images: the bank holds "
            "them, so they cannot calibrate it; give normal images that are not references"
        )
    if len(held_out) < len(held_out_normals):
        notes.append(
            f"{len(held_out_normals) - len(held_out)} of the {len(held_out_normals)} held-out normal images "
            "are also reference images and were left out of the calibration: the bank holds them"
        )
    generated = sum(bool(image.info.get(GENERATED_IMAGE_INFO)) for image in kept)
    return SeparatedImages(kept, held_out, generated, notes)


def calibration_mismatch(calibration: Calibration, runtime: str, precision: str) -> str | None:
    """Why `calibration`'s thresholds do not fit scores computed on `runtime` at `precision` (it was fitted
    on other ones), or None."""
    if (calibration.runtime, calibration.precision) == (runtime, precision):
        return None
    return (
        f"the bank's calibration was fitted on {calibration.runtime} at {calibration.precision}, but the "
        f"images are scored on {runtime} at {precision}"
    )
