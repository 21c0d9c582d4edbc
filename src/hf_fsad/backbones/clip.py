"""One frozen `transformers.CLIPModel` serving every method's feature needs.

A single vision pass per image yields the patch+position embeddings (input of WinCLIP's windows) and the
raw tokens after any chosen blocks (1-based, as the papers count them). The windows of all scales run as one
batch of packed short sequences; each prompt's text embedding is computed once and cached.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPConfig, CLIPModel

from ..configuration_base import POSITION_INTERPOLATIONS
from ..prompts import TEMPLATES, winclip_prompts
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
    """Feature extraction from a CLIP model; the CLIP weights are frozen by the owning model.

    position_interpolation: resampling of the position-embedding grid for other image sizes, "bicubic" or
    "bilinear" (see `resize_position_embeddings`).
    """

    def __init__(self, clip_config: CLIPConfig, position_interpolation: str = "bicubic"):
        super().__init__()
        if position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, got {position_interpolation!r}."
            )
        self.clip = CLIPModel(clip_config)
        self.position_interpolation = position_interpolation
        self.tokenizer = None  # a CLIPTokenizer, attached by the owning model after loading
        self._text_cache: dict[str, torch.Tensor] = {}
        # Window tokens per pass through the tower: bounds the activations' working set (an MLP's hidden
        # states for 1024 tokens are ~15 MB at ViT-B width, inside a CPU's last-level cache; on 2 AMD EPYC
        # cores 1024 ran a 240 px image's windows 15 % faster than one pass). A GPU wants more.
        self.window_tokens_per_pass = 1024

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
        embeddings = self.embed(pixel_values)
        last, kept = self._run_blocks(self.clip.vision_model.pre_layrnorm(embeddings), keep=layers)
        height, width = pixel_values.shape[-2:]
        grid = (height // self.patch_size, width // self.patch_size)
        return VisionFeatures(embeddings, kept, last, grid)

    def embed(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Patch + position embeddings (B, 1+N, D), CLS first. At the checkpoint's image size, transformers'
        own embedding; at other sizes the position grid is resized with `position_interpolation`."""
        embedding = self.clip.vision_model.embeddings
        height, width = pixel_values.shape[-2:]
        native = self.clip.config.vision_config.image_size
        if (height, width) == (native, native):
            return embedding(pixel_values)
        patches = embedding.patch_embedding(pixel_values.to(embedding.patch_embedding.weight.dtype))
        patches = patches.flatten(2).transpose(1, 2)
        tokens = torch.cat([embedding.class_embedding.expand(len(patches), 1, -1), patches], dim=1)
        grid = (height // self.patch_size, width // self.patch_size)
        positions = resize_position_embeddings(
            embedding.position_embedding.weight, grid, self.position_interpolation
        )
        return tokens + positions

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
        """Embeddings of token subsets, one (B, W_s, P) tensor per scale: each subset (a `scale`x`scale` window
        of the patch grid) is encoded on its own with the CLS token. A generic primitive kept in the backbone
        because it is a way to run CLIP; WinCLIP and the anomalous memory use it for their windows.

        Each window is CLS + the window's patch embeddings run through every block; its CLS output is
        normalised and projected. The windows of all scales and images run as one batch: shorter windows are
        packed several to a sequence (see `window_packing`) and a block-diagonal attention mask keeps each
        window to itself, so no compute goes to padding. The last block computes only the CLS outputs, the
        only ones used. Rows go through the tower `window_tokens_per_pass` tokens at a time, so the
        activations stay in cache and a large batch costs per image what a single image does.
        """
        packing = window_packing(grid_size, tuple(scales))
        batch, _, width = embeddings.shape
        rows, length = packing.token_index.shape
        sequences = embeddings[:, packing.token_index.to(embeddings.device)].reshape(
            batch * rows, length, width
        )
        blocked = torch.finfo(embeddings.dtype).min
        mask = torch.zeros(packing.attend.shape, dtype=embeddings.dtype, device=embeddings.device)
        mask = mask.masked_fill(~packing.attend.to(embeddings.device), blocked)
        mask = mask.unsqueeze(1).repeat(batch, 1, 1, 1)  # (B*R, 1, L, L)
        slots = packing.cls_positions.to(embeddings.device).repeat(batch, 1)  # (B*R, S)
        # An exported graph takes any batch: one pass, not a batch-dependent count of chunks.
        if torch.compiler.is_exporting():
            chunks = [(sequences, mask, slots)]
        else:
            rows_per_pass = max(1, self.window_tokens_per_pass // length)
            chunks = zip(*(part.split(rows_per_pass) for part in (sequences, mask, slots)))
        cls_outputs = torch.cat([self._window_tower(*chunk) for chunk in chunks])
        projected = self.project(cls_outputs).reshape(batch, rows * slots.shape[1], -1)
        return [projected[:, order.to(embeddings.device)] for order in packing.window_slots]

    def _window_tower(self, sequences: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """Packed window sequences (R, L, D) through the vision blocks -> raw CLS outputs (R, S, D)."""
        *layers, last_layer = self.clip.vision_model.encoder.layers
        hidden = self.clip.vision_model.pre_layrnorm(sequences)
        for layer in layers:
            hidden = layer(hidden, mask)
        length = sequences.shape[1]
        query_mask = mask.gather(2, slots[:, None, :, None].expand(-1, 1, -1, length))
        return _last_block_at(last_layer, hidden, slots, query_mask)

    def encode_text(self, prompts: Sequence[str]) -> torch.Tensor:
        """Projected text embeddings (n, P) of `prompts`. Each distinct prompt is encoded once and cached
        (a saved model keeps the cache, see `text_cache`); new ones run in batches of similar length so
        little compute goes to padding."""
        if not prompts:
            raise ValueError("No prompts given to encode.")
        if self.tokenizer is None:
            raise ValueError(
                "This model has no tokenizer, so it cannot embed prompts. Load it with `from_pretrained` or "
                "`from_clip` from a directory or Hub repo that holds the CLIP tokenizer files."
            )
        missing = [prompt for prompt in dict.fromkeys(prompts) if prompt not in self._text_cache]
        if missing:
            self._encode_new_prompts(missing)
        device = self.clip.text_projection.weight.device
        return torch.stack([self._text_cache[prompt] for prompt in prompts]).to(device)

    @torch.no_grad()
    def _encode_new_prompts(self, prompts: list[str], batch_size: int = 64) -> None:
        input_ids = self.tokenizer(prompts, truncation=True)["input_ids"]
        by_length = sorted(range(len(prompts)), key=lambda index: len(input_ids[index]))
        device = self.clip.text_projection.weight.device
        for start in range(0, len(prompts), batch_size):
            batch = by_length[start : start + batch_size]
            tokens = self.tokenizer.pad(
                {"input_ids": [input_ids[index] for index in batch]}, return_tensors="pt"
            ).to(device)
            embeddings = self.clip.get_text_features(**tokens).pooler_output
            for index, embedding in zip(batch, embeddings):
                self._text_cache[prompts[index]] = embedding

    @property
    def text_cache(self) -> dict[str, torch.Tensor]:
        """Prompt -> cached projected embedding (P,). Valid for the text weights that computed it (frozen in
        every method); `FsadPreTrainedModel.save_pretrained` stores it beside the weights."""
        return self._text_cache

    def save_text_cache(self, path: str | os.PathLike) -> None:
        """Write the cached prompt embeddings to a safetensors file (prompts in its metadata)."""
        prompts = list(self._text_cache)
        embeddings = torch.stack([self._text_cache[prompt] for prompt in prompts]).detach().cpu().contiguous()
        save_file({"embeddings": embeddings}, str(path), metadata={"prompts": json.dumps(prompts)})

    def load_text_cache(self, path: str | os.PathLike) -> None:
        """Add the prompt embeddings of a file written by `save_text_cache` to the cache."""
        with safe_open(str(path), framework="pt") as handle:
            prompts = (handle.metadata() or {}).get("prompts")
            if prompts is None or "embeddings" not in handle.keys():  # noqa: SIM118 (safe_open has no __contains__)
                raise ValueError(f"{path} is not a text-embedding cache (no prompts or embeddings in it).")
            prompts = json.loads(prompts)
            embeddings = handle.get_tensor("embeddings")
        if len(prompts) != len(embeddings):
            raise ValueError(f"{path} holds {len(embeddings)} embeddings for {len(prompts)} prompts.")
        self._text_cache.update(zip(prompts, embeddings))

    def compile_passes(self, freeze_weights: bool = True, **compile_kwargs) -> None:
        """Compile the vision passes (whole images, packed windows) with `torch.compile` for inference.

        With `freeze_weights` inductor folds the weights in as constants (prepacked matrices): faster, but
        later changes to the weights go unseen. The first call per input shape compiles (tens of seconds).
        """
        options = {"freezing": freeze_weights, **compile_kwargs.pop("options", {})}
        self._run_blocks = torch.compile(self._run_blocks, options=options, **compile_kwargs)
        self._window_tower = torch.compile(self._window_tower, options=options, **compile_kwargs)

    def clear_text_cache(self) -> None:
        """Forget every cached prompt embedding (the next `encode_text` computes them anew)."""
        self._text_cache.clear()

    def state_embeddings(
        self, class_name: str, normalize_each: bool = True, templates: Sequence[str] = TEMPLATES
    ) -> torch.Tensor:
        """(2, P) WinCLIP ensemble embeddings of the normal and the anomalous state of `class_name`, over
        `templates` (see `ensemble_text_embedding` for `normalize_each`)."""
        return torch.stack(
            [
                ensemble_text_embedding(self.encode_text(prompts), normalize_each)
                for prompts in winclip_prompts(class_name, templates)
            ]
        )


def resize_position_embeddings(
    position_embeddings: torch.Tensor, grid_size: tuple[int, int], mode: str = "bicubic"
) -> torch.Tensor:
    """Position embeddings (1+n*n, D) of a square n x n patch grid, CLS first, resized to `grid_size`:
    the CLS position as it is, the grid by `F.interpolate(mode, align_corners=False)`. "bicubic" is what
    transformers' `interpolate_pos_encoding` computes; "bilinear" what AF-CLIP's official code computes
    (and its released weights were trained with). Returns (1+h*w, D)."""
    side = round((position_embeddings.shape[0] - 1) ** 0.5)
    if side * side != position_embeddings.shape[0] - 1:
        raise ValueError(f"{position_embeddings.shape[0] - 1} patch positions do not form a square grid.")
    grid = position_embeddings[1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    resized = F.interpolate(grid, size=grid_size, mode=mode, align_corners=False)
    return torch.cat([position_embeddings[:1], resized.flatten(2)[0].T])


@dataclass(frozen=True)
class WindowPacking:
    """Where every window of every scale sits in the packed batch of `encode_windows`.

    token_index: (R, L) index into an image's [CLS, patch_1 .. patch_N] embeddings for each packed position
        (padding positions repeat CLS and attend only to themselves).
    attend: (R, L, L) True where position i may attend to position j (same window).
    cls_positions: (R, S) position of each window slot's CLS token in its row (S = most windows in a row;
        rows with fewer repeat their last slot).
    window_slots: per scale, (W_s,) flat slot index (row * S + slot) of each window, in window order.
    """

    token_index: torch.Tensor
    attend: torch.Tensor
    cls_positions: torch.Tensor
    window_slots: list[torch.Tensor]


@functools.lru_cache(maxsize=16)
def window_packing(grid_size: tuple[int, int], scales: tuple[int, ...]) -> WindowPacking:
    """Pack the windows of all `scales` (CLS + scale*scale patches each) into rows as long as the longest
    window, as many whole windows to a row as fit. Cached: do not modify the result."""
    if not scales:
        raise ValueError("No window scales given.")
    length = 1 + max(scales) ** 2
    token_rows, segment_rows, cls_rows, placements = [], [], [], []
    segment = 0
    for scale in scales:
        windows = window_token_indices(grid_size, scale) + 1  # CLS is token 0
        windows = torch.cat([torch.zeros(len(windows), 1, dtype=torch.long), windows], dim=1)
        size, per_row = windows.shape[1], length // windows.shape[1]
        first_row = len(token_rows)
        for start in range(0, len(windows), per_row):
            chunk = windows[start : start + per_row]
            padding = length - chunk.numel()
            token_rows.append(torch.cat([chunk.flatten(), torch.zeros(padding, dtype=torch.long)]))
            window_ids = torch.arange(segment, segment + len(chunk)).repeat_interleave(size)
            segment += len(chunk)
            segment_rows.append(torch.cat([window_ids, -1 - torch.arange(padding)]))
            cls_rows.append(torch.arange(len(chunk)) * size)
        placements.append((first_row, per_row, len(windows)))
    slots_per_row = max(len(row) for row in cls_rows)
    cls_positions = torch.stack(
        [torch.cat([row, row[-1:].expand(slots_per_row - len(row))]) for row in cls_rows]
    )
    segments = torch.stack(segment_rows)
    orders = []
    for first_row, per_row, count in placements:
        index = torch.arange(count)
        orders.append((first_row + index // per_row) * slots_per_row + index % per_row)
    return WindowPacking(
        token_index=torch.stack(token_rows),
        attend=segments[:, :, None] == segments[:, None, :],
        cls_positions=cls_positions,
        window_slots=orders,
    )


def _last_block_at(
    layer: nn.Module, hidden: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Outputs (B, S, D) of a `CLIPEncoderLayer` at `positions` (B, S) only: their queries attend to every
    token of their row (under `mask`, (B, 1, S, L) additive), then the MLP runs on those outputs alone."""
    attention = layer.self_attn
    at_positions = positions[..., None].expand(-1, -1, hidden.shape[-1])
    residual = hidden.gather(1, at_positions)
    normed = layer.layer_norm1(hidden)

    def heads(states: torch.Tensor) -> torch.Tensor:
        return states.unflatten(-1, (-1, attention.head_dim)).transpose(1, 2)

    queries = heads(attention.q_proj(normed.gather(1, at_positions)))
    keys, values = heads(attention.k_proj(normed)), heads(attention.v_proj(normed))
    attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=attention.scale)
    outputs = residual + attention.out_proj(attended.transpose(1, 2).flatten(2))
    return outputs + layer.mlp(layer.layer_norm2(outputs))
