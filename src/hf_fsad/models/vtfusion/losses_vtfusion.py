"""VTFusion training losses, Eqs. 3, 4, 8, 10 (Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network
for Few-Shot Anomaly Detection").
"""

from __future__ import annotations

import torch


def compactness_loss(normal_distances: torch.Tensor, radius: float = 1e-5) -> torch.Tensor:
    """VTFusion Eq. 3 (NFC): mean over the normal images' locations of max(0, D(F, P*) - r^2)."""
    return torch.relu(normal_distances - radius**2).mean()


def separation_loss(
    anomalous_distances: torch.Tensor,
    anomalous_locations: torch.Tensor,
    radius: float = 1e-5,
    margin: float = 0.1,
) -> torch.Tensor:
    """VTFusion Eq. 4 (AFS): mean over the anomalous locations of max(0, (r + alpha)^2 - D(F, P*)).

    anomalous_distances: (B, N) D(F^va, P*); anomalous_locations: (B, N) bool, the synthetic defects' patches
    (the normal parts of an anomalous image are not pushed away). 0 when no location is anomalous.
    """
    hinge = torch.relu((radius + margin) ** 2 - anomalous_distances)
    if not anomalous_locations.any():
        return hinge.sum() * 0
    return hinge[anomalous_locations].mean()


def mse_segmentation_loss(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """VTFusion Eq. 8: mean squared error between the maps M^f (B, H, W) and the ground-truth masks."""
    return (anomaly_maps - masks.to(anomaly_maps.dtype)).pow(2).mean()


def vtfusion_loss(
    normal_distances: torch.Tensor,
    anomalous_distances: torch.Tensor,
    anomalous_locations: torch.Tensor,
    anomaly_maps: torch.Tensor,
    masks: torch.Tensor,
    radius: float = 1e-5,
    margin: float = 0.1,
    segmentation_weight: float = 1.0,
    use_separation: bool = True,
) -> dict[str, torch.Tensor]:
    """VTFusion Eq. 10: L_NFC + L_AFS + lambda x L_SEG (the paper prints L_AFS twice; it means
    NFC + AFS). use_separation=False drops both contrastive terms (the "w/o AIE" ablation). Returns every
    term and "total"."""
    compactness = compactness_loss(normal_distances, radius)
    separation = separation_loss(anomalous_distances, anomalous_locations, radius, margin)
    segmentation = mse_segmentation_loss(anomaly_maps, masks)
    total = segmentation_weight * segmentation
    if use_separation:
        total = total + compactness + separation
    return {
        "compactness": compactness,
        "separation": separation,
        "segmentation": segmentation,
        "total": total,
    }
