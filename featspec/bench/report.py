"""Benchmark reports: markdown table for stdout/README and a PNG (tokens/s and tau per method)."""

from __future__ import annotations

from pathlib import Path

from featspec.io import save_figure, write_json  # noqa: F401  (reports are written through the one atomic writer)


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown_table(report: dict) -> str:
    rows = [
        "| method | tokens/s | speedup vs hf | tau | exact match | new tokens | mean tree | plain steps (guard) | accept by depth |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    llama = any(m.get("speedup_vs_llamacpp") is not None for m in report["methods"].values())
    if llama:  # llama.cpp beside featspec: its speedup column, and agreement with hf across engines
        rows = [rows[0].replace("| speedup vs hf |", "| speedup vs hf | vs llamacpp |").replace(
            "| exact match |", "| exact match | agrees with hf |"), "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, m in report["methods"].items():
        g = m.get("guard")
        plain = "-" if not g else f"{g['plain_steps']} / {g['plain_steps'] + g['drafted_steps']}"
        speed = _fmt(m['speedup'], '.2f') + (f" | {_fmt(m.get('speedup_vs_llamacpp'), '.2f')}" if llama else "")
        exact = _fmt(m['exact_match'], '.2f') + (f" | {_fmt(m.get('agreement_with_hf'), '.2f')}" if llama else "")
        rows.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {speed} | {_fmt(m['tau'], '.2f')} | "
            f"{exact} | {m['new_tokens']} | {_fmt(m['mean_tree_size'], '.1f')} | {plain} | "
            f"{' '.join(format(a, '.2f') for a in (m.get('accept_by_depth') or [])[:8]) or '-'} |"
        )
    flags = (report["config"].get("llamacpp") or {}).get("verdict")
    if flags:
        rows.append(f"\nllama.cpp: {flags}; command: `{report['config']['llamacpp']['command']}`")
    return "\n".join(rows)


def write_plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    tps = [report["methods"][n]["tokens_per_s"] for n in names]
    tau = [report["methods"][n]["tau"] or 0.0 for n in names]
    cfg = report["config"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    axes[0].bar(names, tps, color="tab:blue")
    axes[0].set_ylabel("tokens / s")
    axes[0].set_title("throughput (same run, interleaved)")
    for i, n in enumerate(names):
        sp = report["methods"][n]["speedup"]
        if sp is not None:
            axes[0].text(i, tps[i], f"{sp:.2f}x", ha="center", va="bottom", fontsize=8)
    axes[1].bar(names, tau, color="tab:orange")
    axes[1].set_ylabel("tau (tokens / verify forward)")
    axes[1].set_title("acceptance")
    depth_methods = [n for n in names if report["methods"][n].get("accept_by_depth")]
    for n in depth_methods:
        rates = report["methods"][n]["accept_by_depth"]
        axes[2].plot(range(1, len(rates) + 1), rates, marker="o", label=n)
    axes[2].set_xlabel("tree depth")
    axes[2].set_ylabel("acceptance rate (n-alpha)")
    axes[2].set_title("acceptance by depth")
    axes[2].set_ylim(0, 1)
    if depth_methods:
        axes[2].legend(fontsize=7)
    fig.suptitle(f"{cfg['target']} {cfg['dtype']} on {cfg['device']}, max_new_tokens={cfg['max_new_tokens']}, "
                 f"T={cfg['temperature']}", fontsize=9)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
