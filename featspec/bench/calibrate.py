"""`featspec calibrate`: measure (or read) this machine's cost model and show what it implies.

For each dtype: the verify time of n = 1 ... 64 tree nodes at a few context lengths, the drafter's cost
(before its first level, per level), and under the acceptance prior of `drafters.cost.RANK_ACCEPT` the
ceiling `E(n) * T(1) / T(step)` for each tree size: what speculation can reach here at best. The dtype
`--dtype auto` would pick is printed last, with its reason; the curves go to a PNG.
"""

from __future__ import annotations

from pathlib import Path

import torch

from featspec.drafters.cost import CONTEXTS, DTYPE_NAMES, CostModel, ceiling_table, fastest, measure_dtype, predict
from featspec.drafters import DraftOptions, build_drafter
from featspec.models import load_model
from featspec.models.registry import LoadedModel
from featspec.io import save_figure

REPORT_CONTEXT = 256


def _table(costs: CostModel) -> list[str]:
    head = "| context | " + " | ".join(f"T({n}) ms" for n in costs.sizes) + " | T(8)/T(1) | T(32)/T(1) |"
    rows = [head, "|---" * (len(costs.sizes) + 3) + "|"]
    for c in costs.contexts:
        curve = costs.curve(c)
        rows.append(f"| {c} | " + " | ".join(f"{curve(n) * 1e3:.1f}" for n in costs.sizes)
                    + f" | {curve(8) / curve(1):.2f} | {curve(32) / curve(1):.2f} |")
    return rows


def run_calibrate(target_spec: str, method: str, head: str | None, dtypes: list[torch.dtype], force: bool,
                  png: Path) -> dict:
    lm32 = load_model(target_spec, "float32")
    cap = torch.backends.cpu.get_cpu_capability()
    device = torch.cuda.get_device_name() if lm32.device.type == "cuda" else f"CPU {cap}"
    print(f"cost model of {target_spec} on {device}, {torch.get_num_threads()} threads, torch {torch.__version__}")
    results = {}
    make = None
    if method != "vanilla":
        opts = DraftOptions(head=head, budget="fixed", guard=False)
        make = lambda m, costs: build_drafter(method, LoadedModel(lm32.spec, m, lm32.tokenizer), opts, costs)  # noqa: E731
    for dtype in dtypes:
        costs, draft = measure_dtype(lm32.model, dtype, make, use_cache=not force)
        name = DTYPE_NAMES[dtype]
        print(f"\n## {name}: verify forward (one sequence, hidden states on), cached at {costs.path}")
        print("\n".join(_table(costs)))
        if draft is not None:
            print(f"drafting ({method}): {draft['base_s'] * 1e3:.1f} ms before the first level + "
                  f"{draft['level_s'] * 1e3:.1f} ms per level (context {draft['context']})")
        else:
            print(f"drafting ({method}): no head levels to measure (counted as free)")
        rows = ceiling_table(costs, REPORT_CONTEXT, draft)
        print(f"\nceiling at context {REPORT_CONTEXT} under the acceptance prior (tau = E(n); "
              "ceiling = tau * T(1) / T(step), step = drafting + verify of n nodes):")
        print("| tree nodes n (root incl.) | depth | tau (prior) | T(step)/T(1) | ceiling |\n|---|---|---|---|---|")
        for n, depth, e, ratio, ceil in rows:
            print(f"| {n} | {depth} | {e:.2f} | {ratio:.2f} | {ceil:.2f}x |")
        pred = predict(costs, REPORT_CONTEXT, draft)
        print(f"best tree: {pred.nodes} draft nodes, depth {pred.depth}: predicted {pred.speedup:.2f}x over plain "
              f"decoding ({pred.tokens_per_s:.1f} tok/s; plain {1 / pred.plain_s:.1f} tok/s)")
        results[name] = {"costs": costs, "draft": draft, "prediction": pred}
    if len(results) > 1:
        best = fastest({k: v["prediction"] for k, v in results.items()})
        rates = ", ".join(f"{k} {v['prediction'].tokens_per_s:.1f} tok/s" for k, v in results.items())
        print(f"\n--dtype auto picks {best} on this machine (predicted {rates})")
    _plot(results, png, f"{target_spec} on {device}, {torch.get_num_threads()} threads")
    print(f"wrote {png}")
    return results


def _plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.2))
    styles = {"float32": "-", "bfloat16": "--"}
    for name, r in results.items():
        costs: CostModel = r["costs"]
        for c in costs.contexts:
            curve = costs.curve(c)
            a1.plot(costs.sizes, [curve(n) * 1e3 for n in costs.sizes], styles.get(name, "-"), marker="o",
                    label=f"{name}, context {c}")
        rows = ceiling_table(costs, REPORT_CONTEXT, r["draft"])
        a2.plot([x[0] for x in rows], [x[4] for x in rows], styles.get(name, "-"), marker="o", label=name)
    a1.set_xscale("log", base=2)
    a1.set_xlabel("tree nodes verified in one forward")
    a1.set_ylabel("ms per verify forward")
    a1.set_title("verify cost (measured)")
    a1.legend(fontsize=7)
    a2.axhline(1.0, color="grey", lw=0.8)
    a2.set_xscale("log", base=2)
    a2.set_xlabel("tree nodes")
    a2.set_ylabel("tau * T(1) / T(step)")
    a2.set_title(f"speedup ceiling at context {REPORT_CONTEXT} (acceptance prior)")
    a2.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


__all__ = ["run_calibrate", "CONTEXTS"]
