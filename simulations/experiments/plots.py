"""Plot and table helpers shared by the experiments (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def save(fig: plt.Figure, path: Path, title: str | None = None) -> None:
    """Lay out, write the PNG and free the figure (every experiment's plot ends here)."""
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def pct_ci(cell: Mapping) -> str:
    """``"75% [41, 93]"`` from ``{"accuracy", "ci95"}``."""
    lo, hi = cell["ci95"]
    return f"{100 * cell['accuracy']:.0f}% [{100 * lo:.0f}, {100 * hi:.0f}] (n={cell['n']})"


def num(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def accuracy_lines(acc: Mapping[str, Mapping[str, Mapping]], chance: float | None, xlabel: str, title: str,
                   path: Path) -> None:
    """Accuracy per method vs a numeric x, with Wilson error bars and a chance line."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (method, cells) in enumerate(acc.items()):
        xs = [float(x) for x in cells]
        ys = [c["accuracy"] for c in cells.values()]
        err = [[y - c["ci95"][0] for y, c in zip(ys, cells.values(), strict=True)],
               [c["ci95"][1] - y for y, c in zip(ys, cells.values(), strict=True)]]
        jitter = (i - len(acc) / 2) * 0.004 * (max(xs) - min(xs) if len(xs) > 1 else 1)
        ax.errorbar([x + jitter for x in xs], ys, yerr=err, marker="o", capsize=3, label=method)
    if chance is not None:
        ax.axhline(chance, color="grey", ls="--", label="chance")
    ax.set(xlabel=xlabel, ylabel="selection accuracy", ylim=(-0.05, 1.05), title=title)
    ax.legend(fontsize=7, ncol=2)
    save(fig, path)


def grouped_bars(groups: Sequence[str], series: Mapping[str, Sequence[float]], ylabel: str, title: str, path: Path,
                 log: bool = False) -> None:
    """One bar per (group, series)."""
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(groups) * max(1, len(series)) / 2), 4.2))
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        ax.bar([g + (i - (len(series) - 1) / 2) * width for g in range(len(groups))], values, width, label=name)
    ax.set_xticks(range(len(groups)), groups, rotation=15)
    ax.set(ylabel=ylabel, title=title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    save(fig, path)
