"""The one benchmark harness: every method on every item, interleaved, after a warm-up.

Per item the methods run one after another, and their order rotates from item to item, so drift of the
machine (thermal, other load) hits all methods alike; warm-up items run first and are discarded (a process's
first forwards build kernels and run slow). `featspec bench` runs it over prompts, `featspec xmodal bench` over
clips; what a run returns and how it is summed is theirs.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

from tqdm import tqdm

Item = TypeVar("Item")
Result = TypeVar("Result")


def rotation(methods: Sequence[str], index: int) -> list[str]:
    """The order methods run in on item `index`: shifted by one per item."""
    k = index % len(methods)
    return list(methods[k:]) + list(methods[:k])


def interleave(items: Sequence[Item], methods: Sequence[str], run: Callable[[str, Item, bool], Result],
               warmup: Sequence[Item] = (), desc: str = "bench", progress: bool = True,
               status: Callable[[str], str] | None = None) -> dict[str, list[Result]]:
    """`run(method, item, warm)` for every method on every warm-up item (results dropped), then on every item in
    rotating order; returns each method's results in item order. `status(method)` is the progress bar's text
    after a run of that method."""
    for i, item in enumerate(warmup):
        for m in rotation(methods, i):
            run(m, item, True)
    results: dict[str, list[Result]] = {m: [] for m in methods}
    bar = tqdm(total=len(items) * len(methods), desc=desc, unit="run", dynamic_ncols=True, disable=not progress)
    try:
        for i, item in enumerate(items):
            for m in rotation(methods, i):
                results[m].append(run(m, item, False))
                bar.update(1)
                if status is not None:
                    bar.set_postfix_str(status(m))
    finally:
        bar.close()
    return results
