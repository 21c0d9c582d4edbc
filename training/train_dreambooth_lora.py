"""Fit One-to-Normal's anomaly-free customised model: DreamBooth with LoRA on the Stable Diffusion UNet.

    accelerate launch training/train_dreambooth_lora.py --normal good/ --class-name bottle --out one-to-normal-bottle \
        [--clip openai/clip-vit-large-patch14] [--diffusion-model stable-diffusion-v1-5/stable-diffusion-v1-5] [--steps 400]

The paper's settings where it states them: --full-finetune (DreamBooth trains the UNet's weights; try
--learning-rate 5e-6) --text-temperature 1 (Eq. 6 with no scale) --resolution 240; Stable Diffusion's own
size is not stated (--diffusion-resolution, default --resolution). See `OneToNormalConfig`.

Saves the model with `pytorch_lora_weights.safetensors` beside it (diffusers' LoRA format); load it with
`AutoModel.from_pretrained` (needs the `diffusers` extra).
"""

import sys

from hf_fsad.training.recipes import dreambooth_main as main

if __name__ == "__main__":
    sys.exit(main())
