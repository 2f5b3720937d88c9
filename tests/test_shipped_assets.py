"""Everything featspec ships loads from where the layout keeps it: the heads for each target, the cross-modal
adapters and the video target's head (the minis are pinned in test_xmodal_models.py)."""

from __future__ import annotations

import pytest
import torch

from featspec.drafters.registry import HEAD_KIND, SHIPPED_HEADS, shipped_head
from featspec.heads.checkpoint import load_head, validate_against

SHIPPED = sorted((d.parent.name, d.name) for d in SHIPPED_HEADS.glob("*/*") if (d / "config.json").exists())


def test_heads_ship_for_the_default_target():
    assert ("smollm2-135m", "eagle3") in SHIPPED and ("smollm2-135m", "eagle1") in SHIPPED


@pytest.mark.real
@pytest.mark.parametrize("target, kind", SHIPPED)
def test_shipped_head_loads_and_fits_its_target(target, kind):
    from transformers import AutoConfig

    from featspec.models.registry import resolve_source

    assert kind in HEAD_KIND.values()
    head = load_head(shipped_head(target, kind))
    assert head.kind == kind and all(torch.isfinite(p).all() for p in head.parameters())
    validate_against(head, AutoConfig.from_pretrained(resolve_source(target)).get_text_config(), target)


def test_shipped_xmodal_adapters_and_head_load():
    from featspec.xmodal.drafting.adapters import LEVELS
    from featspec.xmodal.evaluate import SHIPPED as XMODAL
    from featspec.xmodal.train.adapter import load_adapter

    adir = XMODAL / "adapters"
    for level in LEVELS:
        embed = torch.nn.Embedding(49152, 576)  # L4/L5 read token embeddings: the backbone's shape
        adapter = load_adapter(adir / f"{level}.pt", embed)
        assert adapter.level == level and not adapter.training
    head = load_head(adir / "eagle3")
    assert head.kind == "eagle3"
