"""The real models behind the minis: Video-LLaVA-7B (transformers) and EventGPT checkpoints.

Not run on this CPU-only machine (7B weights, no hub); the same `VLM` interface the minis use, so every
cross-modal command accepts these on a GPU machine. Tests load tiny random checkpoints in both layouts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from featspec.xmodal.models.eventchat import EventChatConfig, EventChatModel
from featspec.xmodal.models.vlm import VLM
from featspec.errors import FeatspecError

VIDEO_LLAVA_TEMPLATE = "USER: {visual}\n{question} ASSISTANT:"
EVENTGPT_SYSTEM = ("A chat between a curious human and an artificial intelligence assistant. "
                   "The assistant gives helpful, detailed, and polite answers to the human's questions.")
EVENTGPT_TEMPLATE = EVENTGPT_SYSTEM + " USER: {visual}\n{question} ASSISTANT:"


def _source(spec: str) -> str:
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").exists():
            raise FeatspecError(f"{p} has no config.json: point at a checkpoint directory")
        return str(p)
    if len(spec.split("/")) == 2 and not spec.startswith((".", "~", "/")):
        return spec  # a hub id; needs a network
    raise FeatspecError(f"'{spec}' is neither a checkpoint directory nor a hub id like org/name")


def _eos(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []


def load_video_llava(spec: str = "LanguageBind/Video-LLaVA-7B-hf", dtype: torch.dtype = torch.float16, device=None) -> VLM:
    """VideoLlavaForConditionalGeneration + its tokenizer; 8 frames x 257 tokens at 224 px."""
    from transformers import AutoTokenizer, VideoLlavaForConditionalGeneration

    src = _source(spec)
    try:
        model = VideoLlavaForConditionalGeneration.from_pretrained(src, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(src)
    except OSError as exc:
        raise FeatspecError(f"could not load Video-LLaVA from '{spec}' ({str(exc).splitlines()[0]}): "
                            "check the path or the network") from None
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval().requires_grad_(False)
    return VLM("video", model, tokenizer, VIDEO_LLAVA_TEMPLATE, _eos(tokenizer), add_bos=True)


def _eventgpt_state(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(path.glob("pytorch_model*.bin"))
        if not bins:
            raise FeatspecError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load_eventgpt(path: str, dtype: torch.dtype = torch.float16, device=None, visual_tower: str | None = None) -> VLM:
    """An EventGPT checkpoint directory: LLaMA + visual projector + feature adaptor (+ tower weights if saved).

    EventGPT's config names its CLIP tower in `mm_visual_tower`; pass `visual_tower` to point at a local copy.
    Tower keys written by older transformers (`...visual_tower.vision_model.*`) are mapped onto this layout.
    """
    from transformers import AutoTokenizer, CLIPVisionModel

    src = Path(_source(path))
    raw = json.loads((src / "config.json").read_text())
    raw.pop("model_type", None)
    if visual_tower:
        raw["mm_visual_tower"] = visual_tower
    if not raw.get("mm_visual_tower") and not raw.get("visual_config"):
        raise FeatspecError(f"{src}/config.json names no vision tower: pass --visual-tower pointing at CLIP ViT-L/14-336")
    config = EventChatConfig(**{k: v for k, v in raw.items() if k not in ("architectures", "transformers_version")})
    model = EventChatModel(config)
    state = _eventgpt_state(src)
    prefix = "model.visual_tower.visual_tower."
    fixed = {}
    for k, v in state.items():
        if k.startswith(prefix + "vision_model."):
            k = prefix + k[len(prefix + "vision_model."):]
        fixed[k] = v
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    tower_missing = [k for k in missing if k.startswith(prefix)]
    if tower_missing and config.mm_visual_tower:
        tower = CLIPVisionModel.from_pretrained(config.mm_visual_tower)  # EventGPT keeps the frozen tower apart
        model.model.visual_tower.visual_tower.load_state_dict(tower.state_dict())
        missing = [k for k in missing if not k.startswith(prefix)]
    missing = [k for k in missing if k != "lm_head.weight" or not config.tie_word_embeddings]
    if missing or unexpected:
        raise FeatspecError(f"{src} is not an EventGPT checkpoint: {'missing ' + missing[0] if missing else 'unexpected ' + unexpected[0]}")
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    model.to(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype).eval().requires_grad_(False)
    return VLM("events", model, tokenizer, EVENTGPT_TEMPLATE, _eos(tokenizer), add_bos=True)
