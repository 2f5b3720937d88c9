"""Prompt sets and training text, all read from PyPI packages or local files (no hub access).

One module per source: `mtbench`, `humaneval`, `sharegpt` (the conversations, and the held-out slice the
benchmark uses and training skips), `jsonl` (a user's own prompts). Both `bench` and `train` read from here.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

from featspec.errors import FeatspecError

DATASETS = ("mt-bench", "mt-bench:2", "humaneval", "sharegpt-heldout", "jsonl:PATH")


@dataclass
class Sample:
    id: str
    turns: list[str]  # user turns; each is answered before the next is asked
    plain: str | None = None  # completion-style prompt for models without a chat template


def package_file(module: str, pip_cmd: str, *parts: str) -> Path:
    """A data file inside an installed package, or one line saying how to install it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FeatspecError(f"dataset package missing: run `{pip_cmd}`")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FeatspecError(f"{path} is missing: reinstall with `{pip_cmd} --force-reinstall`")
    return path


def load_dataset(name: str, limit: int | None = None) -> list[Sample]:
    """The samples of a benchmark dataset by name (see DATASETS), the first `limit` of them."""
    from featspec.data import humaneval, jsonl, mtbench, sharegpt

    sources = {"mt-bench": lambda: mtbench.mt_bench(1), "mt-bench:2": lambda: mtbench.mt_bench(2),
               "humaneval": humaneval.humaneval, "sharegpt-heldout": sharegpt.sharegpt_heldout}
    if name.startswith("jsonl:"):
        samples = jsonl.jsonl(name[len("jsonl:"):])
    elif name in sources:
        samples = sources[name]()
    else:
        raise FeatspecError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    if limit is not None:
        if limit < 1:
            raise FeatspecError(f"--limit must be >= 1, got {limit}")
        samples = samples[:limit]
    return samples
