"""VTFusion: `configuration_vtfusion.VtFusionConfig`, `modeling_vtfusion.VtFusionModel`."""
