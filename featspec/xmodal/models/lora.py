"""Low-rank adapters over a frozen backbone's linear layers: small to ship, merged away for inference."""

from __future__ import annotations

import math

import torch
from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = base(x) + scale * B(A(x)); base frozen, A and B trained in fp32 whatever the base dtype."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        delta = (x.to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (self.scale * delta).to(x.dtype)

    def merged(self) -> nn.Linear:
        with torch.no_grad():
            w = self.base.weight.float() + self.scale * (self.lora_b @ self.lora_a)
            self.base.weight.copy_(w.to(self.base.weight.dtype))
        return self.base


def apply_lora(module: nn.Module, rank: int, alpha: float | None = None, targets=DEFAULT_TARGETS) -> int:
    """Wrap every matching nn.Linear under `module`; returns how many were wrapped."""
    count = 0
    for name, child in list(module.named_modules()):
        for attr, sub in list(child.named_children()):
            if attr in targets and isinstance(sub, nn.Linear):
                setattr(child, attr, LoRALinear(sub, rank, alpha if alpha is not None else 2.0 * rank))
                count += 1
    return count


def merge_lora(module: nn.Module) -> None:
    """Fold every adapter into its base weight and drop the wrapper: plain nn.Linear again, same outputs."""
    for child in list(module.modules()):
        for attr, sub in list(child.named_children()):
            if isinstance(sub, LoRALinear):
                setattr(child, attr, sub.merged())


def lora_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if k.endswith(("lora_a", "lora_b"))}
