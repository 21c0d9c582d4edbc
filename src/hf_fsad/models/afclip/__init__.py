"""AF-CLIP / AF-CLIP+: `configuration_afclip.AfClipConfig`, `modeling_afclip.AfClipModel`."""
