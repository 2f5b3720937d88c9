"""An EventGPT-class model: CLIP tower over event images, visual projector, feature adaptor, LLaMA.

Module names follow EventGPT's checkpoints (`model.visual_tower.visual_tower.*`, `model.visual_projector.{0,2}`,
`model.feature_adaptor`, `model.layers.*`, `lm_head`) so the same class loads the real 7B model and the mini.
The event placeholder is EventGPT's -200 in `input_ids`; it is replaced by 5 temporal + N spatial tokens.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaForCausalLM

EVENT_TOKEN_INDEX = -200


class EventChatConfig(LlamaConfig):
    model_type = "EventChat_llama"

    def __init__(self, visual_config: dict | None = None, mm_visual_tower: str | None = None,
                 event_feature_adaptor: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.visual_config = visual_config  # a CLIP vision config dict (minis); real EventGPT names a tower instead
        self.mm_visual_tower = mm_visual_tower
        self.event_feature_adaptor = event_feature_adaptor


class VisualTower(nn.Module):
    """Wrapper kept for EventGPT's key names (`visual_tower.visual_tower.vision_model.*`)."""

    def __init__(self, config: CLIPVisionConfig) -> None:
        super().__init__()
        self.visual_tower = CLIPVisionModel(config)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.visual_tower(pixel_values=pixels).last_hidden_state  # EventGPT keeps every token, CLS too


def vision_config_of(config: EventChatConfig) -> CLIPVisionConfig:
    if config.visual_config:
        return CLIPVisionConfig(**config.visual_config)
    if config.mm_visual_tower:
        return CLIPVisionConfig.from_pretrained(config.mm_visual_tower)
    raise ValueError("EventChat config names no vision tower: set visual_config or mm_visual_tower")


class EventChatModel(LlamaForCausalLM):
    config_class = EventChatConfig

    def __init__(self, config: EventChatConfig) -> None:
        super().__init__(config)
        vcfg = vision_config_of(config)
        h = config.hidden_size
        self.model.visual_tower = VisualTower(vcfg)
        self.model.visual_projector = nn.Sequential(nn.Linear(vcfg.hidden_size, h), nn.GELU(), nn.Linear(h, h))
        self.model.feature_adaptor = nn.Linear(h, h) if config.event_feature_adaptor else nn.Identity()
        self.post_init()

    @property
    def image_size(self) -> int:
        return self.model.visual_tower.visual_tower.config.image_size

    def event_tokens(self, event_pixels: torch.Tensor) -> torch.Tensor:
        """(B, n_images, 3, S, S) -> (B, n_images + N, H): per-image mean tokens, then tokens averaged over time."""
        b, n = event_pixels.shape[:2]
        tower = self.model.visual_tower
        feats = tower(event_pixels.flatten(0, 1).to(next(tower.parameters()).dtype))
        feats = self.model.feature_adaptor(self.model.visual_projector(feats.to(self.model.visual_projector[0].weight.dtype)))
        feats = feats.unflatten(0, (b, n))  # (B, n, N, H)
        return torch.cat([feats.mean(dim=2), feats.mean(dim=1)], dim=1)

    def embed_with_events(self, input_ids: torch.Tensor, event_pixels: torch.Tensor) -> torch.Tensor:
        """Text embeddings with the event tokens spliced in at the single -200 of each row."""
        embeds = self.model.embed_tokens(input_ids.clamp_min(0))
        tokens = self.event_tokens(event_pixels).to(embeds.dtype)
        rows = []
        for i in range(input_ids.shape[0]):
            at = (input_ids[i] == EVENT_TOKEN_INDEX).nonzero()
            if len(at) != 1:
                raise ValueError(f"row {i} has {len(at)} event placeholders (-200); put exactly one in the prompt")
            j = int(at[0])
            rows.append(torch.cat([embeds[i, :j], tokens[i], embeds[i, j + 1:]]))
        return torch.stack(rows)

    def forward(self, input_ids=None, event_pixels=None, inputs_embeds=None, **kwargs):
        if event_pixels is not None:
            if input_ids is None:
                raise ValueError("event_pixels need input_ids with the -200 placeholder")
            inputs_embeds, input_ids = self.embed_with_events(input_ids, event_pixels), None
        return super().forward(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)


def n_event_tokens(config: EventChatConfig, n_images: int = 5) -> int:
    v = vision_config_of(config)
    return n_images + (v.image_size // v.patch_size) ** 2 + 1
