"""Train MetaCAN by AD meta-learning.

    accelerate launch training/train_metacan.py --config training/configs/metacan.yaml [--max-steps N]
    torchrun --nproc_per_node 2 training/train_metacan.py --config ...      # several CPU processes

See `hf_fsad.training.recipes` for the config format and `--set` overrides.
"""

import sys

from hf_fsad.training.recipes import main

if __name__ == "__main__":
    sys.exit(main(method="metacan"))
