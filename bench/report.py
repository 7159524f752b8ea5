"""The benchmark's reports: the per-row table, the per-op summary and the plot (GB/s of ours,
PyTorch's and the peer's against the copy bandwidth measured in the same run)."""
from __future__ import annotations

import math
from pathlib import Path


def short_label(r: dict) -> str:
    bag = f" {r['bag']}" if r.get("bag") else ""
    return (f"{r['case']} V={r['V']:.3g} D={r['D']} N={r['N']} {r['dtype']} {r['index_dtype']} "
            f"{r['distribution']}{bag}")


def has_peer(rows: list[dict]) -> bool:
    return any(not math.isnan(r.get("peer_ms", math.nan)) for r in rows)


def format_table(rows: list[dict]) -> str:
    peer = has_peer(rows)
    head = ("| case | op | thr | ours ms | torch ms | speed-up | GB/s ours | GB/s torch "
            "| % copy BW | x floor |" + (" FBGEMM ms | vs FBGEMM |" if peer else ""))
    lines = [head, "|" + "---|" * (12 if peer else 10)]
    for r in rows:
        extra = ""
        if peer:
            extra = (" - | - |" if math.isnan(r["peer_ms"])
                     else f" {r['peer_ms']:.3f} | {r['vs_peer']:.2f}x |")
        lines.append(
            f"| {short_label(r)} | {r['op']} | {r['threads']} | {r['ours_ms']:.3f} | "
            f"{r['torch_ms']:.3f} | {r['speedup']:.2f}x | {r['ours_GBps']:.1f} | "
            f"{r['torch_GBps']:.1f} | {r['ours_pct_copy']:.0f}% | {r['ours_x_floor']:.2f} |"
            + extra)
    return "\n".join(lines)


def geomean(values) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summary(rows: list[dict]) -> str:
    peer = has_peer(rows)
    lines = ["| op | threads | geomean speed-up | min speed-up | rows |"
             + (" geomean vs FBGEMM | min vs FBGEMM | rows with FBGEMM |" if peer else ""),
             "|---|---|---|---|---|" + ("---|---|---|" if peer else "")]
    for t in sorted({r["threads"] for r in rows}):
        for op in dict.fromkeys(r["op"] for r in rows):
            sel = [r for r in rows if r["op"] == op and r["threads"] == t]
            if not sel:
                continue
            speedups = [r["speedup"] for r in sel]
            line = f"| {op} | {t} | {geomean(speedups):.2f}x | {min(speedups):.2f}x | {len(sel)} |"
            if peer:
                vs = [r["vs_peer"] for r in sel if not math.isnan(r["vs_peer"])]
                line += (f" {geomean(vs):.2f}x | {min(vs):.2f}x | {len(vs)} |" if vs
                         else " - | - | 0 |")
            lines.append(line)
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    threads = max(r["threads"] for r in rows)
    sel = [r for r in rows if r["threads"] == threads]
    labels = [f"{short_label(r)}\n{r['op']}" for r in sel]
    fig, ax = plt.subplots(figsize=(11, 0.55 * len(sel) + 1.5))
    y = range(len(sel))
    ax.barh([i + 0.2 for i in y], [r["ours_GBps"] for r in sel], height=0.4, label="embedding_ext")
    ax.barh([i - 0.2 for i in y], [r["torch_GBps"] for r in sel], height=0.4, label="PyTorch")
    if has_peer(sel):
        ax.scatter([r["bytes"] / r["peer_ms"] / 1e6 for r in sel], list(y), marker="D",
                   color="tab:green", zorder=3, label="FBGEMM")
    ax.axvline(sel[0]["copy_GBps"], color="k", linestyle="--",
               label=f"copy bandwidth {sel[0]['copy_GBps']:.0f} GB/s")
    finish_plot(fig, ax, labels, "GB/s (bytes the operation must move / median time)", title,
                path)


def finish_plot(fig, ax, labels: list[str], xlabel: str, title: str, path: Path) -> None:
    """Labels, title and legend of a horizontal bar plot (one bar group per row, top down),
    written to `path`."""
    import matplotlib.pyplot as plt
    ax.set_yticks(list(range(len(labels))), labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
