"""`make check-llamacpp`: the shipped head in the pinned llama.cpp, checked end to end.

Builds the pinned llama.cpp (once), converts the target and the shipped EAGLE-3 head to f32 GGUF, and runs
one interleaved bench in float32 over 10 MT-bench prompts: HF generate, featspec's EAGLE-3 chain of 3 drafts,
llama.cpp alone and llama.cpp with the head at 3 drafts (its default). It asserts:
- lossless in llama.cpp: greedy output with the head identical to llama.cpp without it on every prompt;
- the head behaves as in featspec: llama.cpp's mean accepted length within 10 % of featspec's chain of the
  same length on the same prompts;
and prints the speed table, the flags that pay on this machine (a short sweep), and llama.cpp's step costs.
"""

from __future__ import annotations

import sys

import torch

from featspec.errors import FeatspecError

CHAIN = 3  # llama.cpp's default --spec-draft-n-max
TOLERANCE = 0.10


def run_check(target: str = "smollm2-135m", limit: int = 10, max_new_tokens: int = 128, json_path: str | None = None) -> int:
    from featspec.bench.datasets import load_dataset
    from featspec.bench.report import markdown_table, write_json
    from featspec.bench.runner import prompt_ids_for, run_bench
    from featspec.drafters import DraftOptions
    from featspec.llamacpp.source import build, pinned_tree
    from featspec.models import load_model
    from featspec.sampling import SamplingConfig

    build()
    lm = load_model(target, "float32")
    samples = load_dataset("mt-bench", limit)
    chain = DraftOptions(budget="fixed", depth=CHAIN, topk=1, total_tokens=CHAIN, guard=False)
    report = run_bench(lm, samples, ["hf", "eagle3", "llamacpp", "llamacpp-eagle3"], max_new_tokens, SamplingConfig(),
                       opts=chain, config_extra={"command": "featspec llamacpp check", "dataset": "mt-bench"},
                       llama={"dir": str(pinned_tree()), "draft": f"{CHAIN},0"})
    m = report["methods"]
    print(markdown_table(report))
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"(float32, {limit} MT-bench prompts x {max_new_tokens} tokens, CPU capability {cap}, "
          f"{report['config']['threads']} threads; eagle3 = featspec's chain of {CHAIN}, llamacpp-eagle3 = "
          f"--spec-draft-n-max {CHAIN})")
    failures = []
    if m["llamacpp-eagle3"]["exact_match"] != 1.0:
        failures.append(f"llama.cpp with the head matched llama.cpp alone on {m['llamacpp-eagle3']['exact_match']:.2f} "
                        "of prompts, expected all")
    tau_l, tau_f = m["llamacpp-eagle3"]["tau"], m["eagle3"]["tau"]
    if tau_l is None or tau_f is None:
        failures.append(f"no drafted steps to compare (llama.cpp tau {tau_l}, featspec tau {tau_f})")
    elif abs(tau_l - tau_f) > TOLERANCE * tau_f:
        failures.append(f"mean accepted length {tau_l:.2f} in llama.cpp vs {tau_f:.2f} in featspec's chain: more than "
                        f"{TOLERANCE:.0%} apart")
    else:
        print(f"mean accepted length: llama.cpp {tau_l:.2f}, featspec chain {tau_f:.2f} "
              f"({abs(tau_l - tau_f) / tau_f:.1%} apart, within {TOLERANCE:.0%})")
    print(f"lossless: llama.cpp with the head = llama.cpp alone on {m['llamacpp-eagle3']['exact_match']:.0%} of prompts; "
          f"llama.cpp agrees with HF generate on {m['llamacpp']['agreement_with_hf']:.0%}")

    # which flags pay here (f32 and bf16 differ in llama.cpp as in PyTorch): the sweep featspec bench runs
    from featspec.llamacpp.bench import LlamaCppSession

    for dtype in ("float32", "bfloat16"):
        lm.model.to(getattr(torch, dtype))
        spare = load_dataset("mt-bench")[limit:limit + 4]
        prompts = [prompt_ids_for(lm, s, [{"role": "user", "content": s.turns[0]}]) for s in spare]
        session = LlamaCppSession(lm, str(pinned_tree()), None, "auto", tune_prompts=prompts)
        try:
            session.flags()
            report["config"].setdefault("flag_sweeps", {})[dtype] = session.report()
            print(f"{dtype}: {session.choice.summary()}; command: {session.command()}")
        finally:
            session.close()
    if json_path:
        write_json(report, json_path)
    if failures:
        for f in failures:
            print(f"check-llamacpp: FAILED: {f}", file=sys.stderr)
        return 1
    print("check-llamacpp: passed")
    return 0


def main() -> int:
    try:
        return run_check(json_path=sys.argv[1] if len(sys.argv) > 1 else None)
    except FeatspecError as exc:
        print(f"check-llamacpp: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
