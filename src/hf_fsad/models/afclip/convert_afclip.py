"""The AF-CLIP authors' trained weights -> a `save_pretrained` `AfClipModel`.

The official code (github.com/Faustinaqq/AF-CLIP) releases, per auxiliary dataset, `<dataset>_prompt.pt` (the
learned token embeddings, a (1, c, W) tensor) and `<dataset>_adaptor.pt` (the whole `clip.adaptor.Adaptor`
module, pickled by `torch.save`). Both are read with `torch.load(weights_only=True)`: tensors, and the few
module classes of the adaptor as inert stand-ins that only receive their attributes. A file naming any other
global (a function to call, another class) is refused, so no code from a checkpoint ever runs.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import torch

from .modeling_afclip import AfClipModel

# The classes a pickled official adaptor is made of: its own three, and the torch layers inside them.
ADAPTOR_CLASSES = (
    "clip.adaptor.Adaptor",
    "clip.adaptor.BasicTransformerBlock",
    "clip.adaptor.CrossAttention",
    "torch.nn.modules.linear.Linear",
    "torch.nn.modules.normalization.LayerNorm",
    "torch.nn.modules.container.Sequential",
    "torch.nn.modules.dropout.Dropout",
)
# The official adaptor's attention heads (`BasicTransformerBlock`'s fixed 8 x 64), for a bare state dict.
OFFICIAL_HEADS = 8
# Official adaptor parameter -> `AttentionAdapter` parameter.
ADAPTOR_NAMES = {
    "attention.norm.weight": "norm.weight",
    "attention.norm.bias": "norm.bias",
    "attention.attn.to_q.weight": "query.weight",
    "attention.attn.to_k.weight": "key.weight",
    "attention.attn.to_v.weight": "value.weight",
    "attention.attn.to_out.0.weight": "output.weight",
    "attention.attn.to_out.0.bias": "output.bias",
}


class PickledModule:
    """Stand-in for a pickled `nn.Module`: keeps the attributes the pickle gives it, runs nothing."""

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)

    def parameters_by_name(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Every parameter of this module and its submodules, under `nn.Module.state_dict` names."""
        found = {
            f"{prefix}{name}": tensor.detach()
            for name, tensor in self.__dict__.get("_parameters", {}).items()
            if tensor is not None
        }
        for name, module in self.__dict__.get("_modules", {}).items():
            found |= module.parameters_by_name(f"{prefix}{name}.")
        return found


STAND_INS = {name: type(name.rpartition(".")[2], (PickledModule,), {}) for name in ADAPTOR_CLASSES}


def _load_restricted(path: str | os.PathLike, what: str):
    """`torch.load(path, weights_only=True)` with the adaptor's classes as stand-ins; anything else refused."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"The official AF-CLIP {what} file {path} does not exist.")
    if torch.torch_version.TorchVersion(torch.__version__) < (2, 6):
        raise RuntimeError(
            f"Reading official AF-CLIP files safely needs torch >= 2.6 (stand-ins allowlisted under the "
            f"pickled names); this is torch {torch.__version__}."
        )
    try:
        with torch.serialization.safe_globals([(stand_in, name) for name, stand_in in STAND_INS.items()]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        named = re.search(r"GLOBAL (\S+)", str(error))
        culprit = f"`{named.group(1)}`" if named else "something other than tensors"
        raise ValueError(
            f"{path} is not an official AF-CLIP {what} file: it names {culprit}, which this converter does not "
            f"load (it reads tensors and the adaptor classes {', '.join(ADAPTOR_CLASSES)} only)."
        ) from None


def load_official_prompt(path: str | os.PathLike) -> torch.Tensor:
    """The learned token embeddings (c, W) of an official `<dataset>_prompt.pt` ((1, c, W) or (c, W))."""
    prompt = _load_restricted(path, "prompt")
    if not isinstance(prompt, torch.Tensor):
        raise ValueError(  # noqa: TRY004 (the file's content is wrong, not an argument's type)
            f"{path} holds a {type(prompt).__name__}, not the prompt tensor of token embeddings."
        )
    if prompt.ndim == 3 and prompt.shape[0] == 1:
        prompt = prompt[0]
    if prompt.ndim != 2:
        raise ValueError(
            f"{path} holds a tensor of shape {tuple(prompt.shape)}, not (1, c, W) token embeddings."
        )
    return prompt.detach().float()


def load_official_adaptor(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], int]:
    """The `AttentionAdapter` state dict of an official `<dataset>_adaptor.pt` (the pickled module, or its
    state dict), and its number of attention heads."""
    adaptor = _load_restricted(path, "adaptor")
    pickled_module = isinstance(adaptor, STAND_INS["clip.adaptor.Adaptor"])
    if pickled_module:
        state = adaptor.parameters_by_name()
    elif isinstance(adaptor, dict) and all(isinstance(value, torch.Tensor) for value in adaptor.values()):
        state = dict(adaptor)
    else:
        raise ValueError(f"{path} holds a {type(adaptor).__name__}, not an official AF-CLIP adaptor.")
    if set(state) != set(ADAPTOR_NAMES):
        raise ValueError(
            f"{path} has the parameters {sorted(state)}, not those of the official adaptor "
            f"{sorted(ADAPTOR_NAMES)}."
        )
    heads = int(adaptor._modules["attention"]._modules["attn"].heads) if pickled_module else OFFICIAL_HEADS
    return {ADAPTOR_NAMES[name]: tensor.float() for name, tensor in state.items()}, heads


def convert_official_afclip(
    prompt_path: str | os.PathLike,
    adaptor_path: str | os.PathLike,
    clip_name_or_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: int = 518,
    trained_on: str | None = None,
    hub_kwargs: dict | None = None,
) -> Path:
    """Write an `AfClipModel` with the official prompt and adaptor around `clip_name_or_path` (OpenAI's
    ViT-L/14@336, `openai/clip-vit-large-patch14-336`, for the released weights) to `output_dir`.

    The config is the official code's: `image_size` 518 (37x37 patches), bilinear position grid, prompt
    context before the start token, blocks at the ends of the tower's four quarters.
    """
    context = load_official_prompt(prompt_path)
    adapter_state, heads = load_official_adaptor(adaptor_path)
    inner = adapter_state["query.weight"].shape[0]
    if inner % heads:
        raise ValueError(f"The adaptor's {inner} attention features do not split into {heads} heads.")
    model = AfClipModel.from_clip(
        clip_name_or_path,
        hub_kwargs,
        image_size=image_size,
        num_context_tokens=context.shape[0],
        adapter_type="attention",
        adapter_num_heads=heads,
        adapter_head_dim=inner // heads,
        trained_on=trained_on,
        trained_parts="converted",
    )
    if model.context.shape != context.shape:
        raise ValueError(
            f"The prompt's token embeddings are {context.shape[1]} wide, but the CLIP text tower's are "
            f"{model.context.shape[1]}: give the CLIP the weights were trained on."
        )
    width = model.config.clip_config.vision_config.hidden_size
    if adapter_state["norm.weight"].shape[0] != width:
        raise ValueError(
            f"The adaptor works on {adapter_state['norm.weight'].shape[0]}-wide tokens, but the CLIP vision "
            f"tower's are {width} wide: give the CLIP the weights were trained on."
        )
    with torch.no_grad():
        model.context.copy_(context)
    model.adapter.load_state_dict(adapter_state)
    output_dir = Path(output_dir)
    model.save_pretrained(output_dir)
    return output_dir
