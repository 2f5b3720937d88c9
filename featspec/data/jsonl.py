"""A user's own prompts: one JSON object per line with "prompt" (one turn) or "turns" (several)."""

from __future__ import annotations

import json
from pathlib import Path

from featspec.data import Sample
from featspec.errors import FeatspecError


def jsonl(path_text: str) -> list[Sample]:
    from featspec.validate import read_text

    path = Path(path_text).expanduser()
    lines = read_text(path, "dataset file").splitlines()
    samples = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise FeatspecError(f"{path}:{n} is not valid JSON: one object per line with \"prompt\" or \"turns\"") from None
        turns = row.get("turns") if isinstance(row, dict) else None
        if turns is None and isinstance(row, dict) and "prompt" in row:
            turns = [row["prompt"]]
        if not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise FeatspecError(f"{path}:{n} needs a non-empty \"prompt\" string or \"turns\" list of strings")
        samples.append(Sample(str(row.get("id", f"{path.name}/{n}")), list(turns)))
    if not samples:
        raise FeatspecError(f"{path} holds no prompts: one JSON object per line with \"prompt\" or \"turns\"")
    return samples
