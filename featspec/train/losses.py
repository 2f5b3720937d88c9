"""Training losses of the draft heads, from one frozen target forward per batch.

Index convention (both heads): head position t pairs the target feature of position t with token
t+1 and predicts the target's distribution at position t+1 (over token t+2). Loss positions are
those whose token t+2 is assistant text.

EAGLE-1: SmoothL1(f_hat_t, f_{t+1}) + 0.1 * soft CE(lm_head(f_hat_t), softmax(lm_head(f_{t+1}))),
with uniform noise on the input features.
EAGLE-3: training-time test over `ttt_steps` steps; step j feeds the head's own step j-1 outputs
(shifted one position) back as features and attends as drafting j tokens ahead would; loss = soft CE
against the target distribution restricted to the draft vocabulary, weighted 0.8^j.
Block: position 0 over the real entries (the EAGLE-3 layer, causal, as EAGLE-3's step 0) and, for `anchors`
sampled loss positions a per row, k-1 slots at a+1..a+k-1 (the slot layer) that see the real entries <= a and
each other; slot i is scored against the target's distribution at position a+i+1 (the token i+1 places after
the anchor's next token), with the same soft CE; position i weighs 0.8^i, as the TTT steps do.
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


@torch.no_grad()
def draft_targets(head: DraftHead, tb: TargetBatch, lm_head: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The target's distribution (and argmax) over the head's draft vocabulary that entry t is scored against:
    the target's at position t+1, from its final hidden state there."""
    nxt = _shift_left(tb.last, 1)
    w_draft = lm_head.weight[head.draft_ids]
    target_logits = (nxt.to(w_draft.dtype) @ w_draft.T).float()
    return target_logits.softmax(-1), target_logits.argmax(-1)


def eagle3_loss(head: DraftHead, tb: TargetBatch, ttt_steps: int, lm_head: torch.nn.Module,
                decay: float = 0.8) -> tuple[torch.Tensor, dict[str, float]]:
    b, t = tb.input_ids.shape
    device = tb.input_ids.device
    p, best = draft_targets(head, tb, lm_head)
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


def block_outputs(head, feats: torch.Tensor, embeds: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Position 0 for every real entry (the EAGLE-3 layer, causal) and, per anchor a (B, A), the k-1 slots after
    entry a through the slot layer, seeing the real entries <= a and their own block only: what drafting after
    entry a computes, for many anchors in one pass. Returns (B, T + A*(k-1), H): real entries, then the slots
    block by block."""
    b, t, _ = feats.shape
    device = feats.device
    slots = head.block_size - 1
    n_anchor = anchor.shape[1]
    real = head.run_layer(head.midlayer, feats, embeds, _positions(b, t, device), None, None)
    at = anchor[..., None].expand(-1, -1, feats.shape[-1])
    first = torch.gather(real, 1, at)  # (B, A, H): the EAGLE-3 layer's output at each anchor
    first_logits = head.logits(first) if head.chain else None
    slot_f, slot_e = head.slot_inputs(torch.gather(feats, 1, at), first, first_logits, slots)  # (B, A, k-1, H)
    x_f = torch.cat([feats, slot_f.reshape(b, -1, feats.shape[-1])], 1)
    x_e = torch.cat([embeds, slot_e.reshape(b, -1, feats.shape[-1])], 1)
    slot_pos = (anchor[:, :, None] + torch.arange(1, slots + 1, device=device)).reshape(b, -1)
    positions = torch.cat([_positions(b, t, device), slot_pos], 1)
    n = t + n_anchor * slots
    allowed = torch.zeros(b, n, n, dtype=torch.bool, device=device)
    allowed[:, :t, :t] = torch.ones(t, t, dtype=torch.bool, device=device).tril()
    group = torch.arange(n_anchor, device=device).repeat_interleave(slots)  # slot row -> its block
    allowed[:, t:, :t] = torch.arange(t, device=device)[None, None, :] <= anchor[:, group][:, :, None]
    allowed[:, t:, t:] = group[:, None] == group[None, :]
    out = head.run_layer(head.slot_layer, x_f, x_e, positions, None, allowed[:, None])
    return torch.cat([real, out[:, t:]], 1)


def block_loss(head, tb: TargetBatch, lm_head: torch.nn.Module, anchors: int, generator: torch.Generator | None,
               decay: float = 0.8) -> tuple[torch.Tensor, dict[str, float]]:
    """The block head's loss over its k positions (see the module docstring); stats acc_i / loss_i per position."""
    k = head.block_size
    b, t = tb.input_ids.shape
    device = tb.input_ids.device
    p, best = draft_targets(head, tb, lm_head)
    base_w = _loss_positions(tb)  # (B, T): entry t counts when token t+2 is assistant text
    feats = head.fuse(tb.hidden)
    embeds = head.embed(_shift_left(tb.input_ids[..., None], 1)[..., 0]).to(feats.dtype)
    # anchors: entries whose next k-1 positions are all loss positions, sampled per row (seeded: exact resume)
    valid = base_w.clone()
    for i in range(1, k):
        valid = valid * F.pad(base_w[:, i:], (0, i))
    n_anchor = max(1, min(anchors, int(valid.sum(1).min().item()) or 1))
    scores = torch.rand(b, t, generator=generator, device="cpu").to(device) + valid * 2  # valid ones first
    anchor = scores.topk(n_anchor, dim=1).indices.sort(dim=1).values  # (B, A)
    has = torch.gather(valid, 1, anchor)  # 0 where a row had fewer valid anchors than A
    slots = k - 1
    out = block_outputs(head, feats, embeds, anchor)
    offs = torch.arange(1, k, device=device)
    logits0 = head.logits(out[:, :t])
    denom0 = base_w.sum().clamp_min(1.0)
    ce0 = (soft_ce(logits0, p) * base_w).sum() / denom0
    total = ce0
    stats: dict[str, float] = {"loss_0": float(ce0.detach())}
    with torch.no_grad():
        stats["acc_0"] = float(((logits0.argmax(-1) == best).float() * base_w).sum() / denom0)
    slot_logits = head.logits(out[:, t:]).view(b, n_anchor, slots, -1)
    target_at = (anchor[:, :, None] + offs).clamp_max(t - 1)  # (B, A, k-1): entry whose target slot i predicts
    for i in range(slots):
        at = target_at[:, :, i]
        pi = torch.gather(p, 1, at[..., None].expand(-1, -1, p.shape[-1]))
        w = has * torch.gather(base_w, 1, at)
        denom = w.sum().clamp_min(1.0)
        ce = (soft_ce(slot_logits[:, :, i], pi) * w).sum() / denom
        total = total + (decay ** (i + 1)) * ce
        with torch.no_grad():
            stats[f"loss_{i + 1}"] = float(ce.detach())
            stats[f"acc_{i + 1}"] = float(((slot_logits[:, :, i].argmax(-1) == torch.gather(best, 1, at)).float() * w).sum() / denom)
    return total, stats
