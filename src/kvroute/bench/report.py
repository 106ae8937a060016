"""Benchmark reporting: a table on stdout and a JSON file under bench-results/."""

from __future__ import annotations

import contextlib
import json
import multiprocessing.process
import platform
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_OUT_DIR", "bar_chart", "print_table", "save_json", "stop_child"]

DEFAULT_OUT_DIR = Path("bench-results")


def print_table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    """Print a table with rich when it is installed (the `bench` extra), plain text otherwise."""
    cells = [[_fmt(v) for v in row] for row in rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
        print(f"\n{title}")
        print("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
        for r in cells:
            print("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))
        return
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right")
    for r in cells:
        table.add_row(*r)
    console = Console()
    if not console.is_terminal:  # a log or a pipe: no 80-column squeeze of wide tables
        console = Console(width=200)
    console.print(table)


def save_json(name: str, data: dict[str, Any], out_dir: Path = DEFAULT_OUT_DIR) -> Path:
    """Write `data` (plus host facts) to out_dir/name.json and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    record = {
        "name": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": {"python": platform.python_version(), "machine": platform.machine()},
        **data,
    }
    path.write_text(json.dumps(record, indent=2, sort_keys=False) + "\n")
    return path


def bar_chart(
    path: Path, title: str, labels: Sequence[str], panels: Sequence[tuple[str, Sequence[float]]]
) -> Path | None:
    """One bar per label in each (panel title, values) panel, saved as a PNG at `path`; None
    (and a line saying so) without matplotlib (the `bench` extra)."""
    try:
        import matplotlib
    except ImportError:
        print("no chart: matplotlib is not installed (pip install 'kvroute[bench]')")
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 4), squeeze=False)
    for ax, (panel, values) in zip(axes[0], panels, strict=True):
        ax.bar(list(labels), list(values), color="#2a9d8f")
        ax.set_ylim(bottom=0, top=None if any(values) else 1)  # all zeros: a plain 0..1 axis
        ax.set_title(panel)
        ax.tick_params(axis="x", labelrotation=20)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}")
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if value >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stop_child(conn: Connection, proc: multiprocessing.process.BaseProcess) -> None:
    """Ask a benchmark's child process (a publisher) to stop over its pipe; terminate it if it
    does not within 10 s."""
    with contextlib.suppress(OSError):  # BrokenPipeError included
        conn.send("stop")
    proc.join(10)
    if proc.is_alive():
        proc.terminate()
        proc.join(5)
    conn.close()
