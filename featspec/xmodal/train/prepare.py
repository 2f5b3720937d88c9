"""`featspec xmodal prepare`: data, then both mini models, each in two resumable stages.

Stage 1 (probe) teaches the small vision tower where each object is, its shape and (RGB only) colour, from
the renderer's per-patch ground truth, the way real VLMs start from a pretrained CLIP; stage 2 (qa) trains
the projector (and adaptor) and LoRA deltas on question answering, tower and text backbone frozen. Each
stage checkpoints atomically; a killed run resumes at its last checkpoint.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featspec.xmodal.models.eventchat import EVENT_TOKEN_INDEX
from featspec.xmodal.train.guide import AttentionGuide, look_targets
from featspec.xmodal.world.qa import GRID, grounding, questions
from featspec.xmodal.world.scenes import DIRECTIONS, Scene, WorldConfig
from featspec.xmodal.models.vlm import VLM, MiniSpec, add_lora, build_drafter, build_target, load_trained, save_mini, to_pixels
from featspec.xmodal.world.clips import SplitData, build_split
from featspec.io import write_json
from featspec.train.loop import Loop, read_checkpoint, warmup_cosine


@dataclass
class PrepareConfig:
    out: Path
    world: WorldConfig = field(default_factory=WorldConfig)
    spec: MiniSpec = field(default_factory=MiniSpec)
    n_train: int = 3000
    # a from-scratch ViT learns shapes late: object-patch shape accuracy 0.41 at 450 steps, 0.54 at 1000,
    # 0.83 at 2150 (colours are right from the start); the drafter's tower needs no colour and less shape
    probe_steps: dict = field(default_factory=lambda: {"video": 3000, "events": 1500})
    probe_batch: int = 32
    qa_steps: dict = field(default_factory=lambda: {"video": 350, "events": 420})  # what the shipped minis got
    qa_batch: int = 4  # clips per step; each packs up to 7 of its questions (`qa_rows`)
    lr: float = 1e-3
    # weight of `PositionKeeper` in each model's QA stage (the first minis had 0): it keeps positions, motion and
    # speed readable in the video tokens, or in the drafter's time-averaged event tokens; 0.5 is what the shipped
    # minis used (docs/crossmodal.md)
    keep_weight: float = 0.5
    # short "where is X in frame k?" turns per target row, besides its questions (`qa.grounding`)
    grounding_turns: int = 0
    # weight of `AttentionGuide` (the target's attention at quoted coordinates, on the named object's patches)
    attend_weight: float = 0.0
    checkpoint_every: int = 50
    seed: int = 0
    roles: tuple[str, ...] = ("target", "drafter")  # which models this run trains
    init: Path | None = None  # a mini run (INIT/target, INIT/drafter) whose weights each trained role starts from
    backbone_dtype: str = "bfloat16"  # the frozen language backbone's dtype while training (weights save as bf16)

    @classmethod
    def tiny(cls, out: Path) -> "PrepareConfig":
        """A minute-scale end-to-end run (tests): 2-layer backbones, a 1-layer tower, a handful of steps."""
        spec = MiniSpec(vision_hidden=32, vision_layers=1, vision_heads=2, drafter_layers=1, lora_rank=2,
                        extra={"target_layers": 2})
        from featspec.drafters.cost import bf16_matmul_is_fast

        # a smoke run takes the fast dtype: emulated bf16 makes it many times slower (docs/crossmodal.md)
        return cls(out=out, spec=spec, n_train=24, probe_steps={"video": 3, "events": 3}, probe_batch=8, qa_steps={"video": 3, "events": 3},
                   qa_batch=2, checkpoint_every=2, backbone_dtype="bfloat16" if bf16_matmul_is_fast() else "float32")


# ---------- the probe stage: local labels for the vision tower ----------

def dense_targets(world: WorldConfig, scenes: list[Scene], kind: str, patch: int, min_cover: float = 0.1
                  ) -> dict[str, torch.Tensor]:
    """Per image and patch: colour and shape of the object covering most of the patch (0 = none below
    `min_cover`), which object that is (`owner`, index + 1; `AttentionGuide`'s targets), that object's centre
    relative to the patch and in the image, its motion (1-4 a direction of `scenes.DIRECTIONS`, 5 in place) and
    speed (1 slow, 2 fast; 0 in place), and per image the object count. A per-frame tower cannot tell motion
    from one image (event images partly can); the target's temporal attention (`temporal.py`) can.

    Every patch an object covers is labelled, not only the one holding its centre: the centre patch of a
    large object is uniformly filled, and the shape shows only at the edges, in the neighbours (with
    centre-only labels the tower learned colours, 95 %, but shapes at 36 %, near the 25 % of chance).
    Events get no colour (they carry none)."""
    from featspec.xmodal.world.scenes import object_centres, object_masks, render_timeline, video_frame_indices

    if kind == "video":
        times = render_timeline(world)
        times = times[video_frame_indices(len(times))]
    else:  # equal-count event chunks of steady motion span about equal times
        times = (np.arange(5) + 0.5) / 5 * world.duration_s
    g = world.size // patch
    n, f = len(scenes), len(times)
    colour = np.zeros((n, f, g * g), dtype=np.int64)
    shape = np.zeros((n, f, g * g), dtype=np.int64)
    offset = np.zeros((n, f, g * g, 4), dtype=np.float32)
    owner = np.zeros((n, f, g * g), dtype=np.int64)
    motion = np.zeros((n, f, g * g), dtype=np.int64)
    speed = np.zeros((n, f, g * g), dtype=np.int64)
    count = np.zeros(n, dtype=np.int64)
    cells = np.stack(np.meshgrid(np.arange(g), np.arange(g), indexing="xy"), -1).reshape(-1, 2)  # (x, y) per cell
    for i, sc in enumerate(scenes):
        count[i] = len(sc.objects) - 1
        masks = object_masks(world, sc, times)  # (F, K, H, W); later objects are drawn on top
        visible, above = np.empty_like(masks), np.ones_like(masks[:, 0])
        for k in reversed(range(len(sc.objects))):
            visible[:, k] = masks[:, k] * above
            above = above * (1 - masks[:, k])
        cover = visible.reshape(f, len(sc.objects), g, patch, g, patch).mean((3, 5)).reshape(f, len(sc.objects), -1)
        best, amount = cover.argmax(1), cover.max(1)  # (F, G*G)
        centres = object_centres(world, sc, times)  # (F, K, 2)
        for k, o in enumerate(sc.objects):
            hit = (best == k) & (amount >= min_cover)
            rows, cols = np.nonzero(hit)
            shape[i, rows, cols] = world.shapes.index(o.shape) + 1
            owner[i, rows, cols] = k + 1
            motion[i, rows, cols] = len(DIRECTIONS) + 1 if o.motion == "spin" else list(DIRECTIONS).index(o.motion) + 1
            speed[i, rows, cols] = 0 if o.motion == "spin" else list(world.speeds).index(o.speed) + 1
            colour[i, rows, cols] = world.colours.index(o.colour) + 1 if kind == "video" else 0
            c = centres[rows, k]
            offset[i, rows, cols] = np.concatenate([c / patch - cells[cols], c / world.size], axis=1)
    return {"colour": torch.from_numpy(colour), "shape": torch.from_numpy(shape), "offset": torch.from_numpy(offset),
            "count": torch.from_numpy(count), "owner": torch.from_numpy(owner), "motion": torch.from_numpy(motion),
            "speed": torch.from_numpy(speed)}


def pooled_over_time(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-image patch labels -> one label set per patch for tokens averaged over the images (EventGPT's spatial
    tokens): each patch takes its labels from the image nearest the middle in which an object covers it."""
    f = t["shape"].shape[1]
    order = sorted(range(f), key=lambda k: (abs(k - (f - 1) / 2), k))  # middle out: most of the average
    pick = torch.full(t["shape"][:, 0].shape, order[0], dtype=torch.long)
    for k in reversed(order):
        pick = torch.where(t["shape"][:, k] > 0, torch.full_like(pick, k), pick)
    out = {}
    for key, v in t.items():
        if key == "count":
            out[key] = v
            continue
        idx = pick.view(*pick.shape, *([1] * (v.dim() - 3)))[:, None].expand(-1, 1, *v.shape[2:])
        out[key] = v.gather(1, idx)  # (N, 1, G*G, ...)
    return out


class DenseProbe(nn.Module):
    """Reads patch tokens into (colour, shape, offset) and the CLS token into a count, and with `motion` the
    patch's object's motion and speed; discarded after stage 1."""

    def __init__(self, dim: int, world: WorldConfig, cells: bool = False, motion: bool = False) -> None:
        super().__init__()
        self.sizes = (len(world.colours) + 1, len(world.shapes) + 1, 4)
        self.patch = nn.Linear(dim, sum(self.sizes))
        self.motion = nn.Linear(dim, len(DIRECTIONS) + 1 + len(world.speeds)) if motion else None
        self.cls = nn.Linear(dim, world.max_objects)
        # the object's grid cell (x and y classes of the grid answers quote), as classes: a language model turns
        # class-like features into words (colours, shapes) but not a regressed coordinate into a digit
        self.cells = nn.Linear(dim, 2 * GRID) if cells else None

    @staticmethod
    def class_weight(n: int, present: torch.Tensor) -> torch.Tensor:
        """Down-weight the "no object" class by how much more common it is."""
        frac = present.float().mean().clamp(1e-3, 1.0)
        w = torch.ones(n)
        w[0] = frac / (1 - frac + 1e-6)
        return w

    def loss(self, tokens: torch.Tensor, t: dict[str, torch.Tensor], idx: list[int], with_colour: bool) -> torch.Tensor:
        """tokens (B, F, 1 + G*G, D) from `tower_tokens`."""
        c, s, _ = self.sizes
        out = self.patch(tokens[:, :, 1:])
        ce = nn.functional.cross_entropy
        shape, present = t["shape"][idx], t["shape"][idx] > 0
        # objectness on every patch, then shape, colour and position where an object is: most patches are
        # empty, and one cross-entropy over all of them let the tower learn "empty" and colours but not shapes
        loss = ce(out[..., c: c + s].flatten(0, 2), shape.flatten(), weight=self.class_weight(s, present))
        if present.any():
            loss = loss + ce(out[..., c + 1: c + s][present], shape[present] - 1)
            if with_colour:
                loss = loss + ce(out[..., 1:c][present], t["colour"][idx][present] - 1)
            loss = loss + 4 * (out[..., c + s:][present] - t["offset"][idx][present]).pow(2).mean()
            if self.cells is not None:
                cell = (t["offset"][idx][present][:, 2:] * GRID).long().clamp(0, GRID - 1)  # centre in the image -> cell
                logits = self.cells(tokens[:, :, 1:][present]).unflatten(-1, (2, GRID))
                loss = loss + ce(logits.flatten(0, 1), cell.flatten())
            if self.motion is not None:
                out_m = self.motion(tokens[:, :, 1:][present])
                m, v = t["motion"][idx][present], t["speed"][idx][present]
                loss = loss + ce(out_m[:, : len(DIRECTIONS) + 1], m - 1)
                if (v > 0).any():
                    loss = loss + ce(out_m[v > 0, len(DIRECTIONS) + 1:], v[v > 0] - 1)
        count = self.cls(tokens[:, :, 0])
        return loss + ce(count.flatten(0, 1), t["count"][idx].repeat_interleave(tokens.shape[1]))


def tower_tokens(vlm: VLM, pixels: torch.Tensor) -> torch.Tensor:
    """(B, F, 3, S, S) -> (B, F, N, D): the tower states the language model is fed from."""
    b, f = pixels.shape[:2]
    flat = pixels.flatten(0, 1)
    if vlm.kind == "video":
        out = vlm.model.model.video_tower(flat, output_hidden_states=True)
        states = out.hidden_states[vlm.model.config.vision_feature_layer]
    else:
        states = vlm.model.model.visual_tower(flat)
    return states.unflatten(0, (b, f))


class PositionKeeper(nn.Module):
    """Probe heads on a model's projected visual tokens and on its language model's states at those tokens (the
    target's video tokens; the drafter's time-averaged event patches, labelled by `pooled_over_time`).

    Trained with QA, so the tokens keep saying where each object is while the projector and LoRA learn to
    answer. Measured on the minis shipped before this (ridge probe, an object's x in frame 1, 363 clips):
    correlation 0.89 from the tower's output, 0.41 after the QA-trained projector and 0.19-0.25 inside the
    language model, so direction answers had nothing to read. With the keeper positions stay in the tokens,
    yet directions did not improve (docs/crossmodal.md). Its heads also read each object patch's motion and
    speed, which the temporal tower states, so those stay in the tokens the answers read. Discarded after
    training."""

    def __init__(self, dim: int, world: WorldConfig, n_layers: int, with_colour: bool = True) -> None:
        super().__init__()
        self.with_colour = with_colour  # events carry no colour: the drafter's keeper is not asked for it
        self.layers = sorted({max(1, n_layers // 4), max(1, n_layers // 2)})
        self.heads = nn.ModuleDict({str(k): DenseProbe(dim, world, cells=True, motion=True) for k in [0, *self.layers]})

    def loss(self, states: dict[int, torch.Tensor], t: dict[str, torch.Tensor], idx: list[int]) -> torch.Tensor:
        """states: tap -> (B, images, tokens per image, dim); tap 0 is the projector output."""
        return sum(self.heads[str(k)].loss(v.float(), t, idx, self.with_colour) for k, v in states.items()) / len(states)


# ---------- QA batches ----------

def qa_rows(vlm: VLM, data: SplitData, idx: list[int], step: int, seed: int, max_turns: int = 7, grounding_turns: int = 0
            ) -> dict[str, torch.Tensor]:
    """One row per clip: the visual prefix once, then the clip's questions (at most `max_turns`) and
    `grounding_turns` short position questions (video only: they name the prompt's frame labels), each its own turn.

    `qa_loss` masks attention so each turn sees the prefix and itself only, with positions restarting
    after the prefix: each turn is exactly the single-turn prompt + answer seen at inference, but the
    visual tokens are computed once for all of a clip's questions (about 2.7x the answers per second)."""
    rng = np.random.default_rng([seed, step, 17])
    prefix = vlm.prefix_ids()
    seqs, turns, looks = [], [], []
    for r, i in enumerate(idx):
        seq, spans = list(prefix), []
        qas = questions(data.scenes[i], seed=int(rng.integers(1 << 30)), every_object=True)
        if len(qas) > max_turns:  # rows of similar length waste little compute on padding
            qas = [qas[j] for j in sorted(rng.choice(len(qas), size=max_turns, replace=False))]
        if vlm.kind == "video" and grounding_turns:
            qas += grounding(data.scenes[i], rng, grounding_turns)
        for qa in qas:
            prompt = vlm.turn_ids(qa.question)
            answer = vlm.text_ids(qa.answer) + [vlm.eos_ids[0]]
            spans.append((len(seq), len(seq) + len(prompt), len(seq) + len(prompt) + len(answer)))
            start = len(seq) + len(prompt)
            if qa.cells and vlm.kind == "video":  # each cell quotes two coordinates, x then y
                slots = coordinate_slots(vlm, answer)
                where = [c for c in qa.cells for _ in (0, 1)]
                if len(slots) == len(where):
                    looks += [(r, start + t, i, frame, obj) for t, (frame, obj) in zip(slots, where)]
            seq += prompt + answer
        seqs.append(seq)
        turns.append(spans)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), vlm.eos_ids[0], dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
    images = data.frames[idx] if vlm.kind == "video" else data.event_images[idx]
    return {"input_ids": ids, "prefix": len(prefix), "turns": turns, "pixels": to_pixels(images, vlm.image_size), "idx": idx,
            "looks": looks}


def coordinate_slots(vlm: VLM, answer: list[int]) -> list[int]:
    """Indices in `answer` whose next token is a quoted coordinate's digit ("x 2": the position that writes the
    2): what the model reads there decides the coordinate."""
    words = [vlm.tokenizer.decode([t]).strip() for t in answer]
    return [t for t in range(1, len(words) - 1)
            if words[t + 1].isdigit() and (words[t] in ("x", "y") or (words[t - 1] in ("x", "y") and words[t] == ""))]


def turn_mask(rows: int, width: int, prefix: int, turns: list[list[tuple[int, int, int]]], dtype: torch.dtype
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Additive (rows, 1, width, width) mask and position ids for `qa_rows` layout (indices already shifted
    for an expanded placeholder): causal in the prefix, each turn sees the prefix and its own past, padding
    sees itself."""
    allow = torch.zeros(rows, width, width, dtype=torch.bool)
    pos = torch.arange(width).repeat(rows, 1)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    allow[:, :prefix, :prefix] = causal[:prefix, :prefix]
    for r, spans in enumerate(turns):
        end = prefix
        for a, _, b in spans:
            allow[r, a:b, :prefix] = True
            allow[r, a:b, a:b] = causal[: b - a, : b - a]
            pos[r, a:b] = torch.arange(prefix, prefix + b - a)
            end = b
        allow[r, end:, end:] = torch.eye(width - end, dtype=torch.bool)
    mask = torch.zeros(allow.shape, dtype=dtype).masked_fill(~allow, torch.finfo(dtype).min)
    return mask[:, None], pos


def qa_loss(vlm: VLM, batch: dict, keeper: PositionKeeper | None = None, dense: dict | None = None,
            guide: AttentionGuide | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-entropy on answer tokens only (mean over every answer token of the batch), the keeper's probe
    loss on the video tokens, and the guide's attention loss at quoted coordinates (0 without them)."""
    ids_in = batch["input_ids"]
    if vlm.kind == "video":
        feats = vlm.video_features(batch["pixels"])
        emb = vlm.with_video(ids_in, feats)
    else:
        emb = vlm.embeds({"input_ids": ids_in, vlm.pixel_key: batch["pixels"]})
    shift = emb.shape[1] - ids_in.shape[1]  # the event placeholder expands into many tokens
    turns = [[(a + shift, p + shift, b + shift) for a, p, b in spans] for spans in batch["turns"]]
    mask, pos = turn_mask(emb.shape[0], emb.shape[1], batch["prefix"] + shift, turns, emb.dtype)
    lang = vlm.model.model.language_model if vlm.kind == "video" else vlm.model.model
    out = lang(inputs_embeds=emb, attention_mask=mask, position_ids=pos, output_hidden_states=keeper is not None)
    hidden = out.last_hidden_state
    keep = attend = torch.zeros(())
    if vlm.kind == "video" and (keeper is not None or guide is not None):
        video = (ids_in[0] == vlm.model.config.video_token_id).nonzero()[:, 0]  # every row shares the prefix
    if keeper is not None:  # per tap (B, images, tokens per image, dim)
        if vlm.kind == "video":
            grid = (len(batch["pixels"]), 8, -1, emb.shape[-1])
            states = {0: feats.reshape(grid), **{k: out.hidden_states[k][:, video].reshape(grid) for k in keeper.layers}}
        else:  # EventGPT's tokens: per-image means, then CLS and patches averaged over the images (one "image")
            at = int((ids_in[0] == EVENT_TOKEN_INDEX).nonzero()[0])  # the placeholder became shift + 1 tokens
            spatial = slice(at + batch["pixels"].shape[1], at + shift + 1)
            states = {0: emb[:, None, spatial], **{k: out.hidden_states[k][:, None, spatial] for k in keeper.layers}}
        keep = keeper.loss(states, dense, batch["idx"])
    if guide is not None:
        rows, queries, targets = look_targets(batch["looks"], video, len(video) // 8, dense["owner"], emb.shape[1])
        if len(rows):
            attend = guide.loss(mask, queries, rows, targets)
        guide.seen.clear()
    rows, cols = [], []
    for r, spans in enumerate(turns):
        for _, p, b in spans:
            cols.append(torch.arange(p - 1, b - 1))
            rows.append(torch.full_like(cols[-1], r))
    rows, cols = torch.cat(rows), torch.cat(cols)
    ids = torch.cat([torch.full((emb.shape[0], shift), -1, dtype=torch.long), batch["input_ids"]], dim=1)
    logits = vlm.model.lm_head(hidden[rows, cols]).float()
    return nn.functional.cross_entropy(logits, ids[rows, cols + 1]), keep, attend


# ---------- the two stages on the core loop ----------

def _trainables(vlm: VLM, probe: DenseProbe, keeper: PositionKeeper | None, cfg: PrepareConfig, stage: str) -> list[dict]:
    """Optimizer groups: probe stage (tower, probe head); QA stage (projector, adaptor, LoRA, keeper heads)."""
    trained = [p for p in vlm.model.parameters() if p.requires_grad]
    if stage == "probe":
        return [{"params": trained, "lr": cfg.lr}, {"params": list(probe.parameters()), "lr": cfg.lr}]
    return [{"params": trained + (list(keeper.parameters()) if keeper is not None else []), "lr": cfg.lr}]


def _freeze_for(vlm: VLM, stage: str) -> None:
    """Probe: the tower alone. QA: projector, adaptor and LoRA; the tower stays frozen, as in LLaVA-style
    training, because gradients through a freshly initialised projector wiped out what the probe taught
    (a jointly trained target still answered counts and directions at chance after 100 steps)."""
    for n, p in vlm.model.named_parameters():
        if stage == "probe":
            trained = any(k in n for k in ("video_tower", "visual_tower"))
        else:
            trained = n.endswith(("lora_a", "lora_b")) or any(
                k in n for k in ("multi_modal_projector", "visual_projector", "feature_adaptor"))
        p.requires_grad_(trained)


def train_role(cfg: PrepareConfig, vlm: VLM, data: SplitData, progress: bool = True) -> dict:
    """Run (or resume) both stages for one model on the core training loop; returns what the model card records."""
    role = "target" if vlm.kind == "video" else "drafter"
    ckpt = Path(cfg.out) / f"checkpoint-{role}"
    vcfg = vlm.model.config.vision_config if vlm.kind == "video" else vlm.model.model.visual_tower.visual_tower.config
    dense = dense_targets(cfg.world, data.scenes, vlm.kind, vcfg.patch_size)
    probe = DenseProbe(vcfg.hidden_size, cfg.world, motion=True)
    keeper = None
    keep_targets = dense if vlm.kind == "video" else pooled_over_time(dense)
    if cfg.keep_weight > 0:
        text = vlm.model.config.text_config if vlm.kind == "video" else vlm.model.config
        keeper = PositionKeeper(text.hidden_size, cfg.world, text.num_hidden_layers, with_colour=vlm.kind == "video")
    guide = AttentionGuide(vlm.model.model.language_model) if vlm.kind == "video" and cfg.attend_weight > 0 else None
    state = {"stage": "probe", "step": 0, "micro": 0, "losses": {"probe": [], "qa": [], "keep": [], "attend": []}, "wall_s": 0.0}

    def tensors() -> dict:
        from featspec.xmodal.models.vlm import trained_state

        blob = {"model": trained_state(vlm), "probe": probe.state_dict()}
        if keeper is not None:
            blob["keeper"] = keeper.state_dict()
        return blob

    saved = read_checkpoint(ckpt)
    if saved is not None:
        state.update(saved["meta"])
        state.setdefault("micro", state["step"])
        state["losses"].setdefault("keep", [])
        state["losses"].setdefault("attend", [])
        vlm.model.load_state_dict(saved["model"], strict=False)
        probe.load_state_dict(saved["probe"])
        if keeper is not None and "keeper" in saved:
            keeper.load_state_dict(saved["keeper"])
    for stage, total, bs in (("probe", cfg.probe_steps[vlm.kind], cfg.probe_batch), ("qa", cfg.qa_steps[vlm.kind], cfg.qa_batch)):
        if state["stage"] == "done" or (stage == "probe" and state["stage"] == "qa"):
            continue
        if total == 0:  # no probe steps: the tower comes from --init
            state.update(stage="qa", step=0, micro=0)
            continue
        _freeze_for(vlm, stage)
        opt = torch.optim.AdamW(_trainables(vlm, probe, keeper, cfg, stage), weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, total // 20), total))
        loop = Loop(opt, sched, lambda: [p for g in opt.param_groups for p in g["params"]], total=total, clip=1.0,
                    ckpt=ckpt, save_every=cfg.checkpoint_every, state=tensors, desc=f"{role} {stage}",
                    progress=progress, meta=state)
        if saved is not None and saved["meta"]["stage"] == stage:
            loop.load_optimizer(saved)

        def micro_step(step: int, stage=stage, bs=bs):
            idx = np.random.default_rng([cfg.seed, step, 1 if stage == "probe" else 2]).choice(
                len(data.scenes), size=min(bs, len(data.scenes)), replace=False).tolist()
            if stage == "probe":
                images = data.frames[idx] if vlm.kind == "video" else data.event_images[idx]
                loss = probe.loss(tower_tokens(vlm, to_pixels(images, vlm.image_size)), dense, idx, vlm.kind == "video")
                return loss, {"logged": loss.item()}
            loss, keep, attend = qa_loss(vlm, qa_rows(vlm, data, idx, step, cfg.seed, grounding_turns=cfg.grounding_turns),
                                         keeper, keep_targets, guide)
            if keeper is not None:
                state["losses"]["keep"].append(round(keep.item(), 5))
            if guide is not None:
                state["losses"]["attend"].append(round(attend.item(), 5))
            # the QA loss alone is logged, comparable with or without the keeper and guide
            return loss + cfg.keep_weight * keep + cfg.attend_weight * attend, {"logged": loss.item(), "attend": attend.item()}

        def after_step(step: int, loss: float, stats: dict, stage=stage) -> dict:
            state["losses"][stage].append(round(stats["logged"], 5))
            extra = {"attend": f"{stats['attend']:.2f}"} if stage == "qa" and guide is not None else {}
            return {"loss": f"{stats['logged']:.3f}", **extra}

        loop.run(micro_step, after_step, final_save=False)
        # the next stage starts a fresh optimizer
        state.update(stage="qa" if stage == "probe" else "done", step=0 if stage == "probe" else total,
                     micro=0 if stage == "probe" else total)
        loop.save(optimizer=False)
        saved = None
    if guide is not None:
        guide.remove()
    return state


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict:
    """Data, then target and drafter; writes OUT/target and OUT/drafter (loadable with `load_mini`)."""
    from featspec.xmodal.models.vlm import _backbone

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = build_split(cfg.world, "train", cfg.n_train, cache=out / "data", progress=progress)
    backbone = _backbone(cfg.spec)
    report = {"world": cfg.world.to_json(), "n_train": cfg.n_train, "data_seconds": round(time.time() - t0, 1)}
    torch.manual_seed(cfg.seed)
    for role, build in (("target", build_target), ("drafter", build_drafter)):
        if role not in cfg.roles:
            continue
        t1 = time.time()
        vlm = build(cfg.spec, backbone)
        lang = vlm.model.model.language_model if vlm.kind == "video" else vlm.model.model
        lang.to(getattr(torch, cfg.backbone_dtype))  # the frozen backbone; towers, projectors and LoRA train in fp32
        vlm.model.lm_head.to(getattr(torch, cfg.backbone_dtype))
        for name in ("video_tower", "image_tower", "multi_modal_projector", "visual_tower", "visual_projector", "feature_adaptor"):
            if hasattr(vlm.model.model, name):
                getattr(vlm.model.model, name).float()
        add_lora(vlm, cfg.spec.lora_rank)
        if cfg.init is not None:
            load_trained(vlm, Path(cfg.init) / role, new_ok=True)
        vlm.model.train()
        state = train_role(cfg, vlm, data, progress)
        meta = {"world": cfg.world.to_json(), "n_train": cfg.n_train, "probe_steps": cfg.probe_steps[vlm.kind],
                "init": str(cfg.init) if cfg.init is not None else None,
                "qa_steps": cfg.qa_steps[vlm.kind], "qa_batch": cfg.qa_batch,
                "grounding_turns": cfg.grounding_turns if vlm.kind == "video" else 0,
                "keep_weight": cfg.keep_weight,
                "attend_weight": cfg.attend_weight if vlm.kind == "video" else 0.0, "train_seconds": round(state["wall_s"], 1),
                "final_qa_loss": float(np.mean(state["losses"]["qa"][-20:])) if state["losses"]["qa"] else None,
                "visual_tokens": vlm.visual_tokens}
        save_mini(vlm, cfg.spec, out / role, meta)
        report[role] = {**meta, "wall_seconds": round(time.time() - t1, 1)}
    report["total_seconds"] = round(time.time() - t0, 1)
    write_json(report, out / "prepare.json", indent=1)
    return report
