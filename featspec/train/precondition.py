"""Per-dimension input scaling of the EAGLE-3 `fc` during training, folded into its weight on save.

Why: the hidden states a head fuses carry massive activations. On SmolLM2-135M a few dimensions of
the layer-27 input have an RMS of 200-400 against a median of 13 (the layer-2 input: 36 against 1.2),
and whole layers differ 10x in scale. AdamW moves every weight by about the learning rate whatever
its input's scale, so the weights reading the outlier dimensions swing the fc output hardest and
the rest learn slowly. Training on standardised inputs (each fused dimension divided by its RMS over
the training features) and saving `fc.weight / scale` is the same function with better conditioning;
the saved head keeps the standard layout, so engines load it unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from featspec.train.losses import TargetBatch


@torch.no_grad()
def feature_scale(hidden_rows: Iterable[list[torch.Tensor]], floor: float = 1e-2) -> torch.Tensor:
    """Per-dimension RMS of the concatenated fused hidden states, from examples given as
    [(T, H) per fused layer]. Position 0 is left out: its attention-sink activations (up to ~1300 on
    SmolLM2) are a single position the head never drafts from."""
    total, count = None, 0
    for rows in hidden_rows:
        x = torch.cat([h[1:].float() for h in rows], -1)
        sq = x.pow(2).sum(0)
        total = sq if total is None else total + sq
        count += x.shape[0]
    if total is None or count == 0:
        raise ValueError("feature_scale needs at least one example longer than one token")
    return (total / count).sqrt().clamp_min(floor)


def scaled(tb: TargetBatch, scale: torch.Tensor) -> TargetBatch:
    """The same batch with each fused hidden state divided by its slice of `scale`."""
    parts = scale.split([h.shape[-1] for h in tb.hidden])
    hidden = [(h.float() / s.to(h.device)).to(h.dtype) for h, s in zip(tb.hidden, parts)]
    return TargetBatch(hidden, tb.last, tb.input_ids, tb.loss_mask)


@torch.no_grad()
def fold(fc_weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """fc weight trained on x / scale -> the weight that reads x itself."""
    return fc_weight / scale.to(fc_weight)


@torch.no_grad()
def unfold(fc_weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """A saved fc weight (reading x) -> the weight reading x / scale (to continue training it)."""
    return fc_weight * scale.to(fc_weight)
