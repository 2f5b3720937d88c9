"""`featspec bench`: methods side by side on one dataset, interleaved, against HF generate (JSON, md and png)."""

from __future__ import annotations

import time
from pathlib import Path

from featspec.cli.common import add_model_args, command_line, draft_options, load_target, sampling_config, settle_dtype
from featspec.validate import nonneg_int, positive_int


def add_parser(sub) -> None:
    from featspec.bench.methods import METHODS
    from featspec.data import DATASETS

    b = sub.add_parser("bench", help="benchmark methods side by side, interleaved, against HF generate")
    add_model_args(b)
    b.add_argument("--dataset", default="mt-bench", help=f"one of {', '.join(DATASETS)} (default mt-bench)")
    b.add_argument("--limit", type=positive_int, default=10, help="number of prompts (default 10)")
    b.add_argument("--methods", default="hf,vanilla,ngram", help=f"comma list from {', '.join(METHODS)}")
    b.add_argument("--warmup", type=nonneg_int, default=1, help="warm-up rounds over all methods before timing (default 1)")
    b.add_argument("--json", default="bench.json", help="where to write the JSON report (a .png and .md go beside it)")
    b.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="for methods llamacpp, llamacpp-eagle3: a llama.cpp source tree with its build (default: the "
                        "pinned one `make llamacpp` builds into the featspec cache)")
    b.add_argument("--llama-cpp-draft", default="auto", metavar="auto|none|N_MAX[,P_MIN]",
                   help="draft flags of llamacpp-eagle3: auto (default) sweeps --spec-draft-n-max x --spec-draft-p-min "
                        "on prompts outside the benchmarked ones and keeps the fastest, or none when no setting beats "
                        "the target alone; none runs without the head; N_MAX[,P_MIN] forces a setting")
    b.set_defaults(run=run)


def run(args) -> int:
    from featspec.data import load_dataset
    from featspec.bench.methods import HF_METHODS, LLAMACPP_METHODS, base_method, parse_methods
    from featspec.bench.report import markdown_table, write_plot
    from featspec.io import write_json
    from featspec.bench.runner import run_bench
    from featspec.io import write_text
    from featspec.validate import check_destination
    from featspec.drafters.cost import cost_model
    from featspec.drafters import check_lookup
    from featspec.models.target import TargetModel

    sampling = sampling_config(args)
    json_path = Path(args.json)
    for path in (json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png")):
        check_destination(path, "--json")  # before minutes of benchmarking, not after
    methods = parse_methods(args.methods)
    for m in methods:
        check_lookup(m, args.lookup)
    samples = load_dataset(args.dataset, args.limit)
    llama = None
    if any(m in LLAMACPP_METHODS for m in methods):
        from featspec.llamacpp.bench import parse_draft
        from featspec.llamacpp.source import resolve_tree

        parse_draft(args.llama_cpp_draft)
        resolve_tree(args.llama_cpp)  # no llama.cpp: one line saying how to get it, before a model loads
        llama = {"dir": args.llama_cpp, "draft": args.llama_cpp_draft}
    drafting = [base_method(m) for m in methods if m not in HF_METHODS + LLAMACPP_METHODS and m != "vanilla"]
    # --dtype auto prices the first feature drafter benched (else the first drafter): the dtype serves them all
    lead = next((m for m in drafting if m.startswith("eagle")), drafting[0] if drafting else None)
    lm = load_target(args, lead)
    dtype_note = settle_dtype(args, lm, lead)
    if llama is not None and llama["draft"] == "auto":
        from featspec.bench.runner import prompt_ids_for

        # tune llama.cpp's draft flags on the dataset's next prompts, never on the benchmarked ones
        spare = load_dataset(args.dataset)[args.limit:args.limit + 4] or samples[:2]
        llama["tune_prompts"] = [prompt_ids_for(lm, s, [{"role": "user", "content": s.turns[0]}]) for s in spare]
    started = time.strftime("%Y-%m-%d %H:%M:%S")
    report = run_bench(
        lm, samples, methods, args.max_new_tokens, sampling, seed=args.seed,
        opts=draft_options(args), warmup=args.warmup,
        config_extra={"dataset": args.dataset, "limit": args.limit, "started": started, "dtype_choice": dtype_note,
                      "command": command_line(),
                      "cost_model": cost_model(TargetModel(lm.model)).summary()},
        llama=llama,
    )
    write_json(report, json_path)
    table = markdown_table(report)
    write_text(table + "\n", json_path.with_suffix(".md"))
    write_plot(report, json_path.with_suffix(".png"))
    print(table)
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}, {json_path.with_suffix('.png')}")
    return 0
