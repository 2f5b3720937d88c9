"""Drafters: every way of proposing a tree (n-gram, small model, EAGLE heads, prompt-lookup graft), the registry
that builds one by method name, and what prices speculation on this machine (cost model, budget, guard)."""

from featspec.drafters.base import NoDraft
from featspec.drafters.ngram import NgramDrafter
from featspec.drafters.registry import (DRAFT_METHODS, HEAD_KIND, SHIPPED_HEADS, DraftOptions, build_drafter,
                                        check_lookup, load_feature_head, needs_costs, shipped_head)
from featspec.drafters.small_model import ModelDrafter

__all__ = ["DRAFT_METHODS", "HEAD_KIND", "SHIPPED_HEADS", "DraftOptions", "ModelDrafter", "NgramDrafter", "NoDraft",
           "build_drafter", "check_lookup", "load_feature_head", "needs_costs", "shipped_head"]
