"""Train AF-CLIP's prompt context and adapter (or LoRA) on an auxiliary dataset with masks.

    accelerate launch training/train_afclip.py --config training/configs/afclip.yaml [--max-steps N]
    torchrun --nproc_per_node 2 training/train_afclip.py --config ...      # several CPU processes

See `hf_fsad.training.recipes` for the config format and `--set` overrides.
"""

import sys

from hf_fsad.training.recipes import main

if __name__ == "__main__":
    sys.exit(main(method="afclip"))
