"""The generator a command runs: drafter, the machine's cost model, the tree budget and the guard, wired once.

`generate`, `bench` and the demo all build their engine here, so a method means the same thing in each.
"""

from __future__ import annotations

from featspec.costmodel import cost_model, drafter_costs, leveled, predict
from featspec.drafters import DraftOptions, build_drafter
from featspec.engine import SpeculativeGenerator, eos_token_ids
from featspec.guard import Guard
from featspec.models.registry import LoadedModel
from featspec.models.target import TargetModel

PRIOR_CONTEXT = 256  # context length the guard's prior is priced at (a chat prompt plus a short answer)


def build_generator(method: str, lm: LoadedModel, opts: DraftOptions | None = None) -> SpeculativeGenerator:
    """The engine for `method` on `lm`: the budget and guard get this machine's measured costs."""
    opts = opts or DraftOptions()
    drafter = build_drafter(method, lm, opts)
    target = TargetModel(lm.model)
    guard = None
    if opts.guard and method != "vanilla":
        costs = cost_model(target)
        draft = drafter_costs(costs, drafter, target)
        inner = leveled(drafter)
        budget = getattr(inner, "budget", None)
        if budget is not None and draft is not None:  # start from measured drafting costs, not from zero
            budget.base_s, budget.level_s = draft["base_s"], draft["level_s"]
        predicted = predict(costs, PRIOR_CONTEXT, draft, min_nodes=1).speedup if draft is not None else None
        guard = Guard(plain_prior_s=costs.curve(PRIOR_CONTEXT)(1), predicted=predicted)
    return SpeculativeGenerator(target, drafter, eos_token_ids(lm.model, lm.tokenizer), lm.tokenizer, guard)
