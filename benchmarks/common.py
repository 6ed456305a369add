"""Helpers shared by the benchmarks: percentiles, the run's context, and results written as Markdown + CSV.

Results go to benchmarks/results/NAME.md (every table, with the run's context) and NAME.csv (the
first table; later tables to NAME-SLUG.csv). A bar chart NAME.png is drawn only when matplotlib is
importable; it is not a dependency.
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"

Cell = str | int | float


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Cell]]

    def markdown(self) -> str:
        lines = [
            "| " + " | ".join(self.columns) + " |",
            "|" + "|".join("---" for _ in self.columns) + "|",
        ]
        lines += ["| " + " | ".join(format_cell(c) for c in row) + " |" for row in self.rows]
        return f"### {self.title}\n\n" + "\n".join(lines) + "\n"


def format_cell(value: Cell) -> str:
    if isinstance(value, float):
        digits = 0 if abs(value) >= 1000 else 1 if abs(value) >= 10 else 2
        return f"{value:.{digits}f}"
    return str(value)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile: the smallest value with at least `fraction` of them at or below it."""
    if not values:
        raise ValueError("percentile of no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """utime + stime of process `pid` (all its threads) from /proc/PID/stat; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def steal_seconds() -> float:
    """CPU time this machine's hypervisor gave to others while its CPUs wanted to run (steal, all CPUs)."""
    with open("/proc/stat") as f:
        fields = f.readline().split()  # cpu user nice system idle iowait irq softirq steal ...
    return int(fields[8]) / CLOCK_TICKS


def met(value: float, target: float) -> str:
    return "met" if value <= target else "missed"


def machine_context() -> str:
    """One line that says where and when the numbers were taken; a high load average means noisy numbers."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{now}; Linux {platform.release()}; {os.cpu_count()} CPUs; load average {load}; Python {platform.python_version()}"


def write_results(name: str, heading: str, notes: Sequence[str], tables: Sequence[Table], results_dir: Path = RESULTS_DIR) -> list[Path]:
    """Write NAME.md (heading, notes, all tables) and one CSV per table; return the paths written."""
    results_dir.mkdir(parents=True, exist_ok=True)
    markdown = results_dir / f"{name}.md"
    body = [f"## {heading}\n", *(f"- {note}" for note in notes), ""]
    body += [table.markdown() for table in tables]
    markdown.write_text("\n".join(body))
    written = [markdown]
    for index, table in enumerate(tables):
        suffix = "" if index == 0 else "-" + re.sub(r"[^a-z0-9]+", "-", table.title.lower()).strip("-")
        path = results_dir / f"{name}{suffix}.csv"
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(table.columns)
            writer.writerows(table.rows)
        written.append(path)
    return written


def plot_bars(name: str, title: str, labels: Sequence[str], series: dict[str, Sequence[float]], results_dir: Path = RESULTS_DIR) -> Path | None:
    """Draw grouped bars (one panel per series) to NAME.png if matplotlib is installed; else return None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, axes = plt.subplots(1, len(series), figsize=(5 * len(series), 4), squeeze=False)
    for axis, (ylabel, values) in zip(axes[0], series.items()):
        axis.bar(labels, values)
        axis.set_ylabel(ylabel)
        axis.tick_params(axis="x", labelrotation=30)  # long method names must not run into each other
        for label in axis.get_xticklabels():
            label.set_horizontalalignment("right")
    figure.suptitle(title)
    figure.tight_layout()
    path = results_dir / f"{name}.png"
    figure.savefig(path)
    plt.close(figure)
    return path
