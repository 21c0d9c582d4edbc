"""One frozen `transformers.CLIPModel` serving every method's feature needs.

A single vision pass per image yields the patch+position embeddings (input of WinCLIP's windows) and the
raw tokens after any chosen blocks (1-based, as the papers count them). Window embeddings of all windows of
a scale run as one batch of short sequences; text embeddings of a prompt list are computed once and cached.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers import CLIPConfig, CLIPModel
from transformers.masking_utils import create_causal_mask

from ..prompts import winclip_prompts
from ..scoring import ensemble_text_embedding, window_token_indices


@dataclass
class VisionFeatures:
    """What one vision pass returns.

    embeddings: (B, 1+N, D) patch + position embeddings, before `pre_layrnorm` (window inputs).
    hidden_states: block index (1-based) -> (B, 1+N, D) raw tokens after that block.
    last_hidden_state: (B, 1+N, D) raw tokens after the final block.
    grid_size: (h, w) patch grid, N = h*w.
    """

    embeddings: torch.Tensor
    hidden_states: dict[int, torch.Tensor]
    last_hidden_state: torch.Tensor
    grid_size: tuple[int, int]


class ClipBackbone(nn.Module):
    """Feature extraction from a CLIP model; the CLIP weights are frozen by the owning model."""

    def __init__(self, clip_config: CLIPConfig):
        super().__init__()
        self.clip = CLIPModel(clip_config)
        self.tokenizer = None  # a CLIPTokenizer, attached by the owning model after loading
        self._text_cache: dict[tuple[str, ...], torch.Tensor] = {}

    def load_clip_weights(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a `CLIPModel` state dict, also into layers a method wrapped (PEFT LoRA keeps the original
        weight as `<layer>.base_layer.weight`; its own LoRA weights keep their initialisation)."""
        own = self.clip.state_dict()
        renamed = {}
        for key, value in state_dict.items():
            module, _, leaf = key.rpartition(".")
            wrapped = f"{module}.base_layer.{leaf}"
            renamed[wrapped if key not in own and wrapped in own else key] = value
        missing, unexpected = self.clip.load_state_dict(renamed, strict=False)
        missing = [key for key in missing if "lora_" not in key]
        if missing or unexpected:
            raise ValueError(
                f"CLIP weights do not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}."
            )

    @property
    def patch_size(self) -> int:
        return self.clip.config.vision_config.patch_size

    @property
    def num_blocks(self) -> int:
        return self.clip.config.vision_config.num_hidden_layers

    def _run_blocks(self, hidden: torch.Tensor, keep: Sequence[int] = ()) -> tuple[torch.Tensor, dict]:
        kept = {}
        for index, layer in enumerate(self.clip.vision_model.encoder.layers, start=1):
            hidden = layer(hidden, None)
            if index in keep:
                kept[index] = hidden
        return hidden, kept

    def encode_image(self, pixel_values: torch.Tensor, layers: Sequence[int] = ()) -> VisionFeatures:
        """One vision pass; `layers` are the 1-based blocks whose raw tokens to keep."""
        for layer in layers:
            if not 1 <= layer <= self.num_blocks:
                raise ValueError(
                    f"Block {layer} does not exist: the vision tower has blocks 1..{self.num_blocks}."
                )
        vision = self.clip.vision_model
        height, width = pixel_values.shape[-2:]
        native = self.clip.config.vision_config.image_size
        embeddings = vision.embeddings(
            pixel_values, interpolate_pos_encoding=(height, width) != (native, native)
        )
        last, kept = self._run_blocks(vision.pre_layrnorm(embeddings), keep=layers)
        grid = (height // self.patch_size, width // self.patch_size)
        return VisionFeatures(embeddings, kept, last, grid)

    def block_tokens(self, pixel_values: torch.Tensor, layers: Sequence[int]) -> dict[str, torch.Tensor]:
        """Raw tokens (B, 1+N, D), CLS first, after each of `layers`, as "tokens.<block>" (differentiable)."""
        layers = sorted(set(layers))
        hidden_states = self.encode_image(pixel_values, layers=layers).hidden_states
        return {f"tokens.{layer}": hidden_states[layer] for layer in layers}

    def post_norm(self, tokens: torch.Tensor) -> torch.Tensor:
        """CLIP's `post_layernorm`, applied to any tokens."""
        return self.clip.vision_model.post_layernorm(tokens)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """`post_layernorm` then `visual_projection`: tokens into the joint image-text space."""
        return self.clip.visual_projection(self.post_norm(tokens))

    def encode_windows(
        self, embeddings: torch.Tensor, grid_size: tuple[int, int], scales: Sequence[int]
    ) -> list[torch.Tensor]:
        """WinCLIP window embeddings, one (B, W_s, P) tensor per scale.

        Each window is CLS + the window's patch embeddings run through every block; its CLS output is
        normalised and projected. All windows of all images of a scale form one batch; scales have different
        sequence lengths, so each scale is its own pass (padding them to one length would cost more compute).
        """
        batch, _, width = embeddings.shape
        cls_token, patches = embeddings[:, :1], embeddings[:, 1:]
        pre_norm = self.clip.vision_model.pre_layrnorm
        outputs = []
        for scale in scales:
            indices = window_token_indices(grid_size, scale).to(embeddings.device)
            num_windows = indices.shape[0]
            windows = patches[:, indices]  # (B, W, scale*scale, D)
            cls_tokens = cls_token.unsqueeze(1).expand(batch, num_windows, 1, width)
            sequences = torch.cat([cls_tokens, windows], dim=2).reshape(batch * num_windows, -1, width)
            last, _ = self._run_blocks(pre_norm(sequences))
            outputs.append(self.project(last[:, 0]).reshape(batch, num_windows, -1))
        return outputs

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (n, P) of `prompts`, computed once per prompt list."""
        key = tuple(prompts)
        if not key:
            raise ValueError("No prompts given to encode.")
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer, so it cannot embed prompts. Load it with `from_pretrained` or "
                "`from_clip` from a directory or Hub repo that holds the CLIP tokenizer files."
            )
        cached = self._text_cache.get(key)
        device = self.clip.text_projection.weight.device
        if cached is None or cached.device != device:
            tokens = self.tokenizer(list(key), padding=True, truncation=True, return_tensors="pt").to(device)
            with torch.no_grad():
                cached = self.clip.get_text_features(**tokens).pooler_output
            self._text_cache[key] = cached
        return cached

    def state_embeddings(self, class_name: str, normalize_each: bool = True) -> torch.Tensor:
        """(2, P) WinCLIP ensemble embeddings of the normal and the anomalous state of `class_name` (see
        `ensemble_text_embedding` for `normalize_each`)."""
        return torch.stack(
            [
                ensemble_text_embedding(self.encode_text(prompts), normalize_each)
                for prompts in winclip_prompts(class_name)
            ]
        )

    def encode_text_with_context(
        self, prompts: Sequence[str], context: torch.Tensor, placement: str = "after_start"
    ) -> torch.Tensor:
        """Projected text embeddings (n, P) of `prompts` with learnable token embeddings `context` (c, W)
        spliced into every prompt: right after the start token ("after_start", a prefix of the words) or before
        it ("before_start"). Differentiable in `context`; the pooled token is the end-of-text token, whose
        index shifts by c."""
        if placement not in ("after_start", "before_start"):
            raise ValueError(f"placement must be 'after_start' or 'before_start', got {placement!r}.")
        if self.tokenizer is None:
            raise ValueError("This model has no tokenizer, so it cannot embed prompts.")
        text_model = self.clip.text_model
        device = context.device
        input_ids = self.tokenizer(list(prompts), padding=True, return_tensors="pt").input_ids.to(device)
        length = input_ids.shape[1] + context.shape[0]
        if length > text_model.config.max_position_embeddings:
            raise ValueError(
                f"Prompts of {input_ids.shape[1]} tokens plus {context.shape[0]} learnable tokens exceed the text "
                f"encoder's {text_model.config.max_position_embeddings} positions."
            )
        words = text_model.embeddings.token_embedding(input_ids)
        learned = context.to(words.dtype).unsqueeze(0).expand(len(prompts), -1, -1)
        if placement == "after_start":
            tokens = torch.cat([words[:, :1], learned, words[:, 1:]], dim=1)
        else:
            tokens = torch.cat([learned, words], dim=1)
        hidden = text_model.embeddings(inputs_embeds=tokens)
        mask = create_causal_mask(
            config=text_model.config, inputs_embeds=hidden, attention_mask=None, past_key_values=None
        )
        hidden = text_model.encoder(
            inputs_embeds=hidden, attention_mask=mask, is_causal=True
        ).last_hidden_state
        hidden = text_model.final_layer_norm(hidden)
        end = (input_ids == self.tokenizer.eos_token_id).int().argmax(dim=-1) + context.shape[0]
        return self.clip.text_projection(hidden[torch.arange(len(prompts), device=device), end])
