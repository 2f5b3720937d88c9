"""Attention guidance: teach the mini target where to look when it writes a quoted coordinate.

Why: trained on answers that quote an object's cell ("In Frame 1 the cross is at x 2, y 7"), the target
learned the template and quoted the average cell of the training set whatever the clip (docs/crossmodal.md):
an answer that attends to every video token evenly reads the average position of all patches. Colours,
shapes and counts survive even attention (they are a sum over tokens); a position does not, it needs
attention that picks the object's patches in one frame. The renderer knows which patches those are, so
`AttentionGuide` adds -log(attention mass on them), for the best head of a few layers, at each position
that writes a coordinate digit. Discarded after training: nothing of it ships, the model stays a plain
`VideoLlavaForConditionalGeneration`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import rotate_half


class AttentionGuide:
    """Hooks on some self-attention modules of the language model; `loss` after a forward that ran with them."""

    def __init__(self, language_model: nn.Module, layers: list[int] | None = None) -> None:
        blocks = language_model.layers
        n = len(blocks)
        self.layers = layers if layers is not None else sorted({n // 3, n // 2, (2 * n) // 3})
        self.modules = [blocks[k].self_attn for k in self.layers]
        self.seen: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.handles = [m.register_forward_hook(self._keep(k), with_kwargs=True) for k, m in zip(self.layers, self.modules)]

    def _keep(self, k: int):
        def hook(module, args, kwargs, output):
            hidden = args[0] if args else kwargs["hidden_states"]
            cos, sin = kwargs["position_embeddings"]
            self.seen[k] = (hidden, cos, sin)
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def loss(self, mask: torch.Tensor, queries: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """mask: the forward's additive (B, 1, W, W) mask; queries, rows: (N,) positions and rows that write a
        coordinate; targets: (N, W) bool, the keys (object patches of the named frame) each should attend to.
        Returns the mean over layers and queries of -log(mass on the targets) of the layer's best head."""
        total = torch.zeros((), device=mask.device)
        for k, attn in zip(self.layers, self.modules):
            hidden, cos, sin = self.seen.pop(k)
            hd = attn.head_dim
            q = attn.q_proj(hidden[rows, queries]).float().unflatten(-1, (-1, hd))  # (N, Hq, hd)
            c, s = cos[rows, queries].float()[:, None], sin[rows, queries].float()[:, None]
            q = q * c + rotate_half(q) * s
            key = attn.k_proj(hidden).float().unflatten(-1, (-1, hd))  # (B, W, Hkv, hd), once per row
            key = key * cos.float()[:, :, None] + rotate_half(key) * sin.float()[:, :, None]
            key = key[rows].repeat_interleave(q.shape[1] // key.shape[2], dim=2)  # (N, W, Hq, hd): grouped-query heads share keys
            logits = torch.einsum("nhd,nwhd->nhw", q, key) * attn.scaling + mask[rows, 0, queries].float()[:, None]
            probs = logits.softmax(-1)
            mass = (probs * targets[:, None].float()).sum(-1)  # (N, Hq)
            total = total - mass.max(-1).values.clamp_min(1e-6).log().mean()
        return total / len(self.layers)


def look_targets(looks: list[tuple[int, int, int, int, int]], video_positions: torch.Tensor, per_frame: int,
                 owner: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qa_rows`' looks (row, position, clip, frame, object) -> rows, positions and (N, width) key masks: the
    patch tokens of `frame` the object covers (a frame's first token is its CLS). Looks at an object hidden in
    that frame are dropped."""
    rows, queries, targets = [], [], []
    for r, pos, clip, frame, obj in looks:
        patches = (owner[clip, frame - 1] == obj + 1).nonzero()[:, 0]
        if len(patches) == 0:
            continue
        t = torch.zeros(width, dtype=torch.bool)
        t[video_positions[(frame - 1) * per_frame + 1 + patches]] = True
        rows.append(r)
        queries.append(pos)
        targets.append(t)
    if not rows:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), torch.zeros(0, width, dtype=torch.bool)
    return torch.tensor(rows), torch.tensor(queries), torch.stack(targets)
