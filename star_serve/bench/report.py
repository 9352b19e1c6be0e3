"""Writing benchmark results: JSON for machines, a Markdown table for the README, a PNG plot for people."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_report(
    out_dir: Path, name: str, results: dict[str, Any], table: str, draw: Callable[[Any], None] | None
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    written[0].write_text(json.dumps(results, indent=2) + "\n")
    written[1].write_text(table)
    if draw is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:  # plotting is optional: pip install 'star-serve[bench]'
            return written
        fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
        draw(ax)
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png")
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    return written
