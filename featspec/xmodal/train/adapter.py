"""Train adapters on aligned pairs and measure them: cosine, Accept@threshold and top-1 token agreement."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featspec.xmodal.drafting.adapters import Adapter, adapter_loss, build_adapter
from featspec.io import torch_save
from featspec.train.loop import Loop, warmup_cosine
from featspec.xmodal.drafting.align import sequences

THRESHOLDS = (0.80, 0.85, 0.90, 0.95)


def pad_batch(seqs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    t = max(len(s["next"]) for s in seqs)
    b = len(seqs)
    out = {"draft": torch.zeros(b, t, seqs[0]["draft"].shape[-1]), "target": torch.zeros(b, t, seqs[0]["target"].shape[-1]),
           "token": torch.zeros(b, t, dtype=torch.long), "next": torch.zeros(b, t, dtype=torch.long),
           "mask": torch.zeros(b, t, dtype=torch.bool), "visual": torch.stack([s["visual"].float() for s in seqs])}
    for i, s in enumerate(seqs):
        n = len(s["next"])
        out["draft"][i, :n] = s["draft"].float()
        out["target"][i, :n] = s["target"].float()
        out["token"][i, :n] = s["token"]
        out["next"][i, :n] = s["next"]
        out["mask"][i, :n] = True
    return out


def train_adapter(level: str, pairs: dict[str, torch.Tensor], lm_head: nn.Linear, embed: nn.Embedding,
                  steps: int = 400, batch: int = 16, lr: float = 1e-3, ce_weight: float = 0.0, seed: int = 0,
                  progress: bool = True) -> tuple[Adapter, list[float]]:
    """AdamW with warm-up + cosine on MSE + (1 - cos) (+ soft CE through the frozen target LM head), on the core
    training loop (no checkpoints: a few hundred steps take seconds)."""
    torch.manual_seed(seed)
    seqs = sequences(pairs)
    adapter = build_adapter(level, seqs[0]["draft"].shape[-1], seqs[0]["target"].shape[-1], embed=embed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(max(1, steps // 20), steps, floor=0.05))
    rng = np.random.default_rng(seed)
    losses: list[float] = []
    adapter.train()

    def micro_step(step: int):
        b = pad_batch([seqs[i] for i in rng.choice(len(seqs), size=min(batch, len(seqs)), replace=False)])
        pred = adapter(b["draft"], b["token"], b["visual"])
        loss, _ = adapter_loss(pred, b["target"], b["mask"], lm_head, ce_weight)
        return loss, {}

    Loop(opt, sched, adapter.parameters, total=steps, clip=1.0, desc=f"adapter {level}", progress=progress).run(
        micro_step, lambda step, loss, stats: losses.append(loss))
    adapter.eval()
    return adapter, losses


@torch.no_grad()
def measure(adapter: Adapter | None, pairs: dict[str, torch.Tensor], target_head: nn.Linear,
            drafter_head: nn.Linear) -> dict:
    """Per level (or the raw drafter tokens when `adapter` is None): cosine, Accept@t, top-1 agreement, latency."""
    seqs = sequences(pairs)
    cos_all, hit_all = [], []
    for s in seqs:
        b = pad_batch([s])
        if adapter is None:
            logits = drafter_head(b["draft"][0].to(drafter_head.weight.dtype))
            pred = None
        else:
            pred = adapter(b["draft"], b["token"], b["visual"])[0]
            logits = target_head(pred.to(target_head.weight.dtype))
            cos_all.append(nn.functional.cosine_similarity(pred.float(), b["target"][0], dim=-1))
        hit_all.append(logits.argmax(-1) == b["next"][0])
    hits = torch.cat(hit_all).float()
    out: dict = {"positions": len(hits), "top1": float(hits.mean())}
    if adapter is not None:
        cos = torch.cat(cos_all)
        out["cosine"] = float(cos.mean())
        out.update({f"accept@{t:.2f}": float((cos > t).float().mean()) for t in THRESHOLDS})
        out["params"] = sum(p.numel() for p in adapter.parameters())
        out["latency_ms"] = _latency(adapter, seqs[0])
    return out


def _latency(adapter: Adapter, seq: dict[str, torch.Tensor], reps: int = 20) -> float:
    """One drafting call: the adapter over the answer so far (history levels recompute it), median ms."""
    b = pad_batch([seq])
    times = []
    for _ in range(reps + 3):
        t = time.perf_counter()
        adapter(b["draft"], b["token"], b["visual"])
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times[3:]))


def save_adapter(adapter: Adapter, path: Path, meta: dict) -> None:
    torch_save({"level": adapter.level, "d_in": adapter.d_in, "d_out": adapter.d_out,
                       "state": adapter.state_dict(), "meta": meta}, path)


def load_adapter(path: Path, embed: nn.Embedding | None = None) -> Adapter:
    blob = torch.load(path, map_location="cpu", weights_only=True)
    adapter = build_adapter(blob["level"], blob["d_in"], blob["d_out"], embed=embed)
    adapter.load_state_dict(blob["state"])
    return adapter.eval()
