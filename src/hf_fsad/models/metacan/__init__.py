"""MetaCAN: `configuration_metacan.MetaCanConfig`, `modeling_metacan.MetaCanModel`."""
