"""Logits processing shared by the drafters, the target and verification.

Lossless sampling needs the target distribution that is compared against drafts to be exactly the
one plain sampling would use, so every place that turns logits into probabilities goes through here.
Order and semantics follow transformers' warpers: temperature, then top-k, then top-p (keep the
smallest set of most likely tokens whose mass reaches top_p).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from featspec.errors import FeatspecError


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise FeatspecError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise FeatspecError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise FeatspecError(f"top-k must be >= 0 (0 disables it), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def process_logits(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Return float32 probabilities (..., V) after temperature / top-k / top-p; argmax one-hot if greedy."""
    logits = logits.float()
    if cfg.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / cfg.temperature
    if cfg.top_k and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass of the tokens ranked strictly above it already reaches top_p
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= cfg.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits.softmax(-1)


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """Draw one token id from a 1-D probability vector."""
    return int(torch.multinomial(probs, 1, generator=generator).item())


def select_token(logits: torch.Tensor, cfg: SamplingConfig, generator: torch.Generator | None) -> int:
    """Next token from 1-D logits: argmax when greedy, else a draw from the processed distribution."""
    if cfg.greedy:
        return int(logits.argmax().item())
    return sample(process_logits(logits, cfg), generator)
