"""The generator a command runs: drafter, the machine's cost model, the tree budget and the guard, wired once.

`generate`, `bench` and the demo all build their engine here, so a method means the same thing in each.
"""

from __future__ import annotations

import sys
from functools import cache

from featspec.drafters.cost import cost_model, drafter_costs, leveled, predict
from featspec.drafters.guard import Guard
from featspec.drafters.registry import DraftOptions, build_drafter
from featspec.engine import SpeculativeGenerator
from featspec.models.registry import LoadedModel
from featspec.models.target import TargetModel
from featspec.models.tokens import eos_token_ids

PRIOR_CONTEXT = 256  # context length the guard's prior is priced at (a chat prompt plus a short answer)


def tell(line: str) -> None:
    """What building a generator tells the user (the head it loaded and its dtypes): one stderr line."""
    print(f"featspec: {line}", file=sys.stderr, flush=True)


def build_generator(method: str, lm: LoadedModel, opts: DraftOptions | None = None) -> SpeculativeGenerator:
    """The engine for `method` on `lm`: the budget and guard get this machine's measured costs (measured once,
    after the drafter has loaded, and cached on disk)."""
    opts = opts or DraftOptions()
    target = TargetModel(lm.model)
    costs = cache(lambda: cost_model(target))
    drafter = build_drafter(method, lm, opts, costs, log=tell)
    guard = None
    if opts.guard and method != "vanilla":
        draft = drafter_costs(costs(), drafter, target)
        inner = leveled(drafter)
        budget = getattr(inner, "budget", None)
        if budget is not None and draft is not None:  # start from measured drafting costs, not from zero
            budget.base_s, budget.level_s = draft["base_s"], draft["level_s"]
        predicted = predict(costs(), PRIOR_CONTEXT, draft, min_nodes=1).speedup if draft is not None else None
        guard = Guard(plain_prior_s=costs().curve(PRIOR_CONTEXT)(1), predicted=predicted)
    return SpeculativeGenerator(target, drafter, eos_token_ids(lm.model, lm.tokenizer), lm.tokenizer, guard)
