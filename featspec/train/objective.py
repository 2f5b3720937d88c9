"""The EAGLE training objectives as pieces any loop can run: a fresh head for a target, and head + loss as
one module. `featspec train` runs them on ShareGPT; the cross-modal app runs them on the video target's clips."""

from __future__ import annotations

import torch

from featspec.errors import FeatspecError
from featspec.heads.base import DraftHead
from featspec.heads.block import BlockHead
from featspec.heads.eagle1 import Eagle1Head
from featspec.heads.eagle3 import Eagle3Head
from featspec.heads.layers import HeadConfig
from featspec.train.data import Example, draft_vocabulary
from featspec.train.losses import block_loss, eagle1_loss, eagle3_loss
from featspec.train.precondition import scaled


def build_head(method: str, target, examples: list[Example], always_ids: list[int], draft_vocab: int,
               layer_ids: tuple[int, ...] = (), block_size: int = 8) -> DraftHead:
    """A fresh head; `always_ids` join an EAGLE-3 (or block) draft vocabulary whatever their frequency (EOS, or
    the draft ids of a head the run widens)."""
    target_config = target.config.get_text_config()
    if method == "eagle1":
        return Eagle1Head(HeadConfig.from_target(target_config))
    if method in ("eagle3", "block"):
        size = min(draft_vocab, target_config.vocab_size)
        layers = target_config.num_hidden_layers
        if layer_ids and (len(layer_ids) != 3 or not all(0 <= i <= layers for i in layer_ids)):
            raise FeatspecError(f"--layer-ids {','.join(map(str, layer_ids))}: give 3 hidden-state indices in "
                                f"[0, {layers}] (this target has {layers} layers)")
        cfg = HeadConfig.from_target(target_config, draft_vocab_size=size)
        head = (BlockHead(cfg, tuple(layer_ids) or None, block_size=block_size) if method == "block"
                else Eagle3Head(cfg, tuple(layer_ids) or None))
        head.set_vocab(draft_vocabulary(examples, size, target_config.vocab_size, always_ids))
        head.init_from_target(target)
        return head
    raise FeatspecError(f"unknown training method '{method}': use eagle1, eagle3 or block")


class HeadLoss(torch.nn.Module):
    """The head plus its training loss as one module, so that under `accelerate launch` (DDP) every
    parameter use goes through the wrapped forward and gradients are synchronised."""

    def __init__(self, method: str, head: DraftHead, lm_head: torch.nn.Module, scale: torch.Tensor | None = None,
                 ttt_steps: int = 3, noise: float = 0.2, anchors: int = 16):
        super().__init__()
        self.method, self.head, self.ttt_steps, self.noise, self.anchors = method, head, ttt_steps, noise, anchors
        self._lm_head = (lm_head,)  # the target's, frozen: kept out of this module's parameters
        self.scale = scale  # EAGLE-3 fc input standardisation (None: raw features)

    def forward(self, tb, step_seed: int):
        if self.scale is not None:
            tb = scaled(tb, self.scale)
        if self.method == "eagle1":
            gen = torch.Generator(device=tb.last.device).manual_seed(step_seed)
            return eagle1_loss(self.head, tb, self.noise, gen, self._lm_head[0])
        if self.method == "block":
            gen = torch.Generator().manual_seed(step_seed)  # the anchors a micro-batch scores: seeded, so resumable
            return block_loss(self.head, tb, self._lm_head[0], self.anchors, gen)
        return eagle3_loss(self.head, tb, self.ttt_steps, self._lm_head[0])
