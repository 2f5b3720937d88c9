"""Drafter registry: build a drafter by method name from one options object.

Building a drafter loads what it drafts with (a head, a draft model) and nothing else: the machine's cost model
that `--budget auto` prices trees with comes from the caller (`drafters/runtime.py` measures it), asked for only
after the head has loaded and passed its checks, and what to tell the user goes through the caller's `log`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from featspec.drafters.base import NoDraft
from featspec.drafters.ngram import NgramDrafter
from featspec.drafters.small_model import ModelDrafter, truncated_self_draft
from featspec.errors import FeatspecError
from featspec.models.registry import LoadedModel, load_model
from featspec.protocol import Drafter

DRAFT_METHODS = ("vanilla", "ngram", "model", "eagle1", "eagle2", "eagle3", "block")
HEAD_KIND = {"eagle1": "eagle1", "eagle2": "eagle1", "eagle3": "eagle3", "block": "block"}  # method -> head it drafts with
SHIPPED_HEADS = Path(__file__).resolve().parent.parent / "assets" / "heads"


@dataclass
class DraftOptions:
    """Knobs of every drafter; each drafter reads the ones it needs."""

    draft_model: str | None = None  # method model: a model spec or layers:N
    draft_length: int = 4  # method model: chain length
    head: str | None = None  # eagle*: head directory or hub id (default: the head shipped for the target)
    # eagle2/eagle3 dynamic tree. Small by default: a CPU's verify cost grows with the node count and the
    # shipped heads' acceptance pays for few nodes (measurements in docs/eagle.md). With budget auto, depth
    # and total_tokens are ceilings the budget chooses under, so they default larger.
    depth: int | None = None  # tree depth (default 4; 8 with budget auto)
    topk: int = 4  # children per expanded node and nodes expanded per level
    total_tokens: int | None = None  # draft nodes kept per step (default 8; a ceiling of 32 with budget auto)
    budget: str = "auto"  # auto (per-step depth and node count from confidence and the cost model) | fixed
    guard: bool = True  # run steps without drafts while speculation is measured or predicted slower (guard.py)
    lookup: bool = False  # graft prompt-lookup continuations onto the drafter's tree (drafters/lookup.py)

    def tree_shape(self) -> tuple[int, int]:
        """(depth, total_tokens) after the budget-dependent defaults."""
        auto = self.budget == "auto"
        depth = self.depth if self.depth is not None else (AUTO_DEPTH if auto else FIXED_DEPTH)
        return depth, self.total_tokens if self.total_tokens is not None else (AUTO_TOTAL_TOKENS if auto else FIXED_TOTAL_TOKENS)


AUTO_DEPTH, AUTO_TOTAL_TOKENS = 8, 32  # ceilings of --budget auto
# the fixed budget: where verifying 8 nodes costs about what 1 does and 16 starts to cost more (docs/eagle.md)
FIXED_DEPTH, FIXED_TOTAL_TOKENS = 4, 8


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


def shipped_head(target_spec: str, kind: str) -> Path:
    path = SHIPPED_HEADS / target_spec / kind
    if not (path / "config.json").exists():
        raise FeatspecError(f"no {kind} head ships for '{target_spec}': pass --head DIR "
                            f"(train one with `featspec train --method {kind} --target {target_spec} --out DIR`)")
    return path


def load_feature_head(method: str, target: LoadedModel, head_spec: str | None, log: Callable[[str], None] | None = None):
    """The head for an eagle* method, validated against the target and bound to it; `log` hears its dtypes."""
    from featspec.heads.checkpoint import load_head, validate_against

    kind = HEAD_KIND[method]
    spec = head_spec or str(shipped_head(target.spec, kind))
    head = load_head(spec, device=target.device, dtype=target.dtype)
    if head.kind != kind:
        raise FeatspecError(f"method {method} drafts with an {kind} head but {spec} holds an {head.kind} head")
    validate_against(head, target.model.config.get_text_config(), target.spec)
    run = str(target.dtype).replace("torch.", "")
    if log is not None:
        log(f"{head.kind} head {spec} (stored in {head.stored_dtype}) runs in {run}")
    return head.bind(target.model)


def check_lookup(method: str, lookup: bool) -> None:
    """--lookup needs a drafter whose tree it can graft onto (checked before any model loads)."""
    if lookup and method in ("vanilla", "ngram"):
        raise FeatspecError(f"--lookup grafts prompt lookup onto a drafter's tree and method {method} has none: "
                            "drop --lookup or use an eagle/model method")


def build_drafter(method: str, target: LoadedModel, opts: DraftOptions | None = None, costs: Callable | None = None,
                  log: Callable[[str], None] | None = None) -> Drafter:
    """`costs()`: the machine's `CostModel` for this target, asked for by eagle2/eagle3 with budget auto."""
    opts = opts or DraftOptions()
    check_lookup(method, opts.lookup)
    if opts.lookup:
        from featspec.drafters.lookup import LookupGraft

        return LookupGraft(_build(method, target, opts, costs, log))
    return _build(method, target, opts, costs, log)


def needs_costs(method: str, opts: DraftOptions) -> bool:
    """Does this drafter price its trees with the machine's cost model?"""
    return method in ("eagle2", "eagle3", "block") and opts.budget == "auto"


def _build(method: str, target: LoadedModel, opts: DraftOptions, costs, log) -> Drafter:
    if method == "vanilla":
        return NoDraft()
    if method == "ngram":
        return NgramDrafter()
    if method == "model":
        return ModelDrafter(load_draft_model(opts.draft_model, target), draft_length=opts.draft_length)
    if method in HEAD_KIND:
        from featspec.drafters.eagle import DEFAULT_STATIC_TREE, FeatureDrafter

        head = load_feature_head(method, target, opts.head, log)
        if method == "eagle1":
            return FeatureDrafter(head, method, static_tree=DEFAULT_STATIC_TREE)
        budget = _budget(opts, costs)
        depth, total = opts.tree_shape()
        if method == "block":
            from featspec.drafters.block import BlockDrafter

            return BlockDrafter(head, method, topk=opts.topk, total_tokens=total, budget=budget, depth=depth)
        return FeatureDrafter(head, method, depth=depth, topk=opts.topk, total_tokens=total, budget=budget)
    raise FeatspecError(f"unknown method '{method}': use one of {', '.join(DRAFT_METHODS)}")


def _budget(opts: DraftOptions, costs: Callable | None):
    """The tree budget of --budget auto (None: fixed)."""
    if opts.budget == "fixed":
        return None
    if opts.budget != "auto":
        raise FeatspecError(f"unknown budget '{opts.budget}': use fixed or auto")
    from featspec.drafters.budget import Budget

    if costs is None:
        raise ValueError("budget auto prices trees with the machine's cost model: pass costs")
    return Budget(costs())



