"""`make check-llamacpp`: the shipped head in the pinned llama.cpp, checked end to end.

Builds the pinned llama.cpp (once), converts the target and the shipped EAGLE-3 head to f32 GGUF, and runs
one interleaved bench in float32 over 10 MT-bench prompts: HF generate, featspec's EAGLE-3 chain of 3 drafts,
llama.cpp alone and llama.cpp with the head at 3 drafts (its default). It asserts:
- lossless in llama.cpp: greedy output with the head identical to llama.cpp without it, except where the two
  part at a tie of the target's f32 logits (llama.cpp's batched and one-token kernels round differently; each
  such case is printed with its logit gap), on at least 80 % of the prompts;
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
# A divergence is a rounding tie when both tokens' f32 logits (HF, the same weights) sit within TIE of the top
# logit: llama.cpp's f32 kernels for a batch (verify) and for one token round differently (measured: a
# three-way tie within 0.004 on MT-bench 90), and no speculative method can be bitwise-lossless across that.
# A wrong accept (a bug) lands within 0.01 of the top by chance almost never. Most prompts must match exactly.
TIE = 0.01
MIN_IDENTICAL = 0.8


def tie_gap(lm, ids: list[int], tokens: list[int | None]) -> float | None:
    """How far below the target's top logit the farther of `tokens` is (None if a token is missing: one output
    ended early)."""
    if any(t is None for t in tokens):
        return None
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids], device=lm.device)).logits[0, -1].float()
    top = float(logits.max())
    return max(top - float(logits[t]) for t in tokens)


def run_check(target: str = "smollm2-135m", limit: int = 10, max_new_tokens: int = 128, json_path: str | None = None,
              head: str | None = None, sweep_flags: bool = True) -> int:
    """`head`: an EAGLE-3 head directory (default: the one featspec ships for `target`)."""
    from featspec.data import load_dataset
    from featspec.bench.report import markdown_table
    from featspec.io import write_json
    from featspec.bench.runner import prompt_ids_for, run_bench
    from featspec.drafters import DraftOptions
    from featspec.llamacpp.source import build, pinned_tree
    from featspec.models import load_model
    from featspec.sampling import SamplingConfig

    build()
    lm = load_model(target, "float32")
    samples = load_dataset("mt-bench", limit)
    chain = DraftOptions(head=head, budget="fixed", depth=CHAIN, topk=1, total_tokens=CHAIN, guard=False)
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
    ties = []
    by_id = {s.id: s for s in samples}
    for d in m["llamacpp-eagle3"]["divergences"] or []:
        ids = prompt_ids_for(lm, by_id[d["sample"]], [{"role": "user", "content": by_id[d["sample"]].turns[0]}])
        gap = tie_gap(lm, ids + d["prefix"], [d["token"], d["ref_token"]])
        if gap is None or gap > TIE:
            failures.append(f"{d['sample']}: with the head llama.cpp wrote token {d['token']} where alone it wrote "
                            f"{d['ref_token']} (position {d['at']}), {gap if gap is not None else 'end'} below the "
                            f"target's top logit: not a rounding tie")
        else:
            ties.append(f"{d['sample']} at token {d['at']} (both within {gap:.4f} of the target's top f32 logit)")
    exact = m["llamacpp-eagle3"]["exact_match"]
    print(f"lossless: llama.cpp with the head = llama.cpp alone on {exact:.0%} of prompts"
          + (f"; the others part at a tie of the target's logits, where llama.cpp's batched (verify) and one-token "
             f"kernels round differently: {'; '.join(ties)}" if ties else "")
          + f". llama.cpp alone agrees with HF generate on {m['llamacpp']['agreement_with_hf']:.0%}")
    if exact < MIN_IDENTICAL:
        failures.append(f"llama.cpp with the head matched llama.cpp alone on only {exact:.0%} of prompts")
    tau_l, tau_f = m["llamacpp-eagle3"]["tau"], m["eagle3"]["tau"]
    if tau_l is None or tau_f is None:
        failures.append(f"no drafted steps to compare (llama.cpp tau {tau_l}, featspec tau {tau_f})")
    elif abs(tau_l - tau_f) > TOLERANCE * tau_f:
        failures.append(f"mean accepted length {tau_l:.2f} in llama.cpp vs {tau_f:.2f} in featspec's chain: more than "
                        f"{TOLERANCE:.0%} apart")
    else:
        print(f"mean accepted length: llama.cpp {tau_l:.2f}, featspec chain {tau_f:.2f} "
              f"({abs(tau_l - tau_f) / tau_f:.1%} apart, within {TOLERANCE:.0%})")

    # which flags pay here (f32 and bf16 differ in llama.cpp as in PyTorch): the sweep featspec bench runs
    from featspec.llamacpp.bench import LlamaCppSession

    for dtype in ("float32", "bfloat16") if sweep_flags else ():
        lm.model.to(getattr(torch, dtype))
        spare = load_dataset("mt-bench")[limit:limit + 4]
        prompts = [prompt_ids_for(lm, s, [{"role": "user", "content": s.turns[0]}]) for s in spare]
        session = LlamaCppSession(lm, str(pinned_tree()), head, "auto", tune_prompts=prompts)
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
