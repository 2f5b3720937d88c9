"""One interface over the video target and the event drafter, mini or real: prompts, pixels, generation.

The minis are built from a pretrained text backbone (SmolLM2-135M-Instruct by default) plus small CLIP
towers; their trained parts (towers, projectors, LoRA deltas) ship in a few MB and load over the backbone.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from featspec.xmodal.models.eventchat import EVENT_TOKEN_INDEX, EventChatConfig, EventChatModel, n_event_tokens
from featspec.xmodal.models.lora import apply_lora, merge_lora
from featspec.xmodal.models.temporal import add_temporal_attention
from featspec.errors import FeatspecError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MINI_TEMPLATE = "<|im_start|>user\n{visual}\n{question}<|im_end|>\n<|im_start|>assistant\n"
VIDEO_FRAMES = 8  # frames the target sees per clip, as Video-LLaVA samples
TRAINED_PREFIXES = {"video": ("model.video_tower.", "model.multi_modal_projector."),
                    "events": ("model.visual_tower.", "model.visual_projector.", "model.feature_adaptor.")}


def to_pixels(images: np.ndarray, size: int) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> CLIP-normalised float32 (..., 3, size, size)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255.0)
    lead = x.shape[:-3]
    x = x.reshape(-1, *x.shape[-3:]).permute(0, 3, 1, 2)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).reshape(*lead, 3, size, size)


@dataclass
class VLM:
    """A vision-language model with its prompt format: `kind` is "video" (target) or "events" (drafter)."""

    kind: str
    model: torch.nn.Module
    tokenizer: object
    template: str
    eos_ids: list[int]
    add_bos: bool = False  # LLaMA checkpoints expect <s> first; the SmolLM2 chat format has none
    frame_labels: bool = False  # "Frame k:" before each frame's video tokens (the minis; real Video-LLaVA: none)

    @property
    def image_size(self) -> int:
        if self.kind == "video":
            return self.model.config.vision_config.image_size
        return self.model.image_size

    @property
    def visual_tokens(self) -> int:
        if self.kind == "video":
            v = self.model.config.vision_config
            return 8 * ((v.image_size // v.patch_size) ** 2 + 1)
        return n_event_tokens(self.model.config)

    @property
    def pixel_key(self) -> str:
        return "pixel_values_videos" if self.kind == "video" else "event_pixels"

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def prefix_ids(self) -> list[int]:
        """The prompt up to and including the visual placeholder(s): one -200 (events) or one video id per
        visual token. Every question of a clip shares it."""
        before = self.template.split("{visual}")[0]
        if self.kind == "events":
            visual = [EVENT_TOKEN_INDEX]
        elif self.frame_labels:  # the video tokens stay in frame order, so the model's scatter is unchanged
            per = self.visual_tokens // 8
            visual = [t for k in range(8) for t in self.text_ids(f"Frame {k + 1}:") + [self.model.config.video_token_id] * per]
        else:
            visual = [self.model.config.video_token_id] * self.visual_tokens
        bos = [self.tokenizer.bos_token_id] if self.add_bos and self.tokenizer.bos_token_id is not None else []
        return bos + self.text_ids(before) + visual

    def turn_ids(self, question: str) -> list[int]:
        """The prompt after the visual placeholder: the question and the assistant header."""
        return self.text_ids(self.template.split("{visual}")[1].format(question=question))

    def prompt_ids(self, question: str) -> list[int]:
        return self.prefix_ids() + self.turn_ids(question)

    def inputs(self, images: np.ndarray, question: str, device=None) -> dict[str, torch.Tensor]:
        device = device or next(self.model.parameters()).device
        dtype = next(self.model.parameters()).dtype
        ids = torch.tensor([self.prompt_ids(question)], device=device)
        return {"input_ids": ids, self.pixel_key: to_pixels(images, self.image_size)[None].to(device, dtype)}

    def embeds(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Prompt embeddings with visual features in place (what the language model's first layer sees)."""
        if self.kind == "events":
            return self.model.embed_with_events(inputs["input_ids"], inputs["event_pixels"])
        return self.with_video(inputs["input_ids"], self.video_features(inputs["pixel_values_videos"]))

    def video_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 8, 3, S, S) -> projected video tokens (B * 8, tokens per frame, text hidden)."""
        return self.model.model.get_video_features(pixel_values_videos=pixels, return_dict=True).pooler_output

    def with_video(self, input_ids: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """Token embeddings with `video_features` scattered into the video placeholders, in order."""
        emb = self.model.model.get_input_embeddings()(input_ids)
        mask = (input_ids == self.model.config.video_token_id).unsqueeze(-1)
        return emb.masked_scatter(mask, feats.to(emb.dtype))

    @torch.no_grad()
    def generate(self, images: np.ndarray, question: str, max_new_tokens: int = 64) -> list[int]:
        """Greedy answer token ids (EOS excluded), through HF generate."""
        inputs = self.inputs(images, question)
        emb = self.embeds(inputs)
        out = self.model.generate(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long, device=emb.device),
                                  max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=self.eos_ids,
                                  pad_token_id=self.eos_ids[0])
        ids = out[0].tolist()
        for i, t in enumerate(ids):
            if t in self.eos_ids:
                return ids[:i]
        return ids


@dataclass
class MiniSpec:
    """Shape of the mini world models; the target sees 8 frames, the drafter 5 event images."""

    backbone: str = "smollm2-135m"
    image_size: int = 64
    patch_size: int = 16
    vision_hidden: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    drafter_layers: int = 12
    lora_rank: int = 8
    frame_labels: bool = True  # label each frame's tokens in the target prompt: which frame a token is from is
    # then content the language model can match on, which direction answers (first vs last frame) need
    # the target tower attends across its 8 frames before each layer, as Video-LLaVA's LanguageBind tower does
    # (`temporal.py`); minis saved before it existed load with False
    temporal_attention: bool = True
    video_token_id: int = 16  # SmolLM2's unused <empty_output>, so no embedding resize is needed
    image_token_id: int = 15
    extra: dict = field(default_factory=dict)

    def vision_config(self) -> dict:
        return dict(image_size=self.image_size, patch_size=self.patch_size, hidden_size=self.vision_hidden,
                    intermediate_size=4 * self.vision_hidden, num_hidden_layers=self.vision_layers,
                    num_attention_heads=self.vision_heads)


def _backbone(spec: MiniSpec):
    from featspec.models.registry import load_model

    return load_model(spec.backbone, dtype="float32", device="cpu")


def _first_layers(state: dict[str, torch.Tensor], n: int) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("layers.") or int(k.split(".")[1]) < n}


def build_target(spec: MiniSpec, backbone=None) -> VLM:
    """A VideoLlavaForConditionalGeneration: fresh small CLIP towers, the backbone as its language model."""
    from transformers import CLIPVisionConfig, VideoLlavaConfig, VideoLlavaForConditionalGeneration

    bb = backbone or _backbone(spec)
    text = bb.model.config.to_dict()
    layers = spec.extra.get("target_layers", text["num_hidden_layers"])  # tiny test worlds cut the backbone
    text["num_hidden_layers"] = layers
    cfg = VideoLlavaConfig(vision_config=CLIPVisionConfig(**spec.vision_config()).to_dict(),
                           text_config=text, video_token_index=spec.video_token_id,
                           image_token_index=spec.image_token_id, vision_feature_layer=-1,
                           vision_feature_select_strategy="default", projector_hidden_act="gelu")
    torch.manual_seed(0)  # the unused image tower gets a reproducible init, so it need not ship
    model = VideoLlavaForConditionalGeneration(cfg)
    if spec.temporal_attention:
        add_temporal_attention(model.model.video_tower, VIDEO_FRAMES)
    model.model.language_model.load_state_dict(_first_layers(bb.model.model.state_dict(), layers))
    with torch.no_grad():
        model.lm_head.weight.copy_(bb.model.lm_head.weight)
    return VLM("video", model.eval(), bb.tokenizer, MINI_TEMPLATE, [bb.tokenizer.convert_tokens_to_ids("<|im_end|>")],
               frame_labels=spec.frame_labels)


def build_drafter(spec: MiniSpec, backbone=None) -> VLM:
    """An EventChatModel over the backbone's first `drafter_layers` layers and a fresh event tower."""
    bb = backbone or _backbone(spec)
    text = bb.model.config.to_dict()
    for k in ("architectures", "model_type", "transformers_version"):
        text.pop(k, None)
    text["num_hidden_layers"] = spec.drafter_layers
    cfg = EventChatConfig(visual_config=spec.vision_config(), event_feature_adaptor=True, **text)
    torch.manual_seed(1)
    model = EventChatModel(cfg)
    src = _first_layers(bb.model.model.state_dict(), spec.drafter_layers)
    missing, unexpected = model.model.load_state_dict(src, strict=False)
    if unexpected or any(not k.startswith(("visual_", "feature_adaptor")) for k in missing):
        raise FeatspecError(f"backbone {spec.backbone} does not fit the drafter ({(unexpected or missing)[0]})")
    with torch.no_grad():
        model.lm_head.weight.copy_(bb.model.lm_head.weight)
    return VLM("events", model.eval(), bb.tokenizer, MINI_TEMPLATE, [bb.tokenizer.convert_tokens_to_ids("<|im_end|>")])


