"""Prompt ensembles: templates and state words used to build text embeddings.

The WinCLIP ensemble (Jeong et al., CVPR 2023) combines state words ("flawless {}", "{} with defect", ...)
with photo templates ("a cropped photo of the {}.", ...). Both a/the variants of every template are kept
(22 templates, as InCTRL does); anomalib lists one template twice instead (21).
"""

from __future__ import annotations

NORMAL_STATES: tuple[str, ...] = (
    "{}",
    "flawless {}",
    "perfect {}",
    "unblemished {}",
    "{} without flaw",
    "{} without defect",
    "{} without damage",
)

ANOMALOUS_STATES: tuple[str, ...] = (
    "damaged {}",
    "{} with flaw",
    "{} with defect",
    "{} with damage",
)

TEMPLATES: tuple[str, ...] = (
    "a cropped photo of the {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a close-up photo of the {}.",
    "a bright photo of a {}.",
    "a bright photo of the {}.",
    "a dark photo of the {}.",
    "a dark photo of a {}.",
    "a jpeg corrupted photo of a {}.",
    "a jpeg corrupted photo of the {}.",
    "a blurry photo of the {}.",
    "a blurry photo of a {}.",
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of the small {}.",
    "a photo of a large {}.",
    "a photo of the large {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} for visual inspection.",
    "a photo of the {} for anomaly detection.",
    "a photo of a {} for anomaly detection.",
)

DEFAULT_CLASS_NAME = "object"


def state_prompts(
    class_name: str, states: tuple[str, ...], templates: tuple[str, ...] = TEMPLATES
) -> list[str]:
    """Every template filled with every state filled with `class_name` (state-major order)."""
    if not class_name or not class_name.strip():
        raise ValueError("class_name must be a non-empty string, e.g. 'screw' or 'object'.")
    return [template.format(state.format(class_name.strip())) for state in states for template in templates]


def check_templates(templates: tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`templates` as a tuple, after checking there is at least one and each has one `{}` for the state."""
    if not templates:
        raise ValueError("No prompt templates given: give at least one, e.g. 'a photo of a {}.'.")
    for template in templates:
        if template.count("{}") != 1:
            raise ValueError(f"A prompt template needs exactly one '{{}}' for the state, got {template!r}.")
    return tuple(templates)


def winclip_prompts(
    class_name: str, templates: tuple[str, ...] | list[str] = TEMPLATES
) -> tuple[list[str], list[str]]:
    """The (normal, anomalous) prompt lists of the WinCLIP ensemble for one class."""
    templates = check_templates(templates)
    return (
        state_prompts(class_name, NORMAL_STATES, templates),
        state_prompts(class_name, ANOMALOUS_STATES, templates),
    )
