"""What the test-bed benchmarks (``testbed_edit.py``, ``testbed_inversion.py``, ``testbed_style_transfer.py``)
write beside their resumable CSV rows (``stylediffusion.files.append_csv_rows``): the markdown summary and
the sheet of sample strips."""
from __future__ import annotations

from pathlib import Path

from PIL import Image

from stylediffusion.files import atomic_write_text
from stylediffusion.image_io import save_atomic


def write_summary_table(outdir: Path, lines: list[str]) -> None:
    """``outdir/summary.md`` (written atomically) from the markdown ``lines``, and the same on stdout."""
    text = "\n".join(lines)
    atomic_write_text(outdir / "summary.md", text + "\n")
    print(text)


def save_sample_sheet(strips: list[Image.Image], path: Path) -> None:
    """The image ``strips`` one under the other, left-aligned on white, as one picture at ``path``."""
    sheet = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    y = 0
    for s in strips:
        sheet.paste(s, (0, y))
        y += s.height
    save_atomic(sheet, path)
