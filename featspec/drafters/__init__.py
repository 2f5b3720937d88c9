"""Drafter registry: build a drafter by method name."""

from __future__ import annotations

from featspec.drafters.base import DraftContext, Drafter, NoDraft
from featspec.drafters.ngram import NgramDrafter
from featspec.drafters.small_model import ModelDrafter, truncated_self_draft
from featspec.errors import FeatspecError
from featspec.models.registry import LoadedModel, load_model

DRAFT_METHODS = ("vanilla", "ngram", "model")


def default_self_draft_layers(target: LoadedModel) -> int:
    """A quarter of the target's layers: cheap enough to draft 4 tokens for about one target step."""
    return max(1, target.model.config.num_hidden_layers // 4)


def load_draft_model(spec: str | None, target: LoadedModel):
    """`layers:N` (self-draft), or any model spec sharing the target's tokenizer."""
    if spec is None:
        spec = f"layers:{default_self_draft_layers(target)}"
    if spec.startswith("layers:"):
        try:
            n = int(spec.split(":", 1)[1])
        except ValueError:
            raise FeatspecError(f"bad draft model '{spec}': use layers:N with an integer N") from None
        return truncated_self_draft(target.model, n)
    draft = load_model(spec, dtype=str(target.dtype).replace("torch.", ""), device=target.device)
    if draft.tokenizer.get_vocab() != target.tokenizer.get_vocab():
        raise FeatspecError(f"draft model '{spec}' uses a different tokenizer than '{target.spec}': pick a draft model of the same family")
    return draft.model


def build_drafter(method: str, target: LoadedModel, draft_model: str | None = None, draft_length: int = 4) -> Drafter:
    if method == "vanilla":
        return NoDraft()
    if method == "ngram":
        return NgramDrafter()
    if method == "model":
        return ModelDrafter(load_draft_model(draft_model, target), draft_length=draft_length)
    raise FeatspecError(f"unknown method '{method}': use one of {', '.join(DRAFT_METHODS)}")


__all__ = ["DraftContext", "Drafter", "NoDraft", "NgramDrafter", "ModelDrafter", "build_drafter", "DRAFT_METHODS"]
