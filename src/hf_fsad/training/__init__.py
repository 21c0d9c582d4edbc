"""Training loops (Accelerate) behind the `training/train_<method>.py` scripts."""
