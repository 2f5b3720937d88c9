"""Training losses of the draft heads, from one frozen target forward per batch.

Index convention (both heads): head position t pairs the target feature of position t with token
t+1 and predicts the target's distribution at position t+1 (over token t+2). Loss positions are
those whose token t+2 is assistant text.

EAGLE-1: SmoothL1(f_hat_t, f_{t+1}) + 0.1 * soft CE(lm_head(f_hat_t), softmax(lm_head(f_{t+1}))),
with uniform noise on the input features.
EAGLE-3: training-time test over `ttt_steps` steps; step j feeds the head's own step j-1 outputs
(shifted one position) back as features and attends as drafting j tokens ahead would; loss = soft CE
against the target distribution restricted to the draft vocabulary, weighted 0.8^j.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from featspec.heads.base import DraftHead


@dataclass
class TargetBatch:
    """What the frozen target gives a training step (all (B, T, ...), detached)."""

    hidden: list[torch.Tensor]  # the head's `layer_ids` hidden states
    last: torch.Tensor  # final hidden state (after the final norm): the LM head's input
    input_ids: torch.Tensor
    loss_mask: torch.Tensor  # (B, T) 1 on assistant tokens


@torch.no_grad()
def target_batch(target: torch.nn.Module, head: DraftHead, batch: dict[str, torch.Tensor],
                 inputs_embeds: torch.Tensor | None = None) -> TargetBatch:
    """One frozen forward of the target body with only the hidden states the head needs; `inputs_embeds`
    replaces the token embeddings (a VLM's prompt with its visual features in place)."""
    body = target.get_decoder() if hasattr(target, "get_decoder") else target.model
    num = target.config.get_text_config().num_hidden_layers
    wanted = sorted(set(head.layer_ids) | {num})
    att = batch.get("attention_mask")
    if att is not None and bool(att.all()):
        att = None  # no padding: the causal fast path of SDPA is much faster than an explicit mask
    ids = batch["input_ids"] if inputs_embeds is None else None
    out = body(input_ids=ids, inputs_embeds=inputs_embeds, attention_mask=att, output_hidden_states=wanted,
               use_cache=False)
    hs = out.hidden_states
    return TargetBatch([hs[i] for i in head.layer_ids], hs[num], batch["input_ids"], batch["loss_mask"])


def _positions(b: int, t: int, device) -> torch.Tensor:
    return torch.arange(t, device=device)[None].expand(b, t)


def _shift_left(x: torch.Tensor, n: int = 1) -> torch.Tensor:
    """x[:, t + n] at index t (zero-padded at the end)."""
    return F.pad(x[:, n:], (0, 0) * (x.dim() - 2) + (0, n))


def _loss_positions(tb: TargetBatch) -> torch.Tensor:
    """(B, T) float: index t counts when token t+2 exists and is assistant text."""
    m = tb.loss_mask.float()
    return F.pad(m[:, 2:], (0, 2))


def soft_ce(logits: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy of logits against a target distribution (..., V) -> (...)."""
    return -(target_probs * logits.float().log_softmax(-1)).sum(-1)


def eagle1_loss(head: DraftHead, tb: TargetBatch, noise: float, generator: torch.Generator | None,
                lm_head: torch.nn.Module) -> tuple[torch.Tensor, dict[str, float]]:
    f = tb.last.float()
    b, t, _ = f.shape
    noisy = f + (torch.rand(f.shape, generator=generator, device=f.device) - 0.5) * noise
    tokens = _shift_left(tb.input_ids[..., None], 1)[..., 0]
    out = head(noisy.to(next(head.parameters()).dtype), tokens, _positions(b, t, f.device))
    want = _shift_left(f, 1)
    w = _loss_positions(tb)
    denom = w.sum().clamp_min(1.0)
    reg = (F.smooth_l1_loss(out.float(), want, reduction="none").mean(-1) * w).sum() / denom
    with torch.no_grad():
        p = lm_head(want.to(lm_head.weight.dtype)).float().softmax(-1)
    logits = head.logits(out)
    ce = (soft_ce(logits, p) * w).sum() / denom
    acc = ((logits.argmax(-1) == p.argmax(-1)).float() * w).sum() / denom
    return reg + 0.1 * ce, {"loss_reg": float(reg.detach()), "loss_ce": float(ce.detach()), "acc_0": float(acc)}


def eagle3_loss(head: DraftHead, tb: TargetBatch, ttt_steps: int, lm_head: torch.nn.Module,
                decay: float = 0.8) -> tuple[torch.Tensor, dict[str, float]]:
    b, t = tb.input_ids.shape
    device = tb.input_ids.device
    draft_ids = head.draft_ids
    with torch.no_grad():
        nxt = _shift_left(tb.last, 1)  # final hidden of position t+1
        w_draft = lm_head.weight[draft_ids]
        target_logits = (nxt.to(w_draft.dtype) @ w_draft.T).float()
        p = target_logits.softmax(-1)
        best = target_logits.argmax(-1)
    tokens = _shift_left(tb.input_ids[..., None], 1)[..., 0]
    positions = _positions(b, t, device)
    base_w = _loss_positions(tb)
    feats = head.fuse(tb.hidden)
    past: list = []
    total = torch.zeros((), device=device)
    stats: dict[str, float] = {}
    for j in range(ttt_steps):
        out = head(feats, tokens, positions, ttt_past=past)
        w = base_w.clone()
        w[:, :j] = 0  # fewer than j real features before these positions
        denom = w.sum().clamp_min(1.0)
        logits = head.logits(out)
        ce = (soft_ce(logits, p) * w).sum() / denom
        total = total + (decay**j) * ce
        with torch.no_grad():
            stats[f"acc_{j}"] = float(((logits.argmax(-1) == best).float() * w).sum() / denom)
            stats[f"loss_{j}"] = float(ce.detach())
        feats = F.pad(out[:, :-1], (0, 0, 1, 0))  # step j+1 at index t reads step j's output at t-1
    return total, stats
