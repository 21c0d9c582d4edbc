"""What every trained method shares: the Accelerate loop (`trainer.py`), the focal loss (`losses.py`) and the
YAML recipes and command lines behind the `training/*.py` scripts (`recipes.py`). Each method's own trainer is
`models/<method>/training_<method>.py`."""
