"""Parameter counts per part and visual tokens per frame, computed on the meta device."""

from __future__ import annotations

from typing import Any

import torch

from kangaroo.modules.builder import KangarooConfig, build_kangaroo
from kangaroo.modules.model import KangarooModel


def model_summary(model: KangarooModel) -> dict[str, Any]:
    """``{"parts": {name: {"params", "trainable"}}, "total", "trainable", "tokens_per_frame"}``."""
    parts = {}
    for name, part in model.parts().items():
        params = list(part.parameters()) if part is not None else []
        parts[name] = {
            "params": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }
    return {
        "parts": parts,
        "total": sum(p["params"] for p in parts.values()),
        "trainable": sum(p["trainable"] for p in parts.values()),
        "tokens_per_frame": model.tokens_per_frame,
    }


def summarize_config(config: KangarooConfig) -> dict[str, Any]:
    """Builds the model on the meta device (no weights, no memory) and summarises it."""
    with torch.device("meta"):
        model = build_kangaroo(config, load_weights=False)
    return model_summary(model)


def format_summary(summary: dict[str, Any]) -> str:
    rows = [("part", "parameters", "trainable", "frozen")]
    for name, counts in summary["parts"].items():
        rows.append((name, _human(counts["params"]), _human(counts["trainable"]),
                     _human(counts["params"] - counts["trainable"])))
    rows.append(("total", _human(summary["total"]), _human(summary["trainable"]),
                 _human(summary["total"] - summary["trainable"])))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append(f"visual tokens per frame: {summary['tokens_per_frame']}")
    return "\n".join(lines)


def _human(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
