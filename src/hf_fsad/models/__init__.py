"""One sub-package per method: `configuration_<method>.py` and `modeling_<method>.py`."""