def language_of(vlm: VLM) -> torch.nn.Module:
    return vlm.model.model.language_model if vlm.kind == "video" else vlm.model.model.layers


def add_lora(vlm: VLM, rank: int) -> None:
    apply_lora(language_of(vlm), rank)


def trained_state(vlm: VLM) -> dict[str, torch.Tensor]:
    """The tensors training changes: towers, projectors, adaptor and LoRA factors (the backbone stays as shipped)."""
    return {k: v for k, v in vlm.model.state_dict().items()
            if k.startswith(TRAINED_PREFIXES[vlm.kind]) or k.endswith(("lora_a", "lora_b"))}


def save_mini(vlm: VLM, spec: MiniSpec, out: Path, meta: dict) -> None:
    """Write config.json + weights.safetensors (bf16) atomically."""
    from safetensors.torch import save_file

    from featspec.io import atomic_dir_write

    def write(d: Path) -> None:
        state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in trained_state(vlm).items()}
        save_file(state, str(d / "weights.safetensors"))
        (d / "config.json").write_text(json.dumps({"kind": vlm.kind, "spec": asdict(spec), **meta}, indent=1))

    atomic_dir_write(Path(out), write)


def _mini_meta(path: Path) -> dict:
    if not (path / "config.json").exists() or not (path / "weights.safetensors").exists():
        raise FeatspecError(f"{path} holds no mini model (config.json + weights.safetensors): run `featspec xmodal prepare`")
    return json.loads((path / "config.json").read_text())


