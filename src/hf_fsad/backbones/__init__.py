"""CLIP backbone shared by all methods, and the open_clip checkpoint converter."""

from .clip import ClipBackbone, VisionFeatures

__all__ = ["ClipBackbone", "VisionFeatures"]
