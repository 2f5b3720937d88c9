"""Benchmark reports, shared by `bench` and `xmodal bench`: markdown tables and the plots' common panels."""

from __future__ import annotations

from pathlib import Path

from featspec.io import save_figure


Column = tuple  # (header, key | "a.b" path | callable(row) | None for the row name, format spec | None)


def _value(name: str, row: dict, key):
    if key is None:
        return name
    if callable(key):
        return key(row)
    for part in key.split("."):
        row = None if row is None else row.get(part)
    return row


def table(columns: list[Column], rows: dict[str, dict]) -> str:
    """A markdown table, one row per method; None prints as "-", a format spec ending in "x" appends it."""
    lines = ["| " + " | ".join(c[0] for c in columns) + " |",
             "|" + "|".join("---" if c[2] is None else "---:" for c in columns) + "|"]
    for name, row in rows.items():
        cells = []
        for _, key, spec in columns:
            v = _value(name, row, key)
            suffix = "x" if spec and spec.endswith("x") else ""
            cells.append("-" if v is None else format(v, (spec or "").rstrip("x")) + suffix)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _guard(m: dict) -> str | None:
    g = m.get("guard")
    return None if not g else f"{g['plain_steps']} / {g['plain_steps'] + g['drafted_steps']}"


def _depths(m: dict) -> str | None:
    return " ".join(format(a, ".2f") for a in (m.get("accept_by_depth") or [])[:8]) or None


def markdown_table(report: dict) -> str:
    """`featspec bench`'s table; with llama.cpp in the run, its speedup column and agreement with hf beside."""
    llama = any(m.get("speedup_vs_llamacpp") is not None for m in report["methods"].values())
    columns = [("method", None, None), ("tokens/s", "tokens_per_s", ".1f"), ("speedup vs hf", "speedup", ".2f"),
               *([("vs llamacpp", "speedup_vs_llamacpp", ".2f")] if llama else []), ("tau", "tau", ".2f"),
               ("exact match", "exact_match", ".2f"), *([("agrees with hf", "agreement_with_hf", ".2f")] if llama else []),
               ("new tokens", "new_tokens", "d"), ("mean tree", "mean_tree_size", ".1f"),
               ("plain steps (guard)", _guard, "s"), ("accept by depth", _depths, None)]
    text = table(columns, report["methods"])
    flags = (report["config"].get("llamacpp") or {}).get("verdict")
    if flags:
        text += f"\n\nllama.cpp: {flags}; command: `{report['config']['llamacpp']['command']}`"
    return text


def speed_and_tau(ax_speed, ax_tau, methods: dict[str, dict], speed_key: str, title: str) -> None:
    """The two panels every bench plot starts with: a speed bar per method (speedup labels), tau per method."""
    names = list(methods)
    values = [methods[n][speed_key] or 0.0 for n in names]
    ax_speed.bar(names, values, color="tab:blue")
    ax_speed.set_title(title)
    if speed_key == "speedup":
        ax_speed.axhline(1.0, color="grey", lw=0.8)
    else:
        for i, n in enumerate(names):
            if methods[n].get("speedup") is not None:
                ax_speed.text(i, values[i], f"{methods[n]['speedup']:.2f}x", ha="center", va="bottom", fontsize=8)
    ax_tau.bar(names, [methods[n]["tau"] or 0.0 for n in names], color="tab:orange")
    ax_tau.set_ylabel("tau (tokens / verify forward)")
    ax_tau.set_title("acceptance")
    for ax in (ax_speed, ax_tau):
        ax.tick_params(axis="x", rotation=30)


def write_plot(report: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(report["methods"])
    cfg = report["config"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    speed_and_tau(axes[0], axes[1], report["methods"], "tokens_per_s", "throughput (same run, interleaved)")
    axes[0].set_ylabel("tokens / s")
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
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