def load_trained(vlm: VLM, path: Path, new_ok: bool = False) -> None:
    """Copy a saved mini's trained tensors into `vlm` (built with LoRA, not merged): loading, or the start of
    a run that continues from it (`xmodal prepare --init`), where `new_ok` lets modules the saved mini lacks
    (temporal mixers) keep their identity init."""
    from safetensors.torch import load_file

    meta = _mini_meta(path)
    if meta["kind"] != vlm.kind:
        raise FeatspecError(f"{path} holds a {meta['kind']} mini, not a {vlm.kind} one: point at the run's target/ or drafter/")
    state = load_file(str(path / "weights.safetensors"))
    expected = trained_state(vlm)
    if new_ok:
        expected = {k: v for k, v in expected.items() if k in state or ".temporal." not in k}
    if set(state) != set(expected) or any(state[k].shape != v.shape for k, v in expected.items()):
        odd = sorted(set(state) ^ set(expected) or [k for k, v in expected.items() if state[k].shape != v.shape])[0]
        raise FeatspecError(f"{path}/weights.safetensors does not match the mini layout ({odd}): re-run `featspec xmodal prepare`")
    with torch.no_grad():
        for k, v in vlm.model.named_parameters():
            if k in state:
                v.copy_(state[k].to(v.dtype))


def load_mini(path: Path, dtype: torch.dtype = torch.bfloat16, device=None, backbone=None) -> VLM:
    """Backbone + shipped tensors, LoRA merged: a plain VideoLlava / EventChat model in `dtype`."""
    meta = _mini_meta(Path(path))
    spec = MiniSpec(**{"temporal_attention": False, **meta["spec"]})
    vlm = (build_target if meta["kind"] == "video" else build_drafter)(spec, backbone)
    add_lora(vlm, spec.lora_rank)
    load_trained(vlm, Path(path))
    merge_lora(language_of(vlm))
    vlm.model.to(device=device or torch.device("cpu"), dtype=dtype).eval().requires_grad_(False)
    return vlm
