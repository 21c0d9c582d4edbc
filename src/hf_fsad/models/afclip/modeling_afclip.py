"""AF-CLIP (zero-shot) and AF-CLIP+ (few-shot): anomaly-focused CLIP ("AF-CLIP: Zero-Shot Anomaly Detection
via Anomaly-Focused CLIP Adaptation", ACM MM 2025)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import create_causal_mask

from ...backbones.clip import ClipBackbone
from ...bank import ReferenceBank
from ...modeling_base import FsadPreTrainedModel
from ...modeling_outputs import AnomalyDetectionOutput
from ...scoring import reference_association
from .configuration_afclip import AfClipConfig
from .functional_afclip import afclip_token_probabilities, gaussian_blur, spatial_aggregation


class AttentionAdapter(nn.Module):
    """AF-CLIP Eqs. 3-4: LayerNorm, then multi-head self-attention over all tokens of a set (q/k/v without
    bias, output projection back to the width with bias). No residual: the output replaces the features."""

    def __init__(self, width: int, num_heads: int, head_dim: int):
        super().__init__()
        inner = num_heads * head_dim
        self.num_heads, self.head_dim = num_heads, head_dim
        self.norm = nn.LayerNorm(width)
        self.query = nn.Linear(width, inner, bias=False)
        self.key = nn.Linear(width, inner, bias=False)
        self.value = nn.Linear(width, inner, bias=False)
        self.output = nn.Linear(inner, width)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch, length, _ = tokens.shape
        normed = self.norm(tokens)

        def heads(projection: nn.Linear) -> torch.Tensor:
            return projection(normed).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        attended = F.scaled_dot_product_attention(heads(self.query), heads(self.key), heads(self.value))
        return self.output(attended.transpose(1, 2).reshape(batch, length, -1))


def encode_text_with_context(
    backbone: ClipBackbone, prompts: Sequence[str], context: torch.Tensor, placement: str = "after_start"
) -> torch.Tensor:
    """AF-CLIP's learnable prompts: projected text embeddings (n, P) of `prompts` with learnable token embeddings `context` (c, W)
    spliced into every prompt: right after the start token ("after_start", a prefix of the words) or before
    it ("before_start"). Differentiable in `context`; the pooled token is the end-of-text token, whose
    index shifts by c."""
    if placement not in ("after_start", "before_start"):
        raise ValueError(f"placement must be 'after_start' or 'before_start', got {placement!r}.")
    if backbone.tokenizer is None:
        raise ValueError("This model has no tokenizer, so it cannot embed prompts.")
    text_model = backbone.clip.text_model
    device = context.device
    input_ids = backbone.tokenizer(list(prompts), padding=True, return_tensors="pt").input_ids.to(device)
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
    hidden = text_model.encoder(inputs_embeds=hidden, attention_mask=mask, is_causal=True).last_hidden_state
    hidden = text_model.final_layer_norm(hidden)
    end = (input_ids == backbone.tokenizer.eos_token_id).int().argmax(dim=-1) + context.shape[0]
    return backbone.clip.text_projection(hidden[torch.arange(len(prompts), device=device), end])


class AfClipModel(FsadPreTrainedModel):
    """AF-CLIP turns CLIP's features anomaly-focused: raw tokens of four blocks are spatially aggregated over
    1/3/5-patch Gaussian windows, passed through one shared attention adapter (or LoRA on the vision tower)
    and CLIP's projection, and compared with learned "... without/with defect." prompts; the logits of all
    layers and windows are summed (Eqs. 2-10). The CLS token gives the image score, the patches the map
    (upsampled and Gaussian-smoothed). With k normal references (AF-CLIP+) each patch is also scored by its
    distance to a memory of the references' aggregated raw tokens, fused as Eq. 18.

    Trained parameters: the prompt context and the adapter (or the LoRA weights); the backbone is frozen.
    """

    config_class = AfClipConfig
    needs_training = True
    trained_parts_name = "adapter and prompts"
    how_to_get_weights = (
        "train them (accelerate launch training/train_afclip.py --config training/configs/afclip.yaml; "
        "docs/training.md) or convert the authors' weights (hf-fsad convert --afclip-official PROMPT ADAPTOR "
        "OUT), and score the saved model"
    )
    memory_prefixes = ("memory.",)

    def __init__(self, config: AfClipConfig):
        super().__init__(config)
        clip_config = config.clip_config
        self.adapter = None
        if config.adapter_type == "attention":
            self.adapter = AttentionAdapter(
                clip_config.vision_config.hidden_size, config.adapter_num_heads, config.adapter_head_dim
            )
        context = (
            torch.randn(config.num_context_tokens, clip_config.text_config.hidden_size)
            * config.context_init_std
        )
        self.context = nn.Parameter(context)
        self.post_init()
        if config.adapter_type == "lora":  # after post_init, whose initialisation would overwrite LoRA's
            self._inject_lora()

    @torch.no_grad()
    def _init_weights(self, module):
        if module is self:
            nn.init.normal_(self.context, std=self.config.context_init_std)
        super()._init_weights(module)

    def _inject_lora(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        targets = [
            f"encoder.layers.{layer - 1}.self_attn.{name}"
            for layer in sorted(set(self.config.feature_layers))
            for name in self.config.lora_target_modules
        ]
        lora = LoraConfig(r=self.config.lora_rank, lora_alpha=self.config.lora_alpha, target_modules=targets)
        inject_adapter_in_model(lora, self.backbone.clip.vision_model)

    def freeze_backbone(self) -> None:
        """Freeze CLIP; LoRA weights injected into it stay trainable."""
        super().freeze_backbone()
        for name, parameter in self.backbone.clip.named_parameters():
            if "lora_" in name:
                parameter.requires_grad_(True)

    @torch.no_grad()
    def merge_lora(self) -> AfClipModel:
        """Fold the LoRA weights into the vision tower and drop the LoRA layers (`adapter_type` becomes
        "none"): the same outputs, without LoRA's extra matmuls. Returns the model."""
        from peft.tuners.lora import LoraLayer

        if self.config.adapter_type != "lora":
            raise ValueError(
                f"This model has no LoRA weights to merge (adapter_type={self.config.adapter_type!r})."
            )
        vision = self.backbone.clip.vision_model
        for name, module in list(vision.named_modules()):
            if isinstance(module, LoraLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(vision.get_submodule(parent), child, module.get_base_layer())
        self.config.adapter_type = "none"
        self.invalidate_feature_key()
        self.freeze_backbone()
        return self

    def feature_spec(self) -> dict:
        return {**super().feature_spec(), "feature_layers": sorted(set(self.config.feature_layers))}

    def vision_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw tokens (B, 1+N, D), CLS first, after each configured block, as "tokens.<block>";
        differentiable (LoRA training runs through it)."""
        return self.backbone.block_tokens(
            pixel_values.to(self.device, self.dtype), self.config.feature_layers
        )

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """`vision_features` of checked pixels, without gradients (what the benchmark runner caches)."""
        return self.vision_features(self.check_pixels(pixel_values, name))

    def set_names(self) -> list[str]:
        """One name per token set, "<block>.<window>", in the order of `token_sets`."""
        return [
            f"{layer}.{window}"
            for layer in self.config.feature_layers
            for window in self.config.aggregation_windows
        ]

    def token_sets(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Eqs. 5-6: per block and window, the spatially aggregated raw tokens (B, 1+N, D)."""
        grid, sigma = self.grid_size(), self.config.aggregation_sigma
        return [
            spatial_aggregation(features[f"tokens.{layer}"], grid, window, sigma)
            for layer in self.config.feature_layers
            for window in self.config.aggregation_windows
        ]

    def project_sets(self, token_sets: list[torch.Tensor]) -> list[torch.Tensor]:
        """Eq. 7: each set through the shared adapter (if any), CLIP's post-layernorm and projection."""
        if self.adapter is not None:
            token_sets = [self.adapter(tokens) for tokens in token_sets]
        return [self.backbone.project(tokens) for tokens in token_sets]

    def text_embeddings(self) -> torch.Tensor:
        """Eq. 8: (2, P) embeddings of the normal and anomalous state prompts with the learned context."""
        return encode_text_with_context(
            self.backbone, self.config.state_prompts, self.context, self.config.context_placement
        )

    def token_probabilities(self, token_sets: list[torch.Tensor], text_embeddings: torch.Tensor) -> tuple:
        """Eqs. 9-10 on `token_sets`: the anomalous probability of every token (B, 1+N), and the projected
        token sets the probabilities came from."""
        projected = self.project_sets(token_sets)
        return afclip_token_probabilities(projected, text_embeddings, self.config.temperature), projected

    def pixel_maps(self, patch_scores: torch.Tensor) -> torch.Tensor:
        """(B, N) patch scores -> (B, S, S): bilinear upsampling, then Gaussian smoothing with scipy's default
        border mode ("reflect"), as the official code's `gaussian_filter(sigma=4)`."""
        maps = self.to_pixel_maps(patch_scores)
        return gaussian_blur(maps, self.config.map_smoothing_sigma, mode="reflect")

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """The learned prompts' embeddings, plus (AF-CLIP+, Eq. 16) a memory per token set of the references'
        aggregated raw patch tokens, all k images pooled. No references: a zero-shot bank. The prompts are
        generic; `class_name` only labels the bank."""
        tensors = {"text_embeddings": self.text_embeddings()}
        features = self.features_of(reference_pixel_values, reference_features, "reference_pixel_values")
        k = 0
        if features is not None:
            k = features[f"tokens.{self.config.feature_layers[0]}"].shape[0]
            for name, tokens in zip(self.set_names(), self.token_sets(features)):
                tensors[f"memory.{name}"] = tokens[:, 1:].flatten(0, 1)
        return self.bank_from_tensors(class_name or self.config.default_class_name, k, tensors)

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """Zero-shot scores and maps; with references in the bank, AF-CLIP+'s fusion (Eqs. 17-18)."""
        bank = self.bank_or_default(reference_bank)
        token_sets = self.token_sets(features)
        probabilities, _ = self.token_probabilities(token_sets, bank.tensors["text_embeddings"])
        image_scores, maps = probabilities[:, 0], self.pixel_maps(probabilities[:, 1:])
        branch_scores = {"zero_shot": image_scores}
        if bank.k > 0:
            memory_map = torch.stack(
                [
                    reference_association(tokens[:, 1:], bank.tensors[f"memory.{name}"])
                    for name, tokens in zip(self.set_names(), token_sets)
                ]
            ).mean(dim=0)  # Eq. 17, averaged over blocks and windows
            branch_scores["memory"] = memory_map.amax(dim=-1)
            weight = self.config.memory_weight
            image_scores = branch_scores["memory"] + weight * image_scores  # Eq. 18
            maps = self.pixel_maps(memory_map) + weight * maps
        return AnomalyDetectionOutput(
            image_scores=image_scores, anomaly_maps=maps, branch_scores=branch_scores
        )
