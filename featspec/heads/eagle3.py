"""EAGLE-3 head: fuse three target layers, draft over a reduced vocabulary, trained with TTT.

Inputs are the hidden states entering target layers (2, L//2, L-3), concatenated and mapped by
`fc: 3H -> H`. The decoder layer's q/k/v read `cat[input_layernorm(embed), hidden_norm(h)]` (2H); the
residual stream starts from `h` itself (the official convention), or from `hidden_norm(h)` when
`cfg.norm_before_residual` (config.json says which, as vLLM reads it). `norm` + `lm_head` give logits over the draft
vocabulary; `d2t[i] = target_id - i` maps back, `t2d` marks the target ids the head can propose.
Tensor names are the ones vLLM and SGLang load (`LlamaForCausalLMEagle3`).
"""

from __future__ import annotations

import torch
from torch import nn

from featspec.heads.base import DraftHead
from featspec.heads.layers import MLP, Attention, HeadConfig, KVCache, RMSNorm


def default_layer_ids(num_layers: int) -> tuple[int, int, int]:
    """HF hidden_states indices of the inputs of layers 2, L//2 and L-3 (low, middle, high).

    Clamped to [1, L] so that tiny test models with fewer than 6 layers still get valid indices.
    """
    return tuple(min(num_layers, max(1, i)) for i in (2, num_layers // 2, num_layers - 3))


def ids_from_d2t(d2t: torch.Tensor) -> torch.Tensor:
    """Target id of every draft id, from the offsets `d2t[i] = target_id - i`."""
    return d2t.long() + torch.arange(d2t.numel(), device=d2t.device)


class Eagle3Layer(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        h = cfg.hidden_size
        self.input_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(h, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, 2 * h)
        self.post_attention_layernorm = RMSNorm(h, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Eagle3Head(DraftHead):
    kind = "eagle3"

    def __init__(self, cfg: HeadConfig, layer_ids: tuple[int, ...] | None = None, num_fused: int = 3):
        """`layer_ids` None: the default layers of a `cfg.target_num_layers`-layer target, or, when that
        is unknown (a third-party checkpoint), none until `formats.validate_against` sets them."""
        super().__init__(cfg)
        if cfg.draft_vocab_size < 1:
            raise ValueError("an EAGLE-3 head needs draft_vocab_size >= 1")
        h, th = cfg.hidden_size, cfg.target_hidden_size or cfg.hidden_size
        if layer_ids:
            self._layer_ids = tuple(layer_ids)
        else:
            self._layer_ids = default_layer_ids(cfg.target_num_layers) if cfg.target_num_layers else ()
        self.fc = nn.Linear((len(self._layer_ids) or num_fused) * th, h, bias=False)
        self.midlayer = Eagle3Layer(cfg)
        self.norm = RMSNorm(h, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(h, cfg.draft_vocab_size, bias=False)
        self.register_buffer("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.zeros(cfg.vocab_size, dtype=torch.bool))

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self._layer_ids

    def set_vocab(self, draft_to_target: torch.Tensor) -> None:
        """Install the draft vocabulary: `draft_to_target[i]` is the target id of draft id i."""
        ids = draft_to_target.to(self.d2t.device, torch.long)
        if ids.numel() != self.cfg.draft_vocab_size or ids.unique().numel() != ids.numel():
            raise ValueError("draft vocabulary must list draft_vocab_size distinct target ids")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    @torch.no_grad()
    def init_from_target(self, target: nn.Module) -> None:
        """Start `lm_head` from the target's output rows of the draft vocabulary and `norm` from the target's
        final norm. Why: a short run cannot learn a draft-vocab x H output matrix from scratch; from this start
        the head only has to produce a feature the target's own output layer reads correctly."""
        out_w = target.get_output_embeddings().weight
        self.lm_head.weight.copy_(out_w[self.draft_ids.to(out_w.device)].to(self.lm_head.weight))
        body = target.get_decoder() if hasattr(target, "get_decoder") else target.model
        final_norm = getattr(body, "norm", None)
        if final_norm is not None:
            # the norm applied to a vector of ones is its effective scale, whatever its parametrisation
            # (LLaMA's w, Gemma's 1 + w)
            ones = torch.ones(1, self.cfg.hidden_size, device=out_w.device, dtype=out_w.dtype)
            self.norm.weight.copy_(final_norm(ones)[0].to(self.norm.weight))

    @torch.no_grad()
    def widened_state(self, state: dict[str, torch.Tensor], out_rows: torch.Tensor, ridge: float = 1.0) -> dict[str, torch.Tensor]:
        """`state` (an EAGLE-3 head over a smaller draft vocabulary) re-expressed over this head's vocabulary,
        which must hold every draft id of `state`. Shared tokens keep their trained `lm_head` rows; a new
        token's row is its target output row (`out_rows`, V x H) mapped into the trained head's output space
        by an affine ridge fit over the shared tokens. Why the map: the trained rows drift from the target's
        as a whole (a shared component especially), so raw target rows would outscore every trained one."""
        old_w = state["lm_head.weight"].float()
        old_ids = ids_from_d2t(state["d2t"])
        new_ids = self.draft_ids.to(old_ids.device)
        where = torch.full((self.cfg.vocab_size,), -1, dtype=torch.long, device=old_ids.device)
        where[new_ids] = torch.arange(new_ids.numel(), device=old_ids.device)
        if bool((where[old_ids] < 0).any()):
            raise ValueError("the new draft vocabulary must hold every draft id of the head it widens")
        rows = out_rows.detach().float().to(old_w.device)
        ones = torch.ones(rows.shape[0], 1, device=rows.device)
        basis = torch.cat([rows, ones], 1)
        x = basis[old_ids]
        fit = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], device=x.device), x.T @ old_w)
        w = basis[new_ids] @ fit
        w[where[old_ids]] = old_w
        return {**state, "lm_head.weight": w, "d2t": self.d2t.clone().to(old_w.device), "t2d": self.t2d.clone().to(old_w.device)}

    @property
    def draft_ids(self) -> torch.Tensor:
        """Target id of every draft id."""
        return ids_from_d2t(self.d2t)

    def fuse(self, hidden_states: list[torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat(hidden_states, -1).to(self.fc.weight.dtype))

    def forward(self, feats, tokens, positions, cache: KVCache | None = None, mask=None, ttt_past: list | None = None):
        return self.run_layer(self.midlayer, feats, self.embed(tokens), positions, cache, mask, ttt_past)

    def run_layer(self, layer: Eagle3Layer, feats: torch.Tensor, embeds: torch.Tensor, positions: torch.Tensor,
                  cache: KVCache | None = None, mask=None, ttt_past: list | None = None) -> torch.Tensor:
        """A decoder layer of this shape over (feature, input embedding) pairs: q/k/v read
        `[input_layernorm(embedding), hidden_norm(feature)]` (the block head runs a second layer through it)."""
        normed = layer.hidden_norm(feats)
        residual = normed if self.cfg.norm_before_residual else feats
        x = torch.cat([layer.input_layernorm(embeds.to(feats.dtype)), normed], -1)
        x = residual + self.attend(layer.self_attn, x, positions, cache, mask, ttt_past)
        return x + layer.mlp(layer.post_attention_layernorm(x))

    def logits(self, out: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm(out))

    def to_target_ids(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]
