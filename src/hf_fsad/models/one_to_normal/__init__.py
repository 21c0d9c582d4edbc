"""One-to-Normal: `configuration_one_to_normal.OneToNormalConfig`, `modeling_one_to_normal.OneToNormalModel`."""
