"""Summary tables (markdown + CSV) and metric box plots from a benchmark's per-image CSV."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..files import atomic_write, atomic_write_text
from .sharding import read_rows, write_csv_atomic

METRICS = ("structure_distance", "psnr", "lpips", "mse", "ssim", "clip_whole", "clip_edited", "ns_lpips")
NA = "n/a"

# (CSV column, table header, scale) in PIE-Bench's column order
TABLE = (
    ("structure_distance", "Structure ×10³ ↓", 1e3),
    ("psnr", "PSNR ↑", 1.0),
    ("lpips", "LPIPS ×10³ ↓", 1e3),
    ("mse", "MSE ×10⁴ ↓", 1e4),
    ("ssim", "SSIM ×10² ↑", 1e2),
    ("clip_whole", "CLIP whole ↑", 1.0),
    ("clip_edited", "CLIP edited ↑", 1.0),
)
SUMMARY_COLUMNS = ("method", "editing_type", "n", "structure_distance_x1e3", "psnr", "lpips_x1e3", "mse_x1e4",
                   "ssim_x1e2", "clip_whole", "clip_edited", "seconds_mean")

EDIT_TYPE_NAMES = {
    "0": "random", "1": "change object", "2": "add object", "3": "delete object",
    "4": "change attribute (content)", "5": "change attribute (pose)", "6": "change attribute (color)",
    "7": "change attribute (material)", "8": "change background", "9": "change style",
}


def number(cell) -> float | None:
    """A CSV cell as a float, or None for n/a / empty / unparsable."""
    try:
        return float(cell)
    except (TypeError, ValueError):
        return None


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _scaled_column(name: str, scale: float) -> str:
    return name if scale == 1.0 else f"{name}_x1e{round(math.log10(scale))}"


def summarize(rows: Sequence[dict]) -> list[dict]:
    """Per method: one row per edit type present, then ``all``. Means skip n/a cells; a column whose
    cells are all n/a stays n/a (a table must never show a made-up number)."""
    out = []
    methods = sorted({r["method"] for r in rows})
    types = sorted({r["editing_type_id"] for r in rows}, key=lambda t: (len(t), t))
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        for et in [*types, "all"]:
            sel = mine if et == "all" else [r for r in mine if r["editing_type_id"] == et]
            if not sel:
                continue
            row = {"method": method, "editing_type": et, "n": len(sel)}
            for col, _, scale in TABLE:
                m = _mean([v for v in (number(r.get(col)) for r in sel) if v is not None])
                row[_scaled_column(col, scale)] = NA if m is None else f"{m * scale:.4f}"
            s = _mean([v for v in (number(r.get("seconds")) for r in sel) if v is not None])
            row["seconds_mean"] = NA if s is None else f"{s:.2f}"
            out.append(row)
    return out


def _fmt(cell: str) -> str:
    v = number(cell)
    return NA if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def markdown_table(summary: Sequence[dict], editing_type: str) -> str:
    head = ["Method", "n", *[h for _, h, _ in TABLE], "s / image"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in summary:
        if row["editing_type"] != editing_type:
            continue
        cells = [row["method"], str(row["n"]), *[_fmt(row[_scaled_column(c, s)]) for c, _, s in TABLE],
                 _fmt(row["seconds_mean"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(summary: Sequence[dict], notes: Sequence[str] = ()) -> str:
    parts = ["# PIE-Bench results", "",
             "Means over images. Structure distance (DINO ViT-B/8 key self-similarity) on the whole image; "
             "PSNR / LPIPS / MSE / SSIM on the background (1 − edit mask, PIE-Bench's multiply-by-mask "
             "convention); CLIP similarity of the target prompt with the whole edited image and with its "
             "masked edit region. `n/a` = not computable in this run (missing backbone or library).", "",
             "## All edit types", "", markdown_table(summary, "all"), ""]
    types = sorted({r["editing_type"] for r in summary if r["editing_type"] != "all"}, key=lambda t: (len(t), t))
    for et in types:
        parts += [f"## Edit type {et}: {EDIT_TYPE_NAMES.get(et, 'unknown')}", "", markdown_table(summary, et), ""]
    if notes:
        parts += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(parts)


def boxplots(rows: Sequence[dict], path: Path) -> Path:
    """Box plots per method of structure distance, PSNR and LPIPS (matplotlib Agg, no pyplot)."""
    methods = sorted({r["method"] for r in rows})
    panels = (("structure_distance", "Structure distance ×10³ ↓", 1e3), ("psnr", "PSNR (background) ↑", 1.0),
              ("lpips", "LPIPS (background) ×10³ ↓", 1e3))
    fig = Figure(figsize=(4.2 * len(panels), 0.5 * max(len(methods), 1) + 3.2))
    FigureCanvasAgg(fig)
    for k, (col, title, scale) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        data = []
        for m in methods:
            vals = [number(r.get(col)) for r in rows if r["method"] == m]
            data.append([v * scale for v in vals if v is not None and math.isfinite(v)])
        ax.set_title(title, fontsize=10)
        if any(data):
            boxes = [d if d else [float("nan")] for d in data]
            try:  # matplotlib >= 3.10 spells it orientation=; vert= is deprecated there
                ax.boxplot(boxes, orientation="horizontal", showmeans=True)
            except TypeError:
                ax.boxplot(boxes, vert=False, showmeans=True)
            ax.set_yticks(range(1, len(methods) + 1), methods, fontsize=8)
        else:
            ax.text(0.5, 0.5, "n/a in this run", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return Path(path)


def read_reasons(path: Path) -> dict:
    """``metrics_unavailable.json``: ``{method: {metric: why it is n/a}}`` (empty if absent)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}


def write_reports(outdir: Path, rows: Sequence[dict] | None = None, notes: Sequence[str] | None = None) -> list[Path]:
    """``summary.md``, ``summary.csv`` and ``metrics_boxplots.png`` next to ``results.csv``; the notes
    default to the reasons recorded in ``metrics_unavailable.json``."""
    outdir = Path(outdir)
    rows = read_rows(outdir / "results.csv") if rows is None else rows
    if notes is None:
        notes = [
            f"{m} / {k}: n/a because {v}"
            for m, per in sorted(read_reasons(outdir / "metrics_unavailable.json").items())
            for k, v in sorted(per.items())
        ]
    summary = summarize(rows)
    write_csv_atomic(outdir / "summary.csv", summary, SUMMARY_COLUMNS)
    md = atomic_write_text(outdir / "summary.md", summary_markdown(summary, notes))
    paths = [outdir / "summary.csv", md]
    if rows:
        paths.append(boxplots(rows, outdir / "metrics_boxplots.png"))
    return paths
