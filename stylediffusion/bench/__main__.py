"""``python -m stylediffusion.bench {pie,reproduce,report} ...`` (also under ``accelerate launch -m``)."""
from __future__ import annotations

import sys
from pathlib import Path

from ..errors import UserError, exit_code

USAGE = """usage: python -m stylediffusion.bench {pie,reproduce,report} [options]

  pie        run an inversion x edit method over PIE-Bench and score it (--help for options)
  reproduce  labelled input | reconstruction | edit grids for rows of the data index, and a contact sheet
  report     rewrite summary.md, summary.csv and metrics_boxplots.png from OUT/results.csv

Multi-process: accelerate launch --num_processes N -m stylediffusion.bench pie ... (see docs/benchmarks.md)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]

    def body() -> int:
        if command == "pie":
            from .pie import main as pie_main

            pie_main(rest)
        elif command == "reproduce":
            from .reproduce import main as reproduce_main

            reproduce_main(rest)
        elif command == "report":
            from .report import write_reports

            if len(rest) != 1 or rest[0].startswith("-"):
                print("usage: python -m stylediffusion.bench report OUTDIR", file=sys.stderr)
                return 2
            if not (Path(rest[0]) / "results.csv").is_file():
                raise UserError(f"'{rest[0]}' holds no results.csv: pass the --outdir of a 'pie' run.")
            for path in write_reports(Path(rest[0])):
                print(f"wrote {path}")
        else:
            print(f"unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
            return 2
        return 0

    return exit_code(body, "interrupted: finished items are kept; rerun the same command to resume.")

if __name__ == "__main__":
    sys.exit(main())
